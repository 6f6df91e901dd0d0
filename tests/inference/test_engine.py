"""rlhf.inference: runners against the model's own forward, the continuous-batching engine against
PolicyEngine.generate, per-row sampling settings, stop strings, and the queue/deadline/cancel paths."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from rlhf.errors import ResourceExhaustedError
from rlhf.inference.engine import (DeadlineExceededError, EngineConfig, EngineRetiredError, InferenceEngine,
                                   PromptTooLongError, complete, stream_samples)
from rlhf.inference.runners import GPT2Runner, HFRunner
from rlhf.inference.text import SampleText, render_chat, ChatMessage
from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
from rlhf.serving import GenerationRequest, PolicyEngine
from tests.inference.runner_checks import assert_runner_matches_forward

torch.set_num_threads(1)

WORDS = "the movie was good great fun and the best love of a film story bad dull but it is acting plot".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
PROMPTS = [f"review {i}: the film was" for i in range(10)] + ["a", "the best love of a film story and it is"]


def noisy_lm(vocab: int):
    m = build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=96, vocab_size=vocab), seed=0).eval()
    # a tied-embedding GPT-2 at initialisation greedily repeats its last token; noise varies it
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> PolicyEngine:
    tok = train_tokenizer(TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("policy")
    save_pretrained(noisy_lm(len(tok)), tok, d, manifest={"config": {"add_bos": True}})
    return PolicyEngine(d, "v1", max_prompt_tokens=48)


def run(coro):
    return asyncio.run(coro)


async def _engine(policy, **cfg) -> InferenceEngine:
    e = InferenceEngine(policy, EngineConfig(**{"seed": 0, **cfg}))
    e.start()
    return e


@pytest.mark.parametrize("runner", [GPT2Runner, HFRunner])
def test_runner_logits_equal_the_models_own_forward(policy, runner):
    assert_runner_matches_forward(runner(policy.model, 4, 64), policy.model)


def test_continuous_batching_gives_what_policy_engine_generate_gives(policy):
    req = GenerationRequest(max_new_tokens=12, temperature=0.0, return_logprobs=True)
    expected = policy.generate(PROMPTS, req)

    async def go():
        e = await _engine(policy, max_batch_size=3)  # 12 requests through 3 rows: they join mid-flight
        gens = [e.submit(e.encode(p), req) for p in PROMPTS]
        out = await asyncio.gather(*(complete(g) for g in gens))
        await e.close()
        return e, out

    e, out = run(go())
    assert e.stats.max_rows == 3 and e.stats.prefills > 1
    for ref, (s,) in zip(expected, out):
        r = ref.samples[0]
        assert s.text == r.text and s.token_ids == r.token_ids
        assert max(abs(a - b) for a, b in zip(s.logprobs, r.logprobs)) < 1e-4
        assert {"eos": "stop"}.get(s.finish_reason, s.finish_reason) == r.finish_reason


def test_each_row_samples_with_its_own_settings(policy):
    greedy = GenerationRequest(max_new_tokens=10, temperature=0.0)
    ref = policy.generate([PROMPTS[0]], greedy)[0].samples[0].text

    async def go():
        e = await _engine(policy, max_batch_size=8)
        hot = [e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=10, temperature=1.5, n=3))
               for _ in range(2)]
        g = e.submit(e.encode(PROMPTS[0]), greedy)
        k1 = e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=10, top_k=1))  # top-k 1 is greedy
        p0 = e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=10, top_p=1e-6))  # so is a tiny top-p
        res = await asyncio.gather(*(complete(x) for x in [g, k1, p0, *hot]))
        await e.close()
        return res

    g, k1, p0, *hot = run(go())
    assert g[0].text == k1[0].text == p0[0].text == ref
    assert any(s.text != ref for h in hot for s in h)


def test_seeded_samples_repeat_and_n_samples_differ(policy):
    req = GenerationRequest(max_new_tokens=10, seed=11, n=3, top_p=0.95)

    async def go():
        e = await _engine(policy)
        a = await complete(e.submit(e.encode(PROMPTS[1]), req))
        noise = [e.submit(e.encode(p), GenerationRequest(max_new_tokens=10)) for p in PROMPTS[:4]]
        b = await complete(e.submit(e.encode(PROMPTS[1]), req))  # beside other rows this time
        await asyncio.gather(*(complete(x) for x in noise))
        c = await complete(e.submit(e.encode(PROMPTS[1]), GenerationRequest(max_new_tokens=10, seed=12, n=3, top_p=0.95)))
        await e.close()
        return a, b, c

    a, b, c = run(go())
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert len({tuple(s.token_ids) for s in a}) == 3
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_a_stop_string_cuts_the_text_and_ends_the_row(policy):
    free = policy.generate([PROMPTS[2]], GenerationRequest(max_new_tokens=24, temperature=0.0))[0].samples[0].text
    stop = free[6:9]
    assert len(stop) == 3 and stop.strip(), free

    async def go():
        e = await _engine(policy)
        g = e.submit(e.encode(PROMPTS[2]), GenerationRequest(max_new_tokens=24, temperature=0.0, stop=(stop,)))
        events = [ev async for ev in stream_samples(g)]
        await e.close()
        return events

    events = run(go())
    final = events[-1].sample
    assert final.finish_reason == "stop" and final.text == free[:free.find(stop)]
    assert "".join(ev.text for ev in events) == final.text  # the deltas never show the stop string
    assert len(final.token_ids) < 24


def test_sample_text_holds_back_what_may_start_a_stop_string():
    st = SampleText(None, ("abc",))
    assert st.add_text("xa") == "x"  # "a" may start "abc"
    assert st.add_text("b") == ""
    assert st.add_text("d") == "abd"
    assert st.add_text("ab") == ""
    assert st.add_text("cz") == "" and st.stopped and st.text == "xabd"
    assert st.finish() == ""


def test_chat_template_fallback():
    prompt, stop = render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant:" and stop == ("\nUser:",)


def test_full_queue_deadline_and_too_long_prompts_are_refused(policy):
    async def go():
        e = await _engine(policy, max_batch_size=1, max_queue=1)
        slow(e, 0.02)
        a = e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=20))
        await asyncio.sleep(0.1)  # a runs; b waits
        b = e.submit(e.encode(PROMPTS[1]), GenerationRequest(max_new_tokens=2))
        with pytest.raises(ResourceExhaustedError):
            e.submit(e.encode(PROMPTS[2]), GenerationRequest(max_new_tokens=2))
        with pytest.raises(PromptTooLongError):
            e.submit(e.encode("the " * 80), GenerationRequest(max_new_tokens=2))
        await complete(a)
        await complete(b)
        late = e.submit(e.encode(PROMPTS[3]), GenerationRequest(max_new_tokens=50), deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceededError):
            await complete(late)
        await e.close()
        with pytest.raises(EngineRetiredError):
            e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=2))

    run(go())


def slow(engine: InferenceEngine, seconds: float) -> None:
    """Make every decode step take at least ``seconds`` (so that a test can act mid-generation)."""
    decode = engine.runner.decode

    def slowed(*a):
        time.sleep(seconds)
        return decode(*a)

    engine.runner.decode = slowed


def test_a_cancelled_request_leaves_the_batch_and_others_go_on(policy):
    async def go():
        e = await _engine(policy, max_batch_size=4)
        slow(e, 0.01)
        keep = e.submit(e.encode(PROMPTS[0]), GenerationRequest(max_new_tokens=30, min_new_tokens=30))
        gone = e.submit(e.encode(PROMPTS[1]), GenerationRequest(max_new_tokens=30, min_new_tokens=30, n=2))
        seen = 0
        async for batch in gone:
            seen += len(batch)
            if seen >= 4:
                gone.cancel()
                break
        (s,) = await complete(keep)
        await e.close()
        return e, s, seen

    e, s, seen = run(go())
    assert len(s.token_ids) == 30
    assert e.stats.rows_dropped == 2
    assert e.stats.tokens < 30 * 3  # the cancelled rows stopped early


def test_retiring_finishes_what_runs_and_what_waits(policy):
    async def go():
        e = await _engine(policy, max_batch_size=1)
        gens = [e.submit(e.encode(p), GenerationRequest(max_new_tokens=5)) for p in PROMPTS[:3]]
        e.retire()
        out = await asyncio.gather(*(complete(g) for g in gens))
        await e.close()
        return e, out

    e, out = run(go())
    assert all(len(s.token_ids) == 5 for (s,) in out) and e.closed


def test_a_seeded_row_draws_the_same_token_whatever_runs_beside_it():
    from rlhf.inference.sampling import BatchParams, choose

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 2
    plain = GenerationRequest(temperature=1.0)
    filtered = GenerationRequest(temperature=0.7, top_k=5, top_p=0.9)
    greedy = GenerationRequest(temperature=0.0)

    def seeded(seed):
        return GenerationRequest(temperature=1.0), torch.Generator().manual_seed(seed)

    def params(rows):
        return BatchParams([r for r, _ in rows], [gen for _, gen in rows], logits.device)

    for seed in range(20):
        alone, _, _ = choose(logits[:1].clone(), params([seeded(seed)]), None, 0)
        for other in (plain, filtered, greedy):
            rows = [seeded(seed), (other, None), (filtered, None)]
            tokens, _, _ = choose(logits.clone(), params(rows), None, 0,
                                  generator=torch.Generator().manual_seed(1))
            assert tokens[0] == alone[0], (seed, other)


def test_choose_reports_the_log_probs_of_the_distribution_sampled_when_a_row_asks():
    """logprobs_of="sampling": log-probs of what the token was drawn from (T, top-k/top-p, the
    EOS block), computed here from the logits; other rows keep the model's own (T = 1)."""
    from rlhf.inference.sampling import BatchParams, choose

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g) * 2
    eos = 3
    logits[:, eos] = 4.0  # EOS likely: blocking it must show in the log-probs
    rows = [GenerationRequest(temperature=0.7, logprobs_of="sampling"),
            GenerationRequest(temperature=0.7, top_k=5, logprobs_of="sampling"),
            GenerationRequest(temperature=1.3, top_p=0.8, logprobs_of="sampling"),
            GenerationRequest(temperature=0.0, logprobs_of="sampling"), GenerationRequest(temperature=0.7)]
    block = torch.tensor([True, True, False, False, True])
    for _ in range(5):
        tokens, lps, _ = choose(logits.clone(), BatchParams(rows, [None] * 5, logits.device), block, eos, generator=g)
        for i, (row, t) in enumerate(zip(rows, tokens.tolist())):
            if row.logprobs_of == "model":
                want = torch.log_softmax(logits[i], -1)[t]
            elif row.temperature == 0:
                want = torch.tensor(0.0)
            else:
                z = logits[i] / row.temperature
                if block[i]:
                    z[eos] = float("-inf")
                keep = torch.ones(50, dtype=torch.bool)
                if row.top_k:
                    keep &= z >= torch.topk(z, row.top_k).values[-1]
                if row.top_p < 1:
                    p, order = torch.sort(z.softmax(-1), descending=True)
                    kept = order[(p.cumsum(-1) - p) < row.top_p]
                    keep &= torch.zeros(50, dtype=torch.bool).index_fill(0, kept, True)
                want = z[t] - torch.logsumexp(z[keep], -1)
            assert lps[i].item() == pytest.approx(want.item(), abs=1e-5), (i, row)


def test_engine_returns_sampling_log_probs_as_policy_engine_does(policy):
    req = GenerationRequest(max_new_tokens=8, temperature=0.7, min_new_tokens=4, seed=3, return_logprobs=True,
                            logprobs_of="sampling")
    expected = policy.generate([PROMPTS[2]], req)[0].samples[0]
    own = policy.generate([PROMPTS[2]], GenerationRequest(**{**req.__dict__, "logprobs_of": "model"}))[0].samples[0]
    assert own.token_ids == expected.token_ids and own.logprobs != pytest.approx(expected.logprobs, abs=1e-3)

    async def go():
        e = await _engine(policy)
        out = await complete(e.submit(e.encode(PROMPTS[2]), req))
        await e.close()
        return out

    (s,) = run(go())
    assert s.token_ids == expected.token_ids
    assert s.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    from rlhf.inference.requests import InvalidFieldError, RequestLimits, build_request

    assert build_request({"logprobs_of": "sampling"}, RequestLimits(), default_max_new_tokens=8).logprobs_of == "sampling"
    with pytest.raises(InvalidFieldError, match="'logprobs_of' must be 'model' or 'sampling'"):
        build_request({"logprobs_of": "tempered"}, RequestLimits(), default_max_new_tokens=8)
