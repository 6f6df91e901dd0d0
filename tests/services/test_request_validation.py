"""One validation of generation requests behind every API surface: the same bad request through
gRPC ``Generate``, the OpenAI routes and the TGI routes breaks the same rule of
rlhf.inference.requests, answered in each surface's error shape; and gRPC's choice of log-probs."""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch
from rlhf_client import policy_grpc, policy_pb2

from rlhf.inference.requests import MAX_STOP_CHARS, MAX_STOP_STRINGS, RULES, RequestLimits
from rlhf.models import load_causal_lm, load_tokenizer
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
    s.policy_dir = reg.path("policy", reg.latest("policy"))
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


def test_grpc_logprobs_of_reports_the_sampled_distributions_logprobs_and_refuses_unknown_values(srv):
    def generate(logprobs_of: int) -> policy_pb2.PromptCompletions:
        sampling = policy_pb2.SamplingParams(temperature=0.5, max_new_tokens=6, min_new_tokens=6, seed=3,
                                             logprobs_of=logprobs_of)
        with grpc.insecure_channel(srv.grpc_target) as ch:
            r = policy_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(
                prompts=["the film"], return_logprobs=True, sampling=sampling), timeout=60)
        return r.results[0]

    unset, model, drawn = (generate(v) for v in (policy_pb2.LOGPROBS_OF_UNSPECIFIED, policy_pb2.LOGPROBS_OF_MODEL,
                                                 policy_pb2.LOGPROBS_OF_SAMPLING))
    tokens = list(drawn.completions[0].token_ids)
    assert [list(r.completions[0].token_ids) for r in (unset, model)] == [tokens, tokens]  # the same samples
    # the model's own log-probs (T = 1; unset says the same), and the sampled distribution's:
    # logits / 0.5 with EOS masked (min_new_tokens covers the whole sample)
    ids = torch.tensor([list(drawn.prompt_token_ids) + tokens])
    with torch.no_grad():
        logits = load_causal_lm(srv.policy_dir)(input_ids=ids).logits[0, len(drawn.prompt_token_ids) - 1 : -1].double()
    at = torch.tensor(tokens)[:, None]
    own = logits.log_softmax(-1).gather(-1, at).squeeze(-1)
    logits[:, load_tokenizer(srv.policy_dir).eos_token_id] = float("-inf")
    tempered = (logits / 0.5).log_softmax(-1).gather(-1, at).squeeze(-1)
    for r, want in ((unset, own), (model, own), (drawn, tempered)):
        assert torch.allclose(torch.tensor(list(r.completions[0].logprobs), dtype=torch.float64), want, atol=1e-4)
    with pytest.raises(grpc.RpcError) as e:
        generate(7)  # a value this server does not know
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'sampling.logprobs_of' must be 'model' or 'sampling', got 7" in e.value.details()
