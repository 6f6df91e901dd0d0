"""trl's side of the benchmark, run in bench/.venv-trl (trl 1.12.0; it never imports rlhf):
``trl.experimental.ppo.PPOTrainer`` and ``trl.RewardTrainer`` over the same assets as ours.

    python bench/worker_trl.py JOBS.json OUT.json

Settings chosen to match ours (each is a trl argument; the trl default is in brackets):
fp32 (bf16=False) [bf16 on], no gradient checkpointing [on], temperature 1 [0.7], constant
learning rate [linear decay], kl_coef = ours (fixed beta, k1 estimator), value head and reward
model as GPT2ForSequenceClassification, EOS suppressed in sampling (our side: min_new_tokens),
one rollout batch of 16 split into 2 mini-batches of 8 (gradient steps = 2 x epochs, as ours).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from common import Workload, gold_share, load_json, now, setup_torch, worker_main


_ORIGINALS: dict = {}  # trl functions before our timing wrappers (a process may run several jobs)


def _load(job):
    w = Workload.from_dict(job["workload"])
    torch = setup_torch(w.threads, job.get("seed", w.seed))
    return w, torch, Path(job["assets"])


def _common_args(w: Workload, job, out_dir: str, bf16: bool) -> dict:
    return dict(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        bf16=bf16, fp16=False, gradient_checkpointing=False, use_cpu=not w.device.startswith("cuda"),
        lr_scheduler_type="constant", seed=job.get("seed", w.seed), dataloader_num_workers=0,
    )


class StepClock:
    """Trainer callback: wall clock at train begin and at each step's end (all of a step's work
    falls between two ends, including trl's per-step logging, gc and cache clearing)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        clock = self
        self.device = device
        self.marks: list[float] = []

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.marks.append(now(clock.device))

            def on_step_end(self, args, state, control, **kw):
                clock.marks.append(now(clock.device))

        self.callback = _CB()

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_ppo(job) -> dict:
    w, torch, assets = _load(job)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    dev = w.device
    bf16 = job["side"] == "trl-bf16"
    tok = AutoTokenizer.from_pretrained(assets / "policy", local_files_only=True)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(assets / "policy", local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(assets / "policy", local_files_only=True)
    # value model: the policy's trunk with a scalar head started at 0 (ours: same trunk, zero-init head)
    value = AutoModelForSequenceClassification.from_pretrained(assets / "policy", num_labels=1, local_files_only=True)
    torch.nn.init.zeros_(value.score.weight)
    reward = AutoModelForSequenceClassification.from_pretrained(assets / "reward", local_files_only=True)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    policy.generation_config.suppress_tokens = [tok.eos_token_id]  # EOS never sampled: fixed-length responses

    prompts = load_json(assets / "prompts.json")
    random.Random(job.get("seed", w.seed)).shuffle(prompts)
    n = job["warmup"] + job["steps"]
    B = w.batch_size
    train = Dataset.from_dict({"input_ids": [p["ids"] for p in prompts[: max(B * n, B)]]})
    evald = Dataset.from_dict({"input_ids": [p["ids"] for p in prompts[:B]]})
    lex = set(load_json(assets / "meta.json")["lexicon"])

    with tempfile.TemporaryDirectory() as out_dir:
        args = PPOConfig(
            **_common_args(w, job, out_dir, bf16),
            learning_rate=job.get("lr", w.lr), per_device_train_batch_size=B, gradient_accumulation_steps=1,
            num_mini_batches=B // w.mini_batch_size, num_ppo_epochs=job["epochs"], total_episodes=B * n,
            local_rollout_forward_batch_size=B, response_length=w.response_tokens, temperature=1.0,
            kl_coef=w.kl_coef, kl_estimator="k1", stop_token=None, missing_eos_penalty=None,
            num_sample_generations=0, per_device_eval_batch_size=B,
        )
        clock = StepClock(dev)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=train, value_model=value, eval_dataset=evald, callbacks=[clock.callback])
        # Phase timers: wrap the module-level helpers trl's train() calls (timing only, same calls).
        phase = {"generate": [0.0], "ref_value_reward": [0.0]}
        responses_seen: list[list[int]] = []

        def timed(name, f, record=None):
            def g(*a, **k):
                if torch.is_grad_enabled():
                    return f(*a, **k)
                t0 = now(dev)
                out = f(*a, **k)
                phase[name][-1] += now(dev) - t0
                if record:
                    record(out)
                return out
            return g

        ctx_len = w.prompt_tokens
        orig = _ORIGINALS.setdefault("ppo", (ppo_mod.batch_generation, ppo_mod.forward, ppo_mod.get_reward))
        ppo_mod.batch_generation = timed("generate", orig[0],
                                         lambda out: responses_seen.append(out[0][:, ctx_len:].tolist()))
        ppo_mod.forward = timed("ref_value_reward", orig[1])
        ppo_mod.get_reward = timed("ref_value_reward", orig[2])

        from transformers import TrainerCallback

        class PhaseCB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                for v in phase.values():
                    v.append(0.0)

        trainer.add_callback(PhaseCB())
        trainer.train()

    durs = clock.durations()
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    steps = []
    for i, d in enumerate(durs):
        gen, rv = phase["generate"][i], phase["ref_value_reward"][i]
        texts = [tok.decode([t for t in r if t != tok.pad_token_id]) for r in responses_seen[i]] if i < len(responses_seen) else []
        steps.append({
            "warmup": i < job["warmup"], "seconds": d,
            "reward": logs[i]["objective/scores"] if i < len(logs) else None,
            "kl": logs[i]["objective/kl"] if i < len(logs) else None,
            "entropy": logs[i]["policy/entropy_avg"] if i < len(logs) else None,
            "gold": sum(gold_share(t, lex) for t in texts) / len(texts) if texts else None,
            "time_generate": gen, "time_ref_value": rv, "time_reward": None, "time_update": d - gen - rv,
        })
    timed_steps = [s for s in steps if not s["warmup"]]
    total = sum(s["seconds"] for s in timed_steps)
    return {"steps": steps, "samples_per_second": B * len(timed_steps) / total if timed_steps else float("nan")}


def run_rm(job) -> dict:
    """trl.RewardTrainer on the same pairs (pre-tokenized with the same tokenizer as ours)."""
    w, torch, assets = _load(job)
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(assets / "policy", local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(assets / "policy", num_labels=1, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    n_steps = job["warmup"] + job["steps"]
    bs = w.rm_pairs_per_step
    raw = load_json(assets / "comparisons.json")
    chosen, rejected = [], []
    for c in raw:
        order = c["ranking"]  # best first: every (earlier, later) is a (chosen, rejected) pair
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                enc = lambda r: tok(c["prompt"] + c["responses"][r], add_special_tokens=False,  # noqa: E731
                                    truncation=True, max_length=w.rm_max_length)["input_ids"]
                chosen.append(enc(order[a]))
                rejected.append(enc(order[b]))
        if len(chosen) >= bs * n_steps:
            break
    ds = Dataset.from_dict({"chosen_ids": chosen[: bs * n_steps], "rejected_ids": rejected[: bs * n_steps]})
    with tempfile.TemporaryDirectory() as out_dir:
        args = RewardConfig(**_common_args(w, job, out_dir, job["side"] == "trl-bf16"),
                            per_device_train_batch_size=bs, max_steps=n_steps, max_length=w.rm_max_length,
                            learning_rate=5e-5, remove_unused_columns=False)
        clock = StepClock(w.device)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                callbacks=[clock.callback])
        trainer.train()
    durs = clock.durations()
    steps = [{"seconds": d, "pairs": bs, "warmup": i < job["warmup"]} for i, d in enumerate(durs)]
    timed_steps = [s for s in steps if not s["warmup"]]
    return {"steps": steps, "batch_size": bs, "optimizer": str(args.optim),
            "pairs_per_second": sum(s["pairs"] for s in timed_steps) / sum(s["seconds"] for s in timed_steps)}


def run_job(job) -> dict:
    t0 = time.perf_counter()
    res = {"ppo": run_ppo, "rm": run_rm}[job["task"]](job)
    res["job_seconds"] = time.perf_counter() - t0
    import trl

    res["trl_version"] = trl.__version__
    return res


if __name__ == "__main__":
    worker_main(run_job)
