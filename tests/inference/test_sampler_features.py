"""rlhf.inference: penalties, min-p, stop tokens, ignore_eos, structured output, prompt log-probs,
the fair queue between teams, and tokenizing long prompts off the event loop (engine level; the
HTTP and gRPC surfaces are tested in tests/services/test_inference_contract.py)."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
import torch

from rlhf.errors import DataError
from rlhf.inference.engine import ContextLengthError, PromptTooLongError, complete
from rlhf.inference.guided import Guide
from rlhf.inference.queue import FairQueue
from rlhf.inference.sampling import BatchParams, PenaltyState, apply_penalties, choose
from rlhf.serving import GenerationRequest, PolicyEngine
from tests.inference.test_engine import _engine, policy, run  # noqa: F401  (policy: a fixture)

torch.set_num_threads(1)


def reference_greedy(policy: PolicyEngine, ids: list[int], n: int, rep=1.0, freq=0.0, pres=0.0) -> list[int]:
    """Greedy continuation with the penalties, written as a plain loop over the model's forward."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = policy.model(torch.tensor([ids + out])).logits[0, -1].float().clone()
            for t in set(ids + out):
                logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
            for t in set(out):
                logits[t] -= freq * out.count(t) + pres
            logits[policy.tokenizer.eos_token_id] = float("-inf")  # min_new_tokens = n below
            out.append(int(logits.argmax()))
    return out


def test_penalties_match_a_plain_loop_and_other_rows_are_untouched(policy):
    """Greedy with repetition/frequency/presence penalties equals the loop above, while a row
    without penalties beside it stays the plain greedy sample."""
    async def go():
        e = await _engine(policy)
        ids = e.encode("the film was good and the film")
        pen = GenerationRequest(max_new_tokens=10, min_new_tokens=10, temperature=0.0, repetition_penalty=1.8,
                                frequency_penalty=0.7, presence_penalty=0.4)
        plain = GenerationRequest(max_new_tokens=10, min_new_tokens=10, temperature=0.0)
        a, b = await asyncio.gather(complete(e.submit(ids, pen)), complete(e.submit(ids, plain)))
        await e.close()
        return ids, a[0].token_ids, b[0].token_ids

    ids, penalised, plain = run(go())
    assert penalised == reference_greedy(policy, ids, 10, 1.8, 0.7, 0.4)
    assert plain == reference_greedy(policy, ids, 10)
    assert penalised != plain


def test_apply_penalties_touches_only_penalised_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g)
    reqs = [GenerationRequest(), GenerationRequest(repetition_penalty=2.0, frequency_penalty=0.5),
            GenerationRequest(presence_penalty=1.0)]
    p = BatchParams(reqs, [None] * 3, logits.device)
    state = PenaltyState(3, 40, logits.device)
    for slot in range(3):
        state.start(slot, [1, 2])
    state.add_at(0, torch.tensor([5, 5, 7]))
    state.add_at(0, torch.tensor([5, 5, 2]))
    out = logits.clone()
    apply_penalties(out, p, *state.view(3))
    assert torch.equal(out[0], logits[0])
    r = logits[1].clone()
    for t in (1, 2, 5):
        r[t] = r[t] / 2 if r[t] > 0 else r[t] * 2
    r[5] -= 0.5 * 2
    assert torch.allclose(out[1], r)
    r = logits[2].clone()
    r[7] -= 1.0
    r[2] -= 1.0
    assert torch.allclose(out[2], r)


def test_min_p_keeps_only_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = BatchParams([GenerationRequest(min_p=0.4)], [None], logits.device)
    seen = set()
    for seed in range(200):
        tokens, _, _ = choose(logits.clone(), p, None, 99, torch.Generator().manual_seed(seed))
        seen.add(int(tokens[0]))
    assert seen == {0, 1}  # 0.15 and 0.05 are under 0.4 * 0.5


def test_stop_token_ids_and_ignore_eos(policy):
    async def go():
        e = await _engine(policy)
        ids = e.encode("the film")
        free = (await complete(e.submit(ids, GenerationRequest(max_new_tokens=8, min_new_tokens=8, temperature=0.0))))[0]
        stop = free.token_ids[3]
        cut = (await complete(e.submit(ids, GenerationRequest(max_new_tokens=8, min_new_tokens=8, temperature=0.0,
                                                              stop_token_ids=(stop,)))))[0]
        # ignore_eos: a sampled row runs to max_new_tokens whatever it draws
        long = await complete(e.submit(ids, GenerationRequest(max_new_tokens=30, temperature=1.5, n=4, seed=3,
                                                              ignore_eos=True)))
        await e.close()
        return e, free, stop, cut, long

    e, free, stop, cut, long = run(go())
    first = free.token_ids.index(stop)
    assert cut.token_ids == free.token_ids[:first + 1] and cut.finish_reason == "stop"
    assert cut.text == e.decode(free.token_ids[:first])  # the stop token is not text
    assert all(len(s.token_ids) == 30 and s.finish_reason == "length" and e.eos_id not in s.token_ids for s in long)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_structured_output_always_matches(policy):
    """Sampled at a high temperature (the tiny model alone writes noise), every sample that ends by
    itself parses and fits the schema; regexes and choices match; rows without a guide beside
    them are free."""
    async def go():
        e = await _engine(policy)
        ids = e.encode("answer:")
        reqs = [GenerationRequest(max_new_tokens=40, temperature=1.3, n=4, seed=1,
                                  guide=Guide("json_schema", json.dumps(SCHEMA))),
                GenerationRequest(max_new_tokens=20, temperature=1.3, n=4, seed=2, guide=Guide("regex", r"[0-9]{3}-x")),
                GenerationRequest(max_new_tokens=20, temperature=1.3, n=4, seed=3,
                                  guide=Guide.choice(["positive", "negative"])),
                GenerationRequest(max_new_tokens=20, temperature=1.3, n=2, seed=4)]
        out = await asyncio.gather(*(complete(e.submit(ids, r)) for r in reqs))
        with pytest.raises(DataError, match="cannot be used for structured output"):
            e.submit(ids, GenerationRequest(guide=Guide("regex", "(unclosed")))
        await e.close()
        return out

    js, rx, ch, free = run(go())
    for s in js:
        assert s.finish_reason == "eos", s
        doc = json.loads(s.text)
        assert set(doc) == {"ok", "n"} and isinstance(doc["ok"], bool) and 0 <= doc["n"] <= 9
    assert all(re.fullmatch(r"[0-9]{3}-x", s.text) for s in rx)
    assert all(s.text in ("positive", "negative") for s in ch)
    assert any(not re.fullmatch(r"[0-9]{3}-x", s.text) for s in free)


def test_prompt_logprobs_are_the_models_own(policy):
    async def go():
        e = await _engine(policy)
        ids = e.encode("the film was good")
        g = e.submit(ids, GenerationRequest(max_new_tokens=2, prompt_logprobs=True, top_logprobs=2))
        await complete(g)
        await e.close()
        return ids, g

    ids, g = run(go())
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(torch.tensor([ids])).logits[0].float(), -1)
    want = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert g.prompt_logprobs[0] is None and g.prompt_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert [t for t, _ in g.prompt_top[1]] == torch.topk(logp[0], 2).indices.tolist()


def test_the_queue_takes_teams_in_turn():
    q = FairQueue(lambda x: x[0])
    for item in ["a1", "a2", "a3", "b1", "a4", "c1", "b2"]:
        q.append(item)
    order = []
    while q:
        order.append(q.pop())
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    q.append("a1")
    q.append("b1")
    assert q.remove_if(lambda x: x == "a1") == ["a1"] and list(q) == ["b1"] and len(q) == 1


def test_a_burst_of_one_team_does_not_starve_another(policy):
    """One row: team a's five requests and then team b's one; b's is served second or third
    (whether a's first was admitted before the others came), not last as first come first served."""
    async def go():
        e = await _engine(policy, max_batch_size=1)
        ids = e.encode("the film")
        req = GenerationRequest(max_new_tokens=3, min_new_tokens=3)
        done: list[str] = []

        async def one(name: str, team: str):
            await complete(e.submit(ids, req, team=team))
            done.append(name)

        await asyncio.gather(*[one(f"a{i}", "a") for i in range(5)], one("b", "b"))
        await e.close()
        return done

    done = run(go())
    assert done.index("b") <= 2, done


def test_long_prompts_are_bounded_by_bytes_and_tokenized_off_the_loop(policy):
    """A prompt with more bytes than the prompt limit can hold is refused without tokenizing it; a
    long one that fits (or is truncated) is tokenized on another thread than the event loop's."""
    async def go():
        e = await _engine(policy)
        calls: list[tuple[str, int]] = []
        short, long_ = e._encode, e._encode_long
        e._encode = lambda t: (calls.append((threading.current_thread().name, len(t))), short(t))[1]
        e._encode_long = lambda t: (calls.append((threading.current_thread().name, len(t))), long_(t))[1]
        loop_thread = threading.current_thread().name
        with pytest.raises(PromptTooLongError, match="bytes"):
            await e.encode_async("film " * 200_000)
        refused_calls = list(calls)
        ids = await e.encode_async("the film was good " * 400, truncate=10)
        fits = await e.encode_async("the film " * 300, bounded=False)
        await e.close()
        return e, refused_calls, list(calls), loop_thread, ids, fits

    e, refused_calls, calls, loop_thread, ids, fits = run(go())
    assert refused_calls == []  # never tokenized
    assert len(ids) == 10 and ids[0] == e.tokenizer.bos_token_id
    assert fits == e.encode("the film " * 300)  # the thread's tokenizer call gives the same ids
    assert calls and all(name != loop_thread for name, n in calls if n > 2048)


def test_context_length_errors_name_the_numbers(policy):
    async def go():
        e = await _engine(policy)
        ids = e.encode("the film")
        with pytest.raises(ContextLengthError) as too_much:
            e.check(ids, GenerationRequest(max_new_tokens=e.max_len))
        fitted = e.check(ids, GenerationRequest(max_new_tokens=e.max_len, fit_to_context=True))
        await e.close()
        return e, ids, str(too_much.value), fitted

    e, ids, msg, fitted = run(go())
    assert str(e.max_len) in msg and str(len(ids)) in msg
    assert fitted.max_new_tokens == e.max_len - len(ids)
