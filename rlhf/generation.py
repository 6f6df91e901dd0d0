"""Sampling with a KV cache, returning what PPO needs from the same forward passes.

One prefill over the left-padded prompts, then one single-token step per new token that reuses
the cache. Each step already computes the policy's log-probabilities (and, with a value head,
the values), so PPO can take ``old_logprobs`` and ``values`` straight from the rollout instead of
running a second forward pass.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F

from rlhf.config import Range, count
from rlhf.models import position_ids_from_mask


@dataclass
class SamplingParams:
    """How responses are sampled."""

    max_new_tokens: int = 32  # response length limit in tokens
    temperature: float = 1.0  # softmax(logits / T); 0 is greedy. PPO optimises the distribution at this T
    top_k: int = 0  # 0: off (PPO refuses it: the log-probs it optimises are of the unfiltered distribution)
    top_p: float = 1.0  # 1.0: off (PPO refuses it, as top_k)
    min_new_tokens: int = 0  # EOS cannot be sampled until this many tokens exist (PPO's log-probs know it)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    LIMITS: ClassVar[dict[str, Range]] = {
        "max_new_tokens": count(1, 100_000), "temperature": Range(0, 100), "top_k": count(0, 1_000_000),
        "top_p": Range(0, 1, lo_open=True), "min_new_tokens": count(0, 100_000)}


@dataclass
class Rollout:
    """A batch of sampled continuations. Shapes: B rows, P prompt tokens, R response tokens."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded with pad_token_id after EOS
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens, EOS included
    logprobs: torch.Tensor  # (B, R) log-probs of the tokens (see ``sample``'s ``logprobs``)
    values: torch.Tensor | None  # (B, R) value head outputs, when a value head was given
    ended_with_eos: torch.Tensor  # (B,) bool

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P+R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (B, P+R)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Invert a CDF: per row the index i with cdf[i-1] <= u * total < cdf[i], where total = cdf[-1].

    ``cdf`` (B, V) is the cumulative sum of unnormalised non-negative weights, ``u`` (B, 1) uniform
    in [0, 1). A token of zero weight is never returned: its cdf entry equals the one before, so
    no x satisfies the bounds for it -- even at u == 0 (a left-sided search would return index 0
    there, whatever its weight). When u * total rounds up to total, the last token of non-zero
    weight is returned. Returns (B,).
    """
    total = cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, u * total, right=True)  # (B, 1)
    last = (cdf < total).sum(-1, keepdim=True)  # (B, 1): the first index where the cdf reaches its total
    return torch.minimum(idx, last).squeeze(-1)


def _sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row by inverting the CDF with a uniform number: the same distribution as
    ``torch.multinomial``, ~20x cheaper on CPU, and the generator may live on another device."""
    dev = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=dev).to(probs.device)  # (B, 1)
    return inverse_cdf(probs.cumsum(-1), u)


def sampling_logits(logits: torch.Tensor, temperature: float, min_new_tokens: int, eos_token_id: int | None,
                    first_position: int = 0) -> torch.Tensor:
    """The logits of the distribution the sampler draws from, before any top-k/top-p filter:
    ``logits / temperature``, with EOS at -inf at response positions < ``min_new_tokens``.

    ``logits`` (..., R, V) are for response positions ``first_position`` .. ``first_position+R-1``.
    PPO takes its log-probs of the policy and of the reference from these (TRL divides by the
    temperature in the same way), so the ratio and the KL are those of what was sampled.
    Returns a new float32 tensor.
    """
    out = logits.float() / (temperature if temperature > 0 else 1.0)  # a new tensor: safe to edit
    blocked = min_new_tokens - first_position
    if blocked > 0 and eos_token_id is not None:
        out[..., :blocked, eos_token_id] = float("-inf")
    return out


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can skip the LM head on positions nobody reads (transformers >= 4.50).
    A peft model passes the argument on to the model it wraps."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_token_id: int,
    pad_token_id: int,
    value_head=None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], bool | None] | None = None,
    logprobs: Literal["model", "sampling"] = "model",
) -> Rollout:
    """Sample up to ``params.max_new_tokens`` tokens per row with a KV cache.

    Rows that emit EOS stop (later positions are padding, masked out). ``logprobs="model"`` gives
    the model's own log-probs (temperature 1, no filter, EOS allowed), what an inference API
    reports; ``"sampling"`` gives those of the distribution each token was drawn from
    (temperature, top-k/top-p and the EOS block of ``min_new_tokens`` included; 0 when greedy),
    what PPO needs as its rollout log-probs. ``on_step(tokens, logprobs)`` (each (B,)) is called
    after every step, for streaming; when it returns False, sampling stops there (the caller
    went away).
    """
    if logprobs not in ("model", "sampling"):
        raise ValueError(f"logprobs must be 'model' or 'sampling', got {logprobs!r}")
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    mask = prompt_mask.clone()
    pos = position_ids_from_mask(mask)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    want_hidden = value_head is not None

    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the prefill needs 1 position
    tokens, logps, vals, alive_hist = [], [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos = prompt_ids, pos
    for t in range(params.max_new_tokens):
        with ctx:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
                output_hidden_states=want_hidden,
                **keep_last,
            )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()  # (B, V)
        if want_hidden:
            vals.append(value_head(out.hidden_states[-1][:, -1, :].float()))  # (B,)
        nxt, lp = next_tokens(logits, alive, t, params, eos_token_id, pad_token_id, generator, logprobs)
        tokens.append(nxt)
        logps.append(lp)
        alive_hist.append(alive.clone())
        alive = alive & (nxt != eos_token_id)
        if on_step is not None and on_step(nxt, logps[-1]) is False:
            break
        if not alive.any():
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        step_ids = nxt.unsqueeze(-1)  # (B, 1)
        step_pos = step_pos[:, -1:] + 1  # (B, 1)

    return make_rollout(prompt_ids, prompt_mask, tokens, logps, alive_hist, vals if want_hidden else None,
                        eos_token_id)


def next_tokens(logits: torch.Tensor, alive: torch.Tensor, t: int, params: SamplingParams, eos_token_id: int,
                pad_token_id: int, generator: torch.Generator | None,
                logprobs: Literal["model", "sampling"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response token ``t`` of every row from its next-token ``logits`` (B, V) float32, and its
    log-prob (see :func:`sample`'s ``logprobs``). Rows not ``alive`` (B,) get ``pad_token_id`` and
    log-prob 0, but still consume their uniform number: each step draws B of them, so a row's
    samples do not depend on when the other rows stopped. Returns (tokens (B,), log-probs (B,))."""
    scaled = sampling_logits(logits[:, None], params.temperature, params.min_new_tokens, eos_token_id, t)[:, 0]
    if params.temperature == 0:
        nxt = scaled.argmax(-1)
        logp_all = F.log_softmax(logits, dim=-1) if logprobs == "model" else torch.zeros_like(logits)
    else:
        scaled = _filter_logits(scaled, params.top_k, params.top_p)  # (B, V)
        nxt = _sample_categorical(scaled.softmax(-1), generator)  # (B,)
        logp_all = F.log_softmax(logits if logprobs == "model" else scaled, dim=-1)  # (B, V)
    nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
    lp = logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (B,)
    return nxt, torch.where(alive, lp, torch.zeros_like(lp))  # padding may be outside a filter: no -inf


def make_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: list[torch.Tensor],
                 logps: list[torch.Tensor], alive_hist: list[torch.Tensor], vals: list[torch.Tensor] | None,
                 eos_token_id: int) -> Rollout:
    """A :class:`Rollout` from the per-step tokens, log-probs, 'alive' flags and values (each (B,))."""
    response_ids = torch.stack(tokens, 1)  # (B, R)
    response_mask = torch.stack(alive_hist, 1).long()  # (B, R): real tokens incl. the EOS itself
    logprobs = torch.stack(logps, 1) * response_mask
    values = torch.stack(vals, 1) * response_mask if vals is not None else None
    ended = ((response_ids == eos_token_id) & response_mask.bool()).any(1)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, logprobs, values, ended)


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, device: torch.device | str = "cpu",
                     add_bos: bool = False):
    """Left-padded prompt ids and mask; prompts longer than ``max_length`` keep their last tokens.

    With ``add_bos`` the tokenizer's BOS token is put before each prompt after truncation (so a
    long prompt keeps it), within ``max_length``.
    """
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    budget = max_length - len(bos)
    if budget < 1:
        raise ValueError("max_length leaves no room for the prompt")
    rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"][-budget:] for p in prompts]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device)  # (B, T) left-padded
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without padding or the EOS token."""
    out = []
    for ids, m in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        keep = [i for i, k in zip(ids, m) if k and i != tokenizer.eos_token_id]
        out.append(tokenizer.decode(keep, skip_special_tokens=True))
    return out
