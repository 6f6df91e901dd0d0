"""The trainer's job bodies: RM, SFT and PPO through the other services, and the online loop.

Each body runs in a job thread and talks to the other services over gRPC with blocking stubs:
prompts from the prompt-collector, rollouts from the policy-server, scores from the
reward-scorer, feedback from the feedback-store. New versions go into the registry and are
announced on rlhf.models.v1; the policy-server and reward-scorer pick them up from there.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
import torch
from rlhf_client import (common_pb2, feedback_grpc, feedback_pb2, models_pb2, policy_grpc, policy_pb2,
                         prompts_grpc, prompts_pb2, reward_grpc, reward_pb2)

from rlhf.algos.ppo import PPOConfig, PPOTrainer
from rlhf.algos.rm import RMTrainConfig, normalize_reward_model, pair_accuracy, train_reward_model
from rlhf.algos.sft import SFTConfig, encode_demonstrations, train_lm
from rlhf.config import to_dict
from rlhf.data import Comparison, Demonstration
from rlhf.errors import DataError, UnavailableError
from rlhf.generation import Rollout, SamplingParams
from rlhf.models import RewardModel, load_causal_lm, load_tokenizer, save_pretrained
from rlhf.registry import Manifest, ModelRegistry
from services.common import ts
from services.trainer.jobs import JobContext

GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# -- job configs (overridable with "section.field" -> value, as `rlhf train --set`) ---------------


@dataclass
class RMJobConfig:
    rm: RMTrainConfig = field(default_factory=RMTrainConfig)  # loss, epochs, lr, ... (rlhf train rm)
    init_from: str = "policy"  # "policy": a fresh head on the latest policy's trunk (Ziegler et al.); "reward": continue the latest RM
    min_comparisons: int = 4  # fewer stored comparisons fail the job
    since_unix: float = 0.0  # only comparisons stored at or after this time (0: all)


@dataclass
class SFTJobConfig:
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=1.0, batch_size=8, lr=5e-5, warmup_steps=0))  # rlhf train sft's section
    max_length: int = 128  # tokens of prompt + demonstration
    min_demonstrations: int = 1  # fewer stored demonstrations fail the job


def _small_ppo() -> PPOConfig:
    return PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=1e-5, sampling=SamplingParams(max_new_tokens=16))


@dataclass
class PPOJobConfig:
    ppo: PPOConfig = field(default_factory=lambda: _small_ppo())  # rlhf train ppo's section
    steps: int = 2  # PPO steps (each: rollouts -> scores -> update -> publish)
    reference_version: str = ""  # rho; empty: the root of the policy's lineage (the SFT model)
    wait_for_serving_seconds: float = 120.0  # how long to wait for the policy-server to serve the final version
    # ask for the next step's rollouts before this step's update (they overlap it on the
    # policy-server's hardware, one version staler; old log-probs are recomputed either way)
    prefetch_rollouts: bool = False


@dataclass
class OnlineLoopConfig:
    iterations: int = 1  # rounds of the loop in this job
    prompts_per_iteration: int = 8  # labeling tasks created per iteration
    k: int = 4  # candidates per task
    comparisons_needed: int = 8  # N: comparisons of the iteration's own tasks that trigger RM training
    wait_timeout_seconds: float = 600.0  # give up waiting for labels after this long
    candidate_max_new_tokens: int = 16  # length of each candidate
    candidate_min_new_tokens: int = 1  # no empty candidates: a labeler cannot rank nothing
    rm: RMJobConfig = field(default_factory=RMJobConfig)  # the RM job of each round
    ppo: PPOJobConfig = field(default_factory=PPOJobConfig)  # the PPO job of each round


# -- the context every body gets --------------------------------------------------------------


@dataclass
class Peers:
    """Blocking stubs to the other services, and the publish hook."""

    prompts: prompts_grpc.PromptCollectorServiceStub
    policy: policy_grpc.PolicyServiceStub
    reward: reward_grpc.RewardServiceStub
    feedback: feedback_grpc.FeedbackServiceStub
    registry: ModelRegistry
    publish_event: Callable[[models_pb2.ModelVersionPublishedEvent], None]
    observe_ppo_step: Callable[[dict], None]
    comparisons_for: Callable[[Iterable[str]], int]  # comparison events consumed for these task ids
    device: str = "cpu"
    timeout: float = 300.0

    @classmethod
    def connect(cls, addrs: dict[str, str], **kw) -> "Peers":
        ch = {k: grpc.insecure_channel(v, options=GRPC_OPTIONS) for k, v in addrs.items()}
        return cls(prompts=prompts_grpc.PromptCollectorServiceStub(ch["prompt-collector"]),
                   policy=policy_grpc.PolicyServiceStub(ch["policy-server"]),
                   reward=reward_grpc.RewardServiceStub(ch["reward-scorer"]),
                   feedback=feedback_grpc.FeedbackServiceStub(ch["feedback-store"]), **kw)


def _publish(peers: Peers, ctx: JobContext, kind: str, write, parent: str, metrics: dict, config: dict,
             data: dict | None = None) -> Manifest:
    m = peers.registry.publish(kind, write, parent_version=parent, job_id=ctx.job.job_id, metrics=metrics,
                               config=config, data=data or {})
    peers.publish_event(models_pb2.ModelVersionPublishedEvent(
        event_id=uuid.uuid4().hex, version=m.version, parent_version=parent, job_id=ctx.job.job_id,
        kind=common_pb2.MODEL_KIND_POLICY if kind == "policy" else common_pb2.MODEL_KIND_REWARD,
        metrics={k: float(v) for k, v in metrics.items()}, create_time=ts()))
    ctx.published(m.version)
    return m


def _latest(peers: Peers, kind: str) -> str:
    v = peers.registry.latest(kind)
    if v is None:
        raise UnavailableError(f"the registry holds no {kind} version yet")
    return v


def _root(peers: Peers, version: str) -> str:
    while True:
        parent = peers.registry.manifest("policy", version).parent_version
        if not parent:
            return version
        version = parent


def _policy_config(peers: Peers, version: str) -> dict:
    """What a policy's servers need to know (add_bos), carried from parent to child."""
    return {"add_bos": bool(peers.registry.manifest("policy", version).config.get("add_bos", False))}


def _wait_serving(ctx: JobContext, get_version: Callable[[], str], version: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ctx.check()
        try:
            if get_version() >= version:
                return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        if time.monotonic() > deadline:
            raise UnavailableError(f"the {what} did not serve version {version} within {timeout:.0f} s")
        time.sleep(0.2)


# -- RM ---------------------------------------------------------------------------------------


def _to_comparison(c: feedback_pb2.Comparison) -> Comparison:
    if c.kind == feedback_pb2.COMPARISON_KIND_BEST_OF_K:
        return Comparison(prompt=c.prompt, responses=tuple(c.candidates), kind="best_of_k", best=c.best_index)
    return Comparison(prompt=c.prompt, responses=tuple(c.candidates), kind="ranking",
                      ranking=tuple(tuple(g.indices) for g in c.ranking))


def run_rm(ctx: JobContext, peers: Peers, cfg: RMJobConfig, progress: tuple[float, float] = (0.0, 1.0)) -> dict:
    lo, hi = progress
    ctx.event("exporting comparisons from the feedback-store", lo + 0.02 * (hi - lo))
    req = feedback_pb2.ExportComparisonsRequest()
    if cfg.since_unix > 0:
        req.since.CopyFrom(ts(cfg.since_unix))
    exported = [m.comparison for m in peers.feedback.ExportComparisons(req, timeout=peers.timeout)]
    if cfg.rm.loss == "ranking":
        exported = [c for c in exported if c.kind == feedback_pb2.COMPARISON_KIND_RANKING]
    elif cfg.rm.loss == "best_of_k":
        exported = [c for c in exported if c.kind == feedback_pb2.COMPARISON_KIND_BEST_OF_K]
    train = [_to_comparison(c) for c in exported if c.split != common_pb2.SPLIT_TEST]
    held = [_to_comparison(c) for c in exported if c.split == common_pb2.SPLIT_TEST]
    if len(train) < cfg.min_comparisons:
        raise DataError(f"{len(train)} comparisons for the RM's loss {cfg.rm.loss!r}; the job needs at least "
                        f"{cfg.min_comparisons} (rm.min_comparisons)")
    ctx.check()
    parent = ""
    if cfg.init_from == "reward" and peers.registry.latest("reward"):
        parent = peers.registry.latest("reward")
        rm = RewardModel.load(peers.registry.path("reward", parent))
    else:
        pv = _latest(peers, "policy")
        path = peers.registry.path("policy", pv)
        rm = RewardModel.from_causal_lm(load_causal_lm(path), load_tokenizer(path))
    ctx.event(f"training the reward model on {len(train)} comparisons", lo + 0.1 * (hi - lo))
    steps_total = max(1, -(-len(train) // cfg.rm.batch_size) * cfg.rm.epochs)

    def on_step(m: dict) -> None:
        ctx.check()
        ctx.event(f"RM step {m.get('step', 0)}", lo + (hi - lo) * (0.1 + 0.8 * min(1.0, m.get("step", 0) / steps_total)),
                  {"rm_loss": m["loss"]})

    hist = train_reward_model(rm, train, cfg.rm, on_step)
    metrics = {"rm_loss": hist[-1]["loss"], "rm_comparisons": float(len(train))}
    if held:
        metrics["rm_accuracy_heldout"] = pair_accuracy(rm, held, cfg.rm.max_length)
    # the candidates were sampled from the policy: normalise so that they score 0 on average
    prompts = [c.prompt for c in train for _ in c.responses]
    responses = [r for c in train for r in c.responses]
    normalize_reward_model(rm, prompts, responses, cfg.rm.normalize_unit_variance, cfg.rm.max_length)
    m = _publish(peers, ctx, "reward", lambda d: rm.save(d), parent, metrics, to_dict(cfg),
                 data={"comparisons": len(train), "since_unix": cfg.since_unix})
    return {**metrics, "reward_version_published": 1.0}


# -- SFT --------------------------------------------------------------------------------------


def run_sft(ctx: JobContext, peers: Peers, cfg: SFTJobConfig) -> dict:
    ctx.event("exporting demonstrations from the feedback-store", 0.02)
    demos = [m.demonstration for m in peers.feedback.ExportDemonstrations(
        feedback_pb2.ExportDemonstrationsRequest(), timeout=peers.timeout)]
    if len(demos) < cfg.min_demonstrations:
        raise DataError(f"{len(demos)} demonstrations stored; the job needs at least {cfg.min_demonstrations}")
    parent = _latest(peers, "policy")
    path = peers.registry.path("policy", parent)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    ids, attn, loss_mask = encode_demonstrations(tok, [Demonstration(d.prompt, d.response) for d in demos],
                                                 cfg.max_length)
    ctx.event(f"fine-tuning on {len(demos)} demonstrations", 0.1)

    def on_step(m: dict) -> None:
        ctx.check()
        ctx.event(f"SFT step {m.get('step', 0)}", None, {"sft_loss": m["loss"]})

    hist = train_lm(model, ids, attn, loss_mask, cfg.sft, on_step)
    metrics = {"sft_loss": hist[-1]["loss"], "sft_demonstrations": float(len(demos))}
    _publish(peers, ctx, "policy", lambda d: save_pretrained(model, tok, d), parent, metrics,
             {**_policy_config(peers, parent), "job": to_dict(cfg)})
    return metrics


# -- PPO through the services -------------------------------------------------------------------


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


def _sampling_proto(sp: SamplingParams) -> policy_pb2.SamplingParams:
    return policy_pb2.SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                     max_new_tokens=sp.max_new_tokens, min_new_tokens=sp.min_new_tokens)


def run_ppo(ctx: JobContext, peers: Peers, cfg: PPOJobConfig, progress: tuple[float, float] = (0.0, 1.0)) -> dict:
    lo, hi = progress
    start = _latest(peers, "policy")
    ref_version = cfg.reference_version or _root(peers, start)
    ctx.event(f"PPO from policy {start}, reference {ref_version}", lo)
    path = peers.registry.path("policy", start)
    tok = load_tokenizer(path)
    policy = load_causal_lm(path).to(peers.device)
    ref = load_causal_lm(peers.registry.path("policy", ref_version)).to(peers.device)
    policy_config = _policy_config(peers, start)
    last_rm_version = {"v": ""}

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        r = peers.reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=s)
                                                              for p, s in zip(prompts, responses)]),
                               timeout=peers.timeout)
        last_rm_version["v"] = r.reward_model_version
        return torch.tensor(list(r.scores), dtype=torch.float32)

    trainer = PPOTrainer(policy, tok, reward_fn, cfg.ppo, ref_model=ref)
    current = start
    published = [start]
    staleness: list[int] = []
    hist = []

    def sample_prompts(step: int) -> list[str]:
        sampled = peers.prompts.SamplePrompts(prompts_pb2.SamplePromptsRequest(
            split=common_pb2.SPLIT_TRAIN, count=cfg.ppo.batch_size, seed=cfg.ppo.seed * 100003 + step + 1),
            timeout=peers.timeout).prompts
        if len(sampled) < cfg.ppo.batch_size:
            raise DataError(f"the prompt-collector holds {len(sampled)} train prompts; a PPO step needs "
                            f"ppo.batch_size={cfg.ppo.batch_size}")
        return [p.text for p in sampled]

    def publish(parent: str, m: dict) -> str:
        return _publish(peers, ctx, "policy", lambda d: save_pretrained(policy, tok, d), parent,
                        {k: m[k] for k in ("reward", "kl", "kl_coef", "entropy")},
                        {**policy_config, "reference_version": ref_version, "reward_model_version": last_rm_version["v"],
                         "job": to_dict(cfg)}).version

    def generate(prompts: list[str]) -> policy_pb2.GenerateResponse:
        return peers.policy.Generate(policy_pb2.GenerateRequest(
            prompts=prompts, n=1, sampling=_sampling_proto(cfg.ppo.sampling), return_logprobs=True),
            timeout=peers.timeout)

    def fetch(step: int) -> tuple[list[str], policy_pb2.GenerateResponse]:
        prompts = sample_prompts(step)
        return prompts, generate(prompts)

    # Calls that need no model work overlap the trainer's waiting: the next step's prompts are
    # sampled during this step's update, and a new version is written and announced while the
    # next rollouts are generated (it is awaited before the weights change again).
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-io")
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-rollouts") if cfg.prefetch_rollouts else None
    next_prompts = io.submit(sample_prompts, 0) if ahead is None else None
    next_rollout = ahead.submit(fetch, 0) if ahead is not None else None
    pending: Future | None = None
    try:
        for step in range(cfg.steps):
            ctx.check()
            t_step = t0 = time.perf_counter()
            if ahead is not None:  # sampled and generated while the previous step updated
                prompts, gen = next_rollout.result()
                t_prompts = 0.0
                if step + 1 < cfg.steps:
                    next_rollout = ahead.submit(fetch, step + 1)
            else:
                prompts = next_prompts.result()
                t_prompts, t0 = time.perf_counter() - t0, time.perf_counter()
                gen = generate(prompts)
            rollout = rollout_from_response(gen, tok.pad_token_id, tok.eos_token_id)
            t_generate, t0 = time.perf_counter() - t0, time.perf_counter()
            if pending is not None:
                current = pending.result()
                published.append(current)
            t_publish = time.perf_counter() - t0
            # how many versions behind the trainer's current policy the rollouts were sampled
            stale = len(published) - 1 - published.index(gen.policy_version) if gen.policy_version in published else -1
            staleness.append(stale)
            if ahead is None and step + 1 < cfg.steps:
                next_prompts = io.submit(sample_prompts, step + 1)
            m = trainer.step_on_rollout(prompts, rollout)
            m["rollout_staleness_versions"] = stale
            m["time_prompts_seconds"], m["time_generate_seconds"] = t_prompts, t_generate
            m["time_publish_seconds"] = t_publish  # waiting for the previous version's publication
            hist.append(m)
            pending = io.submit(publish, current, m)
            m["step_duration_seconds"] = dt = time.perf_counter() - t_step  # the whole step, as a caller sees it
            m["samples_per_second"] = len(prompts) / dt
            m["tokens_per_second"] = float(rollout.response_mask.sum()) / dt
            peers.observe_ppo_step(m)
            ctx.event(f"PPO step {step + 1}/{cfg.steps}: reward {m['reward']:+.3f} KL {m['kl']:.2f}",
                      lo + (hi - lo) * (step + 1) / cfg.steps,
                      {k: m[k] for k in ("reward", "kl", "kl_coef", "entropy", "samples_total",
                                         "rollout_staleness_versions", "step_duration_seconds")}
                      | {k: v for k, v in m.items() if k.startswith("time_")})
        if pending is not None:
            current = pending.result()
            published.append(current)
    finally:
        for pool in (io, ahead):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    _wait_serving(ctx, lambda: peers.policy.GetPolicyVersion(policy_pb2.GetPolicyVersionRequest(), timeout=10).policy_version,
                  current, cfg.wait_for_serving_seconds, "policy-server")
    last = hist[-1]
    return {"reward": last["reward"], "kl": last["kl"], "kl_coef": last["kl_coef_next"],
            "samples_total": last["samples_total"], "ppo_steps": float(len(hist)),
            "rollout_staleness_mean_versions": sum(max(0, s) for s in staleness) / len(staleness),
            "rollout_staleness_max_versions": float(max(staleness))}


# -- the online loop ----------------------------------------------------------------------------


def _printable(text: str) -> str:
    """A byte-level model can emit NUL, which no labeler can read and PostgreSQL cannot store."""
    return text.replace("\x00", "\ufffd")



def run_online_loop(ctx: JobContext, peers: Peers, cfg: OnlineLoopConfig) -> dict:
    result: dict = {}
    for it in range(cfg.iterations):
        base = it / cfg.iterations
        span = 1.0 / cfg.iterations
        ctx.event(f"iteration {it + 1}: sampling {cfg.prompts_per_iteration} prompts", base)
        sampled = peers.prompts.SamplePrompts(prompts_pb2.SamplePromptsRequest(
            split=common_pb2.SPLIT_TRAIN, count=cfg.prompts_per_iteration, seed=int(time.time())),
            timeout=peers.timeout).prompts
        if not sampled:
            raise DataError("the prompt-collector holds no train prompts")
        gen = peers.policy.Generate(policy_pb2.GenerateRequest(
            prompts=[p.text for p in sampled], n=cfg.k,
            sampling=policy_pb2.SamplingParams(max_new_tokens=cfg.candidate_max_new_tokens,
                                               min_new_tokens=cfg.candidate_min_new_tokens)), timeout=peers.timeout)
        tasks = peers.feedback.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=[
            feedback_pb2.LabelingTaskInput(prompt=p.text, prompt_id=p.prompt_id, split=p.split,
                                           candidates=[_printable(c.text) for c in r.completions],
                                           policy_version=gen.policy_version)
            for p, r in zip(sampled, gen.results)]), timeout=peers.timeout).tasks
        ctx.event(f"iteration {it + 1}: {len(tasks)} labeling tasks from policy {gen.policy_version}; "
                  f"waiting for {cfg.comparisons_needed} comparisons", base + 0.1 * span)
        # only comparisons of this iteration's tasks count (announced on rlhf.feedback.v1); the RM
        # then trains on every stored comparison
        ids = [t.task_id for t in tasks]
        deadline = time.monotonic() + cfg.wait_timeout_seconds
        while (arrived := peers.comparisons_for(ids)) < cfg.comparisons_needed:
            ctx.check()
            if time.monotonic() > deadline:
                raise UnavailableError(f"only {arrived} of {cfg.comparisons_needed} comparisons "
                                       f"arrived within {cfg.wait_timeout_seconds:.0f} s")
            time.sleep(0.2)
        ctx.event(f"iteration {it + 1}: {arrived} new comparisons; training the RM", base + 0.3 * span)
        rm_metrics = run_rm(ctx, peers, cfg.rm, progress=(base + 0.3 * span, base + 0.5 * span))
        rm_version = ctx.job.published_versions[-1]
        _wait_serving(ctx, lambda: peers.reward.GetRewardModelVersion(
            reward_pb2.GetRewardModelVersionRequest(), timeout=10).reward_model_version,
            rm_version, cfg.ppo.wait_for_serving_seconds, "reward-scorer")
        ppo_metrics = run_ppo(ctx, peers, cfg.ppo, progress=(base + 0.5 * span, base + span))
        result = {**rm_metrics, **ppo_metrics, "iterations": float(it + 1)}
    return result
