"""Scaling across processes (torchrun, DDP over gloo on the CPU or NCCL on GPUs): SFT tokens/s and
PPO samples/s at 1 and 2 processes, and what DDP costs at an equal number of threads.

    .venv/bin/python bench/scaling.py [--quick] [--device cpu|cuda] [--name NAME]

Each configuration runs in fresh processes (`torch.distributed.run`), on the bench's model shape
(GPT-2, 4 layers x 256 on the CPU; 12 x 768 with --device cuda) and the same global batch:

- SFT: `rlhf.algos.sft.train_lm` on random token sequences, 16 sequences of 128 tokens per step;
  tokens/s of whole optimizer steps after warm-up.
- PPO: `PPOTrainer` (each rank samples and scores its share of the step's rollouts, then the
  update), 16 rollouts of 32 + 48 tokens per step, 1 PPO epoch in minibatches of 8; rollouts/s of
  whole steps after warm-up.

CPU configurations: 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread (the
last two use the same cores: their ratio is DDP's overhead against intra-op threads).
GPU (--device cuda): 1 GPU against every GPU of the machine, one process each.
Writes bench/results/scaling-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (ROOT, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import ModelShape, machine_info, thread_env  # noqa: E402

SEQ_TOKENS = 128
BATCH = 16  # global: sequences (SFT) or rollouts (PPO) per step, whatever the number of processes
PROMPT_TOKENS, RESPONSE_TOKENS = 32, 48


def shape_for(device: str, quick: bool) -> ModelShape:
    if quick:
        return ModelShape(n_layer=1, n_embd=64, n_head=2, vocab_size=512, n_positions=128)
    if device == "cuda":
        return ModelShape(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=128)
    return ModelShape()


# -- the worker (one rank) ---------------------------------------------------------------------------


def worker(args) -> None:
    import torch

    from rlhf import distributed
    from rlhf.models import TinyLMConfig, build_tiny_lm

    torch.set_num_threads(args.threads)
    world = distributed.setup(args.device)
    shape = ModelShape(**json.loads(args.shape))
    cfg = TinyLMConfig(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head, n_positions=shape.n_positions,
                       vocab_size=shape.vocab_size)
    steps = args.warmup + args.measure
    if args.part == "sft":
        from rlhf.algos.sft import SFTConfig, train_lm

        model = build_tiny_lm(cfg, seed=0).to(world.device)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, shape.vocab_size, (BATCH * steps, SEQ_TOKENS), generator=g)
        ones = torch.ones_like(ids)
        hist = train_lm(world.wrap(model, "ddp"), ids, ones, ones,
                        SFTConfig(max_steps=steps, batch_size=BATCH, lr=1e-4, warmup_steps=1), world=world)
        rates = [h["tokens_per_second"] for h in hist[args.warmup:]]
        unit = "tokens/s"
    else:
        from rlhf.algos.ppo import PPOConfig, PPOTrainer
        from rlhf.generation import SamplingParams
        from rlhf.models import train_tokenizer

        words = "the movie was good great fun and the best love of a film story bad dull but it is".split()
        texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(200)]
        tok = train_tokenizer(texts, vocab_size=shape.vocab_size)
        cfg.vocab_size = len(tok)
        policy = build_tiny_lm(cfg, seed=0).to(world.device)
        ppo = PPOConfig(batch_size=BATCH, mini_batch_size=8, ppo_epochs=1, max_prompt_tokens=PROMPT_TOKENS,
                        sampling=SamplingParams(max_new_tokens=RESPONSE_TOKENS, min_new_tokens=RESPONSE_TOKENS),
                        kl_coef=0.05, adaptive_kl=False)
        trainer = PPOTrainer(policy, tok, lambda ps, rs: torch.tensor([len(r) / 100.0 for r in rs]), ppo, world=world)
        prompts = [texts[i][: 4 * PROMPT_TOKENS] for i in range(BATCH)]
        rates = []
        for step in range(steps):
            world.barrier()
            t0 = time.perf_counter()
            share = world.share(prompts)
            trainer.step_on_rollout(share, trainer.generate(share), own_rollout=True)
            world.barrier()
            if step >= args.warmup:
                rates.append(BATCH / (time.perf_counter() - t0))
        unit = "rollouts/s"
    if world.main:
        Path(args.out).write_text(json.dumps({"rates": rates, "unit": unit}))
    distributed.shutdown()


# -- the driver -----------------------------------------------------------------------------------


def run_config(part: str, procs: int, threads: int, device: str, shape: ModelShape, warmup: int, measure: int,
               out: Path) -> dict:
    env = thread_env(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           str(Path(__file__)), "--worker", "--part", part, "--threads", str(threads), "--device", device,
           "--shape", json.dumps(shape.__dict__), "--warmup", str(warmup), "--measure", str(measure), "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{part} with {procs} x {threads} failed:\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    return {"part": part, "processes": procs, "threads_per_process": threads, "unit": res["unit"],
            "median": statistics.median(res["rates"]), "min": min(res["rates"]), "max": max(res["rates"]),
            "steps": len(res["rates"]), "wall_seconds": time.perf_counter() - t0}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="sft")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", default="{}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--measure", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="a tiny model and few steps (a smoke run)")
    ap.add_argument("--name", default="", help="results name (default: the device, -quick when quick)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile, for the record")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    name = args.name or args.device + ("-quick" if args.quick else "")
    shape = shape_for(args.device, args.quick)
    warmup, measure = (1, 2) if args.quick else (3, 10)
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        configs = [(1, 1), (gpus, 1)] if gpus > 1 else [(1, 1)]
    else:
        configs = [(1, 1), (1, 2), (2, 1)]
    tmp = BENCH / ".cache" / "scaling"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = loadavg()
    rows = []
    for part in ("sft", "ppo"):
        for procs, threads in configs:
            row = run_config(part, procs, threads, args.device, shape, warmup, measure, tmp / f"{part}-{procs}x{threads}.json")
            print(f"{part}: {procs} process(es) x {threads} thread(s): {row['median']:.1f} {row['unit']}", flush=True)
            rows.append(row)
    result = {"machine": {**machine_info(args.device, 2), "loadavg_before": load_before, "loadavg_after": loadavg(),
                          "note": args.note},
              "shape": shape.__dict__, "global_batch": BATCH, "sft_tokens_per_sequence": SEQ_TOKENS,
              "ppo_tokens": [PROMPT_TOKENS, RESPONSE_TOKENS], "warmup_steps": warmup, "measured_steps": measure,
              "rows": rows}
    out = BENCH / "results" / f"scaling-{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def markdown(r: dict) -> str:
    m = r["machine"]
    by = {(x["part"], x["processes"], x["threads_per_process"]): x for x in r["rows"]}
    lines = [f"# Scaling across processes ({m['device']})", "",
             f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']}; load average "
             f"{m['loadavg_before']} before, {m['loadavg_after']} after. {m.get('note', '')}".rstrip(), "",
             f"Model: GPT-2 {r['shape']['n_layer']} layers x {r['shape']['n_embd']}, vocabulary {r['shape']['vocab_size']}. "
             f"Global batch {r['global_batch']} (SFT: sequences of {r['sft_tokens_per_sequence']} tokens; PPO: rollouts of "
             f"{r['ppo_tokens'][0]} + {r['ppo_tokens'][1]} tokens, 1 epoch, minibatches of 8). Median of "
             f"{r['measured_steps']} steps after {r['warmup_steps']} of warm-up (min-max in brackets).", "",
             "| part | processes x threads | throughput | vs 1 x 1 |", "|---|---|---|---|"]
    for x in r["rows"]:
        base = by.get((x["part"], 1, 1))
        lines.append(f"| {x['part']} | {x['processes']} x {x['threads_per_process']} | {x['median']:.1f} {x['unit']} "
                     f"({x['min']:.1f}-{x['max']:.1f}) | {x['median'] / base['median']:.2f}x |")
    for part in ("sft", "ppo"):
        a, b = by.get((part, 1, 2)), by.get((part, 2, 1))
        if a and b:
            lines += ["", f"{part}: 2 processes x 1 thread reach {b['median'] / a['median']:.2f}x of 1 process x 2 threads "
                      "(the same two cores: DDP against intra-op threads)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
