"""Next-token choice for a batch whose rows each have their own sampling settings.

The same distribution as :func:`rlhf.generation.sample` row by row: temperature, then top-k,
then top-p on what top-k kept (renormalised), EOS masked until ``min_new_tokens``, greedy at
temperature 0, one inverse-CDF draw per row. Log-probs are the policy's own (temperature 1) at
the chosen token, or, for a row that asks (``sampling_logprobs``), those of the distribution the
token was drawn from, as PPO needs them. A row with a seed draws its uniform numbers from its own
generator, so its samples do not depend on the other rows' draws.

Before that, on the rows that ask for them (the others cost nothing):

* penalties, on the raw logits: ``repetition_penalty`` r (CTRL, as TGI and vLLM apply it: the
  logit of every token of the prompt or the sample so far is divided by r when positive,
  multiplied by r when negative), then OpenAI's ``frequency_penalty`` f and
  ``presence_penalty`` p (the logit of token t drops by f * count(t) + p * [count(t) > 0], counts
  over the sample so far);
* a structured-output mask (tokens the row's grammar does not allow next are -inf);
* ``min_p`` (after the temperature: tokens less likely than min_p times the likeliest one are
  dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.generation import inverse_cdf
from rlhf.inference.guided import mask_rows
from rlhf.serving import GenerationRequest


class BatchParams:
    """The rows' sampling settings (each row's :class:`~rlhf.serving.GenerationRequest` and, for a
    seeded sample, its own generator) as tensors, rebuilt only when the set of rows changes."""

    def __init__(self, reqs: list[GenerationRequest], generators: list[torch.Generator | None],
                 device: torch.device):
        self.n = len(reqs)
        t = [r.temperature for r in reqs]
        self.greedy = torch.tensor([x == 0 for x in t], device=device)  # (n,)
        self.all_greedy = all(x == 0 for x in t)
        self.any_greedy = any(x == 0 for x in t)
        self.temperature = torch.tensor([x if x > 0 else 1.0 for x in t], device=device)[:, None]  # (n, 1)
        self.all_t1 = all(x == 1.0 for x in t)
        self.any_top_k = any(r.top_k > 0 for r in reqs)
        self.any_top_p = any(r.top_p < 1.0 for r in reqs)
        self.top_k = torch.tensor([r.top_k for r in reqs], device=device)[:, None]  # (n, 1)
        self.top_p = torch.tensor([r.top_p for r in reqs], device=device)[:, None]  # (n, 1)
        filtered = [r.top_k > 0 or r.top_p < 1.0 for r in reqs]
        self.filtered = torch.tensor(filtered, device=device)  # (n,) rows that sample from a top-k/top-p set
        self.all_filtered = all(filtered)
        self.top_logprobs = max((r.top_logprobs for r in reqs), default=0)
        self.seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
        self.unseeded = torch.tensor([i for i, g in enumerate(generators) if g is None], dtype=torch.long)
        self.none_seeded = not self.seeded
        # rows that report log-probs of the distribution sampled from, not the model's own
        self.sampling_logprobs = torch.tensor([r.logprobs_of == "sampling" for r in reqs], device=device)  # (n,)
        self.any_sampling_logprobs = any(r.logprobs_of == "sampling" for r in reqs)
        # penalties: the rows that have any, and their settings
        pen = [i for i, r in enumerate(reqs)
               if r.repetition_penalty != 1.0 or r.frequency_penalty != 0.0 or r.presence_penalty != 0.0]
        self.penalized = torch.tensor(pen, dtype=torch.long, device=device)  # (m,)
        self.any_penalty = bool(pen)
        self.any_repetition = any(reqs[i].repetition_penalty != 1.0 for i in pen)
        self.repetition = torch.tensor([reqs[i].repetition_penalty for i in pen], device=device)[:, None]  # (m, 1)
        self.frequency = torch.tensor([reqs[i].frequency_penalty for i in pen], device=device)[:, None]  # (m, 1)
        self.presence = torch.tensor([reqs[i].presence_penalty for i in pen], device=device)[:, None]  # (m, 1)
        self.any_min_p = any(r.min_p > 0 for r in reqs)
        self.min_p = torch.tensor([r.min_p for r in reqs], device=device)[:, None]  # (n, 1)


def apply_penalties(logits: torch.Tensor, p: BatchParams, counts: torch.Tensor, seen: torch.Tensor) -> None:
    """Penalise, in place, the penalised rows of ``logits`` (n, V). ``counts`` (n, V): each token's
    occurrences in the row's sample so far; ``seen`` (n, V) bool: tokens of its prompt or sample."""
    idx = p.penalized
    rows = logits[idx]  # (m, V)
    if p.any_repetition:
        r = torch.where(rows > 0, 1.0 / p.repetition, p.repetition)  # (m, V)
        rows = torch.where(seen[idx], rows * r, rows)
    c = counts[idx]  # (m, V)
    rows = rows - p.frequency * c - p.presence * (c > 0).to(rows.dtype)
    logits[idx] = rows


def choose(logits: torch.Tensor, p: BatchParams, eos_block: torch.Tensor | None, eos_id: int,
           generator: torch.Generator | None = None, penalty_state: tuple | None = None,
           guided: tuple[list[int], list] | None = None):
    """Pick one token per row. ``logits``: (n, V) float32, modified in place. ``eos_block``:
    (n,) bool, rows that may not end yet. ``penalty_state``: (counts, seen), see
    :func:`apply_penalties` (needed when a row has a penalty); ``guided``: (rows, their grammar
    matchers). Returns ``tokens`` (n,), ``logprobs`` (n,) and, when some row asked for
    alternatives, ``(top_values, top_ids)`` (n, k), else None."""
    n, V = logits.shape
    logp = F.log_softmax(logits, dim=-1)  # (n, V): the policy's own distribution (T = 1)
    # from here on: sampling only, not the log-probs
    if p.any_penalty:
        apply_penalties(logits, p, penalty_state[0], penalty_state[1])
    if eos_block is not None:
        logits[:, eos_id].masked_fill_(eos_block, float("-inf"))
    if guided is not None:
        mask_rows(logits, *guided)
    drawn = None  # (n,) log-probs of the sampled distribution at the chosen token, when asked for
    if p.all_greedy:
        tokens = logits.argmax(-1)
    else:
        scaled = logits if p.all_t1 else logits / p.temperature  # (n, V)
        if p.any_min_p:
            probs = scaled.softmax(-1)  # (n, V)
            scaled = scaled.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        if p.none_seeded:
            u = torch.rand(n, 1, generator=generator)
        else:
            u = torch.empty(n, 1)
            if p.unseeded.numel():
                u[p.unseeded] = torch.rand(p.unseeded.numel(), 1, generator=generator)
            for i, g in p.seeded:
                u[i] = torch.rand(1, generator=g, device=g.device).cpu()
        u = u.to(logits.device)  # (n, 1)
        if p.any_top_k or p.any_top_p:
            sorted_l, order = torch.sort(scaled, descending=True, dim=-1)  # (n, V)
            if p.any_top_k:
                rank = torch.arange(V, device=logits.device)[None, :]
                k = torch.where(p.top_k > 0, p.top_k, V)  # (n, 1)
                sorted_l = sorted_l.masked_fill(rank >= k, float("-inf"))
            probs = sorted_l.softmax(-1)
            if p.any_top_p:
                drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set whose mass >= top_p
                probs = probs.masked_fill(drop, 0.0)
            idx = inverse_cdf(probs.cumsum(-1), u)  # (n,): never a token the filter dropped
            tokens = order.gather(-1, idx[:, None]).squeeze(-1)
            if p.any_sampling_logprobs:
                drawn = (probs.gather(-1, idx[:, None]).squeeze(-1) / probs.sum(-1)).log()
            if not p.all_filtered:
                # the other rows draw in vocabulary order, as they do in a batch without such rows:
                # a seeded sample must not depend on what else runs beside it
                plain = inverse_cdf(scaled.softmax(-1).cumsum(-1), u)
                tokens = torch.where(p.filtered, tokens, plain)
                if p.any_sampling_logprobs:
                    plain_lp = F.log_softmax(scaled, -1).gather(-1, plain[:, None]).squeeze(-1)
                    drawn = torch.where(p.filtered, drawn, plain_lp)
        else:
            tokens = inverse_cdf(scaled.softmax(-1).cumsum(-1), u)  # (n,): never a blocked EOS
            if p.any_sampling_logprobs:
                drawn = F.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)
        if p.any_greedy:
            tokens = torch.where(p.greedy, logits.argmax(-1), tokens)
    lps = logp.gather(-1, tokens[:, None]).squeeze(-1)  # (n,)
    if p.any_sampling_logprobs:  # greedy rows drew their token with probability 1
        drawn = torch.zeros_like(lps) if drawn is None else torch.where(p.greedy, torch.zeros_like(lps), drawn)
        lps = torch.where(p.sampling_logprobs, drawn, lps)
    top = torch.topk(logp, p.top_logprobs, dim=-1) if p.top_logprobs > 0 else None
    return tokens, lps, top


class PenaltyState:
    """What the penalties need to know about each slot of the running batch: how often each token
    occurred in the row's sample so far (``counts``, float (slots, V)) and whether it occurred in
    its prompt or sample (``seen``, bool (slots, V)). Rows are dense, like the KV cache's slots:
    :meth:`move` follows the engine's compaction."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.counts = torch.zeros(slots, vocab, device=device)  # (slots, V)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)  # (slots, V)

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        self.seen[slot, torch.tensor(prompt_ids, device=self.seen.device)] = True

    def move(self, src: int, dst: int) -> None:
        self.counts[dst] = self.counts[src]
        self.seen[dst] = self.seen[src]

    def add_at(self, slot0: int, tokens: torch.Tensor) -> None:
        """Count each row's chosen token (``tokens``: (n,), the rows in slots slot0..slot0+n-1)."""
        rows = torch.arange(slot0, slot0 + tokens.shape[0], device=tokens.device)
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True

    def view(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.counts[:n], self.seen[:n]
