"""What the training tests share: tiny models and data files, and `rlhf train` as a process (alone or
under torchrun with gloo, one thread per rank). Not a test module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from rlhf.data import write_jsonl
from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"review {i}: the film was good and fun, not bad at all" for i in range(40)]
GOOD = [" wonderful and fun", " a great film", " the best story"]
BAD = [" dull and bad", " so much time", " not good"]


def make_files(d: Path, lm: TinyLMConfig | None = None) -> Path:
    """A tiny base policy and the three jobs' data files in ``d``."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = lm or TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64)
    cfg.vocab_size = len(tok)
    save_pretrained(build_tiny_lm(cfg, seed=0), tok, d / "base")
    write_jsonl(d / "demos.jsonl", [{"prompt": f"review {i}: the film was", "response": GOOD[i % 3] * (1 + i % 2)}
                                    for i in range(21)])
    write_jsonl(d / "comparisons.jsonl", [{"prompt": f"review {i}: the film was",
                                           "responses": [BAD[i % 3], GOOD[i % 3], BAD[(i + 1) % 3]], "ranking": [1, 0, 2]}
                                          for i in range(9)])
    write_jsonl(d / "prompts.jsonl", [{"prompt": f"review {i}: the film"} for i in range(16)])
    return d


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    """One thread per process, nothing from a hub, this checkout first on the path."""
    paths = [str(ROOT), str(ROOT / "clients" / "python"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def train_command(stage: str, *args: str, nproc: int = 1) -> list[str]:
    """`rlhf train STAGE ARGS`, under torchrun with ``nproc`` gloo processes when above 1."""
    if nproc == 1:
        return [sys.executable, "-m", "rlhf.cli", "train", stage, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
            "-m", "rlhf.cli", "train", stage, *args]


def run_train(stage: str, *args: str, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(train_command(stage, *args, nproc=nproc), env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"rlhf train {stage} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def start_train(stage: str, *args: str, nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(train_command(stage, *args, nproc=nproc), env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def checkpoint_step(directory: Path) -> int:
    """The step of the newest complete checkpoint in ``directory`` (0: none yet)."""
    f = directory / "latest"
    try:
        return int(f.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def wait_for_checkpoint(proc: subprocess.Popen, directory: Path, step: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while (s := checkpoint_step(directory)) < step:
        assert proc.poll() is None, f"the training process ended ({proc.returncode}) before checkpoint {step}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout} s"
        time.sleep(0.02)
    return s


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        f = task / "children"
        if f.exists():
            out += [int(x) for x in f.read_text().split()]
    return out


def weights(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor a version holds: its safetensors files and a PPO policy's value head."""
    out = {f"{f.name}:{k}": v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    if (d / "value_head.pt").exists():
        out |= {f"value_head:{k}": v for k, v in torch.load(d / "value_head.pt").items()}
    return out


def losses(d: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (d / "metrics.jsonl").read_text().splitlines()]


def assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"not bit for bit equal: {differ[:5]}"
