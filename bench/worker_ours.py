"""Our side of the benchmark, run in our environment (.venv): PPO, reward-model training,
rollout generation (ours and transformers' generate), the matmul peak, and a profiled PPO step.

    python bench/worker_ours.py JOBS.json OUT.json

Each job is a dict (see bench/run.py); each result is a dict of measurements.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from common import (
    REPO_ROOT,
    Workload,
    gold_share,
    load_json,
    machine_info,
    now,
    peak_matmul_gflops,
    setup_torch,
    worker_main,
)

sys.path.insert(0, str(REPO_ROOT))  # our library from this checkout (installed editable in .venv anyway)

# Our three PPO settings (the task's (a), (b), (c)).
OUR_SETTINGS = {
    # trl-equivalent maths (rollouts on the library's default backend, the engine)
    "ours-a": dict(value_model="separate", logprobs_from_rollout=False, bf16=False, rollout_backend="engine"),
    "ours-b": dict(value_model="shared", logprobs_from_rollout=True, bf16=False, rollout_backend="engine"),  # our defaults
    "ours-c": dict(value_model="shared", logprobs_from_rollout=True, bf16=True, rollout_backend="engine"),  # (b) + bf16
    # (c) with the earlier default rollout backend, rlhf.generation.sample: the engine's effect, side by side
    "ours-d": dict(value_model="shared", logprobs_from_rollout=True, bf16=True, rollout_backend="sampler"),
}


def _load(job):
    w = Workload.from_dict(job["workload"])
    torch = setup_torch(w.threads, job.get("seed", w.seed))
    return w, torch, Path(job["assets"])


def make_reward_fn(rm, tok, device, bf16: bool, max_length: int):
    """Our text-level reward function over the shared GPT2ForSequenceClassification: tokenize
    prompt + response (left-padded, positions from the mask) and read the score at the last token."""
    import torch

    from rlhf.models import position_ids_from_mask

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        enc = tok([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_length, add_special_tokens=False)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.no_grad(), ctx:
            out = rm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        return out.logits.squeeze(-1).float()

    return reward_fn


def build_ppo(job):
    """A fresh PPOTrainer for ``job['side']`` over the shared assets."""
    w, torch, assets = _load(job)
    from transformers import GPT2ForSequenceClassification

    from rlhf.algos.ppo import PPOConfig, PPOTrainer
    from rlhf.generation import SamplingParams
    from rlhf.models import load_causal_lm, load_tokenizer

    dev = w.device
    tok = load_tokenizer(assets / "policy")
    policy = load_causal_lm(assets / "policy").to(dev)
    ref = load_causal_lm(assets / "policy").to(dev)
    rm = GPT2ForSequenceClassification.from_pretrained(assets / "reward", local_files_only=True).to(dev).eval()
    setting = OUR_SETTINGS[job["side"]]
    cfg = PPOConfig(
        batch_size=w.batch_size, mini_batch_size=w.mini_batch_size, ppo_epochs=job["epochs"],
        lr=job.get("lr", w.lr), kl_coef=w.kl_coef, kl_target=None, adaptive_kl=False,
        sampling=SamplingParams(max_new_tokens=w.response_tokens, min_new_tokens=w.response_tokens),
        max_prompt_tokens=w.prompt_tokens, add_bos=False, seed=job.get("seed", w.seed), **setting)
    reward_fn = make_reward_fn(rm, tok, dev, setting["bf16"], w.shape.n_positions)
    trainer = PPOTrainer(policy, tok, reward_fn, cfg, ref_model=ref)
    if dev.startswith("cuda"):
        # Workaround, in this process only: PPOTrainer keeps a CPU torch.Generator (it also drives
        # randperm on the CPU) and passes it to sample(), whose torch.multinomial on CUDA tensors
        # needs a CUDA generator. Sampling gets a generator on the device instead.
        import rlhf.algos.ppo as ppo_mod

        dev_gen = torch.Generator(device=dev).manual_seed(job.get("seed", w.seed))
        orig_sample = ppo_mod.__dict__.setdefault("_bench_original_sample", ppo_mod.sample)
        ppo_mod.sample = lambda *a, generator=None, **k: orig_sample(*a, generator=dev_gen, **k)
    prompts = [p["text"] for p in load_json(assets / "prompts.json")]
    random.Random(job.get("seed", w.seed)).shuffle(prompts)
    return w, trainer, prompts


def run_ppo(job) -> dict:
    w, trainer, prompts = build_ppo(job)
    lex = set(load_json(Path(job["assets"]) / "meta.json")["lexicon"])
    B = w.batch_size
    steps = []
    n = job["warmup"] + job["steps"]
    for i in range(n):
        batch = [prompts[(i * B + j) % len(prompts)] for j in range(B)]
        t0 = now(w.device)
        m = trainer.step(batch)
        dt = now(w.device) - t0
        steps.append({
            "warmup": i < job["warmup"], "seconds": dt, "reward": m["reward"], "kl": m["kl"],
            "gold": sum(gold_share(r, lex) for r in m["_responses"]) / len(m["_responses"]),
            "response_tokens": m["response_length_tokens"], "entropy": m["entropy"],
            "time_generate": m["time_generate_seconds"], "time_ref_value": m["time_reference_and_value_seconds"],
            "time_reward": m["time_reward_seconds"], "time_update": m["time_update_seconds"],
            "library_samples_per_second": m["samples_per_second"],
        })
    timed = [s for s in steps if not s["warmup"]]
    total = sum(s["seconds"] for s in timed)
    return {"steps": steps, "samples_per_second": B * len(timed) / total if timed else float("nan")}


def run_rm(job) -> dict:
    """Our reward-model training: loss ranking (K comparisons per step) or pairwise (pairs per step)."""
    w, torch, assets = _load(job)
    from rlhf.algos.rm import RMTrainConfig, train_reward_model
    from rlhf.data import Comparison
    from rlhf.models import RewardModel, load_causal_lm, load_tokenizer

    tok = load_tokenizer(assets / "policy")
    lm = load_causal_lm(assets / "policy").to(w.device)
    rm = RewardModel.from_causal_lm(lm, tok).to(w.device)
    loss = job["side"].split("-", 1)[1]  # ours-ranking / ours-pairwise
    n_steps = job["warmup"] + job["steps"]
    raw = load_json(assets / "comparisons.json")
    K = len(raw[0]["responses"])
    pairs_per_comp = K * (K - 1) // 2
    if loss == "pairwise":  # batch_size counts pairs; enough comparisons for n_steps full batches
        bs = w.rm_pairs_per_step
        n_comp = -(-bs * n_steps // pairs_per_comp)
    else:  # batch_size counts comparisons: ~pairs_per_step pairs per step
        bs = max(1, round(w.rm_pairs_per_step / pairs_per_comp))
        n_comp = bs * n_steps
    comps = [Comparison(prompt=c["prompt"], responses=tuple(c["responses"]), kind="ranking",
                        ranking=tuple((k,) for k in c["ranking"])) for c in raw[:n_comp]]
    times, hist = [], []

    def on_step(m):
        times.append(now(w.device))
        hist.append(m)

    t_start = now(w.device)
    train_reward_model(rm, comps, RMTrainConfig(loss=loss, batch_size=bs, epochs=1, max_length=w.rm_max_length,
                                                seed=job.get("seed", w.seed)), on_step=on_step)
    edges = [t_start] + times
    steps = [{"seconds": edges[i + 1] - edges[i], "pairs": hist[i]["pairs"], "sequences": hist[i]["sequences"],
              "loss": hist[i]["loss"], "warmup": i < job["warmup"]} for i in range(len(hist))]
    timed = [s for s in steps if not s["warmup"]][: job["steps"]]
    return {"steps": steps, "batch_size": bs,
            "pairs_per_second": sum(s["pairs"] for s in timed) / sum(s["seconds"] for s in timed)}


def run_gen(job) -> dict:
    """PPO's two rollout backends (rlhf.generation.sample; the engine's runners, rebuilt per call
    as PPO does) vs transformers generate, same model and prompts, alternated."""
    w, torch, assets = _load(job)
    from rlhf.generation import SamplingParams, sample
    from rlhf.inference.rollouts import engine_rollout
    from rlhf.models import load_causal_lm

    dev = w.device
    model = load_causal_lm(assets / "policy").to(dev).eval()
    prompts = load_json(assets / "prompts.json")[: w.batch_size]
    ids = torch.tensor([p["ids"] for p in prompts], device=dev)  # (B, P), no padding: all P tokens long
    mask = torch.ones_like(ids)
    R = w.response_tokens
    params = SamplingParams(max_new_tokens=R, min_new_tokens=R)
    gen = torch.Generator(device=dev).manual_seed(w.seed)  # multinomial needs a generator on its device
    cuda = dev.startswith("cuda")
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def ours():
        r = sample(model, ids, mask, params, 0, 0, generator=gen, autocast_dtype=torch.bfloat16 if cuda else None)
        return r.response_ids.shape[1]

    def engine():  # PPOTrainer.generate with rollout_backend="engine"
        r = engine_rollout(model, ids, mask, params, 0, 0, generator=gen)
        return r.response_ids.shape[1]

    def hf():
        with torch.no_grad(), ctx():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=R,
                                 min_new_tokens=R, top_k=0, top_p=1.0, temperature=1.0,
                                 pad_token_id=0, eos_token_id=0)
        return out.shape[1] - ids.shape[1]

    sides = {"ours": ours, "ours-engine": engine, "hf-generate": hf}
    for f in sides.values():  # warm-up
        f()
    reps = {k: [] for k in sides}
    for rep in range(w.repeats):
        order = list(sides)[rep % len(sides):] + list(sides)[:rep % len(sides)]
        for name in order:
            t0 = now(dev)
            toks = sum(sides[name]() * w.batch_size for _ in range(w.gen_batches))
            reps[name].append(toks / (now(dev) - t0))
    return {"tokens_per_second": reps}


def run_peak(job) -> dict:
    w, torch, _ = _load(job)
    out = {"fp32_gflops": peak_matmul_gflops(w.device, "float32"), "machine": machine_info(w.device, w.threads)}
    try:
        out["bf16_gflops"] = peak_matmul_gflops(w.device, "bfloat16")
    except RuntimeError:
        out["bf16_gflops"] = None
    return out


def run_profile(job) -> dict:
    """One PPO step under torch.profiler, with each phase labelled; returns a time breakdown."""
    w, trainer, prompts = build_ppo(job)
    from torch.profiler import ProfilerActivity, profile, record_function

    def label(name, f):
        def g(*a, **k):
            with record_function(name):
                return f(*a, **k)
        return g

    # Label the phases by wrapping the trainer's own methods (on the instance only).
    trainer.generate = label("bench::generate", trainer.generate)
    orig_fwd = trainer._forward
    in_update = {"on": False}

    def fwd(*a, **k):
        with record_function("bench::update_forward" if in_update["on"] else "bench::ref_value_forward"):
            return orig_fwd(*a, **k)

    trainer._forward = fwd
    orig_update = trainer._update

    def upd(*a, **k):
        in_update["on"] = True
        try:
            with record_function("bench::update"):
                return orig_update(*a, **k)
        finally:
            in_update["on"] = False

    trainer._update = upd
    trainer.reward_fn = label("bench::reward", trainer.reward_fn)
    B = w.batch_size
    for i in range(job["warmup"]):
        trainer.step(prompts[i * B:(i + 1) * B])
    batch = prompts[job["warmup"] * B:(job["warmup"] + 1) * B]
    t0 = now(w.device)
    trainer.step(batch)
    plain = now(w.device) - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        with record_function("bench::step"):
            t0 = now(w.device)
            m = trainer.step(batch)
            wall = now(w.device) - t0
    return {"breakdown": breakdown(prof), "profiled_wall_seconds": wall, "unprofiled_wall_seconds": plain,
            "phase_seconds": {k[5:-8]: v for k, v in m.items() if k.startswith("time_")},
            "top_ops": top_ops(prof)}


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def breakdown(prof) -> dict:
    """Microseconds by (phase, kind): kind is forward / backward / optimizer / python (time in a
    phase that no profiled op accounts for: interpreter, module calls, the profiler's own cost)."""
    phases = ("bench::generate", "bench::ref_value_forward", "bench::reward", "bench::update")
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name != "CPU":
            continue
        names = [a.name for a in _ancestors(e)]
        phase = next((n for n in names if n in phases), None)
        if e.name in phases or e.name == "bench::step":
            phase, kind = (e.name if e.name != "bench::step" else "other"), "python"
        elif e.name.startswith("bench::"):
            kind = "python"
        elif any(n.startswith("autograd::engine::evaluate_function") for n in names) or \
                e.name.startswith("autograd::engine::evaluate_function"):
            kind = "backward"
        elif any(n.startswith("Optimizer.") for n in names) or e.name.startswith("Optimizer."):
            kind = "optimizer"
        else:
            kind = "forward"
        key = f"{(phase or 'other').replace('bench::', '')}/{kind}"
        out[key] = out.get(key, 0.0) + e.self_cpu_time_total
    return {k: v / 1e6 for k, v in sorted(out.items())}  # seconds


def top_ops(prof, n: int = 15) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)[:n]
    return [{"name": r.key, "self_seconds": r.self_cpu_time_total / 1e6, "calls": r.count} for r in rows]


def run_job(job) -> dict:
    t0 = time.perf_counter()
    res = {"ppo": run_ppo, "rm": run_rm, "gen": run_gen, "peak": run_peak, "profile": run_profile}[job["task"]](job)
    res["job_seconds"] = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    worker_main(run_job)
