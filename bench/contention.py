"""Training beside another CPU-bound process: the slowdown of a PPO step, SFT and pre-training.

    .venv/bin/python bench/contention.py                       # the whole run (about 15 minutes on 2 cores)
    .venv/bin/python bench/contention.py --quick               # a smoke run (about a minute)
    .venv/bin/python bench/contention.py --only pretrain --policies fixed,adaptive

Each measurement is a fresh process running one workload at one thread policy, once on an idle
machine and once beside one busy process (``yes``, as many as ``--hogs``, started before the worker
and stopped after it). The policies:

- ``fixed``: today's setting before the thread governor, every CPU as an intra-op thread for the
  whole run (``RLHF_ADAPT_THREADS=0``);
- ``adaptive``: the default, :func:`rlhf.runtime.threads.fit_threads` between steps;
- ``one``: a single intra-op thread, fixed (what a busy core leaves at best on 2 cores).

The workloads are the demo's own shapes (docs/demo-results.md), on a freshly initialised model
(the speed does not depend on what the weights learned): pre-training (GPT-2 4 x 256, vocab 4,096,
32 blocks of 64 tokens, bf16), SFT (the same model, 16 sequences of 128 tokens, fp32) and a PPO
step (32 prompts of up to 24 tokens, 24 new tokens, 4 epochs of mini-batches of 8, bf16, a
separate reference copy; the reward is a cheap rule on the decoded text, so the step is the
policy's work). Reported per workload and policy: the median step time idle and busy, their ratio
(the slowdown), and each policy's idle time against ``fixed`` (what the policy costs an idle
machine). Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_DIR, REPO_ROOT, machine_info, thread_env, write_json

WORKLOADS = ("ppo", "sft", "pretrain")
POLICIES = ("fixed", "adaptive", "one")


# ----------------------------------------------------------------------------------------------
# The worker (a fresh process per measurement)
# ----------------------------------------------------------------------------------------------


def worker(job: dict) -> dict:
    import torch

    from rlhf.models import TinyLMConfig, build_tiny_lm, train_tokenizer
    from rlhf.runtime import threads

    texts = job["texts"]
    torch.manual_seed(0)
    tok = train_tokenizer(texts, 4096 if not job["quick"] else 512)
    shape = TinyLMConfig(n_layer=4, n_embd=256, n_head=4, n_positions=128) if not job["quick"] else \
        TinyLMConfig(n_layer=2, n_embd=64, n_head=2, n_positions=128)
    model = build_tiny_lm(TinyLMConfig(**{**shape.__dict__, "vocab_size": len(tok)}), seed=0)
    stamps: list[float] = []
    counts: list[int] = []
    warmup_s, measure_s = job["warmup_seconds"], job["measure_seconds"]

    def stamp():
        stamps.append(time.perf_counter())
        counts.append(torch.get_num_threads())

    if job["workload"] in ("pretrain", "sft"):
        from rlhf.algos.sft import SFTConfig, pack_texts, train_lm

        length, batch, bf16 = (64, 32, True) if job["workload"] == "pretrain" else (128, 16, False)
        blocks = pack_texts(tok, texts, length)
        ones = torch.ones_like(blocks)

        class Enough(Exception):
            pass

        def on_step(m):
            stamp()
            if stamps[-1] - stamps[0] > warmup_s + measure_s and len(stamps) > job["min_steps"] + 1:
                raise Enough

        cfg = SFTConfig(max_steps=100_000, batch_size=batch, lr=1e-3, warmup_steps=10, max_length=length, bf16=bf16)
        stamp()
        try:
            train_lm(model, blocks, ones, ones, cfg, on_step)
        except Enough:
            pass
    else:
        import copy

        from rlhf.algos.ppo import PPOConfig, PPOTrainer
        from rlhf.generation import SamplingParams

        ref = copy.deepcopy(model).requires_grad_(False)
        cfg = PPOConfig(batch_size=32, mini_batch_size=8, ppo_epochs=4, lr=3e-5, value_lr=3e-4, kl_coef=0.3,
                        kl_target=5.0, vf_coef=0.1, entropy_coef=0.01, max_prompt_tokens=24, bf16=True,
                        sampling=SamplingParams(max_new_tokens=24), rollout_backend=job["rollout_backend"])
        if job["quick"]:
            cfg.batch_size, cfg.mini_batch_size = 8, 4

        def reward_fn(ps, rs):
            return torch.tensor([len(set(r.split())) / 10.0 for r in rs])

        trainer = PPOTrainer(model, tok, reward_fn, cfg, ref_model=ref)
        prompts = [" ".join(t.split()[:8]) for t in texts]
        i = 0
        stamp()
        while stamps[-1] - stamps[0] <= warmup_s + measure_s or len(stamps) <= job["min_steps"] + 1:
            trainer.step(prompts[i: i + cfg.batch_size])
            i += cfg.batch_size
            stamp()
    t0 = stamps[0]
    steps = [{"end": s - t0, "seconds": s - p, "threads": n} for p, s, n in zip(stamps, stamps[1:], counts[1:])]
    timed = [s for s in steps if s["end"] - s["seconds"] >= warmup_s] or steps[-job["min_steps"]:]
    return {"steps": steps, "median_step_seconds": statistics.median(s["seconds"] for s in timed),
            "mean_step_seconds": statistics.fmean(s["seconds"] for s in timed), "timed_steps": len(timed),
            "threads_at_end": counts[-1], "governor_saw_others": getattr(threads._governor, "others", None)}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def env_for(policy: str, cpus: int) -> dict:
    env = thread_env(1 if policy == "one" else cpus)
    env.update(PYTHONPATH=str(REPO_ROOT), RLHF_ADAPT_THREADS="1" if policy == "adaptive" else "0")
    return env


def measure(job: dict, policy: str, hogs: int, cpus: int) -> dict:
    procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(hogs)]
    try:
        with tempfile.TemporaryDirectory() as td:
            jf, out = Path(td) / "job.json", Path(td) / "out.json"
            jf.write_text(json.dumps(job))
            load0 = os.getloadavg()[0]
            subprocess.run([sys.executable, __file__, "--worker", str(jf), str(out)], env=env_for(policy, cpus),
                           check=True, cwd=REPO_ROOT)
            res = json.loads(out.read_text())
            res["loadavg_1min"] = [load0, os.getloadavg()[0]]
            return res
    finally:
        for p in procs:
            p.kill()
            p.wait()


def load_texts(data_dir: Path, n: int) -> list[str]:
    sys.path.insert(0, str(REPO_ROOT))
    from rlhf.judge import load_imdb

    return [r.text for r in load_imdb(data_dir) if not r.is_valid][:n]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Training beside a busy process: {res['name']}", "",
             f"`{res['command']}`", "",
             f"Machine: {m.get('cpu_model', '?')}, {res['cpus']} CPUs for the run; torch {m.get('torch', '?')}. "
             f"Busy: {res['hogs']} `yes` process(es) beside the worker. Median step time after "
             f"{res['warmup_seconds']:.0f} s of warm-up, over at least {res['measure_seconds']:.0f} s "
             f"(PPO: at least {res['min_steps']} steps); rollouts on `{res['rollout_backend']}`.", "",
             "| workload | policy | idle s/step | busy s/step | slowdown (busy / idle) | idle vs fixed | threads at the end (idle / busy) |",
             "|---|---|---|---|---|---|---|"]
    for wl, by_policy in res["results"].items():
        fixed_idle = by_policy.get("fixed", {}).get("idle", {}).get("median_step_seconds")
        for pol, r in by_policy.items():
            idle, busy = r["idle"]["median_step_seconds"], r["busy"]["median_step_seconds"]
            vs = f"{idle / fixed_idle - 1:+.1%}" if fixed_idle else "–"
            lines.append(f"| {wl} | {pol} | {idle:.3f} | {busy:.3f} | **{busy / idle:.2f}x** | {vs} | "
                         f"{r['idle']['threads_at_end']} / {r['busy']['threads_at_end']} |")
    lines += ["", f"Suite wall time: {res['suite_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO_ROOT))
        write_json(Path(sys.argv[3]), worker(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma list of ppo,sft,pretrain")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list of fixed,adaptive,one")
    ap.add_argument("--hogs", type=int, default=1, help="busy processes beside the worker (default 1)")
    ap.add_argument("--rollout-backend", default="engine", choices=["sampler", "engine"])
    ap.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    ap.add_argument("--quick", action="store_true", help="tiny model and seconds-long windows (a smoke run)")
    ap.add_argument("--name", default=None, help="results file name (default cpu-contention[-quick])")
    a = ap.parse_args()
    workloads, policies = a.only.split(","), a.policies.split(",")
    for x in workloads:
        if x not in WORKLOADS:
            ap.error(f"unknown workload {x!r}; choose from {', '.join(WORKLOADS)}")
    for x in policies:
        if x not in POLICIES:
            ap.error(f"unknown policy {x!r}; choose from {', '.join(POLICIES)}")
    cpus = len(os.sched_getaffinity(0))
    warm, meas, min_steps = (1.0, 2.0, 2) if a.quick else (6.0, 20.0, 5)
    name = a.name or ("cpu-contention-quick" if a.quick else "cpu-contention")
    texts = load_texts(Path(a.data), 300 if a.quick else 3000)
    t0 = time.perf_counter()
    res = {"name": name, "command": "bench/contention.py " + " ".join(sys.argv[1:]), "cpus": cpus, "hogs": a.hogs,
           "warmup_seconds": warm, "measure_seconds": meas, "min_steps": min_steps,
           "rollout_backend": a.rollout_backend, "machine": machine_info("cpu", cpus), "results": {}}
    for wl in workloads:
        for pol in policies:
            for cond, hogs in (("idle", 0), ("busy", a.hogs)):
                job = {"workload": wl, "quick": a.quick, "texts": texts, "warmup_seconds": warm,
                       "measure_seconds": meas, "min_steps": min_steps, "rollout_backend": a.rollout_backend}
                r = measure(job, pol, hogs, cpus)
                res["results"].setdefault(wl, {}).setdefault(pol, {})[cond] = r
                print(f"{wl:9s} {pol:9s} {cond:5s} {r['median_step_seconds']:.3f} s/step over {r['timed_steps']} steps, "
                      f"{r['threads_at_end']} threads at the end", flush=True)
    res["suite_seconds"] = time.perf_counter() - t0
    out = BENCH_DIR / "results"
    write_json(out / f"{name}.json", res)
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
