"""One validation of generation requests behind every API surface: the same bad request through
gRPC ``Generate``, the OpenAI routes and the TGI routes breaks the same rule of
rlhf.inference.requests, answered in each surface's error shape."""

from __future__ import annotations

import grpc
import httpx
import pytest
from rlhf_client import policy_grpc, policy_pb2

from rlhf.inference.requests import MAX_STOP_CHARS, MAX_STOP_STRINGS, RULES, RequestLimits
from tests.services.helpers import tiny_policy_registry
from tests.services.http_helpers import start_server

pytestmark = pytest.mark.slow

LIMIT, MAX_N = 40, 3
LIMITS = RequestLimits(max_new_tokens=LIMIT, max_n=MAX_N)

# rule broken -> the request's fields under GenerationRequest's names (None: the surface has no such field)
CASES = [
    ("temperature", {"temperature": 2.5}),
    ("temperature", {"temperature": -0.5}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -3}),
    ("max_new_tokens", {"max_new_tokens": LIMIT + 1}),
    ("min_new_tokens", {"max_new_tokens": 4, "min_new_tokens": 5}),
    ("stop", {"stop": ["x"] * (MAX_STOP_STRINGS + 1)}),
    ("stop", {"stop": ["y" * (MAX_STOP_CHARS + 1)]}),
    ("n", {"n": MAX_N + 1}),
]

GRPC_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_new_tokens",
                 "min_new_tokens": "min_new_tokens", "stop": "stop"}
OPENAI = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens",
          "min_new_tokens": "min_tokens", "stop": "stop", "n": "n"}
TGI = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_new_tokens",
       "stop": "stop"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    reg = tiny_policy_registry(tmp_path_factory.mktemp("validation") / "registry")
    s = start_server(registry_dir=str(reg.root), max_new_tokens_limit=LIMIT, max_n=MAX_N)
    yield s
    s.stop()


def rule_text(rule: str) -> str:
    return f"must be {RULES[rule].must(LIMITS)}"


def grpc_error(srv, fields: dict) -> str | None:
    sampling = {GRPC_SAMPLING[k]: v for k, v in fields.items() if k in GRPC_SAMPLING}
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = policy_grpc.PolicyServiceStub(ch)
        try:
            stub.Generate(policy_pb2.GenerateRequest(prompts=["the film"], n=fields.get("n", 0),
                                                     sampling=policy_pb2.SamplingParams(**sampling)), timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            return e.details()
    return None


def openai_error(srv, fields: dict) -> str:
    body = {"model": "rlhf-policy", "prompt": "the film", **{OPENAI[k]: v for k, v in fields.items()}}
    r = httpx.post(f"{srv.http_url}/v1/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"], r.text
    return err["message"]


def tgi_error(srv, fields: dict) -> str | None:
    if not set(fields) <= set(TGI):
        return None
    params = {TGI[k]: v for k, v in fields.items()}
    r = httpx.post(f"{srv.http_url}/generate", json={"inputs": "the film", "parameters": params}, timeout=60)
    body = r.json()
    assert 400 <= r.status_code < 500 and set(body) == {"error", "error_type"}, r.text
    assert body["error_type"] == "validation"
    return body["error"]


@pytest.mark.parametrize("rule,fields", CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
def test_the_same_bad_request_breaks_the_same_rule_on_every_surface(srv, rule, fields):
    want = rule_text(rule)
    messages = {"grpc": grpc_error(srv, fields), "openai": openai_error(srv, fields), "tgi": tgi_error(srv, fields)}
    surfaces = [name for name, m in messages.items() if m is not None]
    assert {"grpc", "openai"} <= set(surfaces)
    for name in surfaces:
        assert want in messages[name], (name, messages[name])


def test_json_answers_never_hold_a_bare_nan():
    import json

    from services.policy_server.api.errors import dumps

    body = {"choices": [{"logprobs": {"token_logprobs": [-0.5, float("nan"), float("-inf")]}}], "ok": 1.5}
    text = dumps(body).decode()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, None, None]
