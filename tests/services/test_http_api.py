"""The policy-server's HTTP API with the real `openai` and `text-generation` clients, on loopback.

One server (tiny random policy, two API keys, a fake prompt-collector) serves most tests; a small
second one (one row, one queued sample) shows the full queue and the drain; a third uses the first
as its TGI backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import httpx
import openai
import pytest
from rlhf_client import common_pb2, models_pb2, policy_grpc, policy_pb2, prompts_grpc, prompts_pb2, TOPIC_MODELS
from text_generation import AsyncClient, Client
from text_generation import errors as tgi_errors

from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
from tests.services.helpers import TEXTS, metric_value, scrape, tiny_policy_registry
from services.policy_server.service import Settings
from tests.services.http_helpers import start_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")]

KEY = "sk-team-search-0001"
LIMITED = "sk-team-slow-0002"
KEYS = json.dumps({KEY: {"team": "search"}, LIMITED: {"team": "slow", "requests_per_minute": 1}})
HEADERS = {"Authorization": f"Bearer {KEY}"}


class FakeCollector(prompts_grpc.PromptCollectorServiceServicer):
    def __init__(self):
        self.prompts: list[prompts_pb2.PromptInput] = []

    def SubmitPrompts(self, request, context):
        self.prompts.extend(request.prompts)
        return prompts_pb2.SubmitPromptsResponse(results=[prompts_pb2.SubmittedPrompt(prompt_id=str(i))
                                                          for i in range(len(request.prompts))])


@pytest.fixture(scope="module")
def collector():
    fake = FakeCollector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    prompts_grpc.add_PromptCollectorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


# every test runs against both engines: in the server's process, and in a child process of its own
@pytest.fixture(scope="module", params=[False, True], ids=["engine-in-process", "engine-process"])
def engine_process(request):
    return request.param


@pytest.fixture(scope="module")
def registry(tmp_path_factory, engine_process):
    # one registry per engine: the reload test publishes a second version into it
    return tiny_policy_registry(tmp_path_factory.mktemp("http") / "registry")


@pytest.fixture(scope="module")
def srv(registry, collector, engine_process):
    s = start_server(registry_dir=str(registry.root), api_keys=KEYS, prompt_collector_addr=collector[1],
                     max_new_tokens_default=16, engine_process=engine_process)
    yield s
    s.stop()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def version(srv) -> str:
    return srv.service.backend.version


def greedy_text(client, prompt: str, n_tokens: int = 24) -> str:
    return client.completions.create(model="rlhf-policy", prompt=prompt, max_tokens=n_tokens,
                                     temperature=0).choices[0].text


# -- OpenAI ---------------------------------------------------------------------------------------------


def test_completion_names_its_version_and_counts_usage(srv, client):
    raw = client.completions.with_raw_response.create(model="rlhf-policy", prompt="the film was", max_tokens=8, seed=3)
    c = raw.parse()
    v = version(srv)
    assert raw.headers["x-policy-version"] == v and c.system_fingerprint == v and c.model == f"rlhf-policy@{v}"
    assert len(c.choices) == 1 and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens == len(srv.service.backend.current().encode("the film was"))  # BOS included
    again = client.completions.create(model=f"rlhf-policy@{v}", prompt="the film was", max_tokens=8, seed=3)
    assert again.choices[0].text == c.choices[0].text  # same seed, same version, same sample


def test_n_samples_logprobs_and_a_batch_of_prompts(client):
    c = client.completions.create(model="rlhf-policy", prompt=["the film", "a movie"], max_tokens=6, n=3, logprobs=2,
                                  seed=1)
    assert sorted(ch.index for ch in c.choices) == list(range(6))
    for ch in c.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
        assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
        assert "".join(lp.tokens).replace("\ufffd", "") or True
    assert len({ch.text for ch in c.choices[:3]}) > 1  # three different samples of one prompt


def test_stop_sequence_cuts_the_text(client):
    free = greedy_text(client, "the movie was")
    stop = free[5:8]
    assert len(stop) == 3, free
    c = client.completions.create(model="rlhf-policy", prompt="the movie was", max_tokens=24, temperature=0, stop=[stop])
    assert c.choices[0].text == free[:free.find(stop)] and c.choices[0].finish_reason == "stop"


def test_streamed_completion_joins_to_the_text_and_ends_with_done(srv, client):
    whole = greedy_text(client, "a movie", 12)
    parts = list(client.completions.create(model="rlhf-policy", prompt="a movie", max_tokens=12, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole
    assert parts[-1].choices[0].finish_reason == "length" and parts[-1].system_fingerprint == version(srv)
    with httpx.stream("POST", f"{srv.http_url}/v1/completions", headers=HEADERS, timeout=60,
                      json={"prompt": "a movie", "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-policy-version"] == version(srv)
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def http_chunks(url: str, path: str, body: dict) -> list[bytes]:
    """POST ``body`` and return the response's HTTP/1.1 chunks as the server wrote them (one chunk per
    write of the streamed body, whatever TCP did to them on the way)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    data = json.dumps(body).encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        raw = b""
        while part := sock.recv(65536):
            raw += part
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" in head.lower(), head
    chunks = []
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2:]


def test_stream_interval_writes_several_tokens_per_event_and_loses_none(srv, registry):
    """stream_interval=4: after the first token, each write holds at least 4 tokens' events (the last
    one fewer); the events are the same as with one write per token."""
    coarse = start_server(registry_dir=str(registry.root), stream_interval=4)
    try:
        body = {"prompt": "the movie was", "max_tokens": 14, "min_tokens": 14, "temperature": 0, "stream": True,
                "logprobs": 0}  # with log-probs every token has an event, text or not
        per_write = []
        for server in (srv, coarse):
            writes = []
            for c in http_chunks(server.http_url, "/v1/completions", body):
                events = [json.loads(line[6:]) for line in c.split(b"\n") if line.startswith(b"data: {")]
                toks = [t for e in events for ch in e["choices"] for t in ch["logprobs"]["tokens"]]
                if toks:
                    writes.append(toks)
            per_write.append(writes)
        fine, coarse_writes = per_write
        assert sum(fine, []) == sum(coarse_writes, []) and len(sum(fine, [])) == 14  # the same 14 tokens
        assert len(coarse_writes) <= 1 + -(-13 // 4)  # the first token alone, then 4 at a time
        assert all(len(w) >= 4 for w in coarse_writes[1:-1]), [len(w) for w in coarse_writes]
        with pytest.raises(ValueError, match="stream_interval"):
            Settings(registry_dir=str(registry.root), stream_interval=0)
    finally:
        coarse.stop()


def test_chat_completion_plain_streamed_and_with_logprobs(srv, client):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about the film."}]
    c = client.chat.completions.create(model="rlhf-policy", messages=msgs, max_tokens=10, temperature=0, n=2,
                                       logprobs=True, top_logprobs=3)
    assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == c.choices[1].message.content  # greedy
    assert c.model == f"rlhf-policy@{version(srv)}" and c.usage.prompt_tokens > 10
    lp = c.choices[0].logprobs.content
    assert lp and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    chunks = list(client.chat.completions.create(model="rlhf-policy", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens // 2


def test_models_lists_the_served_model(srv, client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["rlhf-policy", f"rlhf-policy@{version(srv)}"]


def test_64_concurrent_streaming_clients_all_complete(srv):
    async def one(c: openai.AsyncOpenAI, i: int):
        stream = await c.completions.create(model="rlhf-policy", prompt=f"review {i}: the film was", max_tokens=16,
                                            extra_body={"min_tokens": 16}, stream=True, seed=i)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def all64():
        async with openai.AsyncOpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    before = srv.service.backend.engine.stats.max_rows
    out = asyncio.run(all64())
    assert len(out) == 64 and all(f == "length" for _, f in out)
    assert srv.service.backend.engine.stats.max_rows > max(1, before) or before > 1  # they shared batches


def test_a_client_that_disconnects_stops_its_generation(srv, engine_process):
    if engine_process:
        pytest.skip("slows the runner in the server's process down; test_engine_process.py covers the child's")
    engine = srv.service.backend.engine
    decode = engine.runner.decode

    def slowed(*a):
        time.sleep(0.02)
        return decode(*a)

    engine.runner.decode = slowed
    try:
        dropped = engine.stats.rows_dropped
        with httpx.stream("POST", f"{srv.http_url}/v1/completions", headers=HEADERS, timeout=60,
                          json={"prompt": "the film", "max_tokens": 50, "min_tokens": 50, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break  # leaving the block closes the connection
        deadline = time.monotonic() + 10
        while engine.stats.rows_dropped == dropped and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats.rows_dropped == dropped + 1
        assert engine.running == 0
    finally:
        engine.runner.decode = decode


# -- TGI ------------------------------------------------------------------------------------------------


def test_tgi_client_generate_and_stream(srv):
    c = Client(srv.http_url, headers=HEADERS, timeout=60)
    r = c.generate("the film was", max_new_tokens=6, decoder_input_details=True, top_n_tokens=2)
    d = r.details
    assert d.finish_reason.value in ("length", "eos_token") and d.generated_tokens == len(d.tokens) <= 6
    assert len(d.prefill) == len(srv.service.backend.current().encode("the film was"))
    assert all(len(t) == 2 for t in d.top_tokens)
    assert r.generated_text == "".join(t.text for t in d.tokens if not t.special)
    events = list(c.generate_stream("the film was", max_new_tokens=6))
    assert [e.token.id for e in events] == [t.id for t in d.tokens]  # greedy both times
    assert events[-1].generated_text == r.generated_text and events[-1].details.generated_tokens == len(events)
    sampled = c.generate("the film was", max_new_tokens=6, do_sample=True, seed=4)
    assert sampled.generated_text == c.generate("the film was", max_new_tokens=6, do_sample=True, seed=4).generated_text

    async def with_async():
        a = AsyncClient(srv.http_url, headers=HEADERS, timeout=60)
        return await a.generate("the film was", max_new_tokens=6), [e async for e in a.generate_stream("the film was",
                                                                                                          max_new_tokens=3)]

    ar, aevents = asyncio.run(with_async())
    assert ar.generated_text == r.generated_text and len(aevents) == 3


def test_tgi_routes_generate_info_health(srv):
    r = httpx.post(f"{srv.http_url}/generate", headers=HEADERS, timeout=60,
                   json={"inputs": "the film", "parameters": {"max_new_tokens": 3, "details": True}})
    assert r.status_code == 200 and set(r.json()) == {"generated_text", "details"}
    assert r.headers["x-policy-version"] == version(srv)
    info = httpx.get(f"{srv.http_url}/info").json()
    assert info["model_id"] == "rlhf-policy" and info["model_sha"] == version(srv) and info["max_total_tokens"] == 64
    assert httpx.get(f"{srv.http_url}/health").status_code == 200


# -- opt-in ---------------------------------------------------------------------------------------------


def test_consented_prompts_reach_the_prompt_collector_and_others_do_not(srv, client, collector):
    fake, _ = collector
    before = len(fake.prompts)
    client.completions.create(model="rlhf-policy", prompt="no consent given", max_tokens=2, user="u-1")
    client.completions.create(model="rlhf-policy", prompt="consent but no user", max_tokens=2,
                              extra_headers={"X-RLHF-Consent": "true"})
    client.chat.completions.create(model="rlhf-policy", max_tokens=2, user="u-2", extra_headers={"X-RLHF-Consent": "true"},
                                   messages=[{"role": "user", "content": "a prompt to keep"}])
    deadline = time.monotonic() + 10
    while len(fake.prompts) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    new = fake.prompts[before:]
    assert [(p.text.decode(), p.user_id, p.consent, p.source) for p in new] == [
        ("a prompt to keep", "u-2", True, "api:search")]
    m = scrape(srv.metrics_port)
    assert metric_value(m, "rlhf_policy_prompts_forwarded_total", 'outcome="sent"') == 1


# -- errors ---------------------------------------------------------------------------------------------


def test_openai_errors_have_their_status_and_shape(srv, client):
    cases = [
        (openai.BadRequestError, 400, "invalid_value", dict(prompt="x", temperature=5)),
        # prompt + max_tokens > context
        (openai.BadRequestError, 400, "context_length_exceeded", dict(prompt="x", max_tokens=63)),
        (openai.NotFoundError, 404, "model_not_found", dict(prompt="x", model="gpt-4")),
        (openai.BadRequestError, 400, "context_length_exceeded", dict(prompt="film " * 80)),
    ]
    for exc, status, code, kw in cases:
        with pytest.raises(exc) as e:
            client.completions.create(**{"model": "rlhf-policy", "max_tokens": 4, **kw})
        assert e.value.status_code == status and e.value.body["code"] == code
        assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="sk-wrong-key", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    limited = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key=LIMITED, max_retries=0)
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        limited.models.list()
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    r = httpx.post(f"{srv.http_url}/v1/completions", headers=HEADERS, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{srv.http_url}/v1/nothing-here", headers=HEADERS)
    assert r.status_code == 404 and "error" in r.json()


def test_tgi_errors_have_their_status_and_shape(srv):
    def post(body, headers=HEADERS):
        return httpx.post(f"{srv.http_url}/generate", json=body, headers=headers, timeout=60)

    r = post({"inputs": "x", "parameters": {"temperature": -1}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and r.json()["error"]
    r = post({"inputs": "film " * 80})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = post({"inputs": "x"}, headers={})
    assert r.status_code == 401 and set(r.json()) == {"error", "error_type"}
    with pytest.raises(tgi_errors.ValidationError):
        Client(srv.http_url, headers=HEADERS).generate("x", max_new_tokens=4, top_n_tokens=9)


@pytest.fixture(scope="module")
def small(registry, engine_process):
    s = start_server(registry_dir=str(registry.root), max_batch_prompts=1, max_n=1, max_waiting_samples=1,
                     grace_seconds=20.0, engine_process=engine_process)
    yield s
    s.stop()


def test_full_queue_is_429_and_draining_is_503_without_dropping_requests(small, engine_process):
    if engine_process:
        pytest.skip("slows the runner in the server's process down; test_engine_process.py covers the child's")
    engine = small.service.backend.engine
    decode = engine.runner.decode
    engine.runner.decode = lambda *a: (time.sleep(0.05), decode(*a))[1]
    url = f"{small.http_url}/v1/completions"
    body = {"prompt": "the film", "max_tokens": 40, "min_tokens": 40}
    results: dict = {}

    def call(name):
        results[name] = httpx.post(url, json=body, timeout=60)

    threads = [threading.Thread(target=call, args=(f"r{i}",)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # r0 runs, r1 waits in the queue
    full = httpx.post(url, json=body, timeout=60)
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    assert full.headers["retry-after"] == "1"
    tgi = httpx.post(f"{small.http_url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded"
    # SIGTERM's path: the bootstrap stops the gRPC server, which starts the HTTP drain
    stopper = threading.Thread(target=small.stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while not small.service.http.draining and time.monotonic() < deadline:
        time.sleep(0.01)
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert httpx.get(f"{small.http_url}/health").status_code == 503
    for t in threads:
        t.join(60)
    stopper.join(60)
    assert [results[f"r{i}"].status_code for i in range(2)] == [200, 200]  # in flight: finished, not dropped


# -- hot reload -----------------------------------------------------------------------------------------


def publish_and_wait(srv, registry, seed: int) -> str:
    """Publish a new tiny policy version, announce it on the bus, wait until the server serves it."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=seed)
    new = registry.publish("policy", lambda d: save_pretrained(model, tok, d), config={"add_bos": True}).version
    ev = models_pb2.ModelVersionPublishedEvent(event_id=new, version=new, kind=common_pb2.MODEL_KIND_POLICY)
    srv.call(srv.service.bus.publish(TOPIC_MODELS, ev))
    deadline = time.monotonic() + 60
    while version(srv) != new and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


def test_a_reload_under_load_drops_nothing(srv, registry):
    old = version(srv)
    stop = threading.Event()
    seen, errors = [], []

    def hammer(i):
        c = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                if i % 2:
                    parts = list(c.completions.create(model="rlhf-policy", prompt="the film", max_tokens=8, stream=True))
                    seen.append(parts[-1].system_fingerprint)
                else:
                    seen.append(c.completions.create(model="rlhf-policy", prompt="the film", max_tokens=8).system_fingerprint)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    new = publish_and_wait(srv, registry, seed=1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert version(srv) == new and {old, new} <= set(seen)
    # gRPC takes the same API keys as HTTP (a product team's credential)
    with grpc.insecure_channel(srv.grpc_target) as ch:
        r = policy_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(prompts=["the film"]),
                                                       metadata=[("authorization", f"Bearer {KEY}")])
    assert r.policy_version == new


# -- the TGI backend ------------------------------------------------------------------------------------


def test_tgi_backend_serves_through_a_remote_tgi_server(srv):
    front = start_server(backend="tgi", tgi_url=srv.http_url, tgi_api_key=KEY)
    try:
        c = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
        direct = greedy_text(openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, max_retries=0), "a film", 8)
        r = c.completions.create(model="rlhf-policy", prompt="a film", max_tokens=8, temperature=0, logprobs=1)
        assert r.choices[0].text == direct and r.system_fingerprint == version(srv)
        assert len(r.choices[0].logprobs.token_logprobs) >= 1
        stop = direct[2:4]
        assert len(stop) == 2, direct
        s = c.completions.create(model="rlhf-policy", prompt="a film", max_tokens=8, temperature=0, stop=[stop])
        assert s.choices[0].text == direct[:direct.find(stop)] and s.choices[0].finish_reason == "stop"
        parts = list(c.completions.create(model="rlhf-policy", prompt="a film", max_tokens=8, temperature=0, stream=True,
                                          n=2))
        assert {p.choices[0].index for p in parts} == {0, 1}
        with grpc.insecure_channel(front.grpc_target) as ch:
            g = policy_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(
                prompts=["a film"], sampling=policy_pb2.SamplingParams(temperature=0, max_new_tokens=8),
                return_logprobs=True))
        assert g.policy_version == version(srv) and g.results[0].completions[0].text == direct
        with pytest.raises(openai.BadRequestError) as e:  # the remote's 422 for a long prompt
            c.completions.create(model="rlhf-policy", prompt="film " * 80, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    finally:
        front.stop()


def test_metrics_count_requests_latency_tokens_and_batches(srv, client):
    client.completions.create(model="rlhf-policy", prompt="the film", max_tokens=4)
    httpx.post(f"{srv.http_url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, headers=HEADERS)
    httpx.post(f"{srv.http_url}/generate", json={"inputs": "x"})  # no key
    m = scrape(srv.metrics_port)
    assert metric_value(m, "rlhf_http_requests_total",
                        'code="200",route="/v1/completions",service="policy-server",team="search"') >= 1
    assert metric_value(m, "rlhf_http_requests_total",
                        'code="401",route="/generate",service="policy-server",team="unauthenticated"') >= 1
    assert metric_value(m, "rlhf_policy_time_to_first_token_seconds_count", 'api="openai",team="search"') >= 1
    assert metric_value(m, "rlhf_policy_request_duration_seconds_count", 'api="tgi",team="search"') >= 1
    assert metric_value(m, "rlhf_policy_generated_tokens_total") >= 6
    assert metric_value(m, "rlhf_policy_batch_size_count") >= 1
    assert metric_value(m, "rlhf_policy_queue_depth") == 0


def test_an_engine_process_that_dies_turns_health_503_and_a_new_version_recovers(srv, registry, engine_process):
    if not engine_process:
        pytest.skip("only the engine process has a child to lose")
    engine = srv.service.backend.engine
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not engine.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{srv.http_url}/v1/completions", headers=HEADERS, json={"prompt": "the film", "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
    assert httpx.get(f"{srv.http_url}/health").status_code == 503
    new = publish_and_wait(srv, registry, seed=2)
    assert httpx.get(f"{srv.http_url}/health").status_code == 200
    r = httpx.post(f"{srv.http_url}/v1/completions", headers=HEADERS, json={"prompt": "the film", "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-policy-version"] == new
