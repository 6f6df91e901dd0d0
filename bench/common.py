"""What both sides of the benchmark share: settings, threads, timing, statistics, machine facts.

This module imports neither ``rlhf`` nor ``trl``: it runs in our environment (``.venv``) and in
trl's (``bench/.venv-trl``) alike. Everything a side needs to build the same models and data is in
the assets directory written by ``bench/assets.py`` (tokenizer, policy, reward model, prompts,
comparisons), so both sides load identical weights and token ids.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


# ----------------------------------------------------------------------------------------------
# Settings shared by both sides
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """The GPT-2 that policy, reference, value and reward models share."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 8192
    n_positions: int = 128


@dataclass
class Workload:
    """One benchmark configuration: model shape, batch shapes, PPO and RM settings, repeats."""

    device: str = "cpu"
    threads: int = 2
    shape: ModelShape = field(default_factory=ModelShape)
    batch_size: int = 16  # rollouts per PPO step
    mini_batch_size: int = 8  # rollouts per gradient step (both sides: batch/mini x epochs steps)
    prompt_tokens: int = 32
    response_tokens: int = 48  # fixed: EOS is never sampled on either side
    ppo_epochs: tuple[int, ...] = (4, 1)  # one configuration per entry
    lr: float = 1e-5
    kl_coef: float = 0.05  # fixed beta on both sides (trl has no adaptive controller)
    warmup_steps: int = 2  # PPO steps run and discarded before timing
    measure_steps: int = 5  # PPO steps timed per repeat
    repeats: int = 3  # fresh processes per side, alternated A B A B ...
    rm_pairs_per_step: int = 16
    rm_warmup_steps: int = 3
    rm_measure_steps: int = 12
    rm_max_length: int = 128
    gen_batches: int = 4  # timed sampling calls per repeat and side
    reward_fit_steps: int = 120  # steps that fit the fixed reward model to its rule
    learn_steps: int = 30  # PPO steps of the "learn alike" run (per side)
    learn_lr: float = 1e-3  # high, so that a random-init policy moves within learn_steps
    bf16_sides: bool = False  # on CUDA also run trl in bf16
    seed: int = 0

    @classmethod
    def for_device(cls, device: str, quick: bool, threads: int | None) -> "Workload":
        w = cls(device=device)
        if device.startswith("cuda"):
            # A GPU gets a GPT-2-small-sized trunk and runs trl in bf16 as well.
            w.shape = ModelShape(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=128)
            w.bf16_sides = True
            w.reward_fit_steps = 60
        if quick:
            w.shape = ModelShape(n_layer=2, n_embd=64, n_head=2, vocab_size=w.shape.vocab_size, n_positions=128)
            w.batch_size, w.mini_batch_size = 4, 2
            w.prompt_tokens, w.response_tokens = 8, 8
            w.ppo_epochs = (1,)
            w.warmup_steps, w.measure_steps, w.repeats = 1, 1, 1
            w.rm_pairs_per_step, w.rm_warmup_steps, w.rm_measure_steps, w.rm_max_length = 4, 1, 2, 64
            w.gen_batches, w.reward_fit_steps, w.learn_steps = 1, 3, 2
        if threads is not None:
            w.threads = threads
        return w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppo_epochs"] = list(self.ppo_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        d = dict(d)
        d["shape"] = ModelShape(**d["shape"])
        d["ppo_epochs"] = tuple(d["ppo_epochs"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Process set-up, timing and statistics
# ----------------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker process: fixed thread counts, offline, quiet."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_DISABLED="true", PYTHONWARNINGS="ignore")
    return env


def setup_torch(threads: int, seed: int = 0):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def sync(device: str) -> None:
    """Wait for queued GPU work so that wall-clock timings cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def now(device: str = "cpu") -> float:
    sync(device)
    return time.perf_counter()


def summary(xs: list[float]) -> dict:
    """median, min, max (and n) of a list of numbers."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def peak_matmul_gflops(device: str, dtype_name: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n x n matmul (2 n^3 FLOPs), at the current thread count."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    inner = 20 if device.startswith("cuda") else 1
    best = float("inf")
    for _ in range(reps):
        t0 = now(device)
        for _ in range(inner):
            torch.mm(a, b, out=c)
        best = min(best, (now(device) - t0) / inner)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------
# FLOP counts (what we count is written next to each term)
# ----------------------------------------------------------------------------------------------


def matmul_params(shape: ModelShape, lm_head: bool) -> int:
    """Weights that take part in a matmul per token: 12 d^2 per block (QKV 3d^2, proj d^2, MLP 8d^2),
    plus the vocab projection d*V when the LM head runs. Embedding look-ups, LayerNorms and biases
    are not counted (they are not matmuls)."""
    d = shape.n_embd
    return shape.n_layer * 12 * d * d + (d * shape.vocab_size if lm_head else 0)


def attention_flops_per_token(shape: ModelShape, context: int) -> int:
    """Forward FLOPs per token of QK^T and AV over a context of ``context`` keys (2 matmuls, 2 FLOPs per MAC)."""
    return 2 * 2 * shape.n_layer * context * shape.n_embd


def forward_flops(shape: ModelShape, tokens: int, context: int, lm_head: bool) -> float:
    """2 x matmul params x tokens + attention (full-sequence forward over ``context`` positions)."""
    return tokens * (2 * matmul_params(shape, lm_head) + attention_flops_per_token(shape, context))


# ----------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------


def machine_info(device: str, threads: int) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": " avx512_bf16" in flags or " amx_bf16" in flags,
        "threads": threads,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# Assets and the job protocol
# ----------------------------------------------------------------------------------------------


def load_json(path: Path | str):
    return json.loads(Path(path).read_text())


def write_json(path: Path | str, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def gold_share(text: str, lexicon: set[str]) -> float:
    """The fixed rule the reward model was fitted to: the share of the words of ``text`` that are
    among the most common words of the review text (lower-cased, letters only)."""
    words = text.split()
    if not words:
        return 0.0
    return sum(w.lower() in lexicon for w in words) / len(words)


def worker_main(run_job) -> None:
    """Entry point of a worker: ``worker.py JOBS.json OUT.json`` runs each job, writes the results."""
    jobs = load_json(sys.argv[1])
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        res = run_job(job)
        res["job"] = job
        res["wall_seconds"] = time.perf_counter() - t0
        res["loadavg_1min"] = [load0, os.getloadavg()[0]]  # other processes competing for the cores
        results.append(res)
        write_json(sys.argv[2], results)  # after each job, so a crash keeps what finished
