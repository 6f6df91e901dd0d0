"""Run the whole benchmark suite and write bench/results/<name>.json and <name>.md.

Called by bench/run.sh (which builds both environments first); runs in our environment and starts
one fresh worker process per measurement, alternating the sides (A B C D, then B C D A, ...):

1. PPO samples/s: trl 1.12 PPOTrainer vs our PPOTrainer in three settings, per ppo_epochs config
2. reward-model training pairs/s: trl RewardTrainer vs ours (K-way ranking loss, pairwise loss)
3. rollout generation tokens/s: PPO's two rollout backends (the sampler, the engine's runners) vs transformers generate
4. the machine's matmul peak (at the start and the end) and the MFU of our PPO update / step
5. "learn alike": the same reward model and number of steps on each side, reward first vs last
6. a torch.profiler time breakdown of one PPO step of ours (settings a and b)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    REPO_ROOT,
    ModelShape,
    Workload,
    load_json,
    matmul_params,
    summary,
    thread_env,
    write_json,
)

PPO_SIDES = ["trl", "ours-a", "ours-b", "ours-c", "ours-d"]
RM_SIDES = ["trl", "ours-pairwise", "ours-ranking"]
SIDE_NAMES = {
    "trl": "trl 1.12 PPOTrainer (fp32)",
    "trl-bf16": "trl 1.12 PPOTrainer (bf16 autocast)",
    "ours-a": "ours (a) trl-equivalent maths: separate value model, old log-probs recomputed, fp32",
    "ours-b": "ours (b) defaults: shared value head, rollouts on the engine, fp32",
    "ours-c": "ours (c) = (b) + bf16 autocast",
    "ours-d": "ours (d) = (c) with rollouts on rlhf.generation.sample (the earlier default)",
    "ours-pairwise": "ours, loss=pairwise (16 pairs/step, 2 sequences per pair)",
    "ours-ranking": "ours, loss=ranking (K=4: 3 prompts = 18 pairs/step, 4 sequences per prompt)",
    "trl-rm": "trl 1.12 RewardTrainer (16 pairs/step)",
}
ORDER = ["trl", "trl-bf16", "ours-a", "ours-b", "ours-c", "ours-d", "ours-pairwise", "ours-ranking"]
TARGETS = {"ppo": 2.5, "rm": 2.0, "gen": 2.0, "mfu_update": 0.60}


class Runner:
    """Starts worker processes and collects their results (errors are recorded, not fatal)."""

    def __init__(self, ours_python: str, trl_python: str, threads: int, log_dir: Path, verbose: bool):
        self.py = {"ours": ours_python, "trl": trl_python}
        self.env = thread_env(threads)
        self.log_dir = log_dir
        self.verbose = verbose
        self.errors: list[dict] = []
        self.n = 0

    def __call__(self, env: str, jobs: list[dict]) -> list[dict]:
        self.n += 1
        script = BENCH_DIR / ("worker_ours.py" if env == "ours" else "worker_trl.py")
        with tempfile.TemporaryDirectory() as td:
            jf, of = Path(td) / "jobs.json", Path(td) / "out.json"
            write_json(jf, jobs)
            log = self.log_dir / f"{self.n:03d}-{env}-{jobs[0]['task']}-{jobs[0].get('side', '')}.log"
            t0 = time.perf_counter()
            with open(log, "w") as lf:
                rc = subprocess.call([self.py[env], str(script), str(jf), str(of)], cwd=REPO_ROOT, env=self.env,
                                     stdout=lf, stderr=subprocess.STDOUT)
            out = load_json(of) if of.is_file() else []
        desc = ", ".join(f"{j['task']}:{j.get('side', '')}" for j in jobs)
        print(f"  [{time.perf_counter() - t0:6.1f}s] {env:4s} {desc}" + ("" if rc == 0 else f"  FAILED rc={rc}"),
              flush=True)
        if rc != 0 or len(out) < len(jobs):
            tail = re.sub(r"(/[\w.+-]+)+/([\w.+-]+)", r"<path>/\2", log.read_text()[-3000:])
            self.errors.append({"env": env, "jobs": desc, "rc": rc, "log_tail": tail})
            print(tail, file=sys.stderr)
        return out


def env_of(side: str) -> str:
    return "trl" if side.startswith("trl") else "ours"


def rotated(xs: list, k: int) -> list:
    k %= len(xs)
    return xs[k:] + xs[:k]


# ----------------------------------------------------------------------------------------------
# FLOPs of a PPO step (what is counted is documented in docs/benchmarks.md)
# ----------------------------------------------------------------------------------------------


def ppo_flops(w: Workload, side: str, epochs: int) -> dict:
    """Model FLOPs of the passes each side runs per PPO step.

    Forward = 2 x (matmul weights) x tokens, backward = 2 x forward; the trunk runs over all P+R
    positions, the LM head (d x V) only over the R response positions whose log-probs are used;
    attention adds 4 x n_layer x (P+R) x d per token. Generation: trunk over P + R - 1 tokens, LM
    head over R. Not counted: embeddings, LayerNorms, softmaxes, the optimizer, and the LM head
    over positions whose logits nobody uses (e.g. our separate critic's LM head).
    """
    s: ModelShape = w.shape
    B, P, R = w.batch_size, w.prompt_tokens, w.response_tokens
    T = P + R
    trunk = 2 * matmul_params(s, lm_head=False)  # per token, forward
    head = 2 * s.n_embd * s.vocab_size
    attn = 4 * s.n_layer * T * s.n_embd
    fwd_trunk = B * T * (trunk + attn)
    fwd_policy = fwd_trunk + B * R * head
    gen = B * (P + R - 1) * (trunk + attn) + B * R * head
    separate = side in ("trl", "trl-bf16", "ours-a")
    nograd = fwd_policy + fwd_trunk  # reference log-probs + reward model
    if separate:
        nograd += fwd_trunk  # values from the separate value model
    if side in ("ours-a", "ours-b", "ours-c"):
        # ours-a: old log-probs recomputed (trl takes them from generate's scores); b and c sample
        # on the engine, whose runners return no values: one policy forward gives old values
        nograd += fwd_policy
    update = epochs * 3 * (fwd_policy + (fwd_trunk if separate else 0))
    return {"generate": gen, "nograd_forwards": nograd, "update": update, "step": gen + nograd + update}


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def run_suite(a) -> dict:
    w = Workload.for_device(a.device, a.quick, a.threads)
    if a.repeats:
        w.repeats = a.repeats
    cache = BENCH_DIR / ".cache"
    log_dir = cache / "logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    run = Runner(a.ours_python, a.trl_python, w.threads, log_dir, a.verbose)
    only = set(a.only.split(",")) if a.only else {"ppo", "rm", "gen", "learn", "profile"}
    t_start = time.perf_counter()
    res: dict = {"workload": w.to_dict(), "quick": a.quick, "errors": run.errors}

    # Assets (cached by their inputs) --------------------------------------------------------
    sys.path.insert(0, str(BENCH_DIR))
    from assets import assets_key

    assets = cache / f"assets-{assets_key(w, a.data)}"
    if not (assets / "meta.json").is_file():
        print(f"building the shared models and data ({'quick' if a.quick else 'full'}) ...", flush=True)
        with tempfile.TemporaryDirectory() as td:
            wf = Path(td) / "workload.json"
            write_json(wf, w.to_dict())
            subprocess.check_call([a.ours_python, str(BENCH_DIR / "assets.py"), "--workload", str(wf), "--data",
                                   str(a.data), "--out", str(assets)], cwd=REPO_ROOT, env=thread_env(w.threads))
    meta = load_json(assets / "meta.json")
    res["assets"] = {k: v for k, v in meta.items() if k not in ("lexicon", "workload")}
    base = {"workload": w.to_dict(), "assets": str(assets)}

    # The plan: (where the result goes, environment, job), in the order they run. A full run starts
    # one process per job; --quick runs all of an environment's jobs in one process (seconds).
    plan: list[tuple[tuple, str, dict]] = [(("peak_start",), "ours", {**base, "task": "peak"})]
    sides = PPO_SIDES + (["trl-bf16"] if w.bf16_sides else [])
    if "ppo" in only:
        for epochs in w.ppo_epochs:
            for rep in range(w.repeats):
                for side in rotated(sides, rep):
                    plan.append((("ppo", str(epochs), side), env_of(side),
                                 {**base, "task": "ppo", "side": side, "epochs": epochs, "warmup": w.warmup_steps,
                                  "steps": w.measure_steps, "seed": w.seed + rep}))
    if "rm" in only:
        for rep in range(w.repeats):
            for side in rotated(RM_SIDES, rep):
                plan.append((("rm", side), env_of(side), {**base, "task": "rm", "side": side, "seed": w.seed + rep,
                                                          "warmup": w.rm_warmup_steps, "steps": w.rm_measure_steps}))
    if "gen" in only:  # one process; the sides take turns inside it
        plan.append((("gen",), "ours", {**base, "task": "gen"}))
    if "learn" in only:
        for side in ["trl", "ours-a", "ours-b"]:
            plan.append((("learn", side), env_of(side),
                         {**base, "task": "ppo", "side": side, "epochs": w.ppo_epochs[0], "warmup": 0,
                          "steps": w.learn_steps, "lr": w.learn_lr, "seed": w.seed}))
    if "profile" in only:
        for side in ["ours-a", "ours-b"]:
            plan.append((("profile", side), "ours",
                         {**base, "task": "profile", "side": side, "epochs": w.ppo_epochs[0], "warmup": 1}))
    plan.append((("peak_end",), "ours", {**base, "task": "peak"}))

    if a.quick:
        batches = [[p for p in plan if p[1] == env] for env in ("ours", "trl")]
    else:
        batches = [[p] for p in plan]
    print(f"{len(plan)} measurements in {len(batches)} processes", flush=True)
    for batch in batches:
        if not batch:
            continue
        out = run(batch[0][1], [p[2] for p in batch])
        for (key, _, _), r in zip(batch, out):
            if key[0] in ("ppo", "rm"):
                d = res.setdefault(key[0], {})
                for k in key[1:-1]:
                    d = d.setdefault(k, {})
                d.setdefault(key[-1], []).append(r)
            elif len(key) == 2:
                res.setdefault(key[0], {})[key[1]] = r
            else:
                res[key[0]] = r
    res["suite_seconds"] = time.perf_counter() - t_start
    return res


# ----------------------------------------------------------------------------------------------
# Summaries and the Markdown report
# ----------------------------------------------------------------------------------------------


def _phase_medians(reps: list[dict]) -> dict:
    keys = ("time_generate", "time_ref_value", "time_reward", "time_update")
    out = {}
    for k in keys:
        vals = [s[k] for r in reps for s in r["steps"] if not s["warmup"] and s.get(k) is not None]
        out[k] = summary(vals)["median"] if vals else None
    out["seconds"] = summary([s["seconds"] for r in reps for s in r["steps"] if not s["warmup"]])["median"]
    return out


def summarise(res: dict) -> dict:
    w = Workload.from_dict(res["workload"])
    peaks = [p for p in (res.get("peak_start"), res.get("peak_end")) if p]
    peak32 = max((p["fp32_gflops"] for p in peaks), default=float("nan"))
    peak16 = max((p.get("bf16_gflops") or 0 for p in peaks), default=0) or None
    out: dict = {"peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16, "ppo": {}, "targets": {}}
    for epochs, per in (res.get("ppo") or {}).items():
        trl = summary([r["samples_per_second"] for r in per.get("trl", [])])
        rows = {}
        for side, reps in sorted(per.items(), key=lambda kv: ORDER.index(kv[0])):
            sm = summary([r["samples_per_second"] for r in reps])
            ph = _phase_medians(reps) if reps else {}
            fl = ppo_flops(w, side, int(epochs))
            peak = peak16 if side in ("ours-c", "ours-d", "trl-bf16") and peak16 else peak32
            row = {"samples_per_second": sm, "ratio_vs_trl": sm["median"] / trl["median"] if trl["n"] else None,
                   "phases_median_seconds": ph, "flops": fl}
            if ph.get("time_update"):
                row["mfu_update"] = fl["update"] / ph["time_update"] / (peak32 * 1e9)
                row["mfu_step"] = fl["step"] / ph["seconds"] / (peak32 * 1e9)
                if peak != peak32:
                    row["mfu_update_vs_bf16_peak"] = fl["update"] / ph["time_update"] / (peak * 1e9)
            rows[side] = row
        out["ppo"][epochs] = rows
    if res.get("rm"):
        trl = summary([r["pairs_per_second"] for r in res["rm"].get("trl", [])])
        out["rm"] = {side: {"pairs_per_second": (sm := summary([r["pairs_per_second"] for r in reps])),
                            "ratio_vs_trl": sm["median"] / trl["median"] if trl["n"] else None}
                     for side, reps in sorted(res["rm"].items(), key=lambda kv: ORDER.index(kv[0]))}
    if res.get("gen"):
        tps = res["gen"]["tokens_per_second"]
        hf = summary(tps["hf-generate"])
        out["gen"] = {k: {"tokens_per_second": (sm := summary(v)), "ratio_vs_generate": sm["median"] / hf["median"]}
                      for k, v in tps.items()}
    if res.get("learn"):
        out["learn"] = {}
        for side, r in res["learn"].items():
            if not r:
                continue
            st = r["steps"]
            k = max(1, min(5, len(st) // 3))
            mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
            out["learn"][side] = {
                "steps": len(st), "window": k,
                "reward_first": mean([s["reward"] for s in st[:k]]), "reward_last": mean([s["reward"] for s in st[-k:]]),
                "gold_first": mean([s["gold"] for s in st[:k] if s["gold"] is not None]),
                "gold_last": mean([s["gold"] for s in st[-k:] if s["gold"] is not None]),
                "kl_last": mean([s["kl"] for s in st[-k:] if s["kl"] is not None]),
                "entropy_first": mean([s["entropy"] for s in st[:k] if s.get("entropy") is not None]),
                "entropy_last": mean([s["entropy"] for s in st[-k:] if s.get("entropy") is not None]),
            }
    # Targets
    t = out["targets"]
    for epochs, rows in out["ppo"].items():
        best = max((rows[s]["ratio_vs_trl"] or 0, s) for s in rows if s.startswith("ours"))
        t[f"ppo_{epochs}ep"] = {"target": f">= {TARGETS['ppo']}x trl samples/s", "best": best[1],
                                "value": best[0], "met": best[0] >= TARGETS["ppo"]}
        # fp32 settings against the fp32 peak, the bf16 setting against the bf16 peak
        mfu = max((rows[s].get("mfu_update_vs_bf16_peak", rows[s].get("mfu_update", 0)), s)
                  for s in rows if s.startswith("ours"))
        t[f"mfu_update_{epochs}ep"] = {"target": ">= 60% of the matmul peak (fp32; bf16 for ours-c)", "best": mfu[1],
                                       "value": mfu[0], "met": mfu[0] >= TARGETS["mfu_update"]}
    if out.get("rm"):
        best = max((v["ratio_vs_trl"] or 0, s) for s, v in out["rm"].items() if s.startswith("ours"))
        t["rm"] = {"target": f">= {TARGETS['rm']}x RewardTrainer pairs/s", "best": best[1], "value": best[0],
                   "met": best[0] >= TARGETS["rm"]}
    if out.get("gen"):
        best = max((v["ratio_vs_generate"], s) for s, v in out["gen"].items() if s.startswith("ours"))
        t["gen"] = {"target": f">= {TARGETS['gen']}x generate tokens/s", "best": best[1], "value": best[0],
                    "met": best[0] >= TARGETS["gen"]}
    return out


def _f(x, nd=1):
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def _mm(sm, nd=1):
    return f"{_f(sm['median'], nd)} ({_f(sm['min'], nd)}–{_f(sm['max'], nd)})"


def markdown(res: dict, sm: dict, name: str) -> str:
    w = Workload.from_dict(res["workload"])
    p = res.get("peak_start") or res.get("peak_end") or {}
    mach = p.get("machine", {})
    trl_v = next((r.get("trl_version") for per in (res.get("ppo") or {}).values() for r in per.get("trl", [])), None)
    trl_v = trl_v or next((r.get("trl_version") for r in (res.get("rm") or {}).get("trl", [])), "—")
    s = w.shape
    L = []
    L.append(f"# Benchmark `{name}`{' (quick smoke run: numbers mean nothing)' if res.get('quick') else ''}\n")
    L.append("Produced by `bench/run.sh` (see docs/benchmarks.md). Median (min–max) over "
             f"{w.repeats} fresh processes per side, sides alternated; each process runs "
             f"{w.warmup_steps} warm-up PPO steps, then {w.measure_steps} timed steps.\n")
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    for k, v in [("CPU", mach.get("cpu_model")), ("cores", mach.get("cpu_cores")), ("threads", w.threads),
                 ("device", w.device + (f" ({mach['gpu']})" if mach.get("gpu") else "")),
                 ("CPU has bf16 instructions", mach.get("cpu_bf16")),
                 ("torch", mach.get("torch")), ("transformers", mach.get("transformers")), ("trl", trl_v),
                 ("python", mach.get("python")),
                 ("fp32 matmul peak (2048³, start / end)", " / ".join(
                     _f(x.get("fp32_gflops")) for x in (res.get("peak_start") or {}, res.get("peak_end") or {})) + " GFLOP/s"),
                 ("bf16 matmul peak (start / end)", " / ".join(
                     _f(x.get("bf16_gflops")) for x in (res.get("peak_start") or {}, res.get("peak_end") or {})) + " GFLOP/s")]:
        L.append(f"| {k} | {v} |")
    loads = []

    def walk(x):
        if isinstance(x, dict):
            if "loadavg_1min" in x:
                loads.extend(x["loadavg_1min"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk({k: v for k, v in res.items() if k != "summary"})
    if loads:
        L.append(f"| 1-min load average at worker starts/ends (other work on the machine) | "
                 f"{min(loads):.1f}–{max(loads):.1f} (median {sorted(loads)[len(loads) // 2]:.1f}) |")
    meta = res.get("assets", {})
    L.append("\n## Workload\n")
    L.append(f"GPT-2 {s.n_layer} layers, width {s.n_embd}, {s.n_head} heads, vocab {meta.get('vocab_size')}, "
             f"n_positions {s.n_positions}: {meta.get('policy_parameters', 0) / 1e6:.2f} M parameters (policy; the "
             f"reference, value and reward models have the same trunk). Batch {w.batch_size} rollouts, "
             f"{w.prompt_tokens}-token prompts (IMDB review openings), {w.response_tokens}-token responses (EOS never "
             f"sampled), mini-batch {w.mini_batch_size} (so {w.batch_size // w.mini_batch_size} gradient steps per "
             f"epoch on both sides), lr {w.lr}, fixed KL coefficient {w.kl_coef}, {w.device}, {w.threads} threads. "
             f"Reward model: GPT2ForSequenceClassification fitted for {meta.get('reward_fit', {}).get('steps')} steps "
             f"to a fixed rule (held-out correlation {_f(meta.get('reward_fit', {}).get('heldout_corr'), 2)}), loaded "
             "by both sides.\n")
    for epochs, rows in sorted(sm.get("ppo", {}).items(), key=lambda kv: -int(kv[0])):
        L.append(f"## PPO, {epochs} PPO epoch(s): samples/s (rollouts per second of whole steps)\n")
        L.append("| side | samples/s median (min–max) | ours/trl | s/step | generate | ref+value | reward | update "
                 "| MFU update | MFU step |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for side, r in rows.items():
            ph = r["phases_median_seconds"]
            rv = ph.get("time_ref_value")
            L.append(f"| {SIDE_NAMES.get(side, side)} | {_mm(r['samples_per_second'], 2)} | "
                     f"{_f(r['ratio_vs_trl'], 2)}x | {_f(ph.get('seconds'), 3)} | {_f(ph.get('time_generate'), 3)} | "
                     f"{_f(rv, 3)}{'¹' if side.startswith('trl') else ''} | {_f(ph.get('time_reward'), 3)} | "
                     f"{_f(ph.get('time_update'), 3)} | {_f(100 * r.get('mfu_update', float('nan')))}% | "
                     f"{_f(100 * r.get('mfu_step', float('nan')))}% |")
        for side, r in rows.items():
            if "mfu_update_vs_bf16_peak" in r:
                L.append(f"\n{side} against the bf16 matmul peak: update MFU "
                         f"{_f(100 * r['mfu_update_vs_bf16_peak'])}%.")
        L.append("\nPhase columns: median seconds per step. ¹ trl: reference, value and reward forwards together "
                 "(its reward pass is inside them); trl's update column is the rest of the step. MFU: model FLOPs "
                 "(see docs/benchmarks.md) / time / fp32 matmul peak.\n")
    if sm.get("rm"):
        L.append("## Reward-model training: pairs/s\n")
        L.append("| side | pairs/s median (min–max) | ours/trl |\n|---|---|---|")
        for side, r in sm["rm"].items():
            L.append(f"| {SIDE_NAMES.get('trl-rm' if side == 'trl' else side, side)} | {_mm(r['pairs_per_second'])} | "
                     f"{_f(r['ratio_vs_trl'], 2)}x |")
        L.append("")
    if sm.get("gen"):
        L.append(f"## Rollout generation: tokens/s (batch {w.batch_size}, {w.response_tokens} new tokens)\n")
        L.append("| side | tokens/s median (min–max) | ratio |\n|---|---|---|")
        names = {"ours": "rlhf.generation.sample (rollout_backend=sampler)",
                 "ours-engine": "rlhf.inference.rollouts.engine_rollout (rollout_backend=engine)",
                 "hf-generate": "transformers generate(do_sample=True)"}
        for side, r in sm["gen"].items():
            L.append(f"| {names.get(side, side)} | {_mm(r['tokens_per_second'], 0)} | {_f(r['ratio_vs_generate'], 2)}x |")
        L.append("")
    if sm.get("learn"):
        L.append("## Do both sides learn alike?\n")
        any_r = next(iter(sm["learn"].values()))
        L.append(f"Same policy, reward model, prompts pool and {any_r['steps']} PPO steps per side (lr "
                 f"{w.learn_lr}); mean over the first and last {any_r['window']} steps. *reward*: the shared reward "
                 "model's score; *gold*: the rule it was fitted to, computed on the decoded responses.\n")
        L.append("| side | reward first | reward last | gold first | gold last | entropy first | entropy last "
                 "| KL last (nats/seq) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for side, r in sorted(sm["learn"].items(), key=lambda kv: ORDER.index(kv[0])):
            L.append(f"| {SIDE_NAMES.get(side, side)} | {_f(r['reward_first'], 3)} | {_f(r['reward_last'], 3)} | "
                     f"{_f(r['gold_first'], 3)} | {_f(r['gold_last'], 3)} | {_f(r['entropy_first'], 3)} | "
                     f"{_f(r['entropy_last'], 3)} | {_f(r['kl_last'], 2)} |")
        L.append("\nPer-step rewards are in the JSON (`learn.<side>.steps`).")
        L.append("")
    if res.get("profile"):
        L.append("## Where our PPO step's time goes (torch.profiler, one step)\n")
        L.append("Self CPU seconds by phase and kind; *python* is time in a phase that no profiled op accounts "
                 "for (interpreter, module calls, the profiler's own cost).\n")
        sides = [s for s, r in res["profile"].items() if r]
        keys = sorted({k for s in sides for k in res["profile"][s]["breakdown"]})
        L.append("| phase/kind | " + " | ".join(sides) + " |\n|---|" + "---|" * len(sides))
        for k in keys:
            L.append(f"| {k} | " + " | ".join(_f(res["profile"][s]["breakdown"].get(k), 3) for s in sides) + " |")
        L.append("| wall, profiled / unprofiled | " + " | ".join(
            f"{_f(res['profile'][s]['profiled_wall_seconds'], 3)} / {_f(res['profile'][s]['unprofiled_wall_seconds'], 3)}"
            for s in sides) + " |")
        L.append("")
        for s in sides:
            L.append(f"Top ops of {s} (self seconds, calls): " + ", ".join(
                f"`{o['name']}` {o['self_seconds']:.3f} ({o['calls']})" for o in res["profile"][s]["top_ops"][:8]))
            L.append("")
    if sm.get("targets"):
        L.append("## Targets\n")
        L.append("| target | best | value | met |\n|---|---|---|---|")
        for k, t in sm["targets"].items():
            val = f"{100 * t['value']:.1f}%" if k.startswith("mfu") else f"{t['value']:.2f}x"
            L.append(f"| {k}: {t['target']} | {t.get('best', '')} | {val} | {'yes' if t['met'] else 'no'} |")
        L.append("")
    if res.get("errors"):
        L.append("## Errors\n")
        for e in res["errors"]:
            L.append(f"- {e['env']} {e['jobs']}: rc={e['rc']}")
        L.append("")
    L.append(f"Suite wall time: {_f(res.get('suite_seconds', 0) / 60)} min.\n")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description="rlhf benchmark suite (use bench/run.sh, which builds the environments)")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run on a tiny model")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: 12 layers x 768, bf16 sides too)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh processes per side (default 3)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                    help="the shared data directory (holds imdb-sample/texts.csv)")
    ap.add_argument("--name", default=None, help="results name (default: <device>, or <device>-quick)")
    ap.add_argument("--only", default=None, help="comma list of ppo,rm,gen,learn,profile (default all)")
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--trl-python", default=str(BENCH_DIR / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report", type=Path, default=None,
                    help="only re-write the Markdown (and summary) of an existing results JSON")
    a = ap.parse_args()
    if a.report:
        res = load_json(a.report)
        res["summary"] = sm = summarise(res)
        write_json(a.report, res)
        a.report.with_suffix(".md").write_text(markdown(res, sm, a.report.stem))
        print(markdown(res, sm, a.report.stem))
        return
    a.data = a.data.resolve()
    if not (a.data / "imdb-sample" / "texts.csv").is_file():
        ap.error(f"--data: no imdb-sample/texts.csv under {a.data}")
    name = a.name or (a.device.split(":")[0] + ("-quick" if a.quick else ""))
    res = run_suite(a)
    sm = summarise(res)
    res["summary"] = sm
    out_dir = BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    # Results name no machine paths: the assets directory is kept by its name only.
    res_public = json.loads(json.dumps(res).replace(str(REPO_ROOT) + os.sep, "").replace(str(REPO_ROOT), "."))
    write_json(out_dir / f"{name}.json", res_public)
    (out_dir / f"{name}.md").write_text(markdown(res_public, sm, name))
    print(f"\nwrote bench/results/{name}.json and bench/results/{name}.md")
    print(markdown(res_public, sm, name))
    sys.exit(1 if res["errors"] else 0)


if __name__ == "__main__":
    main()
