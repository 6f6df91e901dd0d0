"""PPO across processes: 2 gloo ranks, each with its share of the same rollouts, against 1 process
with all of them (tests/algos/ppo_world.py): whitening, the KL, beta and the update agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.distributed import World
from tests.algos import ppo_world
from tests.training import env

pytestmark = pytest.mark.slow


def test_two_ranks_take_the_ppo_steps_of_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        str(Path(ppo_world.__file__)), str(tmp_path / "two")],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    torch.set_num_threads(1)
    one = ppo_world.run(tmp_path / "one", World())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    # the whitening of rows split over two ranks is the whitening of all of them
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(two["whitened"]) == pytest.approx(flat(one["whitened_alone"]), abs=1e-6)
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    # beta moved (the KL is the whole batch's), and the second step's KL is not the first's
    assert one["steps"][0]["kl_coef_next"] != one["steps"][0]["kl_coef"]
    assert one["steps"][1]["kl"] != one["steps"][0]["kl"]
    wa, wb = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "two" / "weights.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k
    assert wa["value_head.summary.weight"].abs().sum() > 0  # the update did something (it starts at 0)
