"""The policy-server's chat API on Llama-architecture chat models: the model's own chat template,
named in /v1/models and /info; the OpenAI client against a tiny Llama and against the real
SmolLM2-135M-Instruct (slow: its package and one import)."""

from __future__ import annotations

import httpx
import openai
import pytest

from rlhf.model_import import import_model
from rlhf.registry import ModelRegistry
from rlhf.serving import GenerationRequest, PolicyEngine
from tests.llama_helpers import llama_dir, smollm2_registry
from tests.services.http_helpers import start_server

MSGS = [{"role": "user", "content": "write a short poem about the sea"}]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    import_model(llama_dir(root / "src"), root / "registry")
    s = start_server(registry_dir=str(root / "registry"), max_new_tokens_default=8)
    yield s
    s.stop()


def test_models_and_info_name_the_models_own_template(tiny_chat):
    models = httpx.get(f"{tiny_chat.http_url}/v1/models").json()["data"]
    assert {m["chat_template"] for m in models} == {"model"}
    assert httpx.get(f"{tiny_chat.http_url}/info").json()["chat_template"] == "model"


def test_a_chat_completion_is_the_templated_prompt_completed(tiny_chat):
    client = openai.OpenAI(base_url=f"{tiny_chat.http_url}/v1", api_key="none", max_retries=0, timeout=60)
    c = client.chat.completions.create(model="rlhf-policy", messages=MSGS, max_tokens=8, temperature=0)
    path = ModelRegistry(tiny_chat.settings.registry_dir).path("policy", tiny_chat.service.backend.version)
    ref = PolicyEngine(path, "ref")
    prompt = ref.tokenizer.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    want = ref.generate([prompt], GenerationRequest(max_new_tokens=8, temperature=0.0))[0].samples[0]
    assert c.choices[0].message.content == want.text
    assert c.usage.prompt_tokens == len(ref.tokenizer.apply_chat_template(MSGS, add_generation_prompt=True))


@pytest.mark.slow
def test_the_real_model_answers_through_the_openai_client(tmp_path_factory):
    pytest.importorskip("gguf")
    reg = smollm2_registry(tmp_path_factory)
    s = start_server(registry_dir=str(reg), max_new_tokens_default=16)
    try:
        client = openai.OpenAI(base_url=f"{s.http_url}/v1", api_key="none", max_retries=0, timeout=120)
        assert client.models.list().data[0].model_extra["chat_template"] == "model"
        c = client.chat.completions.create(
            model="rlhf-policy", temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        assert "Paris" in c.choices[0].message.content and c.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(
            model="rlhf-policy", max_tokens=12, seed=1, stream=True,
            messages=[{"role": "user", "content": "Say hello."}]))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
    finally:
        s.stop()
