"""Micro-benchmarks behind the library changes suggested in docs/benchmarks.md.

    .venv/bin/python bench/micro.py [--threads N] [--device cpu] [--name NAME]

Each row times one piece of our PPO step the way the library does it now, and the alternative,
on the benchmark's model (the assets built by bench/run.sh, or built here if missing). Writes
bench/results/micro-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from common import BENCH_DIR, REPO_ROOT, Workload, setup_torch, sync, write_json

sys.path.insert(0, str(REPO_ROOT))


def timeit(f, device: str, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``f()``."""
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        f()
        sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    a = ap.parse_args()
    w = Workload.for_device(a.device, False, a.threads)
    torch = setup_torch(w.threads, 0)
    import torch.nn.functional as F

    from assets import assets_key, build_assets
    from rlhf.models import load_causal_lm

    assets = build_assets(w, a.data.resolve(), BENCH_DIR / ".cache" / f"assets-{assets_key(w, a.data.resolve())}")
    dev = w.device
    B, P, R, mb = w.batch_size, w.prompt_tokens, w.response_tokens, w.mini_batch_size
    V = w.shape.vocab_size
    policy = load_causal_lm(assets / "policy").to(dev)
    rows = []

    def row(what, now_s, alt_s, now_desc, alt_desc, per):
        rows.append({"what": what, "now": now_desc, "alternative": alt_desc, "now_seconds": now_s,
                     "alternative_seconds": alt_s, "speedup": now_s / alt_s, "per": per})

    # 1. Sampling from (B, V) probabilities: torch.multinomial vs inverse CDF (same distribution).
    probs = torch.softmax(torch.randn(B, V, device=dev), -1)
    g = torch.Generator(device=dev).manual_seed(0)

    def inv_cdf():
        cdf = probs.cumsum(-1)
        u = torch.rand(B, 1, generator=g, device=dev) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp_(max=V - 1)

    row("sample one token per row (B=16, V=8192)",
        timeit(lambda: torch.multinomial(probs, 1, generator=g), dev, 50),
        timeit(inv_cdf, dev, 50), "torch.multinomial", "cumsum + searchsorted (inverse CDF)", "decode step")

    # 2. Policy forward+backward on a mini-batch: logits at all P+R positions vs the R+1 needed.
    ids = torch.randint(1, V, (mb, P + R), device=dev)
    pos = torch.arange(P + R, device=dev).expand(mb, -1)

    def fb(keep: int):
        def f():
            out = policy(input_ids=ids, position_ids=pos, logits_to_keep=keep)
            lg = out.logits[:, -(R + 1):-1] if keep else out.logits[:, P - 1:-1]
            F.log_softmax(lg.float(), -1).mean().backward()
        return f

    row("policy forward + backward, mini-batch 8 x 80 tokens", timeit(fb(0), dev, 6), timeit(fb(R + 1), dev, 6),
        "LM head over all 80 positions (ppo._forward)", "logits_to_keep=R+1 (49 positions)", "gradient step")

    # 3. Separate critic: a full causal-LM copy (LM head runs, unused) vs the trunk only.
    critic_lm = copy.deepcopy(policy)
    trunk = critic_lm.base_model
    with torch.no_grad():
        row("separate critic forward, mini-batch 8 x 80 tokens",
            timeit(lambda: critic_lm(input_ids=ids, position_ids=pos, output_hidden_states=True), dev, 6),
            timeit(lambda: trunk(input_ids=ids, position_ids=pos), dev, 6),
            "deepcopy(policy) with LM head", "policy.base_model copy (trunk only)", "critic forward")

    # 4. Optimizer step over policy + value head (+ critic in setting a): Adam for-loop vs fused.
    params = [p for p in policy.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt_loop = torch.optim.Adam(params, lr=1e-5, eps=1e-5, foreach=False)
    opt_fused = torch.optim.Adam(params, lr=1e-5, eps=1e-5, fused=True)
    row("Adam step over the policy's 5.3 M parameters", timeit(opt_loop.step, dev, 10), timeit(opt_fused.step, dev, 10),
        "torch.optim.Adam() default on CPU (for-loop)", "Adam(fused=True)", "gradient step")
    row("clip_grad_norm_ over the policy's parameters",
        timeit(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False), dev, 10),
        timeit(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), dev, 10),
        "clip_grad_norm_ default on CPU (per tensor)", "foreach=True", "gradient step")

    # 5. Log-probs and entropy: two log_softmax passes over (8, R, V) vs one.
    logits = torch.randn(mb, R, V, device=dev)
    tok = torch.randint(0, V, (mb, R), device=dev)

    def twice():
        lp = torch.gather(F.log_softmax(logits.float(), -1), -1, tok.unsqueeze(-1))
        logp = F.log_softmax(logits.float(), -1)
        return lp, -(logp.exp() * logp).sum(-1)

    def once():
        logp = F.log_softmax(logits.float(), -1)
        return torch.gather(logp, -1, tok.unsqueeze(-1)), -(logp.exp() * logp).sum(-1)

    row("log-probs + entropy of a mini-batch (8 x 48 x 8192)", timeit(twice, dev, 10), timeit(once, dev, 10),
        "logprobs_of + entropy_from_logits (2 log_softmax)", "one log_softmax shared", "gradient step")

    name = a.name or f"{dev.split(':')[0]}-{w.threads}thread{'s' if w.threads > 1 else ''}"
    out = {"threads": w.threads, "device": dev, "torch": torch.__version__, "rows": rows}
    res_dir = BENCH_DIR / "results"
    res_dir.mkdir(exist_ok=True)
    write_json(res_dir / f"micro-{name}.json", out)
    L = [f"# Micro-benchmarks `{name}` ({dev}, {w.threads} threads, torch {torch.__version__})\n",
         "Median seconds; produced by `bench/micro.py`.\n",
         "| what | now | s | alternative | s | speedup | per |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['what']} | {r['now']} | {r['now_seconds']:.4f} | {r['alternative']} | "
                 f"{r['alternative_seconds']:.4f} | {r['speedup']:.2f}x | {r['per']} |")
    (res_dir / f"micro-{name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
