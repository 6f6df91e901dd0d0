"""rlhf.checkpoint: exact resume. A training process killed with kill -9 at a random step and
resumed with `rlhf train STAGE --resume DIR` ends with the weights of an uninterrupted run, bit for
bit (SFT, RM, PPO; the 2-process case is in test_distributed.py); SIGTERM writes a checkpoint and
stops; a checkpoint is never half written, and a resume refuses what would not be exact."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import pytest
import torch

from rlhf import checkpoint
from rlhf.checkpoint import Checkpoints, Interrupted
from rlhf.config import from_dict
from rlhf.errors import ConfigError
from rlhf.train import JOBS, resume_config, run_local
from tests.training import (assert_equal_weights, losses, make_files, run_train, start_train, wait_for_checkpoint,
                            write_config)

JOBS_CFG = {
    "sft": {"sft": {"max_steps": 24, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "max_length": 32}},
    "rm": {"rm": {"batch_size": 4, "epochs": 8, "lr": 1e-3, "max_length": 32}, "min_comparisons": 2},
    "ppo": {"steps": 12, "ppo": {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "lr": 1e-3,
                                 "sampling": {"max_new_tokens": 6}, "kl_coef": 0.2}},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = make_files(tmp_path_factory.mktemp("ckpt"))
    torch.set_num_threads(1)
    run_local("rm", from_dict(JOBS["rm"], {**JOBS_CFG["rm"], "model": str(d / "base"), "data": str(d / "comparisons.jsonl"),
                                           "output": str(d / "rm"), "rm": {**JOBS_CFG["rm"]["rm"], "epochs": 1}}))
    return d


def job_config(files, stage: str, every: int) -> dict:
    inputs = {"sft": {"model": str(files / "base"), "data": str(files / "demos.jsonl")},
              "rm": {"model": str(files / "base"), "data": str(files / "comparisons.jsonl")},
              "ppo": {"policy": str(files / "base"), "reward_model": str(files / "rm"),
                      "prompts": str(files / "prompts.jsonl")}}[stage]
    return {**JOBS_CFG[stage], **inputs, "checkpoint": {"every_steps": every}}


def uninterrupted(stage: str, cfg: dict, out) -> None:
    torch.set_num_threads(1)  # as the job's process runs (OMP_NUM_THREADS=1)
    run_local(stage, from_dict(JOBS[stage], {**cfg, "output": str(out), "checkpoint": {"every_steps": 0}}))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_kill_9_at_a_random_step_then_resume_gives_the_uninterrupted_weights(files, stage, tmp_path):
    cfg = job_config(files, stage, every=2)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoints"
    proc = start_train(stage, "--config", str(write_config(tmp_path / "job.yaml", cfg)), "--set", f"output={out}",
                       log=tmp_path / "run.log")
    try:
        wait_for_checkpoint(proc, ckpt, random.choice([2, 4, 6]))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    (ckpt / ".tmp-step-99999999").mkdir()  # as a process killed while writing a checkpoint leaves it
    run_train(stage, "--resume", str(ckpt))
    uninterrupted(stage, cfg, tmp_path / "reference")
    assert_equal_weights(tmp_path / "reference", out)
    key = {"sft": "loss", "rm": "loss", "ppo": "kl"}[stage]
    assert losses(tmp_path / "reference", key) == losses(out, key)  # every step's metrics line, once


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_step_and_stops(files, tmp_path, monkeypatch):
    """Preemption: the step finishes, a checkpoint of it is written (however far the next periodic
    one is), the job stops with Interrupted; the resume then ends where an uninterrupted run does."""
    cfg = job_config(files, "sft", every=0)
    job = from_dict(JOBS["sft"], {**cfg, "output": str(tmp_path / "out")})
    torch.set_num_threads(1)
    monkeypatch.setattr(checkpoint, "_PREEMPTED", _SetAtStep(5))
    with pytest.raises(Interrupted) as e:
        run_local("sft", job)
    assert e.value.step == 5 and Checkpoints(tmp_path / "out.checkpoints").meta()["step"] == 5
    monkeypatch.setattr(checkpoint, "_PREEMPTED", _SetAtStep(10**9))
    run_local("sft", resume_config("sft", tmp_path / "out.checkpoints"), resume=True)
    uninterrupted("sft", cfg, tmp_path / "reference")
    assert_equal_weights(tmp_path / "reference", tmp_path / "out")


class _SetAtStep:
    """A preemption flag that is set from the ``step``-th time it is asked (once per step)."""

    def __init__(self, step: int):
        self.step, self.asked = step, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.step


def test_a_resume_refuses_what_would_not_be_exact(files, tmp_path):
    cfg = job_config(files, "sft", every=2)
    cfg["sft"] = {**cfg["sft"], "max_steps": 4}
    torch.set_num_threads(1)
    run_local("sft", from_dict(JOBS["sft"], {**cfg, "output": str(tmp_path / "out")}))
    ckpt = tmp_path / "out.checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["inputs-data.pt", "inputs-model.pt", "latest", "step-00000002",
                                                      "step-00000004"]
    # a new run must not continue an old one by accident
    with pytest.raises(ConfigError, match="holds a checkpoint of an earlier run.*--resume"):
        run_local("sft", from_dict(JOBS["sft"], {**cfg, "output": str(tmp_path / "out2"),
                                                 "checkpoint": {"directory": str(ckpt)}}))
    # another config, another kind, another number of processes
    changed = from_dict(JOBS["sft"], {**cfg, "output": str(tmp_path / "out3"), "checkpoint": {"directory": str(ckpt)},
                                      "sft": {**cfg["sft"], "lr": 5e-4}})
    with pytest.raises(ConfigError, match="another config .*sft differ"):
        run_local("sft", changed, resume=True)
    with pytest.raises(ConfigError, match="of a sft job, not rm"):
        resume_config("rm", ckpt)
    meta = json.loads((ckpt / "step-00000004" / "meta.json").read_text())
    (ckpt / "step-00000004" / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    job = resume_config("sft", ckpt)
    job.output = str(tmp_path / "out4")
    with pytest.raises(ConfigError, match="written by 2 process.*as many"):
        run_local("sft", job, resume=True)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        resume_config("sft", tmp_path / "nothing")
    # the newest complete checkpoint counts: one being written (or killed while written) does not
    shutil.rmtree(ckpt / "step-00000004")
    (ckpt / ".tmp-step-00000006").mkdir()
    assert Checkpoints(ckpt).latest() is None  # latest named a checkpoint that is gone
    (ckpt / "latest").write_text("step-00000002\n")
    assert Checkpoints(ckpt).meta()["step"] == 2


def test_cli_resume_takes_its_config_from_the_checkpoint(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["train", "sft", "--resume", str(tmp_path), "--set", "sft.lr=1"]) == 2
    assert "--resume takes the job's config from its checkpoint" in capsys.readouterr().err
    assert main(["train", "sft"]) == 2
    assert "--config is required (or --resume DIR" in capsys.readouterr().err
