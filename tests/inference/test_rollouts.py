"""rlhf.inference.rollouts.engine_rollout: the log-probs PPO needs, from the engine's runners, equal
an independent full forward pass on the sampled sequences (tiny GPT-2 and tiny Llama, fp32), and
the tokens are rlhf.generation.sample's for the same seed."""

from __future__ import annotations

import pytest
import torch

from rlhf.generation import SamplingParams, sample
from rlhf.inference.rollouts import check_engine_model, engine_rollout
from rlhf.models import TinyLMConfig, ValueHead, build_tiny_lm, hidden_size_of
from tests.llama_helpers import tiny_llama

torch.set_num_threads(1)

V = 64
PAD = 0
PROMPTS = [[5, 9, 17], [33, 2, 8, 41, 7], [12], [3, 4], [60, 1, 22, 9], [50], [7, 7, 30], [44, 45, 46, 47, 48, 49]]


def _gpt2():
    m = build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=V), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # varied continuations (the initialisation repeats its last token)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _llama():
    m = tiny_llama(V, seed=0, tie=False)
    with torch.no_grad():  # a peaked distribution: some tokens recur, so EOS can end rows early
        m.lm_head.weight.mul_(4.0)
    return m


MODELS = {"gpt2": _gpt2, "llama": _llama}


def left_pad(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def full_forward_logprobs(model, r, temperature, top_k, min_new_tokens, eos):
    """log p(token) under softmax(z / T) restricted to the top-k and, within min_new_tokens, without
    EOS -- from one forward pass over prompt + response, position by position."""
    att = r.attention_mask
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        z = model(input_ids=r.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    z = z[:, P - 1 : -1].float()  # (B, R, V): position P-1+t predicts response token t
    out = torch.zeros_like(r.logprobs)
    for b in range(z.shape[0]):
        for t in range(int(r.response_mask[b].sum())):
            scaled = z[b, t] / temperature
            if t < min_new_tokens:
                scaled[eos] = float("-inf")
            kept = scaled >= torch.topk(scaled, top_k).values[-1] if top_k else torch.isfinite(scaled)
            out[b, t] = scaled[r.response_ids[b, t]] - torch.logsumexp(scaled[kept], -1)
    return out


def _eos_that_stops_rows_early(model, ids, mask, params, seed):
    """Test data: of the tokens the model samples most, the one that, as EOS, ends the rows of
    ``sample``'s rollout at the most different lengths."""
    free = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k)
    r = sample(model, ids, mask, free, eos_token_id=V, pad_token_id=PAD, generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(r.response_ids.flatten(), minlength=V)
    counts[PAD] = 0

    def spread(eos):
        s = sample(model, ids, mask, params, eos, PAD, generator=torch.Generator().manual_seed(seed))
        return len(set(s.response_mask.sum(1).tolist()))

    return max(torch.topk(counts, 8).indices.tolist(), key=spread)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("runner", ["auto", "hf"])
@pytest.mark.parametrize("temperature, top_k, min_new", [(1.0, 0, 0), (0.7, 10, 3)])
def test_engine_logprobs_equal_a_full_forward_and_tokens_equal_sample(arch, runner, temperature, top_k, min_new):
    model = MODELS[arch]()
    ids, mask = left_pad(PROMPTS)
    params = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=top_k, min_new_tokens=min_new)
    eos = _eos_that_stops_rows_early(model, ids, mask, params, seed=1)
    vh = ValueHead(hidden_size_of(model))
    with torch.no_grad():  # a head that is not zero
        vh.summary.weight.copy_(torch.randn(vh.summary.weight.shape, generator=torch.Generator().manual_seed(2)))
    r = engine_rollout(model, ids, mask, params, eos, PAD, generator=torch.Generator().manual_seed(1), runner=runner,
                       value_head=vh)
    lengths = r.response_mask.sum(1)
    assert r.ended_with_eos.any() and len(set(lengths.tolist())) >= 3, lengths  # rows stop at different lengths
    assert (lengths[r.ended_with_eos] >= min_new + 1).all()  # no EOS inside min_new_tokens
    ref = full_forward_logprobs(model, r, temperature, top_k, min_new, eos)
    assert torch.allclose(r.logprobs, ref, atol=1e-4), (r.logprobs - ref).abs().max()
    assert (r.logprobs[r.response_mask == 0] == 0).all() and (r.response_ids[r.response_mask == 0] == PAD).all()
    # the same uniform numbers as the sampler: the same tokens and log-probs
    s = sample(model, ids, mask, params, eos, PAD, generator=torch.Generator().manual_seed(1), logprobs="sampling",
               value_head=vh)
    assert torch.equal(r.response_ids, s.response_ids) and torch.equal(r.response_mask, s.response_mask)
    assert torch.allclose(r.logprobs, s.logprobs, atol=1e-4)
    # values: the head on the final hidden state before each response token, as the sampler reads them
    assert r.values.abs().max() > 1e-2 and torch.allclose(r.values, s.values, atol=1e-4), (r.values - s.values).abs().max()
    assert (r.values[r.response_mask == 0] == 0).all()
    plain = engine_rollout(model, ids, mask, params, eos, PAD, generator=torch.Generator().manual_seed(1), runner=runner)
    assert plain.values is None and torch.equal(plain.response_ids, r.response_ids)
    assert torch.equal(r.ended_with_eos, s.ended_with_eos)


def test_engine_samples_the_weights_as_they_are_now():
    """The runner is built per call: a change to the weights shows in the next rollout."""
    model = _gpt2()
    ids, mask = left_pad(PROMPTS)
    params = SamplingParams(max_new_tokens=6)
    before = engine_rollout(model, ids, mask, params, V, PAD, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(-2.0)  # a packed (copied) weight
        model.lm_head.weight.add_(0.5)  # tied to the embeddings, read as a view
    after = engine_rollout(model, ids, mask, params, V, PAD, generator=torch.Generator().manual_seed(1))
    changed = full_forward_logprobs(model, before, 1.0, 0, 0, V)
    assert (changed - before.logprobs).abs().max() > 0.1  # the change moves the log-probs ...
    assert torch.allclose(after.logprobs, full_forward_logprobs(model, after, 1.0, 0, 0, V), atol=1e-4)  # ... and the engine saw it


def test_engine_rollout_refuses_what_it_cannot_run():
    model = _gpt2()  # 64 positions
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="context"):
        engine_rollout(model, ids, mask, SamplingParams(max_new_tokens=60), V, PAD)
    with pytest.raises(ValueError, match="at least one token"):
        engine_rollout(model, ids, torch.cat([torch.zeros_like(mask[:1]), mask[1:]]), SamplingParams(), V, PAD)
    with pytest.raises(ValueError, match="Hugging Face causal LM"):
        check_engine_model(torch.nn.Linear(3, 3))
    check_engine_model(model)  # a GPT-2 passes
