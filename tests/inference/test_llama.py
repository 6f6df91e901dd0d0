"""The continuous-batching engine on the Llama architecture (RoPE, grouped-query attention, RMSNorm):
the runner's slot cache against the model's own forward, and the engine against
PolicyEngine.generate on chat prompts."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rlhf.inference.engine import EngineConfig, InferenceEngine, complete
from rlhf.inference.runners import HFRunner, LlamaRunner, make_runner
from rlhf.inference.text import ChatMessage, render_chat
from rlhf.serving import GenerationRequest, PolicyEngine
from tests.inference.runner_checks import assert_runner_matches_forward
from tests.llama_helpers import llama_dir

torch.set_num_threads(1)

QUESTIONS = ["write a short poem about the sea", "the sun", "answer in at most ten words: what is the sky",
             "include the word ocean", "a", "night star good day water ship sail home"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> PolicyEngine:
    d = llama_dir(tmp_path_factory.mktemp("llama"), manifest={"config": {"add_bos": False}})
    return PolicyEngine(d, "v1", max_prompt_tokens=96)


def test_a_llama_gets_the_llama_runner_whose_cache_has_the_key_value_heads(policy):
    r = make_runner(policy.model, 4, 64, policy.tokenizer.pad_token_id)
    assert isinstance(r, LlamaRunner)
    assert r.K.shape == (2, 4, 2, 64, 8)  # layers, slots, 2 key/value heads (of 4 query heads), positions, head dim
    h = make_runner(policy.model, 4, 64, policy.tokenizer.pad_token_id, kind="hf")
    h.prefill([[5, 9, 17]], 0)
    assert isinstance(h, HFRunner) and h.K[0].shape == (4, 2, 64, 8)


@pytest.mark.parametrize("kind", ["llama", "hf"])
def test_llama_runner_logits_equal_the_models_own_forward(policy, kind):
    assert_runner_matches_forward(make_runner(policy.model, 4, 64, policy.tokenizer.pad_token_id, kind=kind), policy.model)


@pytest.mark.parametrize("runner", ["auto", "hf"])
def test_the_engine_on_chat_prompts_gives_what_generate_gives(policy, runner):
    prompts = [render_chat([ChatMessage("user", q)], policy.tokenizer)[0] for q in QUESTIONS]
    req = GenerationRequest(max_new_tokens=10, temperature=0.0, return_logprobs=True)
    expected = policy.generate(prompts, req)

    async def go():
        e = InferenceEngine(policy, EngineConfig(max_batch_size=2, seed=0, runner=runner))  # rows join mid-flight
        e.start()
        out = await asyncio.gather(*(complete(e.submit(e.encode(p), req)) for p in prompts))
        await e.close()
        return out

    for ref, (s,) in zip(expected, asyncio.run(go())):
        r = ref.samples[0]
        assert s.token_ids == r.token_ids and s.text == r.text
        assert max(abs(a - b) for a, b in zip(s.logprobs, r.logprobs)) < 1e-4
