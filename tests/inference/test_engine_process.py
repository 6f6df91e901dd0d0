"""rlhf.inference.process: the engine in a child process gives the same samples as in the server's
process, and keeps the queue bound, cancellation, deadlines and failures of its own.

The HTTP API's tests run against both engines (tests/services/test_http_api.py); these cover what
they reach only by slowing the in-process runner down. Here a long generation (900 tokens of a
tiny model) keeps a request running while the test acts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from rlhf.errors import ModelNotFoundError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import DeadlineExceededError, EngineConfig, EngineRetiredError, InferenceEngine, complete
from rlhf.inference.process import EngineProcess
from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
from rlhf.serving import GenerationRequest, PolicyEngine

pytestmark = pytest.mark.slow

WORDS = "the movie was good great fun and the best love of a film story bad dull but it is acting plot".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
LONG = GenerationRequest(max_new_tokens=900, min_new_tokens=900)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    m = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=1024, vocab_size=len(tok)), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # vary the greedy continuation of a tied-embedding model at initialisation
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path_factory.mktemp("policy")
    save_pretrained(m, tok, d, manifest={"config": {"add_bos": True}})
    return d


async def _started(model_dir, **cfg) -> EngineProcess:
    e = await asyncio.to_thread(EngineProcess, model_dir, "v1", EngineConfig(**{"seed": 0, **cfg}), max_prompt_tokens=48)
    e.start()
    return e


async def _first_batch(gen):
    it = gen.__aiter__()
    return it, await it.__anext__()


async def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_same_samples_as_the_engine_in_the_servers_process(model_dir):
    reqs = [GenerationRequest(max_new_tokens=12, seed=5, n=3, top_logprobs=2),
            GenerationRequest(max_new_tokens=7, temperature=0.0, stop=("film",)),
            GenerationRequest(max_new_tokens=9, top_k=5, top_p=0.9, seed=1)]
    prompts = ["the film was", "a movie", "the best love of a film story and it is"]

    async def samples(engine):
        engine.start()
        try:
            gens = [engine.submit(engine.encode(p), r) for p, r in zip(prompts, reqs)]
            return await asyncio.gather(*(complete(g) for g in gens))
        finally:
            await engine.close()

    async def main():
        local = InferenceEngine(PolicyEngine(model_dir, "v1", max_prompt_tokens=48), EngineConfig(seed=0))
        remote = await asyncio.to_thread(EngineProcess, model_dir, "v1", EngineConfig(seed=0), max_prompt_tokens=48)
        assert (remote.max_len, remote.max_prompt_tokens, remote.add_bos) == (local.max_len, local.max_prompt_tokens, True)
        assert remote.encode("the film") == local.encode("the film")
        return await samples(local), await samples(remote), remote

    a, b, remote = asyncio.run(main())
    # the same tokens, text and finish reasons; the log-probs to float precision (the batches that
    # prefilled the prompts differ: submits reach the child one by one)
    assert [[(s.index, s.token_ids, s.text, s.finish_reason) for s in r] for r in a] == \
        [[(s.index, s.token_ids, s.text, s.finish_reason) for s in r] for r in b]
    for ra, rb in zip(a, b):
        for sa, sb in zip(ra, rb):
            assert sa.logprobs == pytest.approx(sb.logprobs, abs=1e-5)
            assert (sa.top_logprobs is None) == (sb.top_logprobs is None)
            for ta, tb in zip(sa.top_logprobs or [], sb.top_logprobs or []):
                assert [t for t, _ in ta] == [t for t, _ in tb]
    assert [s.finish_reason for s in a[1]] in (["stop"], ["length"])
    remote._proc.join(10)
    assert remote._proc.exitcode == 0  # closing lets the child end on its own


def test_queue_bound_cancel_and_the_counts(model_dir):
    async def main():
        e = await _started(model_dir, max_batch_size=1, max_queue=1)
        try:
            a = e.submit(e.encode("the film"), LONG)
            it, _ = await _first_batch(a)  # a holds the only row
            b = e.submit(e.encode("a movie"), LONG)  # waits for it
            assert e.queue_depth == 1
            with pytest.raises(ResourceExhaustedError):
                e.submit(e.encode("a movie"), LONG)
            a.cancel()  # the caller went away: its row leaves, b gets it
            await _until(lambda: e.stats.rows_dropped == 1)
            it_b, first = await _first_batch(b)
            assert e.queue_depth == 0 and first[0].index == 0
            b.cancel()
            await _until(lambda: e.stats.rows_dropped == 2 and e.running == 0)
            short = await complete(e.submit(e.encode("the film"), GenerationRequest(max_new_tokens=4)))
            assert len(short[0].token_ids) <= 4
        finally:
            await e.close()

    asyncio.run(main())


def test_deadline_and_close_with_abort_fail_requests(model_dir):
    async def main():
        e = await _started(model_dir, max_batch_size=1)
        try:
            late = e.submit(e.encode("the film"), LONG, deadline=time.monotonic() - 1.0)  # one clock for both processes
            with pytest.raises(DeadlineExceededError):
                await complete(late)
            await _until(lambda: e.queue_depth == 0)
            running = e.submit(e.encode("the film"), LONG)
            queued = e.submit(e.encode("a movie"), LONG)
            await _first_batch(running)
        finally:
            await e.close(abort=UnavailableError("server stopping"))
        for g in (running, queued):
            with pytest.raises(UnavailableError, match="server stopping"):
                await complete(g)
        with pytest.raises(EngineRetiredError):
            e.submit(e.encode("the film"), LONG)

    asyncio.run(main())


def test_a_retired_engine_finishes_its_requests_then_the_child_exits(model_dir):
    async def main():
        e = await _started(model_dir)
        gens = [e.submit(e.encode(p), GenerationRequest(max_new_tokens=30, min_new_tokens=30)) for p in ("a", "b")]
        e.retire()
        with pytest.raises(EngineRetiredError):
            e.submit(e.encode("the film"), LONG)
        results = await asyncio.gather(*(complete(g) for g in gens))
        assert [len(r[0].token_ids) for r in results] == [30, 30]
        await e.close()
        return e

    e = asyncio.run(main())
    assert e.closed and not e._proc.is_alive()


def test_a_child_that_dies_fails_its_requests_not_the_server(model_dir):
    async def main():
        e = await _started(model_dir)
        gen = e.submit(e.encode("the film"), LONG)
        await _first_batch(gen)
        os.kill(e.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="exited"):
            await complete(gen)
        assert e.closed
        with pytest.raises(EngineRetiredError):
            e.submit(e.encode("the film"), LONG)
        await e.close()

    asyncio.run(main())


def test_a_model_that_does_not_load_raises_in_the_server(tmp_path):
    with pytest.raises(ModelNotFoundError):
        EngineProcess(tmp_path / "missing", "v1")
