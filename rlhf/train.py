"""Training jobs: the one recipe of each job, for ``rlhf train sft|rm|ppo`` and for the trainer service.

A job is a config dataclass (:class:`SFTJob`, :class:`RMJob`, :class:`PPOJob`; every field is
documented here, in docs/cli.md and in docs/services-reference.md) and a ``run_*`` function that
takes it and a :class:`JobIO`. The IO is the one thing that differs between the two ways of
running a job: where its inputs come from and where its model versions go.

* :class:`LocalIO` (the command line): models are directories, data are JSONL files, the new
  version is written to ``output``, progress goes to the terminal.
* the trainer service's IO (``services/trainer/runs.py``): models are registry versions, data come
  from the feedback-store and the prompt-collector, rewards from the reward-scorer, rollouts from
  the policy-server or from the trainer itself, and versions are published into the registry and
  announced on ``rlhf.models.v1``.

Every version, whichever way it was trained, is written by :func:`rlhf.registry.write_version`
with the registry's one manifest (kind, parent, job, data, config, metrics) and holds the model in
Hugging Face format plus ``metrics.jsonl`` (one line per optimizer step); a PPO policy also holds
its value head (``value_head.pt``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Callable, Literal, Sequence

import torch

from rlhf.algos.lora import merged_copy
from rlhf.algos.ppo import SAMPLER_SEED_STRIDE, PPOConfig, PPOTrainer, RewardFn
from rlhf.algos.rm import RMTrainConfig, normalize_reward_model, pair_accuracy, split_into_pairs, train_reward_model
from rlhf.algos.sft import PretrainBlocks, SFTConfig, encode_demonstrations, perplexity, train_lm
from rlhf.checkpoint import CheckpointConfig, Checkpointing, Checkpoints
from rlhf.config import Range, count, to_dict
from rlhf.data import Comparison, Demonstration, read_comparisons, read_demonstrations, read_prompts, read_texts
from rlhf.distributed import DistributedConfig, World, setup, unwrap
from rlhf.errors import ConfigError, DataError
from rlhf.generation import Rollout, decode_responses
from rlhf.models import RewardModel, disable_dropout, load_causal_lm, load_tokenizer, minilm_path, save_pretrained
from rlhf.progress import Progress
from rlhf.registry import write_version


# ----------------------------------------------------------------------------------------------
# The job configs (one set: `rlhf train` files and the trainer's StartJob overrides)
# ----------------------------------------------------------------------------------------------


@dataclass
class SFTJob:
    """Supervised fine-tuning on demonstrations (loss on response tokens only)."""

    model: str = ""  # the policy to fine-tune: a Hugging Face directory (rlhf train, required) or a registry policy version (trainer; empty: the latest)
    data: str = ""  # demonstrations JSONL, {"prompt", "response"} per line (rlhf train, required); the trainer uses the feedback-store's demonstrations
    eval_data: str | None = None  # demonstrations JSONL for held-out perplexity (rlhf train; optional)
    output: str = ""  # directory for the new version (rlhf train, required; must not exist); the trainer publishes into its registry
    min_demonstrations: int = 1  # fewer demonstrations fail the job
    sft: SFTConfig = field(default_factory=SFTConfig)  # training hyper-parameters (next table)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # processes and how they share the model (docs/training.md)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints and resume (docs/training.md)

    LIMITS: ClassVar[dict[str, Range]] = {"min_demonstrations": count(1, 10**9)}


@dataclass
class RMJob:
    """Reward-model training on comparisons; the model is then normalised so the responses in the
    training comparisons (samples of the reference policy) score 0 on average."""

    model: str = ""  # the backbone: a causal LM or encoder directory, or "minilm" for the packaged MiniLM (rlhf train, required); trainer: a policy version, "minilm", or empty (see init_from)
    backbone: Literal["causal", "encoder"] = "causal"  # causal: score at the last token; encoder: mean-pooled
    init_from: Literal["policy", "reward"] = "policy"  # trainer, empty model: a fresh head on the latest policy's trunk (Ziegler et al.), or continue the latest reward model
    data: str = ""  # comparisons JSONL: ranking, best-of-K or pair records (rlhf train, required); the trainer uses the feedback-store's comparisons
    eval_data: str | None = None  # comparisons JSONL for held-out accuracy (rlhf train; optional); the trainer holds out the test split
    output: str = ""  # directory for the new reward-model version (rlhf train, required; must not exist); the trainer publishes into its registry
    min_comparisons: int = 4  # fewer usable comparisons fail the job
    since_unix: float = 0.0  # trainer: only comparisons stored at or after this time (0: all)
    rm: RMTrainConfig = field(default_factory=RMTrainConfig)  # training hyper-parameters (next table)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # processes and how they share the model
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints and resume

    LIMITS: ClassVar[dict[str, Range]] = {"min_comparisons": count(1, 10**9), "since_unix": Range(0, 1e11)}


@dataclass
class PPOJob:
    """PPO of a policy against a reward model under a KL penalty to a frozen reference policy."""

    policy: str = ""  # the policy to start from: a directory (rlhf train, required) or a registry policy version (trainer; empty: the latest)
    reference: str = ""  # rho, the frozen reference: a directory / registry version; empty: the starting policy (rlhf train) or the root of its lineage, the SFT model (trainer)
    reward_model: str = ""  # directory of a reward model written by `rlhf train rm` (rlhf train, required); the trainer scores on the reward-scorer
    prompts: str = ""  # prompts JSONL, {"prompt"} per line (rlhf train, required); the trainer uses the prompt-collector's train prompts
    ptx_data: str | None = None  # pre-training text for PPO-ptx (ppo.ptx_coef > 0): a text file of blank-line separated documents, or JSONL of {"text"} or demonstration records (rlhf train; optional)
    ptx_dataset: str = ""  # trainer: pre-training text for PPO-ptx from the registry, a dataset version imported by `rlhf import-dataset` (or "latest"); empty: none
    output: str = ""  # directory for the new policy version (rlhf train, required; must not exist); the trainer publishes into its registry
    steps: int = 100  # PPO steps; each uses ppo.batch_size prompts
    rollouts: Literal["", "local", "policy-server"] = ""  # who samples the rollouts: this process, or the policy-server (trainer only); empty: local for rlhf train, the policy-server in the trainer
    prefetch_rollouts: bool = False  # policy-server rollouts: ask for the next step's before this step's update (they overlap it, one version staler)
    wait_for_serving_seconds: float = 120.0  # trainer: how long to wait for the policy-server to serve the final version
    eval_every: int = 0  # PPO steps between evaluations on held-out prompts (and at the last step): the step's eval_score; 0: none
    eval_prompts: int = 32  # prompts held out from the prompt pool for the evaluation (drawn once by ppo.seed, never trained on); with eval_every > 0
    eval_reward_model: str = ""  # who scores the evaluation: a reward-model directory (rlhf train) or a registry reward version (trainer); empty: the training reward model
    ppo: PPOConfig = field(default_factory=PPOConfig)  # PPO hyper-parameters (next tables)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # processes and how they share the model
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=10))  # checkpoints and resume (PPO steps are long: every 10 by default)

    LIMITS: ClassVar[dict[str, Range]] = {"steps": count(1, 10**7), "wait_for_serving_seconds": Range(0, 86_400, lo_open=True),
                                          "eval_every": count(0, 10**7), "eval_prompts": count(1, 100_000)}


# ----------------------------------------------------------------------------------------------
# Where a job's inputs come from and its versions go
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved model: its directory, and how the new version's manifest names it as parent."""

    path: Path
    parent: str


class RolloutSource:
    """Yields each PPO step's prompts and rollout batch; ``stepped`` is told when the update is done."""

    def next(self, step: int) -> tuple[list[str], Rollout, dict]:
        """(prompts, rollout, info): ``info["own_rollout"]`` says whether the trainer's current
        weights sampled it; ``info["behaviour_logprobs"]`` (optional) that ``rollout.logprobs``
        are the sampler's behaviour log-probs, to take the PPO ratio against
        (PPOTrainer.step_on_rollout); other keys are step metrics (timings, staleness)."""
        raise NotImplementedError

    def stepped(self, step: int, metrics: dict) -> None:
        """Called after each update, before the step's metrics are reported."""

    def finish(self) -> str | None:
        """After the last step: the version the last publication made, if the source publishes."""
        return None

    def close(self) -> None:
        pass

    def state(self) -> dict:
        """What a checkpoint keeps of the source (the versions it published, ...)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (a resumed job)."""


class LocalRollouts(RolloutSource):
    """The trainer's own policy samples each step's rollouts."""

    def __init__(self, trainer: PPOTrainer, prompts_for_step: Callable[[int], list[str]]):
        self.trainer = trainer
        self.prompts_for_step = prompts_for_step

    def next(self, step: int) -> tuple[list[str], Rollout, dict]:
        prompts = self.prompts_for_step(step)
        t0 = time.perf_counter()
        r = self.trainer.generate(prompts)
        return prompts, r, {"own_rollout": True, "time_generate_seconds": time.perf_counter() - t0}


class JobIO:
    """Inputs, outputs and progress of a job. Subclasses implement what their jobs need."""

    device: str = "cpu"

    # progress and cancellation
    def event(self, message: str, progress: float | None = None, metrics: dict | None = None) -> None:
        """A milestone of the job (progress in 0..1 of the whole job, when known)."""

    def step(self, stage: str, done: int, total: int, metrics: dict) -> None:
        """One optimizer step of ``stage`` (SFT, RM, PPO) is done."""

    def check(self) -> None:
        """Raise when the job should stop (cancelled)."""

    # inputs
    def demonstrations(self, job: SFTJob) -> tuple[list[Demonstration], list[Demonstration]]:
        raise NotImplementedError

    def comparisons(self, job: RMJob) -> tuple[list[Comparison], list[Comparison]]:
        raise NotImplementedError

    def policy(self, ref: str, field_name: str) -> Source:
        raise NotImplementedError

    def reference(self, job: PPOJob, start: Source) -> Source:
        raise NotImplementedError

    def reward_backbone(self, job: RMJob) -> tuple[RewardModel, str]:
        raise NotImplementedError

    def prompts(self, job: PPOJob) -> list[str]:
        raise NotImplementedError

    def ptx_texts(self, job: PPOJob) -> list[str] | None:
        return None

    def reward_fn(self, job: PPOJob) -> tuple[RewardFn, Callable[[], dict]]:
        """The reward function, and what the manifest records of the reward model that answered."""
        raise NotImplementedError

    def eval_reward_model(self, job: PPOJob) -> Path:
        """The directory of ``job.eval_reward_model`` (set), the reward model that scores the evaluation."""
        raise NotImplementedError

    def rollouts(self, job: PPOJob, start: Source, trainer: PPOTrainer, prompts_for_step: Callable[[int], list[str]],
                 write: Callable[[Path], None], manifest: Callable[[dict], dict]) -> RolloutSource:
        """Local rollouts; the trainer may sample on the policy-server (publishing every step)."""
        return LocalRollouts(trainer, prompts_for_step)

    # checkpoints
    def checkpoint_dir(self, job) -> Path | None:
        """Where the job's checkpoints go, and it resumes from (None: it writes none)."""
        return None

    # outputs
    def publish(self, kind: str, write: Callable[[Path], None], job, *, parent: str, metrics: dict,
                config: dict, data: dict) -> str:
        """Write the job's new version; returns its id (the trainer) or directory (rlhf train)."""
        raise NotImplementedError


def serving_config(path: Path) -> dict:
    """What serving a policy needs to know from its parent (whether prompts start with BOS)."""
    f = Path(path) / "manifest.json"
    config = json.loads(f.read_text()).get("config", {}) if f.is_file() else {}
    return {"add_bos": bool(config.get("add_bos", False))}


def batch_prompts(prompts: Sequence[str], step: int, seed: int, n: int) -> list[str]:
    """The prompts of PPO step ``step``: ``n`` distinct ones, drawn by ``seed`` and ``step`` alone
    (a job resumed at a step, or run through the other path, sees the same batch)."""
    if len(prompts) < n:
        raise DataError(f"{len(prompts)} prompts are fewer than ppo.batch_size={n}")
    return random.Random(seed * 1_000_003 + step).sample(list(prompts), n)


def split_eval_prompts(prompts: Sequence[str], job: PPOJob) -> tuple[list[str], list[str]]:
    """(training pool, evaluation prompts): with ``eval_every`` set, ``eval_prompts`` distinct
    prompts drawn once by ``ppo.seed`` are held out, and no copy of them is trained on."""
    if not job.eval_every:
        return list(prompts), []
    distinct = list(dict.fromkeys(prompts))
    held = set(random.Random(job.ppo.seed).sample(distinct, job.eval_prompts)) if len(distinct) >= job.eval_prompts else set()
    pool = [p for p in prompts if p not in held]
    if not held or len(pool) < job.ppo.batch_size:
        raise ConfigError(f"{len(distinct)} distinct prompts cannot hold out eval_prompts={job.eval_prompts} and still "
                          f"fill ppo.batch_size={job.ppo.batch_size}: lower eval_prompts, add prompts or set eval_every: 0")
    return pool, [p for p in distinct if p in held]


EVAL_SEED_OFFSET = 11  # the evaluation's sampling stream, apart from the trainer's (rlhf.algos.ppo)


def evaluate(trainer: PPOTrainer, prompts: Sequence[str], score: RewardFn, world: World) -> float:
    """``eval_score``: the mean score of one response per evaluation prompt, sampled by the
    trainer's policy with the PPO sampling settings. Every evaluation draws with the same seed, so
    that the score moves with the policy, not with the draw. Each rank samples its share, in
    chunks of its share of a PPO batch (a size the step itself samples)."""
    mine = world.share(prompts)
    chunk = max(1, trainer.cfg.batch_size // world.size)
    gen = torch.Generator(device="cpu").manual_seed(trainer.cfg.seed + EVAL_SEED_OFFSET + SAMPLER_SEED_STRIDE * world.rank)
    total = torch.zeros(2, dtype=torch.float64, device=trainer.device)
    for i in range(0, len(mine), chunk):  # the trainer's sampler on the evaluation's own stream
        batch = mine[i : i + chunk]
        rollout = trainer.generate(batch, generator=gen, values=False)
        scores = score(batch, decode_responses(trainer.tok, rollout))
        total += torch.tensor([float(scores.double().sum()), len(batch)], dtype=torch.float64, device=trainer.device)
    total = world.sum(total)
    return float(total[0] / total[1])


def usable_comparisons(comparisons: Sequence[Comparison], loss: str) -> list[Comparison]:
    """The comparisons a loss can train on: best-of-K choices for best_of_k, rankings and pairs otherwise."""
    if loss == "best_of_k":
        return [c for c in comparisons if c.kind == "best_of_k"]
    return [c for c in comparisons if c.kind != "best_of_k"]


def check_step(stage: str, step: int, metrics: dict) -> None:
    """Stop a job whose losses turned NaN or infinite: it would only train (and publish) garbage."""
    bad = [k for k, v in metrics.items()
           if ("loss" in k or k in ("kl", "reward")) and isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise DataError(f"{stage} step {step}: {', '.join(f'{k} = {metrics[k]}' for k in sorted(bad))}; the job stops "
                        "and publishes nothing (lower the learning rate or the KL coefficient?)")


def _metrics_jsonl(history: list[dict]) -> str:
    return "".join(json.dumps({k: v for k, v in h.items() if not k.startswith("_")}) + "\n" for h in history)


def _write_policy(model, tok, history: list[dict], value_head=None,
                  state_dict: Callable[[], dict | None] = lambda: None) -> Callable[[Path], None]:
    """Save the policy (``state_dict()``: its whole weights when they are sharded, else None)."""
    def write(d: Path) -> None:
        # LoRA adapters folded into plain weights
        save_pretrained(merged_copy(unwrap(model)), tok, d, state_dict=state_dict())
        if value_head is not None:
            torch.save(value_head.state_dict(), d / "value_head.pt")
        (d / "metrics.jsonl").write_text(_metrics_jsonl(history))
    return write


def load_scorer(path: str | Path, device) -> RewardFn:
    """A reward model directory as a frozen reward function."""
    rm = disable_dropout(RewardModel.load(path)).requires_grad_(False).to(device)
    return lambda prompts, responses: rm.score(prompts, responses)


def on_main(world: World, fn: Callable[[], object]):
    """``fn()`` on rank 0, its result on every rank: one process asks for the job's inputs, so
    every rank trains on the same data (a registry's latest version, a service's export)."""
    return world.broadcast(fn() if world.main else None)


def checkpointing(io: JobIO, job, kind: str, world: World) -> Checkpointing:
    """The job's checkpoints (rlhf.checkpoint): written where the IO says, every
    ``job.checkpoint.every_steps`` steps; cancellation asked of the IO by rank 0."""
    d = io.checkpoint_dir(job)
    store = Checkpoints(d, world, job.checkpoint.keep) if d is not None else None
    meta = {"kind": kind, "strategy": job.distributed.strategy, "job": to_dict(job)}
    return Checkpointing(store, job.checkpoint.every_steps, meta, check=io.check, world=world)


def sharded_state(world: World, model, strategy: str) -> dict | None:
    """The whole weights of a sharded (FSDP2) model, gathered on rank 0 (a collective); None
    when the model is whole on every rank, and saves itself."""
    return world.full_state_dict(model) if world.distributed and strategy == "fsdp" else None


# ----------------------------------------------------------------------------------------------
# The recipes
# ----------------------------------------------------------------------------------------------


def run_sft(job: SFTJob, io: JobIO) -> dict:
    world = setup(io.device)
    torch.manual_seed(job.sft.seed)  # dropout: the same job gives the same weights, whichever way it runs
    ckpt = checkpointing(io, job, "sft", world)
    demos, evals = ckpt.pinned("data", lambda: io.demonstrations(job))
    if len(demos) < job.min_demonstrations:
        raise DataError(f"{len(demos)} demonstrations; the job needs at least {job.min_demonstrations} (min_demonstrations)")
    src = ckpt.pinned("model", lambda: io.policy(job.model, "model"))
    tok, model = load_tokenizer(src.path), load_causal_lm(src.path).to(world.device)
    ids, attn, lm = encode_demonstrations(tok, demos, job.sft.max_length)
    total = job.sft.total_steps(len(demos))
    if world.main:
        io.event(f"fine-tuning on {len(demos)} demonstrations" + (f" in {world.size} processes" if world.distributed else ""), 0.1)
    t0 = time.perf_counter()

    def on_step(m: dict) -> None:
        check_step("SFT", m.get("step", 0), m)
        if world.main:
            io.step("SFT", m.get("step", 0), total, {"sft_loss": m["loss"]})

    net = world.wrap(model, job.distributed.strategy)
    hist = train_lm(net, ids, attn, lm, job.sft, on_step, world=world, checkpointing=ckpt)
    metrics = {"sft_loss": hist[-1]["loss"], "sft_steps": float(len(hist)), "sft_demonstrations": float(len(demos)),
               "seconds": time.perf_counter() - t0}
    if evals:
        metrics["eval_perplexity"] = perplexity(unwrap(net), *encode_demonstrations(tok, evals, job.sft.max_length))
    state = sharded_state(world, net, job.distributed.strategy)
    out = on_main(world, lambda: io.publish(
        "policy", _write_policy(net, tok, hist, state_dict=lambda: state), job, parent=src.parent, metrics=metrics,
        config={**serving_config(src.path), "job": to_dict(job)}, data={"demonstrations": len(demos), "source": job.data}))
    return {"output": out, **metrics}


def run_rm(job: RMJob, io: JobIO) -> dict:
    world = setup(io.device)
    torch.manual_seed(job.rm.seed)
    ckpt = checkpointing(io, job, "rm", world)
    train, held = ckpt.pinned("data", lambda: io.comparisons(job))
    train, held = usable_comparisons(train, job.rm.loss), usable_comparisons(held, job.rm.loss)
    if len(train) < job.min_comparisons:
        raise DataError(f"{len(train)} comparisons for the RM's loss {job.rm.loss!r}; the job needs at least "
                        f"{job.min_comparisons} (min_comparisons)")
    if world.main:
        io.check()
    rm, parent = io.reward_backbone(job)
    rm = rm.to(world.device)
    n_pass = len(train) if job.rm.loss != "pairwise" else len(split_into_pairs(train))
    total = max(1, -(-n_pass // job.rm.batch_size) * job.rm.epochs)
    if world.main:
        io.event(f"training the reward model on {len(train)} comparisons" + (f" in {world.size} processes" if world.distributed else ""), 0.1)
    t0 = time.perf_counter()

    def on_step(m: dict) -> None:
        check_step("RM", m.get("step", 0), m)
        if world.main:
            io.step("RM", m.get("step", 0), total, {"rm_loss": m["loss"]})

    strategy = job.distributed.strategy
    hist = train_reward_model(rm, train, job.rm, on_step, world=world, strategy=strategy, checkpointing=ckpt)
    metrics = {"rm_loss": hist[-1]["loss"], "rm_steps": float(len(hist)), "rm_comparisons": float(len(train)),
               "seconds": time.perf_counter() - t0}
    if held:
        metrics["rm_accuracy_heldout"] = pair_accuracy(rm, held, job.rm.max_length)
    # The responses in the comparisons were sampled from the reference policy: normalise on them.
    prompts = [c.prompt for c in train for _ in c.responses]
    responses = [r for c in train for r in c.responses]
    normalize_reward_model(rm, prompts, responses, job.rm.normalize_unit_variance, job.rm.max_length)
    state = sharded_state(world, rm, strategy)

    def write(d: Path) -> None:
        rm.save(d, state_dict=state)
        (d / "metrics.jsonl").write_text(_metrics_jsonl(hist))

    out = on_main(world, lambda: io.publish(
        "reward", write, job, parent=parent, metrics=metrics, config={"job": to_dict(job)},
        data={"comparisons": len(train), "heldout_comparisons": len(held), "source": job.data, "since_unix": job.since_unix}))
    return {"output": out, **metrics}


def run_ppo(job: PPOJob, io: JobIO) -> dict:
    world = setup(io.device)
    if world.distributed and job.distributed.strategy != "ddp":
        raise ConfigError("PPO trains with strategy ddp (each process samples with the whole policy); "
                          "fsdp is for SFT and reward models")
    torch.manual_seed(job.ppo.seed)
    ckpt = checkpointing(io, job, "ppo", world)
    start = ckpt.pinned("policy", lambda: io.policy(job.policy, "policy"))
    ref = ckpt.pinned("reference", lambda: io.reference(job, start))
    all_prompts, eval_prompts = split_eval_prompts(ckpt.pinned("prompts", lambda: io.prompts(job)), job)
    if len(all_prompts) < job.ppo.batch_size:
        raise DataError(f"{len(all_prompts)} prompts are fewer than ppo.batch_size={job.ppo.batch_size}")
    if world.main:
        io.event(f"PPO from policy {start.parent}, reference {ref.parent}", 0.0)
    tok = load_tokenizer(start.path)
    policy = load_causal_lm(start.path).to(world.device)
    # with LoRA, rho is the policy's own base with the adapters off (ppo.finetune): no second copy
    if job.ppo.finetune == "lora" and Path(ref.path).resolve() != Path(start.path).resolve():
        raise ConfigError("ppo.finetune=lora takes the starting policy as the reference: leave reference unset")
    ref_model = load_causal_lm(ref.path).to(world.device) if job.ppo.finetune == "full" else None
    texts = io.ptx_texts(job)
    ptx = PretrainBlocks.from_texts(tok, texts, job.ppo.ptx_block_size) if texts else None
    if job.ppo.ptx_coef > 0 and ptx is None:
        raise ConfigError("ppo.ptx_coef > 0 needs pre-training text (ptx_data; in the trainer ptx_dataset)")
    reward_fn, reward_info = io.reward_fn(job)
    eval_score_fn = reward_fn  # the training reward model: catches over-fitting to the training prompts
    if eval_prompts and job.eval_reward_model:  # an independent judge: catches the policy gaming the reward model
        eval_score_fn = load_scorer(io.eval_reward_model(job), world.device)
    trainer = PPOTrainer(policy, tok, reward_fn, job.ppo, ref_model=ref_model, ptx_blocks=ptx, world=world)
    hist: list[dict] = []
    write = _write_policy(trainer.policy, tok, hist, trainer.value_head)
    base_config = {**serving_config(start.path), "reference": ref.parent, "job": to_dict(job)}

    def manifest(m: dict) -> dict:
        """The manifest fields of a version written after step metrics ``m``."""
        return {"metrics": {k: m[k] for k in ("reward", "kl", "kl_coef", "entropy", "eval_score") if k in m},
                "config": {**base_config, **reward_info()}, "data": {"source": job.prompts, "samples": m["samples_total"]}}

    # each rank samples its share of the step's prompts (rlhf.distributed)
    source = io.rollouts(job, start, trainer,
                         lambda s: world.share(batch_prompts(all_prompts, s, job.ppo.seed, job.ppo.batch_size)),
                         write, manifest)
    modules = trainer.modules()
    resumed = ckpt.restore(modules, trainer.opt)
    if resumed is not None:
        trainer.load_loop_state(resumed["trainer"] | resumed["trainer_rank"])
        hist += resumed["history"]
        source.load_state(resumed["source"])
        if world.main:
            io.event(f"resumed at PPO step {resumed['step']} from checkpoint {ckpt.resumed_from.path.name}")

    def state() -> tuple[dict, dict]:
        shared, own = trainer.loop_state()
        history = [{k: v for k, v in h.items() if not k.startswith("_")} for h in hist]
        return {"trainer": shared, "history": history, "source": source.state()}, {"trainer_rank": own}

    try:
        for step in range(resumed["step"] if resumed else 0, job.steps):
            t_step = time.perf_counter()
            prompts, rollout, info = source.next(step)
            own = info.pop("own_rollout")
            behaviour = info.pop("behaviour_logprobs", False)
            m = trainer.step_on_rollout(prompts, rollout, own_rollout=own, behaviour_logprobs=behaviour)
            check_step("PPO", step + 1, m)
            m.update(info)
            t_eval = 0.0
            if eval_prompts and ((step + 1) % job.eval_every == 0 or step + 1 == job.steps):
                t0 = time.perf_counter()
                m["eval_score"] = evaluate(trainer, eval_prompts, eval_score_fn, world)
                m["time_eval_seconds"] = t_eval = time.perf_counter() - t0
            hist.append(m)
            source.stepped(step, m)
            # the whole step as a caller sees it, but for the evaluation (time_eval_seconds), which
            # would make the steps that evaluate look slow
            m["step_duration_seconds"] = dt = time.perf_counter() - t_step - t_eval
            m["samples_per_second"] = job.ppo.batch_size / dt
            m["tokens_per_second"] = m["response_length_tokens"] * job.ppo.batch_size / dt
            ckpt.after_step(step + 1, modules, trainer.opt, state)  # before the step is reported: a reported step is kept
            if world.main:
                io.step("PPO", step + 1, job.steps, m)
        published = source.finish()
    finally:
        source.close()
    last = hist[-1]
    result = {"reward": last["reward"], "kl": last["kl"], "kl_coef": last["kl_coef_next"],
              "samples_total": float(last["samples_total"]), "ppo_steps": float(len(hist)),
              "median_samples_per_second": sorted(h["samples_per_second"] for h in hist)[len(hist) // 2]}
    if "eval_score" in last:
        result["eval_score"] = last["eval_score"]
    stale = [h["rollout_staleness_versions"] for h in hist if "rollout_staleness_versions" in h]
    if stale:
        result["rollout_staleness_mean_versions"] = sum(max(0, s) for s in stale) / len(stale)
        result["rollout_staleness_max_versions"] = float(max(stale))
    if published is None:
        fields = manifest(last)
        published = on_main(world, lambda: io.publish("policy", write, job, parent=start.parent,
                                                      metrics={**fields["metrics"], **result},
                                                      config=fields["config"], data=fields["data"]))
    return {"output": published, **result}


# ----------------------------------------------------------------------------------------------
# `rlhf train`: files and directories
# ----------------------------------------------------------------------------------------------


class LocalIO(JobIO):
    """``rlhf train``: models are directories, data are files, the version goes to ``job.output``."""

    def __init__(self, progress: Progress | None = None, device: str = "cpu", resume: bool = False):
        self.progress = progress or Progress(enabled=False)
        self.device = device
        self.resume = resume  # continue from the newest checkpoint in the job's checkpoint directory
        self._bars: dict[str, int] = {}

    def step(self, stage: str, done: int, total: int, metrics: dict) -> None:
        if stage not in self._bars:
            self._bars[stage] = self.progress.add(stage, total=total)
        text = "  ".join(f"{k.removeprefix('sft_').removeprefix('rm_')} {v:.3f}" for k, v in metrics.items()
                         if k in ("sft_loss", "rm_loss", "reward", "kl", "kl_coef"))
        self.progress.update(self._bars[stage], 1, text)

    @staticmethod
    def _required(job, *names: str) -> None:
        for n in names:
            if not getattr(job, n):
                raise ConfigError(f"field {n} is required")
        out = Path(job.output)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"output {out} already exists and is not empty: model versions are immutable")

    def demonstrations(self, job: SFTJob):
        self._required(job, "model", "data", "output")
        return read_demonstrations(job.data), read_demonstrations(job.eval_data) if job.eval_data else []

    def comparisons(self, job: RMJob):
        self._required(job, "model", "data", "output")
        return read_comparisons(job.data), read_comparisons(job.eval_data) if job.eval_data else []

    def policy(self, ref: str, field_name: str) -> Source:
        if not ref:
            raise ConfigError(f"field {field_name} is required")
        return Source(Path(ref), ref)

    def reference(self, job: PPOJob, start: Source) -> Source:
        return Source(Path(job.reference), job.reference) if job.reference else start

    def reward_backbone(self, job: RMJob) -> tuple[RewardModel, str]:
        seed = job.rm.seed
        if job.backbone == "encoder" or job.model == "minilm":
            return RewardModel.from_encoder(minilm_path() if job.model == "minilm" else job.model, seed), job.model
        return RewardModel.from_causal_lm(load_causal_lm(job.model), load_tokenizer(job.model), seed), job.model

    def prompts(self, job: PPOJob) -> list[str]:
        self._required(job, "policy", "reward_model", "prompts", "output")
        if job.rollouts == "policy-server":
            raise ConfigError("rollouts: policy-server is for the trainer service; rlhf train samples locally")
        return [p.prompt for p in read_prompts(job.prompts)]

    def ptx_texts(self, job: PPOJob) -> list[str] | None:
        if job.ptx_dataset:
            raise ConfigError("ptx_dataset names a dataset of the trainer's registry; rlhf train reads ptx_data (a file)")
        return read_texts(job.ptx_data) if job.ptx_data else None

    def eval_reward_model(self, job: PPOJob) -> Path:
        return Path(job.eval_reward_model)

    def reward_fn(self, job: PPOJob):
        return load_scorer(job.reward_model, self.device), (lambda: {"reward_model": job.reward_model})

    REQUIRED = {SFTJob: ("model", "data", "output"), RMJob: ("model", "data", "output"),
                PPOJob: ("policy", "reward_model", "prompts", "output")}

    def checkpoint_dir(self, job) -> Path:
        """``checkpoint.directory``, or OUTPUT.checkpoints beside the output. Without ``resume`` it
        must hold no checkpoint (one of an earlier run would be continued by accident)."""
        self._required(job, *self.REQUIRED[type(job)])
        d = Path(job.checkpoint.directory or f"{Path(job.output)}.checkpoints")
        found = Checkpoints(d).latest()
        if self.resume and found is None:
            raise ConfigError(f"--resume: {d} holds no checkpoint")
        if not self.resume and found is not None:
            raise ConfigError(f"{d} holds a checkpoint of an earlier run ({found.name}): continue it with "
                              f"--resume {d}, or remove it")
        if not self.resume and d.is_dir():
            Checkpoints(d).forget_inputs()  # of a run that stopped before its first checkpoint
        return d

    def publish(self, kind, write, job, *, parent, metrics, config, data) -> str:
        write_version(job.output, kind, write, parent_version=parent, metrics=metrics, config=config, data=data)
        return str(job.output)


def run_local(stage: str, job, progress: Progress | None = None, resume: bool = False, device: str = "cpu") -> dict:
    """``rlhf train STAGE``: run the job on files and directories (``resume``: from the newest
    checkpoint in its checkpoint directory)."""
    io = LocalIO(progress, device=device, resume=resume)
    return RECIPES[stage](job, io)


def resume_config(stage: str, directory: str | Path):
    """The job config a checkpoint directory was written with (``rlhf train STAGE --resume DIR``)."""
    from rlhf.config import from_dict

    meta = Checkpoints(directory).meta()
    if meta is None:
        raise ConfigError(f"--resume: {directory} holds no checkpoint")
    if meta.get("kind") != stage:
        raise ConfigError(f"--resume: {directory} holds a checkpoint of a {meta.get('kind')} job, not {stage}")
    job = from_dict(JOBS[stage], meta["job"])
    job.checkpoint.directory = str(directory)
    return job


JOBS = {"sft": SFTJob, "rm": RMJob, "ppo": PPOJob}
RECIPES = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}

