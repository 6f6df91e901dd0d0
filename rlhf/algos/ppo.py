"""PPO for language models under a KL penalty to a frozen reference policy.

Seed 002 (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2), the reward PPO maximises:

    R(x, y) = r(x, y) - beta * log( pi(y|x) / rho(y|x) )

with the KL term applied per token (log pi(y_t|.) - log rho(y_t|.)) and the reward-model score
r(x, y) added at the last response token; rho is the frozen SFT policy. beta is fixed or set by
the adaptive controller in :mod:`rlhf.algos.kl`.

PPO-ptx (InstructGPT eq. 2): objective += gamma * E_{x ~ D_pretrain}[ log pi(x) ], i.e. the loss
gets ``ptx_coef`` times the pre-training negative log-likelihood.

pi and rho above are the distributions the rollouts are sampled from: the model's logits divided
by the sampling temperature, with EOS excluded while ``min_new_tokens`` forbids it (TRL divides
by the temperature in the same way). The ratio, the KL penalty, the controller's KL and the
entropy bonus are all taken under them; top-k/top-p filtering is refused (PPOConfig). Dropout is
turned off in every model the trainer holds.

The PPO machinery (Schulman et al. 2017, as used by both seeds): GAE(gamma, lambda) advantages,
whitened; clipped surrogate policy loss; clipped value loss; several epochs of minibatches per
rollout batch.

Across processes (torchrun; :mod:`rlhf.distributed`) each rank samples and scores its share of
the step's rollouts; the statistics of the whole batch come from all-reduces (advantage
whitening, the KL fed to the controller, the reported rewards), the rows are then gathered so
that every rank forms the same minibatches, each rank runs its share of every minibatch and the
gradients are averaged: a 2-rank run and a 1-rank run on the same rollouts take the same step.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import ClassVar, Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf.algos import lora
from rlhf.algos.kl import make_kl_controller
from rlhf.algos.masked import masked_mean, whiten
from rlhf.algos.sft import PretrainBlocks, sft_loss
from rlhf.config import SEED, UNIT, Range, count
from rlhf.distributed import World
from rlhf.generation import (Rollout, SamplingParams, accepts_logits_to_keep, decode_responses, sample,
                              sampling_logits, tokenize_prompts)
from rlhf.inference.rollouts import check_engine_model, engine_rollout
from rlhf.models import ValueHead, disable_dropout, hidden_size_of, position_ids_from_mask
from rlhf.runtime.threads import fit_threads

RewardFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> scores (B,)


# ----------------------------------------------------------------------------------------------
# The equations, as small pure functions
# ----------------------------------------------------------------------------------------------


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * (log pi - log rho), plus the RM score at the last real token.

    Returns (rewards (B, R), kl (B, R)); both are zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    rewards = -beta * kl
    last = (mask.cumsum(1) * mask).argmax(1)  # (B,) index of the last real token
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses (vectorised over the batch).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1};
    the episode ends at the last real token (V after it is 0). Returns (advantages, returns).
    """
    mask = mask.to(values.dtype)
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)).

    Returns (loss, clip fraction, approx KL(old || new) = mean 0.5 * (log ratio)^2).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean max((V - G)^2, (clip(V, V_old +- eps) - G)^2); and its clip fraction."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1, l2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(l1, l2), mask), masked_mean((l2 > l1).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by ``logits`` (..., V)."""
    return entropy_of_logprobs(F.log_softmax(logits.float(), dim=-1))


def entropy_of_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dimension of log-probs (..., V); tokens at -inf (p = 0) add 0,
    with a zero (not NaN) gradient."""
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) gathered at ``tokens``: (B, R, V), (B, R) -> (B, R)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """PPO hyper-parameters; the sections follow the seeds' equations."""

    # Rollouts
    batch_size: int = 32  # rollouts (prompts) per PPO step
    max_prompt_tokens: int = 32  # longer prompts keep their last tokens
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=32))  # response sampling (see the next table)
    add_bos: bool = True  # prepend the tokenizer's BOS, as the LM saw at the start of documents
    stop_token_ids: tuple[int, ...] = ()  # truncate each response after the first of these tokens
    min_response_tokens: int = 0  # ... but only once the response has this many tokens
    missing_stop_penalty: float | None = None  # score for responses that never reached a stop token/EOS
    # KL penalty (seed: Ziegler et al. eq. 2 and the adaptive controller)
    kl_coef: float = 0.1  # beta at step 0
    kl_target: float | None = 6.0  # nats per sequence; None with adaptive_kl=False -> fixed beta
    adaptive_kl: bool = True  # true: the adaptive controller moves beta towards kl_target; false: beta stays kl_coef
    kl_horizon: int | None = None  # None: beta moves by K_beta = 0.1 per step (the seed); N: by batch_size / N per step (Ziegler et al.'s code: 10000)
    # PPO
    ppo_epochs: int = 4  # passes over each rollout batch
    mini_batch_size: int = 8  # rollouts per gradient step; divides batch_size
    lr: float = 1e-5  # Adam learning rate of the policy (and of the value head unless value_lr is set)
    value_lr: float | None = None  # Adam learning rate of the value head / critic; None: lr (a zero-initialised head learns slowly at a policy's small lr)
    clip_range: float = 0.2  # epsilon of the clipped surrogate
    clip_range_value: float = 0.2  # epsilon of the clipped value loss
    vf_coef: float = 0.1  # weight of the value loss
    entropy_coef: float = 0.0  # weight of an entropy bonus (Schulman et al. 2017, eq. 9); 0 turns it off
    gamma: float = 1.0  # discount of GAE (1: no discount within a response)
    lam: float = 0.95  # lambda of GAE
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 per batch
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    # PPO-ptx
    ptx_coef: float = 0.0  # gamma of InstructGPT eq. 2; 0 turns PPO-ptx off
    ptx_batch_size: int = 8  # pre-training sequences per PPO-ptx gradient step
    ptx_block_size: int = 64  # tokens per pre-training sequence (blocks cut from the pre-training text)
    # What is trained: every weight, or LoRA adapters (rlhf.algos.lora) with rho = the base with them off
    finetune: Literal["full", "lora"] = "full"  # lora needs the peft package
    lora_rank: int = 16  # r of the low-rank update B A
    lora_alpha: float = 32.0  # the update is scaled by alpha / r
    lora_target_modules: tuple[str, ...] = ()  # names of the adapted linear layers; (): every one of each block
    # Speed switches (each changes only how, not what, except bf16's rounding)
    value_model: Literal["shared", "separate"] = "shared"  # value head on the policy trunk, or its own copy
    logprobs_from_rollout: bool = True  # take old log-probs/values from the sampling pass
    rollout_backend: Literal["sampler", "engine"] = "engine"  # engine: the inference engine's runners; sampler: rlhf.generation.sample (docs/ppo.md)
    bf16: bool = False  # bfloat16 autocast for forward passes
    seed: int = 0  # sampling and shuffling seed
    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams(**self.sampling)
        if self.batch_size < 1 or self.mini_batch_size < 1:
            raise ValueError("batch_size and mini_batch_size must be >= 1")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.value_model not in ("shared", "separate"):
            raise ValueError("value_model must be 'shared' or 'separate'")
        if self.rollout_backend not in ("sampler", "engine"):
            raise ValueError(f"rollout_backend must be 'sampler' or 'engine', got {self.rollout_backend!r}")
        if self.ppo_epochs < 1:
            raise ValueError("ppo_epochs must be >= 1")
        if self.sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0: PPO optimises the distribution it samples from, "
                             "and greedy decoding (0) has none")
        if self.sampling.top_k != 0 or self.sampling.top_p != 1.0:
            raise ValueError("PPO samples from the policy's whole distribution: leave sampling.top_k at 0 and "
                             "sampling.top_p at 1 (a filtered distribution's support moves with the weights, and "
                             "its KL to the reference can be infinite; docs/ppo.md)")
        if self.kl_horizon is not None and self.kl_horizon < 1:
            raise ValueError("kl_horizon must be >= 1 episode (or null for the per-step controller)")
        if self.ptx_batch_size < 1 or self.ptx_block_size < 2:
            raise ValueError("ptx_batch_size must be >= 1 and ptx_block_size >= 2")
        if self.finetune == "lora" and self.value_model == "separate":
            raise ValueError("finetune=lora keeps one copy of the weights: use value_model=shared")
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.lora_target_modules = tuple(self.lora_target_modules)

    LIMITS: ClassVar[dict[str, Range]] = {
        "batch_size": count(1, 65_536), "mini_batch_size": count(1, 65_536), "max_prompt_tokens": count(1, 1_000_000),
        "min_response_tokens": count(0, 1_000_000), "missing_stop_penalty": Range(-1e6, 1e6),
        "kl_coef": Range(0, 1000), "kl_target": Range(0, 1e6, lo_open=True), "ppo_epochs": count(1, 1000),
        "lr": Range(0, 1), "value_lr": Range(0, 1), "clip_range": Range(0, 10, lo_open=True),
        "clip_range_value": Range(0, 1e6, lo_open=True), "vf_coef": Range(0, 1000), "entropy_coef": Range(0, 10),
        "gamma": UNIT, "lam": UNIT, "max_grad_norm": Range(0, 1e6, lo_open=True), "ptx_coef": Range(0, 1000),
        "ptx_batch_size": count(1, 65_536), "ptx_block_size": count(2, 1_000_000), "kl_horizon": count(1, 10**12),
        "lora_rank": count(1, 65_536), "lora_alpha": Range(0, 1e6, lo_open=True), "seed": SEED}


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


def _gather(logp_all: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs (b, R, V) at ``tokens`` (b, R), 0 where ``mask`` is False (padding may hold a
    token of probability 0, e.g. an EOS inside min_new_tokens: no -inf may reach a masked sum)."""
    lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def truncate_at_stop(r: Rollout, stop_ids: Sequence[int], min_tokens: int) -> torch.Tensor:
    """Cut each response after its first stop token at index >= min_tokens - 1; returns (B,) 'stopped'."""
    if not stop_ids:
        return r.ended_with_eos.clone()
    is_stop = torch.zeros_like(r.response_ids, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= r.response_ids == s
    R = r.response_ids.shape[1]
    pos = torch.arange(R).expand_as(is_stop)
    is_stop &= (pos >= max(min_tokens - 1, 0)) & r.response_mask.bool()
    first = torch.where(is_stop, pos, torch.full_like(pos, R)).min(1).values  # (B,)
    keep = pos <= first.unsqueeze(1)
    r.response_mask = r.response_mask * keep.long()
    r.logprobs = torch.where(r.response_mask.bool(), r.logprobs, torch.zeros_like(r.logprobs))
    if r.values is not None:
        r.values = r.values * r.response_mask
    return (first < R) | r.ended_with_eos


class PPOTrainer:
    """Owns the policy (trained), the reference (frozen copy), the value head and the optimizer.

    With ``finetune="lora"`` the policy gets LoRA adapters (injected into the module passed in) and
    the reference is the same module with them disabled; :meth:`export_policy` folds them in."""

    def __init__(self, policy, tokenizer, reward_fn: RewardFn, cfg: PPOConfig, ref_model=None,
                 ptx_blocks: PretrainBlocks | torch.Tensor | None = None, world: World | None = None):
        self.cfg = cfg
        self.world = world or World()
        check_world(cfg, self.world)
        if cfg.finetune == "lora":
            policy = lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            ref_model = lora.AdapterOffReference(policy)
        if cfg.rollout_backend == "engine":
            check_engine_model(policy)
        self.policy = policy
        self.tok = tokenizer
        self.reward_fn = reward_fn
        self.device = next(policy.parameters()).device
        disable_dropout(policy)  # before the copies below: the reference and the critic inherit it
        if ref_model is None:
            self.ref = copy.deepcopy(policy)
        else:  # a LoRA policy's reference walks the policy's own modules (adapters off)
            self.ref = disable_dropout(ref_model)
        self.ref.eval().requires_grad_(False)
        self.value_head = ValueHead(hidden_size_of(policy)).to(self.device)
        self.critic = None
        if cfg.value_model == "separate":
            # the value network starts from the policy's trunk (Ziegler et al.); it needs no LM head
            self.critic = copy.deepcopy(policy.base_model)
        value_params = list(self.value_head.parameters())
        if self.critic is not None:
            value_params += list(self.critic.parameters())
        groups = [{"params": list(policy.parameters())},
                  {"params": value_params, "lr": cfg.value_lr if cfg.value_lr is not None else cfg.lr}]
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, eps=1e-5, fused=self.device.type in ("cpu", "cuda"))
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.adaptive_kl, cfg.kl_horizon)
        self.ptx = PretrainBlocks(ptx_blocks) if isinstance(ptx_blocks, torch.Tensor) else ptx_blocks
        if cfg.ptx_coef > 0 and self.ptx is None:
            raise ValueError("ptx_coef > 0 needs pre-training text (ptx_blocks: a PretrainBlocks)")
        # sampling: each rank its own stream; minibatch order and PPO-ptx draws: one stream, the
        # same on every rank, so that all ranks form the same minibatches
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed + SAMPLER_SEED_STRIDE * self.world.rank)
        self.update_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + UPDATE_SEED_OFFSET)
        self.samples_total = 0
        self.tokens_total = 0
        self.step_count = 0

    def export_policy(self):
        """The trained policy as a plain Hugging Face model (LoRA adapters folded into the weights;
        the trainer cannot go on training after that)."""
        return lora.merged(self.policy)

    # -- forward helpers ---------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _forward(self, model, input_ids, attn, P: int, want_hidden: bool):
        R = input_ids.shape[1] - P
        keep = {"logits_to_keep": R + 1} if accepts_logits_to_keep(model) else {}  # no LM head on the prompt
        with self._autocast():
            out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                        output_hidden_states=want_hidden, **keep)
        logits = out.logits[:, -(R + 1) : -1, :]  # (B, R, V): position P-1+t predicts response token t
        hidden = out.hidden_states[-1][:, P - 1 : -1, :].float() if want_hidden else None
        return logits, hidden

    def _sampling_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, R, V) logits -> log-probs of the distribution the rollouts are sampled from."""
        s = self.cfg.sampling
        return F.log_softmax(sampling_logits(logits, s.temperature, s.min_new_tokens, self.tok.eos_token_id), dim=-1)

    def _values(self, input_ids, attn, P, hidden_from_policy):
        if self.critic is None:
            return self.value_head(hidden_from_policy)
        with self._autocast():
            out = self.critic(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
        return self.value_head(out.last_hidden_state[:, P - 1 : -1, :].float())

    # -- one PPO step ------------------------------------------------------------------------------

    def generate(self, prompts: list[str], generator: torch.Generator | None = None,
                 values: bool = True) -> Rollout:
        """Sample responses to ``prompts`` with the policy and the PPO sampling settings, from the
        trainer's own stream unless ``generator`` is given. ``values=False`` skips the value head
        (an evaluation needs only the text). With ``rollout_backend="engine"`` the inference
        engine's runners sample, the values read from their final hidden states."""
        cfg = self.cfg
        fit_threads()  # as many intra-op threads as other processes leave CPUs free
        ids, mask = tokenize_prompts(self.tok, list(prompts), cfg.max_prompt_tokens, self.device, add_bos=cfg.add_bos)
        self.policy.eval()
        shared_values = values and self.critic is None and cfg.logprobs_from_rollout
        if cfg.rollout_backend == "engine":
            return engine_rollout(self.policy, ids, mask, cfg.sampling, self.tok.eos_token_id, self.tok.pad_token_id,
                                  generator=generator or self.gen,
                                  value_head=self.value_head if shared_values else None)
        return sample(self.policy, ids, mask, cfg.sampling, self.tok.eos_token_id, self.tok.pad_token_id,
                      value_head=self.value_head if shared_values else None, generator=generator or self.gen,
                      autocast_dtype=torch.bfloat16 if cfg.bf16 else None, logprobs="sampling")

    def step(self, prompts: list[str]) -> dict:
        """Roll out on ``prompts``, score, and run ppo_epochs x minibatches of updates."""
        cfg = self.cfg
        share = cfg.batch_size // self.world.size  # this rank's share of the step's prompts
        if len(prompts) != share:
            raise ValueError(f"a PPO step takes batch_size={cfg.batch_size} prompts"
                             + (f" ({share} per process)" if self.world.distributed else "") + f", got {len(prompts)}")
        t_start = time.perf_counter()
        timings = {}

        t0 = time.perf_counter()
        r = self.generate(prompts)
        timings["generate"] = time.perf_counter() - t0
        return self.step_on_rollout(prompts, r, own_rollout=True, _t_start=t_start, _timings=timings)

    def step_on_rollout(self, prompts: list[str], r: Rollout, own_rollout: bool = False, *,
                        behaviour_logprobs: bool = False, _t_start: float | None = None,
                        _timings: dict | None = None) -> dict:
        """One PPO step on a rollout batch sampled elsewhere (e.g. by a policy-server).

        ``r.logprobs`` are the behaviour log-probs: those of the distribution each token was drawn
        from (``sample(..., logprobs="sampling")``), under the weights that drew them. With
        ``behaviour_logprobs`` the PPO ratio is taken against them: a rollout sampled by an older
        version starts the update with a ratio != 1, and the clipped surrogate limits how far the
        update moves from the policy that actually sampled it. Without, the old log-probs are
        recomputed with this trainer's current weights (the ratio starts at 1 and the staleness
        goes uncorrected). On a rollout of the current weights the two agree.

        The KL penalty (and the KL fed to the controller) always uses the current weights'
        log-probs: it penalises the policy being optimised, and the controller steers that policy,
        not one several versions old. ``behaviour_approx_kl`` reports how far the behaviour
        log-probs are from the current ones (0 for a fresh rollout).
        """
        cfg = self.cfg
        t_start = _t_start if _t_start is not None else time.perf_counter()
        timings = _timings if _timings is not None else {}
        if r.response_ids.shape[0] != len(prompts):
            raise ValueError(f"rollout has {r.response_ids.shape[0]} rows for {len(prompts)} prompts")
        n_block = min(cfg.sampling.min_new_tokens, r.response_ids.shape[1])
        if ((r.response_ids[:, :n_block] == self.tok.eos_token_id) & r.response_mask[:, :n_block].bool()).any():
            raise ValueError(f"a response ends before sampling.min_new_tokens={cfg.sampling.min_new_tokens}: "
                             "its EOS has probability 0 under the distribution PPO optimises")
        stopped = truncate_at_stop(r, cfg.stop_token_ids, cfg.min_response_tokens)

        t0 = time.perf_counter()
        ids, attn, P = r.input_ids, r.attention_mask, r.prompt_ids.shape[1]
        resp, rmask = r.response_ids, r.response_mask.float()
        real = rmask.bool()
        from_rollout = cfg.logprobs_from_rollout and own_rollout
        with torch.no_grad():
            if from_rollout and r.values is not None:
                logprobs, old_values = r.logprobs, r.values
            elif from_rollout and self.critic is not None:  # log-probs from the rollout, values from the critic
                logprobs = r.logprobs
                old_values = self._values(ids, attn, P, None) * rmask
            else:  # also a rollout without values (the engine's) and no critic: one pass gives both
                logits, hidden = self._forward(self.policy, ids, attn, P, want_hidden=self.critic is None)
                logprobs = _gather(self._sampling_logprobs(logits), resp, real)
                old_values = self._values(ids, attn, P, hidden) * rmask
                del logits, hidden
            ref_logits, _ = self._forward(self.ref, ids, attn, P, want_hidden=False)
            ref_logprobs = _gather(self._sampling_logprobs(ref_logits), resp, real)
            del ref_logits
            old_logprobs = logprobs
            if behaviour_logprobs and not own_rollout:
                old_logprobs = torch.where(real, r.logprobs.to(logprobs.dtype), torch.zeros_like(logprobs))
                if not torch.isfinite(old_logprobs).all():
                    raise ValueError("the rollout's behaviour log-probs must be finite on every response token")
            behaviour_kl = self._batch_mean(0.5 * (logprobs - old_logprobs) ** 2, rmask)
        timings["reference_and_value"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        responses = decode_responses(self.tok, r)
        scores = self.reward_fn(list(prompts), responses).to(self.device).float()
        if cfg.missing_stop_penalty is not None:
            scores = torch.where(stopped, scores, torch.full_like(scores, cfg.missing_stop_penalty))
        timings["reward"] = time.perf_counter() - t0

        beta = self.kl_ctl.beta
        with torch.no_grad():
            rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, rmask, beta)
            adv, returns = gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, rmask, world=self.world)  # the whole batch's mean and variance

        t0 = time.perf_counter()
        batch = self.gather_rows(P, ids, attn, resp, rmask, old_logprobs, old_values, adv, returns)
        stats = self._update(*batch)
        timings["update"] = time.perf_counter() - t0

        g = self.batch_stats(scores, kl, rmask, stopped, beta)
        kl_seq = g["kl"]
        new_beta = self.kl_ctl.update(kl_seq, n_steps=int(g["samples"]))
        n_tokens = int(g["tokens"])
        self.samples_total += int(g["samples"])
        self.tokens_total += n_tokens
        self.step_count += 1
        dt = time.perf_counter() - t_start
        return {
            "step": self.step_count,
            "kl": kl_seq,
            "kl_coef": beta,
            "kl_coef_next": new_beta,
            **({"kl_target": self.kl_ctl.target} if hasattr(self.kl_ctl, "target") else {}),
            "reward": g["reward"],
            "reward_std": g["reward_std"],
            "reward_total": g["reward_total"],
            "response_length_tokens": g["response_length_tokens"],
            "samples_per_second": g["samples"] / dt,
            "tokens_per_second": n_tokens / dt,
            "samples_total": self.samples_total,
            "tokens_total": self.tokens_total,
            "step_duration_seconds": dt,
            "stopped_fraction": g["stopped_fraction"],
            "behaviour_approx_kl": behaviour_kl,
            **stats,
            **{f"time_{k}_seconds": v for k, v in timings.items()},
            "_responses": responses,
            "_scores": scores.detach().cpu(),
        }

    def _update(self, ids, attn, P, resp, rmask, old_logprobs, old_values, adv, returns) -> dict:
        cfg = self.cfg
        self.policy.train()
        B = ids.shape[0]
        acc = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac_ratio": 0.0, "value_clipfrac_ratio": 0.0,
               "entropy": 0.0, "approx_kl": 0.0, "ptx_loss": 0.0}
        n = 0
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for _ in range(cfg.ppo_epochs):
            fit_threads()  # a look per epoch too: a step is seconds long, and a busy core should not wait for the next
            perm = torch.randperm(B, generator=self.update_gen)
            for i in range(0, B, cfg.mini_batch_size):
                whole = perm[i : i + cfg.mini_batch_size]
                rows, weight = self.world.share_or_first(whole.tolist())
                mb = torch.tensor(rows)
                m = rmask[mb]
                # this rank's part of the minibatch's token means (rlhf.distributed)
                scale = weight * self.world.size * m.sum() / rmask[whole].sum().clamp(min=1.0)
                logits, hidden = self._forward(self.policy, ids[mb], attn[mb], P, want_hidden=self.critic is None)
                logp_all = self._sampling_logprobs(logits)  # (b, R, V): for log-probs and entropy
                logprobs = _gather(logp_all, resp[mb], m.bool())
                values = self._values(ids[mb], attn[mb], P, hidden)
                pg, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs[mb], adv[mb], m, cfg.clip_range)
                vf, vclip = value_loss(values, old_values[mb], returns[mb], m, cfg.clip_range_value)
                with torch.set_grad_enabled(cfg.entropy_coef > 0):
                    ent = masked_mean(entropy_of_logprobs(logp_all), m)
                loss = (pg + cfg.vf_coef * vf) * scale
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * ent * scale
                if cfg.ptx_coef > 0:
                    ptx, ptx_scale = self._ptx_loss()
                    loss = loss + cfg.ptx_coef * ptx * ptx_scale
                    acc["ptx_loss"] += ptx.item() * ptx_scale / self.world.size
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.world.average_gradients(params)
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.opt.step()
                for k, v in (("policy_loss", pg), ("value_loss", vf), ("clipfrac_ratio", clipfrac),
                             ("value_clipfrac_ratio", vclip), ("entropy", ent), ("approx_kl", approx_kl)):
                    acc[k] += v.item() * float(scale) / self.world.size
                n += 1
        self.policy.eval()
        total = self.world.sum(torch.tensor(list(acc.values()), dtype=torch.float64)).tolist()
        return {k: v / n for k, v in zip(acc, total)}

    def _batch_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """The masked mean of ``x`` over the whole batch (all ranks' rows)."""
        if not self.world.distributed:
            return masked_mean(x, mask).item()
        s, n = self.world.sum(torch.stack([(x * mask).sum(), mask.sum()]).double()).tolist()
        return s / max(n, 1.0)

    def _ptx_loss(self) -> tuple[torch.Tensor, float]:
        """-log pi(x) on this rank's share of a batch of pre-training blocks (PPO-ptx), at the
        model's own temperature 1 (the pre-training objective, not the sampling distribution), and
        the factor that makes it its part of the whole batch's mean (rlhf.distributed)."""
        idx = torch.randint(0, len(self.ptx), (self.cfg.ptx_batch_size,), generator=self.update_gen)
        rows, weight = self.world.share_or_first(idx.tolist())
        x = self.ptx.blocks[torch.tensor(rows)].to(self.device)
        ones = torch.ones_like(x)
        with self._autocast():
            logits = self.policy(input_ids=x).logits
        return sft_loss(logits, x, ones), weight * self.world.size * len(rows) / len(idx)

    # -- several processes, checkpoints ------------------------------------------------------------

    def batch_stats(self, scores: torch.Tensor, kl: torch.Tensor, rmask: torch.Tensor, stopped: torch.Tensor,
                    beta: float) -> dict[str, float]:
        """The step's statistics over the whole batch (all ranks' rows): the mean KL per sequence
        the controller is fed, the rewards, lengths and counts."""
        kl_seq = kl.sum(1)
        local = torch.stack([torch.tensor(float(scores.numel())), scores.sum(), (scores**2).sum(), kl_seq.sum(),
                             (scores - beta * kl_seq).sum(), rmask.sum(), stopped.float().sum()]).double()
        n, s, s2, k, total, tokens, stop = self.world.sum(local).tolist()
        if not self.world.distributed:  # one process: the same arithmetic as always
            return {"samples": n, "reward": scores.mean().item(), "kl": kl_seq.mean().item(),
                    "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
                    "reward_total": (scores - beta * kl_seq).mean().item(), "tokens": tokens,
                    "response_length_tokens": rmask.sum(1).mean().item(), "stopped_fraction": stopped.float().mean().item()}
        var = (s2 - s * s / n) / (n - 1) if n > 1 else 0.0
        return {"samples": n, "reward": s / n, "kl": k / n, "reward_std": max(var, 0.0) ** 0.5, "reward_total": total / n,
                "tokens": tokens, "response_length_tokens": tokens / n, "stopped_fraction": stop / n}

    def gather_rows(self, P: int, ids, attn, *per_token):
        """Every rank's rollout rows on every rank, in the order of the whole batch (rank r held
        rows r, r + W, ...): prompts left-padded and responses right-padded to the longest.
        ``per_token`` are (b, R) tensors. Returns (ids, attn, P, *per_token)."""
        w = self.world
        if not w.distributed:
            return (ids, attn, P, *per_token)
        pad = self.tok.pad_token_id
        shapes = w.gather((P, ids.shape[1] - P))
        P_max, R_max = max(p for p, _ in shapes), max(r for _, r in shapes)

        def padded(t: torch.Tensor, fill, prompt_part: bool) -> torch.Tensor:
            if prompt_part:  # (b, P) -> (b, P_max), on the left
                return torch.nn.functional.pad(t, (P_max - t.shape[1], 0), value=fill)
            return torch.nn.functional.pad(t, (0, R_max - t.shape[1]), value=fill)  # (b, R) -> (b, R_max)

        ids = torch.cat([padded(ids[:, :P], pad, True), padded(ids[:, P:], pad, False)], 1)
        attn = torch.cat([padded(attn[:, :P], 0, True), padded(attn[:, P:], 0, False)], 1)
        per_token = [padded(t, 0, False) for t in per_token]
        out = []
        for t in (ids, attn, *per_token):
            parts = w.gather(t.cpu())
            rows = [None] * sum(x.shape[0] for x in parts)
            for r, x in enumerate(parts):
                rows[r :: w.size] = list(x)
            out.append(torch.stack(rows).to(t.device))
        ids, attn, *per_token = out
        return (ids, attn, P_max, *per_token)

    def modules(self) -> nn.ModuleDict:
        """The trained modules, as one module (for checkpoints)."""
        return nn.ModuleDict({"policy": self.policy, "value_head": self.value_head,
                              **({"critic": self.critic} if self.critic is not None else {})})

    def loop_state(self) -> tuple[dict, dict]:
        """(state shared by the ranks, this rank's own) besides the modules and the optimizer."""
        shared = {"kl_controller": dict(vars(self.kl_ctl)), "samples_total": self.samples_total,
                  "tokens_total": self.tokens_total, "step_count": self.step_count,
                  "update_gen": self.update_gen.get_state()}
        return shared, {"sampler": self.gen.get_state()}

    def load_loop_state(self, state: dict) -> None:
        """Continue from :meth:`loop_state` (both parts merged)."""
        vars(self.kl_ctl).update(state["kl_controller"])
        self.samples_total, self.tokens_total = state["samples_total"], state["tokens_total"]
        self.step_count = state["step_count"]
        self.update_gen.set_state(state["update_gen"])
        self.gen.set_state(state["sampler"])


SAMPLER_SEED_STRIDE = 1_000_003  # rank r samples with seed + r * this (rank 0: the seed itself)
UPDATE_SEED_OFFSET = 7  # the minibatch / PPO-ptx stream is seeded apart from rank 0's sampler


def check_world(cfg: PPOConfig, world: World) -> None:
    """Each rank samples an equal share of a step's rollouts."""
    if cfg.batch_size % world.size:
        raise ValueError(f"ppo.batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                         f"({world.size}): each samples an equal share")
