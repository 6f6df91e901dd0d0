"""Training jobs on the user's own data: what ``rlhf train sft|rm|ppo`` runs.

Each job reads a config (see :class:`SFTJob`, :class:`RMJob`, :class:`PPOJob`; every field is
documented there and in docs/cli.md), trains, and writes a model version in Hugging Face format
to ``output`` with ``manifest.json`` (parent model, data, config, final metrics) and
``metrics.jsonl`` (one line per optimizer step).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhf.algos.ppo import PPOConfig, PPOTrainer
from rlhf.algos.rm import RMTrainConfig, normalize_reward_model, pair_accuracy, split_into_pairs, train_reward_model
from rlhf.algos.sft import SFTConfig, encode_demonstrations, perplexity, train_lm
from rlhf.config import to_dict
from rlhf.data import read_comparisons, read_demonstrations, read_prompts
from rlhf.errors import ConfigError
from rlhf.models import RewardModel, load_causal_lm, load_tokenizer, minilm_path, save_pretrained
from rlhf.progress import Progress


@dataclass
class SFTJob:
    """Supervised fine-tuning on demonstrations (loss on response tokens only)."""

    model: str = ""  # directory of the Hugging Face causal LM to fine-tune (required)
    data: str = ""  # demonstrations JSONL: {"prompt", "response"} per line (required)
    eval_data: str | None = None  # demonstrations JSONL for held-out perplexity (optional)
    output: str = ""  # directory for the new model version (required; must not exist)
    sft: SFTConfig = field(default_factory=SFTConfig)  # training hyper-parameters (next table)
@dataclass
class RMJob:
    """Reward-model training on comparisons; the model is then normalised so the responses in the
    training comparisons (samples of the reference policy) score 0 on average."""

    model: str = ""  # causal LM directory, an encoder directory, or "minilm" for the packaged MiniLM
    backbone: Literal["causal", "encoder"] = "causal"  # causal: score at the last token; encoder: mean-pooled
    data: str = ""  # comparisons JSONL (ranking, best-of-K or pair records) (required)
    eval_data: str | None = None  # comparisons JSONL for held-out accuracy (optional)
    output: str = ""  # directory for the new reward-model version (required; must not exist)
    rm: RMTrainConfig = field(default_factory=RMTrainConfig)  # training hyper-parameters (next table)
@dataclass
class PPOJob:
    """PPO of a policy against a reward model under a KL penalty to the starting policy."""

    policy: str = ""  # directory of the SFT policy; also the frozen reference rho (required)
    reward_model: str = ""  # directory of a reward model written by `rlhf train rm` (required)
    prompts: str = ""  # prompts JSONL: {"prompt"} per line (required)
    ptx_data: str | None = None  # demonstrations JSONL used as pre-training text for PPO-ptx (optional)
    output: str = ""  # directory for the new policy version (required; must not exist)
    steps: int = 100  # PPO steps; each uses ppo.batch_size prompts
    ppo: PPOConfig = field(default_factory=PPOConfig)  # PPO hyper-parameters (next tables)
def _require(job, *names: str) -> None:
    for n in names:
        if not getattr(job, n):
            raise ConfigError(f"field {n} is required")
    out = Path(job.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output {out} already exists and is not empty: model versions are immutable")


def _write_metrics(out: Path, history: list[dict]) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps({k: v for k, v in h.items() if not k.startswith("_")}) + "\n")


def run_sft(job: SFTJob, progress: Progress) -> dict:
    _require(job, "model", "data", "output")
    demos = read_demonstrations(job.data)
    evals = read_demonstrations(job.eval_data) if job.eval_data else []
    tok = load_tokenizer(job.model)
    model = load_causal_lm(job.model)
    ids, attn, lm = encode_demonstrations(tok, demos, job.sft.max_length)
    total = job.sft.max_steps or max(1, int(job.sft.epochs * -(-len(demos) // job.sft.batch_size)))
    task = progress.add("SFT", total=total)
    t0 = time.perf_counter()
    hist = train_lm(model, ids, attn, lm, job.sft, lambda m: progress.update(task, 1, f"loss {m['loss']:.3f}"))
    result = {"final_loss": hist[-1]["loss"], "steps": len(hist), "seconds": time.perf_counter() - t0}
    if evals:
        result["eval_perplexity"] = perplexity(model, *encode_demonstrations(tok, evals, job.sft.max_length))
    out = save_pretrained(model, tok, job.output, manifest={
        "kind": "policy", "stage": "sft", "parent": job.model, "data": job.data, "config": to_dict(job), "metrics": result})
    _write_metrics(out, hist)
    return {"output": str(out), **result}


def load_reward_backbone(job: RMJob) -> RewardModel:
    if job.backbone == "encoder" or job.model == "minilm":
        return RewardModel.from_encoder(minilm_path() if job.model == "minilm" else job.model)
    return RewardModel.from_causal_lm(load_causal_lm(job.model), load_tokenizer(job.model))


def run_rm(job: RMJob, progress: Progress) -> dict:
    _require(job, "model", "data", "output")
    train = read_comparisons(job.data)
    held = read_comparisons(job.eval_data) if job.eval_data else []
    rm = load_reward_backbone(job)
    n_pass = len(train) if job.rm.loss != "pairwise" else len(split_into_pairs(train))
    task = progress.add(f"reward model ({job.rm.loss})", total=-(-n_pass // job.rm.batch_size) * job.rm.epochs)
    t0 = time.perf_counter()
    hist = train_reward_model(rm, train, job.rm, lambda m: progress.update(task, 1, f"loss {m['loss']:.3f}"))
    result = {"final_loss": hist[-1]["loss"], "steps": len(hist), "seconds": time.perf_counter() - t0}
    if held:
        result["heldout_accuracy"] = pair_accuracy(rm, held, job.rm.max_length)
    # The responses in the comparisons were sampled from the reference policy: normalise on them.
    prompts = [c.prompt for c in train for _ in c.responses]
    responses = [r for c in train for r in c.responses]
    normalize_reward_model(rm, prompts, responses, job.rm.normalize_unit_variance, job.rm.max_length)
    out = rm.save(job.output, manifest={"kind": "reward-model", "parent": job.model, "data": job.data,
                                        "config": to_dict(job), "metrics": result})
    _write_metrics(out, hist)
    return {"output": str(out), **result}


def run_ppo(job: PPOJob, progress: Progress) -> dict:
    _require(job, "policy", "reward_model", "prompts", "output")
    prompts = [p.prompt for p in read_prompts(job.prompts)]
    if len(prompts) < job.ppo.batch_size:
        raise ConfigError(f"{job.prompts} has {len(prompts)} prompts, fewer than ppo.batch_size={job.ppo.batch_size}")
    tok = load_tokenizer(job.policy)
    policy = load_causal_lm(job.policy)
    ref = load_causal_lm(job.policy)
    rm = RewardModel.load(job.reward_model).requires_grad_(False)
    ptx = None
    if job.ptx_data:
        from rlhf.algos.sft import pack_texts

        ptx = pack_texts(tok, [d.prompt + d.response for d in read_demonstrations(job.ptx_data)], 64)

    def reward_fn(ps, rs):
        return rm.score(ps, rs)

    trainer = PPOTrainer(policy, tok, reward_fn, job.ppo, ref_model=ref, ptx_blocks=ptx)
    rng = random.Random(job.ppo.seed)
    task = progress.add("PPO", total=job.steps)
    hist = []
    for _ in range(job.steps):
        m = trainer.step(rng.sample(prompts, job.ppo.batch_size))
        hist.append(m)
        progress.update(task, 1, f"reward {m['reward']:+.3f} KL {m['kl']:.2f} beta {m['kl_coef']:.3f}")
    last = hist[-1]
    result = {k: last[k] for k in ("reward", "kl", "kl_coef_next", "samples_total")}
    result["median_samples_per_second"] = sorted(h["samples_per_second"] for h in hist)[len(hist) // 2]
    out = save_pretrained(policy, tok, job.output, manifest={
        "kind": "policy", "stage": "ppo", "parent": job.policy, "reward_model": job.reward_model,
        "data": job.prompts, "config": to_dict(job), "metrics": result})
    torch.save(trainer.value_head.state_dict(), Path(out) / "value_head.pt")
    _write_metrics(out, hist)
    return {"output": str(out), **result}
