"""The trainer's side of the job recipes: the IO that runs :mod:`rlhf.train`'s SFT, RM and PPO
through the other services, and the online loop.

The recipes themselves live in the core (:mod:`rlhf.train`, shared with ``rlhf train``); here they
get a :class:`ServiceIO`: demonstrations and comparisons from the feedback-store, prompts from the
prompt-collector, scores from the reward-scorer, rollouts from the policy-server (or from the
trainer's own weights), and new versions published into the registry and announced on
rlhf.models.v1 (through the outbox, in the transaction that records them in the job), which the
policy-server and the reward-scorer follow. A job runs in a process of its own
(:mod:`services.trainer.worker`), with blocking stubs on the platform's channels.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Callable

import torch
from rlhf_client import common_pb2, feedback_pb2, models_pb2, policy_pb2
from rlhf_client.client import FeedbackClient, PolicyClient, PromptClient, RewardClient

from rlhf.storage.feedback import MAX_BATCH, MAX_K, MIN_K
from rlhf.config import Range, count
from rlhf.algos.ppo import PPOTrainer
from rlhf.data import Comparison, Demonstration
from rlhf.errors import ConfigError, DataError, UnavailableError
from rlhf.generation import Rollout, SamplingParams
from rlhf.models import RewardModel, load_causal_lm, load_tokenizer, minilm_path
from rlhf.registry import ModelRegistry
from rlhf_client.channel import Credentials
from rlhf.train import JobIO, PPOJob, RMJob, RolloutSource, SFTJob, Source, run_ppo, run_rm
from services.common import ts
from services.trainer.jobs import JobContext

COMPARISON_POLL_SECONDS = (1.0, 5.0)  # how often a waiting job asks the feedback-store: first, at most
SERVED_POLL_SECONDS = 0.5  # how often a waiting job looks for a served version

# fields of the job configs that name files or directories on the caller's machine: the trainer
# reads its data from the services and writes into its registry, so a StartJob naming them is refused
EXPORT_TASK_IDS = 1000  # task ids per ExportComparisons call (the feedback-store's limit)
VERSION_FIELDS = {"sft": ("model",), "rm": ("model",), "ppo": ("policy", "reference")}  # policy versions
REWARD_VERSION_FIELDS = {"ppo": ("eval_reward_model",)}  # reward-model versions
LOCAL_ONLY = {"sft": ("data", "eval_data", "output"), "rm": ("data", "eval_data", "output"),
              "ppo": ("reward_model", "prompts", "ptx_data", "output")}


def check_for_trainer(kind: str, job, registry: ModelRegistry) -> None:
    """What the trainer refuses at StartJob: the fields only ``rlhf train`` takes (paths on the
    caller's machine: INVALID_ARGUMENT), PPO-ptx without pre-training text (INVALID_ARGUMENT), and
    model or dataset versions its registry does not hold (NOT_FOUND)."""
    parts = [("", kind, job)] if kind != "online_loop" else [("rm.", "rm", job.rm), ("ppo.", "ppo", job.ppo)]
    given = [prefix + f for prefix, k, j in parts for f in LOCAL_ONLY[k] if getattr(j, f)]
    if given:
        raise ConfigError(f"{', '.join(given)}: the trainer takes its data from the services and writes into its "
                          f"registry; these fields are for `rlhf train`")
    for prefix, k, j in parts:
        for name in VERSION_FIELDS[k]:
            version = getattr(j, name)
            if version and not (k in ("rm", "sft") and name == "model" and version == "minilm"):
                registry.path("policy", version)  # DataError / NotFoundError naming the version
        if k == "ppo" and j.ppo.ptx_coef > 0 and not j.ptx_dataset:
            raise ConfigError(f"{prefix}ppo.ptx_coef > 0 needs pre-training text: {prefix}ptx_dataset, a dataset "
                              "version of the trainer's registry (`rlhf import-dataset`) or latest")
        if k == "ppo" and j.ptx_dataset:
            registry.resolve("dataset", j.ptx_dataset)
        for name in REWARD_VERSION_FIELDS.get(k, ()):
            if getattr(j, name):
                registry.path("reward", getattr(j, name))


@dataclass
class OnlineLoopConfig:
    iterations: int = 1  # rounds of the loop in this job
    prompts_per_iteration: int = 8  # labeling tasks created per iteration
    k: int = 4  # candidates per task
    comparisons_needed: int = 8  # N: comparisons of the iteration's own tasks that trigger RM training
    wait_timeout_seconds: float = 600.0  # give up waiting for labels after this long
    candidate_max_new_tokens: int = 16  # length of each candidate
    candidate_min_new_tokens: int = 1  # no empty candidates: a labeler cannot rank nothing
    rm: RMJob = field(default_factory=RMJob)  # the RM job of each round
    ppo: PPOJob = field(default_factory=PPOJob)  # the PPO job of each round (its checkpoint section: how often, within a round)

    LIMITS: ClassVar[dict[str, Range]] = {
        "iterations": count(1, 1_000_000), "prompts_per_iteration": count(1, MAX_BATCH), "k": count(MIN_K, MAX_K),
        "comparisons_needed": count(1, 10**9), "wait_timeout_seconds": Range(0, 10**7, lo_open=True),
        "candidate_max_new_tokens": count(1, 100_000), "candidate_min_new_tokens": count(0, 100_000)}


# -- the peers every body gets ------------------------------------------------------------------


@dataclass
class Peers:
    """The SDK's typed clients of the other services (deadline ``timeout`` on every call), the
    registry, and ``served(kind)``: the newest version an instance announced it serves (the
    trainer records the rlhf.serving.v1 events; services/trainer/service.py)."""

    prompts: PromptClient
    policy: PolicyClient
    reward: RewardClient
    feedback: FeedbackClient
    registry: ModelRegistry
    served: Callable[[str], str]
    device: str = "cpu"
    timeout: float = 300.0

    def count_stored_comparisons(self, task_ids: list[str]) -> int:
        """Comparisons the feedback-store holds for these labeling tasks."""
        return sum(sum(1 for _ in self.feedback.export_comparisons(task_ids=task_ids[i : i + EXPORT_TASK_IDS]))
                   for i in range(0, len(task_ids), EXPORT_TASK_IDS))

    def wait_comparisons(self, task_ids: list[str], needed: int, timeout: float, check: Callable[[], None]) -> int:
        """Wait until the feedback-store holds ``needed`` comparisons of these labeling tasks (what
        it stores counts, each comparison once, however often its event was delivered)."""
        deadline, pause = time.monotonic() + timeout, COMPARISON_POLL_SECONDS[0]
        while True:
            check()
            stored = self.count_stored_comparisons(task_ids)
            if stored >= needed:
                return stored
            if time.monotonic() + pause > deadline:
                raise UnavailableError(f"only {stored} of {needed} comparisons arrived within {timeout:.0f} s")
            time.sleep(pause)
            pause = min(pause * 1.5, COMPARISON_POLL_SECONDS[1])

    def wait_served(self, kind: str, version: str, timeout: float, check: Callable[[], None]) -> None:
        """Wait until an instance announces on rlhf.serving.v1 that it serves ``version`` (or newer)."""
        what = {"policy": "policy-server", "reward": "reward-scorer"}[kind]
        deadline = time.monotonic() + timeout
        while self.served(kind) < version:
            check()
            if time.monotonic() > deadline:
                raise UnavailableError(f"the {what} did not serve {kind} version {version} within {timeout:.0f} s")
            time.sleep(SERVED_POLL_SECONDS)

    @classmethod
    def connect(cls, addrs: dict[str, str], creds: Credentials | None = None, timeout: float = 300.0,
                **kw) -> "Peers":
        return cls(prompts=PromptClient(addrs["prompt-collector"], creds, timeout),
                   policy=PolicyClient(addrs["policy-server"], creds, timeout),
                   reward=RewardClient(addrs["reward-scorer"], creds, timeout),
                   feedback=FeedbackClient(addrs["feedback-store"], creds, timeout), timeout=timeout, **kw)


def _to_comparison(c: feedback_pb2.Comparison) -> Comparison:
    if c.kind == feedback_pb2.COMPARISON_KIND_BEST_OF_K:
        return Comparison(prompt=c.prompt, responses=tuple(c.candidates), kind="best_of_k", best=c.best_index)
    return Comparison(prompt=c.prompt, responses=tuple(c.candidates), kind="ranking",
                      ranking=tuple(tuple(g.indices) for g in c.ranking))


def _sampling(sp: SamplingParams) -> dict:
    """A PPO job's sampling settings as the policy-server's SamplingParams fields."""
    return dict(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_new_tokens=sp.max_new_tokens,
                min_new_tokens=sp.min_new_tokens)


def rollout_from_response(resp: policy_pb2.GenerateResponse, pad_id: int, eos_id: int) -> Rollout:
    """Left-padded prompts and right-padded responses, as PPOTrainer expects, from the server's ids."""
    prompts = [list(r.prompt_token_ids) for r in resp.results]
    comps = [r.completions[0] for r in resp.results]
    P = max(len(p) for p in prompts)
    R = max(1, max(len(c.token_ids) for c in comps))
    p_ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])  # (B, P)
    p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    r_ids = torch.tensor([list(c.token_ids) + [pad_id] * (R - len(c.token_ids)) for c in comps])  # (B, R)
    r_mask = torch.tensor([[1] * len(c.token_ids) + [0] * (R - len(c.token_ids)) for c in comps])
    lps = torch.tensor([list(c.logprobs) + [0.0] * (R - len(c.logprobs)) for c in comps], dtype=torch.float32)
    ended = torch.tensor([len(c.token_ids) > 0 and c.token_ids[-1] == eos_id for c in comps])
    return Rollout(p_ids, p_mask, r_ids, r_mask, lps, None, ended)


class ServerRollouts(RolloutSource):
    """Rollouts sampled by the policy-server; every step's weights are published as a version so
    that the policy-server serves them for the next rollouts.

    Calls that need no model work overlap the trainer's: a new version is written and announced
    while the next rollouts are generated (it is awaited before the weights change again), and
    with ``prefetch`` the next step's rollouts are asked for before this step's update.
    """

    def __init__(self, io: "ServiceIO", job: PPOJob, trainer: PPOTrainer, prompts_for_step: Callable[[int], list[str]],
                 start: str, write: Callable[[Path], None], manifest: Callable[[dict], dict]):
        self.io, self.job, self.trainer, self.prompts_for_step = io, job, trainer, prompts_for_step
        self.main = trainer.world.main  # rank 0 alone publishes (each rank asks for its share of the rollouts)
        self.write, self.manifest = write, manifest
        self.current, self.published = start, [start]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-publish")
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-rollouts") if job.prefetch_rollouts else None
        self.next_rollout: Future | None = self.ahead.submit(self._fetch, 0) if self.ahead else None
        self.pending: Future | None = None

    def _fetch(self, step: int) -> tuple[list[str], policy_pb2.GenerateResponse]:
        prompts = self.prompts_for_step(step)
        peers = self.io.peers
        # the behaviour log-probs: those of the distribution the server sampled from, under the
        # version it served (PPO's ratio is taken against them, so a stale rollout is corrected)
        return prompts, peers.policy.generate(prompts, return_logprobs=True, logprobs_of=policy_pb2.LOGPROBS_OF_SAMPLING,
                                              **_sampling(self.job.ppo.sampling))

    def next(self, step: int) -> tuple[list[str], Rollout, dict]:
        t0 = time.perf_counter()
        if self.ahead is not None:  # asked for while the previous step updated
            prompts, gen = self.next_rollout.result()
            if step + 1 < self.job.steps:
                self.next_rollout = self.ahead.submit(self._fetch, step + 1)
        else:
            prompts, gen = self._fetch(step)
        tok = self.trainer.tok
        rollout = rollout_from_response(gen, tok.pad_token_id, tok.eos_token_id)
        t_generate, t0 = time.perf_counter() - t0, time.perf_counter()
        self._await_publication()
        # how many versions behind the trainer's current policy the rollouts were sampled
        v = gen.policy_version
        stale = len(self.published) - 1 - self.published.index(v) if v in self.published else -1
        return prompts, rollout, {"own_rollout": False, "behaviour_logprobs": True, "rollout_staleness_versions": stale,
                                  "time_generate_seconds": t_generate,
                                  "time_publish_seconds": time.perf_counter() - t0}  # waiting for the last publication

    def _await_publication(self) -> None:
        if self.pending is not None:
            self.current = self.pending.result()
            self.published.append(self.current)
            self.pending = None

    def stepped(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        fields = self.manifest(metrics)
        parent = self.current
        self.pending = self.pool.submit(lambda: self.io.publish_version(
            "policy", self.write, parent=parent, metrics=fields["metrics"], config=fields["config"], data=fields["data"]))

    def finish(self) -> str:
        self._await_publication()
        if self.main:
            self.io.peers.wait_served("policy", self.current, self.job.wait_for_serving_seconds, self.io.ctx.check)
        return self.current

    def state(self) -> dict:
        self._await_publication()  # a checkpoint follows the step's version
        return {"published": list(self.published), "current": self.current}

    def load_state(self, state: dict) -> None:
        self.published, self.current = list(state["published"]), state["current"]

    def close(self) -> None:
        for pool in (self.pool, self.ahead):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class ServiceIO(JobIO):
    """The recipes' inputs and outputs through the services and the registry. ``span`` maps the
    job's progress into a part of the whole (a stage of the online loop)."""

    def __init__(self, ctx: JobContext, peers: Peers, span: tuple[float, float] = (0.0, 1.0),
                 checkpoints: Path | None = None):
        self.ctx, self.peers, self.span, self.checkpoints = ctx, peers, span, checkpoints
        self.device = peers.device

    def _at(self, progress: float | None) -> float | None:
        lo, hi = self.span
        return None if progress is None else lo + (hi - lo) * progress

    # progress
    def event(self, message: str, progress: float | None = None, metrics: dict | None = None) -> None:
        self.ctx.event(message, self._at(progress), metrics)

    def step(self, stage: str, done: int, total: int, metrics: dict) -> None:
        """A step's event; a PPO step's carries all its metrics (the trainer exports them)."""
        if stage == "PPO":
            m = metrics
            self.ctx.event(f"PPO step {done}/{total}: reward {m['reward']:+.3f} KL {m['kl']:.2f}", self._at(done / total),
                           m, stage="PPO")
        else:
            self.ctx.event(f"{stage} step {done}", self._at(0.1 + 0.8 * min(1.0, done / total)), metrics, stage=stage)

    def check(self) -> None:
        self.ctx.check()

    # inputs
    def demonstrations(self, job: SFTJob) -> tuple[list[Demonstration], list[Demonstration]]:
        self.event("exporting demonstrations from the feedback-store", 0.02)
        demos = list(self.peers.feedback.export_demonstrations())
        return [Demonstration(d.prompt, d.response) for d in demos], []

    def comparisons(self, job: RMJob) -> tuple[list[Comparison], list[Comparison]]:
        self.event("exporting comparisons from the feedback-store", 0.02)
        exported = list(self.peers.feedback.export_comparisons(**({"since": ts(job.since_unix)} if job.since_unix > 0 else {})))
        train = [_to_comparison(c) for c in exported if c.split != common_pb2.SPLIT_TEST]
        held = [_to_comparison(c) for c in exported if c.split == common_pb2.SPLIT_TEST]
        return train, held

    def _latest(self, kind: str) -> str:
        v = self.peers.registry.latest(kind)
        if v is None:
            raise UnavailableError(f"the registry holds no {kind} version yet")
        return v

    def policy(self, ref: str, field_name: str) -> Source:
        version = ref or self._latest("policy")
        return Source(self.peers.registry.path("policy", version), version)

    def _root(self, version: str) -> str:
        while parent := self.peers.registry.manifest("policy", version).parent_version:
            version = parent
        return version

    def reference(self, job: PPOJob, start: Source) -> Source:
        version = job.reference or self._root(start.parent)
        return Source(self.peers.registry.path("policy", version), version)

    def reward_backbone(self, job: RMJob) -> tuple[RewardModel, str]:
        reg = self.peers.registry
        if job.model == "minilm" or job.backbone == "encoder":
            if job.model != "minilm":
                raise ConfigError("the trainer's encoder backbone is the packaged MiniLM: model: minilm")
            return RewardModel.from_encoder(minilm_path(), job.rm.seed), ""
        if not job.model and job.init_from == "reward" and reg.latest("reward"):
            parent = reg.latest("reward")
            return RewardModel.load(reg.path("reward", parent)), parent
        path = self.policy(job.model, "model").path
        return RewardModel.from_causal_lm(load_causal_lm(path), load_tokenizer(path), job.rm.seed), ""

    def prompts(self, job: PPOJob) -> list[str]:
        return [p.text for p in self.peers.prompts.list(split=common_pb2.SPLIT_TRAIN)]

    def ptx_texts(self, job: PPOJob) -> list[str] | None:
        return self.peers.registry.texts(job.ptx_dataset) if job.ptx_dataset else None

    def reward_fn(self, job: PPOJob):
        last = {"v": ""}

        def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
            r = self.peers.reward.score(zip(prompts, responses))
            last["v"] = r.reward_model_version
            return torch.tensor(list(r.scores), dtype=torch.float32)

        return score, lambda: {"reward_model": last["v"]}

    def eval_reward_model(self, job: PPOJob) -> Path:
        return self.peers.registry.path("reward", job.eval_reward_model)

    def rollouts(self, job, start, trainer, prompts_for_step, write, manifest) -> RolloutSource:
        if job.rollouts == "local":
            return super().rollouts(job, start, trainer, prompts_for_step, write, manifest)
        return ServerRollouts(self, job, trainer, prompts_for_step, start.parent, write, manifest)

    def checkpoint_dir(self, job) -> Path | None:
        return self.checkpoints

    # outputs
    def publish_version(self, kind: str, write, *, parent: str, metrics: dict, config: dict, data: dict) -> str:
        peers, ctx = self.peers, self.ctx
        m = peers.registry.publish(kind, write, parent_version=parent, job_id=ctx.job_id, metrics=metrics,
                                   config=config, data=data)
        ctx.published(models_pb2.ModelVersionPublishedEvent(
            event_id=uuid.uuid4().hex, version=m.version, parent_version=parent, job_id=ctx.job_id,
            kind=common_pb2.MODEL_KIND_POLICY if kind == "policy" else common_pb2.MODEL_KIND_REWARD,
            metrics={k: float(v) for k, v in m.metrics.items()}, create_time=ts()))
        return m.version

    def publish(self, kind, write, job, *, parent, metrics, config, data) -> str:
        return self.publish_version(kind, write, parent=parent, metrics=metrics, config=config, data=data)


def run_job(kind: str, ctx: JobContext, peers: Peers, job, checkpoints: Path | None = None) -> dict:
    """A trainer job: one of the core recipes through :class:`ServiceIO`, or the online loop.
    ``checkpoints``: the job's checkpoint directory (it resumes from what it holds)."""
    from rlhf.train import RECIPES

    if kind == "online_loop":
        return run_online_loop(ctx, peers, job, checkpoints)
    result = RECIPES[kind](job, ServiceIO(ctx, peers, checkpoints=checkpoints))
    result.pop("output")
    return result


# -- the online loop ----------------------------------------------------------------------------


def _printable(text: str) -> str:
    """A byte-level model can emit NUL, which no labeler can read and PostgreSQL cannot store."""
    return text.replace("\x00", "\ufffd")


class LoopState:
    """Where the online loop is, in ``loop.json`` of its checkpoint directory (replaced atomically
    at every stage): the iteration, the labeling tasks it created, the reward model it trained.
    A resumed loop creates no second set of tasks and trains no second reward model for an
    iteration, so no comparison is counted twice; its PPO resumes from its own checkpoints."""

    def __init__(self, directory: Path | None):
        self.file = directory / "loop.json" if directory is not None else None
        self.data: dict = json.loads(self.file.read_text()) if self.file is not None and self.file.is_file() else {}

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def save(self, **changes) -> None:
        self.data.update(changes)
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(".loop.json.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.file)


def run_online_loop(ctx: JobContext, peers: Peers, cfg: OnlineLoopConfig, checkpoints: Path | None = None) -> dict:
    state = LoopState(checkpoints)
    result: dict = state.get("result", {})
    first = state.get("iteration", 0)
    if first:
        ctx.event(f"resuming at iteration {first + 1}")
    for it in range(first, cfg.iterations):
        base = it / cfg.iterations
        span = 1.0 / cfg.iterations
        where = checkpoints / f"iteration-{it + 1:04d}" if checkpoints is not None else None
        if state.get("tasks") is None:
            ctx.event(f"iteration {it + 1}: sampling {cfg.prompts_per_iteration} prompts", base)
            sampled = peers.prompts.sample(cfg.prompts_per_iteration, split=common_pb2.SPLIT_TRAIN, seed=int(time.time()))
            if not sampled:
                raise DataError("the prompt-collector holds no train prompts")
            gen = peers.policy.generate([p.text for p in sampled], n=cfg.k, max_new_tokens=cfg.candidate_max_new_tokens,
                                        min_new_tokens=cfg.candidate_min_new_tokens)
            tasks = peers.feedback.create_tasks([
                feedback_pb2.LabelingTaskInput(prompt=p.text, prompt_id=p.prompt_id, split=p.split,
                                               candidates=[_printable(c.text) for c in r.completions],
                                               policy_version=gen.policy_version)
                for p, r in zip(sampled, gen.results)])
            state.save(iteration=it, tasks=[t.task_id for t in tasks], rm_version=None)
            ctx.event(f"iteration {it + 1}: {len(tasks)} labeling tasks from policy {gen.policy_version}; "
                      f"waiting for {cfg.comparisons_needed} comparisons", base + 0.1 * span)
        rm_version = state.get("rm_version")
        if rm_version is None:
            # only comparisons of this iteration's tasks count, as the feedback-store confirms them;
            # the RM then trains on every stored comparison
            arrived = peers.wait_comparisons(state.get("tasks"), cfg.comparisons_needed, cfg.wait_timeout_seconds,
                                             ctx.check)
            ctx.event(f"iteration {it + 1}: {arrived} new comparisons; training the RM", base + 0.3 * span)
            rm_metrics = run_rm(cfg.rm, ServiceIO(ctx, peers, (base + 0.3 * span, base + 0.5 * span),
                                                  where / "rm" if where is not None else None))
            rm_version = rm_metrics.pop("output")
            state.save(rm_version=rm_version, rm_metrics=rm_metrics)
        peers.wait_served("reward", rm_version, cfg.ppo.wait_for_serving_seconds, ctx.check)
        ppo_metrics = run_ppo(cfg.ppo, ServiceIO(ctx, peers, (base + 0.5 * span, base + span),
                                                 where / "ppo" if where is not None else None))
        ppo_metrics.pop("output")
        result = {**state.get("rm_metrics", {}), **ppo_metrics, "iterations": float(it + 1)}
        state.save(iteration=it + 1, tasks=None, rm_version=None, rm_metrics=None, result=result)
    return result
