"""A whole batch of rollouts through the inference engine's runners, for PPO.

:func:`engine_rollout` returns what :func:`rlhf.generation.sample` returns with
``logprobs="sampling"`` -- the same :class:`~rlhf.generation.Rollout`, the tokens chosen by the
same rule (:func:`rlhf.generation.next_tokens`: temperature, top-k, top-p, the EOS block of
``min_new_tokens``) from the same uniform numbers -- but runs the forward passes on a runner of
:mod:`rlhf.inference.runners` (packed GPT-2 and Llama weights, a slot KV cache written in place)
instead of the model's own forward over a growing cache.

The batch is fixed: every prompt is prefilled at once into slots ``0 .. B-1``, then decoded one
token per running row; a row that stops (EOS) leaves the batch, the last running row moving into
its slot (as the engine compacts), so later steps compute only the rows still running.

What differs from ``sample``:

* values, when a ``value_head`` is given, are read from the runner's final hidden states (the
  ones its logits came from), as ``sample`` reads them from the model's last hidden states;
* the runner runs in the weights' dtype, without autocast;
* the runner is built per call from the weights as they are now (a packed copy of every linear
  weight, adapters folded in), so it always samples from the weights the last update wrote.
"""

from __future__ import annotations

import torch

from rlhf.generation import Rollout, SamplingParams, make_rollout, next_tokens
from rlhf.inference.runners import check_adapters, make_runner


@torch.no_grad()
def engine_rollout(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
                   eos_token_id: int, pad_token_id: int, generator: torch.Generator | None = None,
                   runner: str = "auto", value_head=None) -> Rollout:
    """Sample up to ``params.max_new_tokens`` tokens after each left-padded prompt (``prompt_ids``,
    ``prompt_mask``: (B, P), as :func:`rlhf.generation.tokenize_prompts` gives them) on a runner
    of ``model`` (``runner``: the kind, see :func:`~rlhf.inference.runners.make_runner`).

    The log-probs are those of the distribution each token was drawn from, as
    ``sample(..., logprobs="sampling")`` gives them; ``values`` are ``value_head`` on the final
    hidden state before each response token (None without a ``value_head``). With the same
    ``generator`` state the uniform numbers are those ``sample`` draws (B per step, in row order),
    so the tokens are ``sample``'s unless float rounding moves a logit across a draw's boundary.
    """
    B = prompt_ids.shape[0]
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    need = max(len(p) for p in prompts) + params.max_new_tokens
    r = make_runner(model, B, need, pad_token_id=pad_token_id, kind=runner)
    r.keep_hidden = value_head is not None
    if r.max_len < need:
        raise ValueError(f"prompt + max_new_tokens ({need} tokens) exceed the model's context ({r.max_len})")
    dev = prompt_ids.device

    # (B, V) next-token logits in batch-row order (the prefill's: every row's first response
    # token); a stopped row's are stale, never used
    full = r.prefill(prompts, 0).to(dev)
    # (B,) the value of each row's state before its next token, like ``full``
    vfull = value_head(r.hidden.float().to(dev)) if value_head is not None else None
    slot_rows = torch.arange(B, device=dev)  # (n,) the batch row in each running slot
    pos = torch.tensor([len(p) for p in prompts], device=dev)  # (B,) where each row's next token goes
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    tokens, logps, alive_hist, vals = [], [], [], []
    for t in range(params.max_new_tokens):
        nxt, lp = next_tokens(full, alive, t, params, eos_token_id, pad_token_id, generator, "sampling")
        tokens.append(nxt)
        logps.append(lp)
        if vfull is not None:
            vals.append(vfull.clone())
        alive_hist.append(alive.clone())
        alive = alive & (nxt != eos_token_id)
        if not alive.any() or t + 1 == params.max_new_tokens:
            break
        slot_rows = _compact(r, slot_rows, alive, pos)
        out = r.decode(nxt[slot_rows].to(r.device), pos[slot_rows].to(r.device)).to(dev)  # (n, V)
        pos[slot_rows] += 1
        full = full.index_put((slot_rows,), out)
        if vfull is not None:
            vfull = vfull.index_put((slot_rows,), value_head(r.hidden.float().to(dev)))
    return make_rollout(prompt_ids, prompt_mask, tokens, logps, alive_hist, vals if value_head is not None else None,
                        eos_token_id)


def _compact(runner, slot_rows: torch.Tensor, alive: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Drop the stopped rows from the running slots: each running row beyond the new end moves
    (its cache slot copied, ``pos`` positions of it) into a freed slot. Returns the new slot->row map."""
    keep = alive[slot_rows]  # (n,)
    if bool(keep.all()):
        return slot_rows
    n = int(keep.sum())
    holes = (~keep[:n]).nonzero().flatten().tolist()
    movers = (keep[n:].nonzero().flatten() + n).tolist()
    rows = slot_rows.clone()
    for hole, src in zip(holes, movers):
        runner.copy_slot(src, hole, int(pos[rows[src]]))
        rows[hole] = rows[src]
    return rows[:n]


def check_engine_model(model) -> None:
    """Raise ValueError when ``model`` cannot sample through :func:`engine_rollout`: the runners
    need a Hugging Face causal LM (a config, a KV cache) and cannot apply adapters on embeddings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "config", None) is None or not hasattr(base, "get_output_embeddings"):
        raise ValueError(f"rollout_backend=engine needs a Hugging Face causal LM, got {type(base).__name__} "
                         "(rollout_backend=sampler samples with the model's own forward)")
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(f"rollout_backend=engine needs a decoder-only model, got {type(base).__name__} "
                         "(rollout_backend=sampler samples with the model's own forward)")
    check_adapters(base)
