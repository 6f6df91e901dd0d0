"""rlhf.generation.sample (KV cache) against a cache-free greedy loop, EOS handling and params."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf.generation import Rollout, SamplingParams, decode_responses, sample, tokenize_prompts
from rlhf.models import TinyLMConfig, ValueHead, build_tiny_lm, train_tokenizer

torch.set_num_threads(1)

V = 64
PAD = 0
NO_EOS = V - 1  # an EOS id we check is never produced where it matters


@pytest.fixture(scope="module")
def model():
    m = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=V), seed=0).eval()
    # At initialisation the tied-embedding GPT-2 greedily repeats its last input token; noise on every
    # weight gives varied continuations, so the comparisons below are not trivially satisfied.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


PROMPTS = [[5, 9, 17], [33, 2, 8, 41, 7], [12]]


def left_pad(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    """Reference: a full forward pass over prompt + generated tokens at every step, argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def test_greedy_equals_cache_free_loop_and_is_deterministic(model):
    ids, mask = left_pad(PROMPTS)
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    r1 = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD)
    r2 = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD)
    assert torch.equal(r1.response_ids, r2.response_ids)
    for i, prompt in enumerate(PROMPTS):
        ref = greedy_no_cache(model, prompt, 6)
        assert NO_EOS not in ref
        assert r1.response_ids[i].tolist() == ref, f"row {i}"
    assert r1.response_mask.tolist() == [[1] * 6] * 3
    assert r1.ended_with_eos.tolist() == [False] * 3
    assert r1.values is None


def test_left_padded_batch_equals_each_prompt_alone(model):
    p = SamplingParams(max_new_tokens=5, temperature=0.0)
    ids, mask = left_pad(PROMPTS)
    batch = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        one = sample(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), p,
                     eos_token_id=NO_EOS, pad_token_id=PAD)
        assert batch.response_ids[i].tolist() == one.response_ids[0].tolist()
        assert torch.allclose(batch.logprobs[i], one.logprobs[0], atol=1e-5)


def test_logprobs_and_values_equal_a_full_forward(model):
    """Sampled at T=0.7 with top-k, but log-probs are the policy's own (T=1, unfiltered)."""
    torch.manual_seed(0)
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight)
    ids, mask = left_pad(PROMPTS * 2)
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=7, temperature=0.7, top_k=10), eos_token_id=NO_EOS,
               pad_token_id=PAD, value_head=head, generator=torch.Generator().manual_seed(0))
    att = r.attention_mask
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    P = ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=r.input_ids, attention_mask=att, position_ids=pos, output_hidden_states=True)
        lp = F.log_softmax(out.logits[:, P - 1 : -1], -1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
        v = head(out.hidden_states[-1][:, P - 1 : -1])
    assert torch.allclose(r.logprobs, lp * r.response_mask, atol=1e-4)
    assert torch.allclose(r.values, v * r.response_mask, atol=1e-4)


def test_eos_stops_a_row(model):
    ids, mask = left_pad(PROMPTS)
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    free = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD).response_ids.tolist()
    # make the token row 0 first emits at step >= 2 the EOS: greedy is deterministic, so row 0 stops there
    step = next(j for j in range(2, 6) if free[0][j] not in free[0][:j])
    eos = free[0][step]
    pad = 1 if eos != 1 else 2
    r = sample(model, ids, mask, p, eos_token_id=eos, pad_token_id=pad)
    for i, row in enumerate(free):
        stop = row.index(eos) if eos in row else None
        if stop is None:
            assert r.response_ids[i].tolist()[: len(row)] == row
            assert r.response_mask[i].sum().item() == r.response_ids.shape[1]
            assert not r.ended_with_eos[i]
        else:
            R = r.response_ids.shape[1]
            assert r.response_ids[i].tolist() == row[: stop + 1] + [pad] * (R - stop - 1)
            assert r.response_mask[i].tolist() == [1] * (stop + 1) + [0] * (R - stop - 1)
            assert r.ended_with_eos[i]
            assert (r.logprobs[i, stop + 1 :] == 0).all()
    assert r.ended_with_eos[0]
    assert r.response_mask[0].tolist() == [1] * (step + 1) + [0] * (r.response_ids.shape[1] - step - 1)


def test_generation_stops_early_when_every_row_ended(model):
    ids, mask = left_pad([PROMPTS[0]])
    p = SamplingParams(max_new_tokens=10, temperature=0.0)
    first = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD).response_ids[0, 0].item()
    r = sample(model, ids, mask, p, eos_token_id=first, pad_token_id=PAD)
    assert r.response_ids.shape == (1, 1)
    assert r.response_mask.tolist() == [[1]] and r.ended_with_eos.tolist() == [True]


def test_min_new_tokens_blocks_eos(model):
    ids, mask = left_pad(PROMPTS * 4)
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    first = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD).response_ids[0, 0].item()
    # greedy would emit `first` (the EOS here) at once for row 0; min_new_tokens forbids it for 3 tokens
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=6, temperature=0.0, min_new_tokens=3),
               eos_token_id=first, pad_token_id=PAD)
    assert (r.response_ids[:, :3] != first).all()
    assert (r.response_mask[:, :3] == 1).all()
    # and with sampling at high temperature
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=6, temperature=5.0, min_new_tokens=4),
               eos_token_id=first, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert (r.response_ids[:, :4] != first).all()


def test_logprobs_are_unmodified_with_min_new_tokens(model):
    """The EOS mask of min_new_tokens changes sampling only: log-probs stay the policy's own (T=1)."""
    ids, mask = left_pad(PROMPTS)
    p = SamplingParams(max_new_tokens=4, temperature=0.0)
    eos = sample(model, ids, mask, p, eos_token_id=NO_EOS, pad_token_id=PAD).response_ids[0, 0].item()
    # the EOS is the likeliest first token of row 0, so masking it changes that row's log-probs a lot
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=4, temperature=0.0, min_new_tokens=3),
               eos_token_id=eos, pad_token_id=PAD)
    att = r.attention_mask
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    P = ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=att, position_ids=pos).logits[:, P - 1 : -1]
    lp = F.log_softmax(logits, -1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1) * r.response_mask
    assert torch.allclose(r.logprobs, lp, atol=1e-5)


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    ids, mask = left_pad(PROMPTS)
    greedy = sample(model, ids, mask, SamplingParams(max_new_tokens=6, temperature=0.0), NO_EOS, PAD)
    k1 = sample(model, ids, mask, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1), NO_EOS, PAD,
                generator=torch.Generator().manual_seed(123))
    p0 = sample(model, ids, mask, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6), NO_EOS, PAD,
                generator=torch.Generator().manual_seed(7))
    assert torch.equal(k1.response_ids, greedy.response_ids)
    assert torch.equal(p0.response_ids, greedy.response_ids)


def test_sampling_is_reproducible_with_a_generator(model):
    ids, mask = left_pad(PROMPTS)
    p = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = sample(model, ids, mask, p, NO_EOS, PAD, generator=torch.Generator().manual_seed(5))
    b = sample(model, ids, mask, p, NO_EOS, PAD, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids, b.response_ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ],
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_rollout_concatenation_and_decoding():
    tok = train_tokenizer(["hello world", "hello there", "a small world"], vocab_size=280)
    eos = tok.eos_token_id
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    world = tok(" world", add_special_tokens=False)["input_ids"]
    resp = hello + world + [eos]
    r = Rollout(
        prompt_ids=torch.tensor([[eos, 5], [6, 7]]),
        prompt_mask=torch.tensor([[0, 1], [1, 1]]),
        response_ids=torch.tensor([resp, hello + [eos] * (len(resp) - len(hello))]),
        response_mask=torch.tensor([[1] * len(resp), [1] * len(hello) + [0] * (len(resp) - len(hello))]),
        logprobs=torch.zeros(2, len(resp)),
        values=None,
        ended_with_eos=torch.tensor([True, False]),
    )
    assert r.input_ids.shape == (2, 2 + len(resp))
    assert r.attention_mask[0].tolist() == [0, 1] + [1] * len(resp)
    assert decode_responses(tok, r) == ["hello world", "hello"]


def test_tokenize_prompts_left_pads_and_keeps_the_end():
    tok = train_tokenizer(["one two three four five six"], vocab_size=270)
    tok.padding_side = "right"
    ids, mask = tokenize_prompts(tok, ["one two three four five six", "six"], max_length=3)
    full = tok("one two three four five six", add_special_tokens=False)["input_ids"]
    six = tok("six", add_special_tokens=False)["input_ids"]
    assert ids.shape[1] == 3
    assert ids[0].tolist() == full[-3:]
    assert mask[1].tolist() == [0] * (3 - len(six)) + [1] * len(six)
    assert ids[1].tolist()[3 - len(six):] == six


def test_top_p_keeps_the_smallest_nucleus_at_the_boundary():
    from rlhf.generation import _filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # softmax gives 0.5, 0.25, 0.25 exactly
    kept = torch.isfinite(_filter_logits(logits, 0, 0.5))[0].tolist()
    assert kept == [True, False, False]  # {token 0} already has mass 0.5 >= top_p
    kept = torch.isfinite(_filter_logits(logits, 0, 0.75))[0].tolist()
    assert kept == [True, True, False]


def test_top_p_nucleus_away_from_the_boundary():
    from rlhf.generation import _filter_logits

    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    assert torch.isfinite(_filter_logits(logits, 0, 0.55))[0].tolist() == [False, True, False]
    assert torch.isfinite(_filter_logits(logits, 0, 0.7))[0].tolist() == [False, True, True]
    assert torch.isfinite(_filter_logits(logits, 0, 0.95))[0].tolist() == [True, True, True]
    assert torch.isfinite(_filter_logits(logits, 2, 1.0))[0].tolist() == [False, True, True]


def test_inverse_cdf_sampling_matches_the_distribution():
    from rlhf.generation import _sample_categorical

    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7]]).expand(40000, 4)
    draws = _sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, probs[0], atol=0.01), freq
    assert (draws != 2).all(), "a zero-probability token is never drawn"


# ----------------------------------------------------------------------------------------------
# Inverse-CDF draws never return a token of probability 0; the log-probs of what was sampled
# ----------------------------------------------------------------------------------------------

BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: torch.rand's highest value


def test_inverse_cdf_at_the_ends_of_the_uniform_draw():
    from rlhf.generation import inverse_cdf

    probs = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.0],   # zero weight at both ends
                          [0.5, 0.0, 0.5, 0.0, 0.0],   # and in the middle
                          [1.0, 0.0, 0.0, 0.0, 0.0]])
    cdf = probs.cumsum(-1)
    assert inverse_cdf(cdf, torch.zeros(3, 1)).tolist() == [2, 0, 0]  # u = 0: the first token of weight > 0
    assert inverse_cdf(cdf, torch.full((3, 1), BELOW_ONE)).tolist() == [3, 2, 0]  # u -> 1: the last one
    assert inverse_cdf(cdf, torch.full((3, 1), 0.5)).tolist() == [3, 2, 0]  # u * total on a step: the next token
    assert inverse_cdf(cdf, torch.ones(3, 1)).tolist() == [3, 2, 0]  # even u = 1 (should u * total round up)
    # unnormalised weights (a softmax's cumsum need not end at exactly 1)
    w = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0]])
    assert inverse_cdf(w.cumsum(-1), torch.tensor([[0.2]])).tolist() == [1]
    assert inverse_cdf(w.cumsum(-1), torch.tensor([[0.25]])).tolist() == [3]


@pytest.mark.parametrize("u", [0.0, BELOW_ONE])
def test_no_zero_probability_token_under_top_k_and_min_new_tokens(model, monkeypatch, u):
    """Every uniform draw at 0 (or just below 1): with EOS = token 0 blocked by min_new_tokens,
    and top-k dropping tokens 0 and V-1, neither sampler may return them."""
    from rlhf.inference.sampling import BatchParams, choose
    from rlhf.serving import GenerationRequest

    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full(a if a and isinstance(a[0], int) else a[0], u))
    ids, mask = left_pad(PROMPTS)
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=4, min_new_tokens=4), eos_token_id=0, pad_token_id=PAD)
    assert (r.response_ids != 0).all()
    logits = torch.zeros(2, V)
    logits[:, 5:9] = 1.0  # top-4: tokens 5..8; tokens 0 and V-1 are outside it
    for k in (0, 4):
        toks, _, _ = choose(logits.clone(), BatchParams([GenerationRequest(top_k=k)] * 2, [None, None], torch.device("cpu")),
                            torch.tensor([True, True]), eos_id=0)
        assert (toks != 0).all() and (k == 0 or ((toks >= 5) & (toks <= 8)).all()), (k, toks)
    k4 = sample(model, ids, mask, SamplingParams(max_new_tokens=4, top_k=4), NO_EOS, PAD)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert all(t in row for t, row in zip(k4.response_ids[:, 0].tolist(), torch.topk(first, 4).indices.tolist()))


def test_sampling_logprobs_are_those_of_the_distribution_sampled(model):
    """logprobs="sampling": log softmax of the logits / T, filtered by top-k, EOS renormalised
    away within min_new_tokens; "model" (the default) keeps the model's own T = 1 log-probs."""
    ids, mask = left_pad(PROMPTS * 2)
    eos = 7
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=10, min_new_tokens=3)
    runs = {mode: sample(model, ids, mask, params, eos_token_id=eos, pad_token_id=PAD, logprobs=mode,
                         generator=torch.Generator().manual_seed(0)) for mode in ("model", "sampling")}
    r = runs["sampling"]
    assert torch.equal(r.response_ids, runs["model"].response_ids)  # the same draws
    att = r.attention_mask
    P = ids.shape[1]
    with torch.no_grad():
        z = model(input_ids=r.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    z = z[:, P - 1 : -1].float()  # (B, R, V)
    for b in range(z.shape[0]):
        for t in range(int(r.response_mask[b].sum())):
            scaled = z[b, t] / 0.7
            if t < 3:
                scaled[eos] = float("-inf")
            kth = torch.topk(scaled, 10).values[-1]
            kept = scaled >= kth
            lp = scaled[r.response_ids[b, t]] - torch.logsumexp(scaled[kept], -1)
            assert r.logprobs[b, t].item() == pytest.approx(lp.item(), abs=1e-4)
            own = torch.log_softmax(z[b, t], -1)[r.response_ids[b, t]]
            assert runs["model"].logprobs[b, t].item() == pytest.approx(own.item(), abs=1e-4)
    greedy = sample(model, ids, mask, SamplingParams(max_new_tokens=3, temperature=0.0), NO_EOS, PAD, logprobs="sampling")
    assert (greedy.logprobs == 0).all()  # greedy: the token chosen had probability 1
    with pytest.raises(ValueError):
        sample(model, ids, mask, params, eos, PAD, logprobs="tempered")
