"""The inference API's contract, through the real `openai` and `text-generation` clients (and gRPC):
no field silently ignored, the errors clients expect, teams' limits and quotas, structured output,
the sampler's penalties on every surface, prompt log-probs, and the endpoints teams look for.

Most tests run against one server with its engine in the server's process; those that go
through the engine itself also run with the engine in a child process (``any_srv``).
"""

from __future__ import annotations

import json
import re
import threading
import time

import grpc
import httpx
import openai
import pytest
from rlhf_client import policy_grpc, policy_pb2
from text_generation import Client
from text_generation import errors as tgi_errors
from text_generation.types import Grammar, GrammarType

from services.policy_server.api import fields as F
from services.policy_server.api.routes import ROUTES
from tests.services.helpers import metric_value, scrape, tiny_policy_registry
from tests.services.http_helpers import start_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")]

KEY, SLOW_A, SLOW_B, TOKENS = "sk-search-00000001", "sk-slow-0000000a", "sk-slow-0000000b", "sk-tokens-0000001"
KEYS = json.dumps({"teams": {"search": {}, "slow": {"requests_per_minute": 1}, "tokens": {"tokens_per_minute": 60}},
                   "keys": {KEY: "search", SLOW_A: "slow", SLOW_B: "slow", TOKENS: "tokens"}})
H = {"Authorization": f"Bearer {KEY}"}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tiny_policy_registry(tmp_path_factory.mktemp("contract") / "registry")


@pytest.fixture(scope="module")
def srv(registry):
    s = start_server(registry_dir=str(registry.root), api_keys=KEYS, max_new_tokens_default=16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def process_srv(registry):
    s = start_server(registry_dir=str(registry.root), api_keys=KEYS, max_new_tokens_default=16, engine_process=True)
    yield s
    s.stop()


@pytest.fixture(params=["engine-in-process", "engine-process"])
def any_srv(request):
    return request.getfixturevalue("srv" if request.param == "engine-in-process" else "process_srv")


def oai(s, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.http_url}/v1", api_key=key, max_retries=0, timeout=60)


def tgi(s) -> Client:
    return Client(s.http_url, headers=H, timeout=60)


def grpc_generate(s, prompt: str, **sampling):
    so = sampling.pop("structured_output", None)
    n = sampling.pop("n", 1)
    prompt_lp = sampling.pop("return_prompt_logprobs", False)
    sp = policy_pb2.SamplingParams(**sampling)
    if so is not None:
        sp.structured_output.CopyFrom(so)
    with grpc.insecure_channel(s.grpc_target) as ch:
        r = policy_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(
            prompts=[prompt], n=n, sampling=sp, return_logprobs=True, return_prompt_logprobs=prompt_lp), timeout=60,
            metadata=[("authorization", f"Bearer {KEY}")])
    return r.results[0]


# -- defect 1: no silent ignores ----------------------------------------------------------------------


def test_unknown_and_unimplemented_fields_are_400_naming_them(srv):
    c = oai(srv)
    cases = [("max_token", {"max_token": 5}, "unknown_parameter"),
             ("bad_words", {"bad_words": ["film"]}, "unsupported_parameter"),
             ("suffix", {"suffix": "!"}, "unsupported_parameter")]
    for param, extra, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="rlhf-policy", prompt="the film", extra_body=extra)
        assert e.value.body["param"] == param and e.value.body["code"] == code and param in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="rlhf-policy", prompt="the film", extra_body={"max_token": 5})
    assert "did you mean 'max_tokens'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="rlhf-policy", prompt="the film", logit_bias={"5": 10})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"chat_template_kwargs": {"x": 1}})
    assert e.value.body["param"] == "chat_template_kwargs"
    # TGI: a validation error is 422, through its client too
    r = httpx.post(f"{srv.http_url}/generate", headers=H, timeout=60,
                   json={"inputs": "x", "parameters": {"max_new_token": 3}})
    assert r.status_code == 422 and "parameters.max_new_token" in r.json()["error"]
    with pytest.raises(tgi_errors.ValidationError, match="typical_p"):
        tgi(srv).generate("x", max_new_tokens=3, typical_p=0.5)


def test_the_fields_that_were_ignored_now_work(srv):
    """guided_choice, ignore_eos, repetition_penalty, min_p, stop_token_ids and response_format on
    /v1/completions, chat_template and add_generation_prompt on chat: each changes the answer."""
    c = oai(srv)
    base = dict(model="rlhf-policy", prompt="the film", max_tokens=8, temperature=0)
    greedy = c.completions.create(**base).choices[0].text
    assert c.completions.create(**base, extra_body={"repetition_penalty": 3.0}).choices[0].text != greedy
    hot = dict(base, temperature=1.5, seed=7)
    assert c.completions.create(**hot, extra_body={"min_p": 1.0}).choices[0].text == greedy  # only the likeliest left
    r = c.completions.create(**dict(base, max_tokens=30), n=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 90 and {ch.finish_reason for ch in r.choices} == {"length"}
    r = c.completions.create(**dict(base, max_tokens=20), extra_body={"guided_choice": ["good", "bad"]})
    assert r.choices[0].text in ("good", "bad")
    r = c.completions.create(**dict(base, max_tokens=40), extra_body={"response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
    assert set(json.loads(r.choices[0].text)) == {"ok", "n"}
    ids = grpc_generate(srv, "the film", temperature=0, max_new_tokens=8, min_new_tokens=8).completions[0].token_ids
    stop = ids[3]
    cut = grpc_generate(srv, "the film", temperature=0, max_new_tokens=8, min_new_tokens=8, stop_token_ids=[stop])
    assert list(cut.completions[0].token_ids) == list(ids[:list(ids).index(stop) + 1])
    r = c.completions.create(**base, extra_body={"min_tokens": 8, "stop_token_ids": [stop]})
    assert r.choices[0].text == cut.completions[0].text and r.choices[0].finish_reason == "stop"
    msgs = [{"role": "user", "content": "hi"}]
    chat = dict(model="rlhf-policy", messages=msgs, max_tokens=4, temperature=0)
    default = c.chat.completions.create(**chat).choices[0].message.content
    bare = c.chat.completions.create(**chat, extra_body={"add_generation_prompt": False}).choices[0].message.content
    templated = c.chat.completions.create(**chat, extra_body={
        "chat_template": "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"}).choices[0].message.content
    assert len({default, bare, templated}) == 3


# -- the sampler's new settings on every surface -------------------------------------------------------


def test_penalties_are_the_same_on_every_surface(any_srv):
    """Greedy with penalties: gRPC, the OpenAI routes and TGI (repetition and frequency, which TGI
    has) give the same sample, and it differs from plain greedy."""
    s = any_srv
    pen = dict(repetition_penalty=1.8, frequency_penalty=0.7)
    g = grpc_generate(s, "the film", temperature=0, max_new_tokens=10, min_new_tokens=10, presence_penalty=0.4, **pen)
    plain = grpc_generate(s, "the film", temperature=0, max_new_tokens=10, min_new_tokens=10)
    assert g.completions[0].token_ids != plain.completions[0].token_ids
    c = oai(s)
    o = c.completions.create(model="rlhf-policy", prompt="the film", max_tokens=10, temperature=0, presence_penalty=0.4,
                             frequency_penalty=0.7, extra_body={"min_tokens": 10, "repetition_penalty": 1.8})
    assert o.choices[0].text == g.completions[0].text
    g2 = grpc_generate(s, "the film", temperature=0, max_new_tokens=10, min_new_tokens=10, **pen)
    t = tgi(s).generate("the film", max_new_tokens=10, **pen)
    # TGI keeps its text whole (no stop strings here), so the texts compare
    assert t.generated_text == g2.completions[0].text and [tok.id for tok in t.details.tokens][:1] == \
        list(g2.completions[0].token_ids)[:1]


def test_structured_output_on_every_surface(any_srv):
    s = any_srv
    c = oai(s)
    chat = c.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "rate it"}],
                                     max_tokens=40, temperature=1.2, seed=3, n=2,
                                     response_format={"type": "json_schema",
                                                      "json_schema": {"name": "rating", "schema": SCHEMA}})
    for ch in chat.choices:
        assert ch.finish_reason == "stop" and set(json.loads(ch.message.content)) == {"ok", "n"}
    r = c.completions.create(model="rlhf-policy", prompt="code:", max_tokens=20, temperature=1.2, seed=1, n=3,
                             extra_body={"guided_regex": "[a-c]{2}-[0-9]"})
    assert all(re.fullmatch("[a-c]{2}-[0-9]", ch.text) for ch in r.choices)
    t = tgi(s).generate("rate it", max_new_tokens=40, do_sample=True, seed=5,
                        grammar=Grammar(type=GrammarType.Json, value=SCHEMA))
    assert set(json.loads(t.generated_text)) == {"ok", "n"}
    so = policy_pb2.StructuredOutput(choice=policy_pb2.Choices(options=["yes", "no"]))
    g = grpc_generate(s, "ok?", max_new_tokens=10, temperature=1.2, seed=2, n=3, structured_output=so)
    assert {x.text for x in g.completions} <= {"yes", "no"}
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="rlhf-policy", prompt="x", extra_body={"guided_regex": "(unclosed"})
    assert e.value.body["code"] == "invalid_value"


def test_prompt_logprobs_are_the_same_on_every_surface(any_srv):
    """Scoring a given text: echo + logprobs (OpenAI), decoder_input_details (TGI) and gRPC's
    return_prompt_logprobs give each prompt token's log-prob given those before it."""
    s = any_srv
    text = "the film was good"
    g = grpc_generate(s, text, max_new_tokens=1, return_prompt_logprobs=True)
    ids, lps = list(g.prompt_token_ids), list(g.prompt_logprobs)
    assert len(ids) == len(lps) > 2 and lps[0] == 0.0 and all(x < 0 for x in lps[1:])
    o = oai(s).completions.create(model="rlhf-policy", prompt=text, max_tokens=1, echo=True, logprobs=1)
    lp = o.choices[0].logprobs
    n = len(ids) - 1  # the prompt's text tokens (the BOS the model adds is not text)
    assert "".join(lp.tokens[:n]) == text and lp.token_logprobs[0] == pytest.approx(lps[1], abs=1e-5)
    assert lp.token_logprobs[:n] == pytest.approx(lps[1:], abs=1e-5) and lp.text_offset[n] == len(text)
    t = tgi(s).generate(text, max_new_tokens=1, decoder_input_details=True)
    assert [p.id for p in t.details.prefill] == ids and t.details.prefill[0].logprob is None
    assert [p.logprob for p in t.details.prefill[1:]] == pytest.approx(lps[1:], abs=1e-5)


# -- defect 2: context length ----------------------------------------------------------------------------


def test_context_overflows_are_400_context_length_exceeded_with_the_numbers(srv):
    c = oai(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="rlhf-policy", prompt="film " * 80, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "63" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="rlhf-policy", prompt="film", max_tokens=63)
    m = e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded" and "64 tokens" in m and "63 in the completion" in m
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "film " * 80}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(tgi_errors.ValidationError, match="64"):
        tgi(srv).generate("film", max_new_tokens=63)


# -- defect 3: TGI's truncate, statuses, streams and seeds -------------------------------------------------


def test_tgi_truncate_validation_statuses_and_seeds(srv):
    r = httpx.post(f"{srv.http_url}/generate", headers=H, timeout=60,
                   json={"inputs": "film " * 80, "parameters": {"truncate": 8, "details": True}})
    d = r.json()["details"]
    assert r.status_code == 200 and (d["generated_tokens"] == 16 or d["finish_reason"] == "eos_token")
    assert d["generated_tokens"] > 1
    r = httpx.post(f"{srv.http_url}/generate_stream", headers=H, timeout=60,
                   json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = httpx.post(f"{srv.http_url}/generate", headers=H, timeout=60, json={"inputs": "x", "parameters": {"top_p": 2}})
    assert r.status_code == 422
    with pytest.raises(openai.BadRequestError) as e:
        oai(srv).completions.create(model="rlhf-policy", prompt="x", stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    c = tgi(srv)
    first = c.generate("the film", max_new_tokens=6, do_sample=True)
    seed = first.details.seed
    assert isinstance(seed, int)
    assert c.generate("the film", max_new_tokens=6, do_sample=True, seed=seed).generated_text == first.generated_text
    assert c.generate("the film", max_new_tokens=6).details.seed is None  # greedy: no seed


# -- defect 4: a megabyte prompt does not stall the event loop -----------------------------------------------


def test_a_long_prompt_is_tokenized_while_other_streams_go_on(srv):
    """The tokenizer's thread is held until a concurrent stream has finished: if the long prompt
    were tokenized on the event loop, that stream could not run and this test would time out.
    A megabyte prompt is refused without being tokenized at all."""
    engine = srv.service.backend.engine
    original = engine._encode_long
    started, release, sizes = threading.Event(), threading.Event(), []

    def held(text):
        sizes.append(len(text))
        started.set()
        release.wait(60)
        return original(text)

    engine._encode_long = held
    try:
        big = httpx.post(f"{srv.http_url}/v1/completions", headers=H, timeout=60,
                         json={"prompt": "film " * 200_000, "max_tokens": 4})
        assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded" and not sizes
        out = {}
        long_req = threading.Thread(target=lambda: out.update(r=httpx.post(  # /tokenize has no length bound
            f"{srv.http_url}/tokenize", headers=H, timeout=60, json={"prompt": "the film was good " * 2000})))
        long_req.start()
        assert started.wait(30)
        chunks = list(oai(srv).completions.create(model="rlhf-policy", prompt="a film", max_tokens=12, stream=True,
                                                  extra_body={"min_tokens": 12}))
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
        assert long_req.is_alive()  # still waiting on its tokenizer thread all along
        release.set()
        long_req.join(60)
        assert out["r"].status_code == 200 and out["r"].json()["count"] > 2000 and sizes == [36000]
    finally:
        release.set()
        engine._encode_long = original


def test_a_20_megabyte_grpc_prompt_is_refused_untokenized(srv):
    """gRPC Generate takes the same path: the prompt's size is checked before any tokenizing, so
    a 20 MB prompt costs no tokenizer time (on the event loop or off it)."""
    engine = srv.service.backend.engine
    original, sizes = engine._encode_long, []
    engine._encode_long = lambda text: (sizes.append(len(text)), original(text))[1]
    try:
        with pytest.raises(grpc.RpcError) as e:
            grpc_generate(srv, "film " * 4_000_000, max_new_tokens=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt tokens" in e.value.details()
        assert sizes == []
        assert grpc_generate(srv, "a film", max_new_tokens=4).completions[0].token_ids  # and the server goes on
    finally:
        engine._encode_long = original


# -- defect 5: failed streams ------------------------------------------------------------------------------


def test_a_stream_that_fails_is_counted_by_its_outcome(srv):
    engine = srv.service.backend.engine
    decode = engine.runner.decode
    engine.runner.decode = lambda *a: (time.sleep(0.03), decode(*a))[1]
    label = 'code="504",route="/v1/completions",service="policy-server",team="search"'
    before = metric_value(scrape(srv.metrics_port), "rlhf_http_requests_total", label) or 0
    try:
        with pytest.raises(openai.APIError):
            for _ in oai(srv).completions.create(model="rlhf-policy", prompt="the film", max_tokens=40, stream=True,
                                                 extra_body={"min_tokens": 40},
                                                 extra_headers={"X-Request-Timeout": "0.4"}):
                pass
    finally:
        engine.runner.decode = decode
    time.sleep(0.2)
    m = scrape(srv.metrics_port)
    assert metric_value(m, "rlhf_http_requests_total", label) == before + 1
    assert metric_value(m, "rlhf_policy_request_failures_total", 'api="openai",reason="timeout",team="search"') >= 1


# -- defect 6: teams, not keys -----------------------------------------------------------------------------


def test_limits_are_per_team_and_a_refused_request_spends_nothing(srv):
    a, b = oai(srv, SLOW_A), oai(srv, SLOW_B)
    for _ in range(3):  # bad requests do not spend the team's one request a minute
        with pytest.raises(openai.BadRequestError):
            a.completions.create(model="rlhf-policy", prompt="x", temperature=9)
    a.completions.create(model="rlhf-policy", prompt="x", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:  # the team's other key shares the limit
        b.completions.create(model="rlhf-policy", prompt="x", max_tokens=2)
    assert "team slow" in e.value.body["message"] and int(e.value.response.headers["retry-after"]) >= 1
    t = oai(srv, TOKENS)
    t.completions.create(model="rlhf-policy", prompt="x", max_tokens=40, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as e:  # 60 tokens a minute: 42 are spent
        t.completions.create(model="rlhf-policy", prompt="x", max_tokens=40)
    assert e.value.body["code"] == "quota_exceeded" and "60 tokens per minute" in e.value.body["message"]
    m = scrape(srv.metrics_port)
    assert metric_value(m, "rlhf_http_requests_total",
                        'code="429",route="/v1/completions",service="policy-server",team="slow"') >= 1
    assert metric_value(m, "rlhf_policy_request_failures_total", 'api="openai",reason="quota",team="tokens"') >= 1


# -- the endpoints teams look for --------------------------------------------------------------------------


def test_tokenize_detokenize_models_metrics_and_openapi(srv):
    r = httpx.post(f"{srv.http_url}/tokenize", headers=H, json={"prompt": "the film was"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    back = httpx.post(f"{srv.http_url}/detokenize", headers=H, json={"tokens": r["tokens"]}).json()["prompt"]
    assert back.endswith("the film was")
    chat = httpx.post(f"{srv.http_url}/tokenize", headers=H,
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    c = oai(srv)
    v = srv.service.backend.version
    assert c.models.retrieve("rlhf-policy").id == "rlhf-policy" and c.models.retrieve(f"rlhf-policy@{v}").version == v
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    text = httpx.get(f"{srv.http_url}/metrics").text  # on the API port too, without a key
    assert "rlhf_http_requests_total" in text and "rlhf_policy_queue_time_seconds_bucket" in text
    doc = httpx.get(f"{srv.http_url}/openapi.json").json()
    assert {(r.path, r.method.lower()) for r in ROUTES} == {(p, m) for p, ops in doc["paths"].items() for m in ops}
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {f.name for f in F.COMPLETIONS} and body["additionalProperties"] is False


def test_the_metrics_teams_look_for(srv):
    oai(srv).completions.create(model="rlhf-policy", prompt="the film", max_tokens=6, stream=False)
    m = scrape(srv.metrics_port)
    assert metric_value(m, "rlhf_policy_queue_time_seconds_count") >= 1
    assert metric_value(m, "rlhf_policy_inter_token_latency_seconds_count") >= 1
    assert metric_value(m, "rlhf_policy_prompt_tokens_total", 'api="openai",team="search"') >= 3
    assert metric_value(m, "rlhf_policy_requests_running") == 0
