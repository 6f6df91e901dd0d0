"""policy-server: generation for product traffic and PPO rollouts, over gRPC and HTTP.

The gRPC PolicyService (proto <-> domain here) and the OpenAI- and TGI-compatible HTTP API
(:mod:`services.policy_server.api`, on ``http_port`` in the same process and event loop)
share one backend (:mod:`services.policy_server.backends`): the embedded continuous-batching
engine of :mod:`rlhf.inference` on the registry's newest policy version, hot-reloaded on
``rlhf.models.v1`` without failing a call, or a remote TGI server. Every answer carries the
version that produced it. On SIGTERM gRPC and HTTP drain together (the bootstrap calls
:meth:`PolicyServer.drain` beside the gRPC server's stop): new HTTP requests get 503, those in
flight finish within ``grace_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from rlhf_client import policy_grpc, policy_pb2

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import DeadlineExceededError, EngineConfig
from rlhf.metrics import ServiceMetrics
from rlhf.registry import ModelRegistry
from rlhf.runtime.apikeys import ANONYMOUS, INTERNAL, ApiKeys, RateLimitedError
from rlhf.runtime.auth import ANYONE, OPERATOR, PRODUCT, SERVICE, Principal, caller, make_authenticator
from rlhf.runtime.bus import bus_for
from rlhf.runtime.grpc_client import peer_credentials
from rlhf.runtime.http import EmbeddedHttpServer
from rlhf.runtime.server import BaseServiceSettings
from rlhf.inference.guided import Guide
from rlhf.inference.requests import RequestLimits, build_request
from rlhf.serving import GenerationRequest
from services.policy_server.backends import LocalBackend, TGIBackend, complete, observe, used_tokens
from services.policy_server.api.routes import HttpApi
from services.policy_server.optin import PromptForwarder

NAME = "policy-server"
FINISH = {"eos": policy_pb2.FINISH_REASON_STOP, "stop": policy_pb2.FINISH_REASON_STOP,
          "length": policy_pb2.FINISH_REASON_LENGTH}
log = logging.getLogger("rlhf.services.policy")
# the gRPC API's names for GenerationRequest's fields (in error messages)
NAMES = {k: f"sampling.{k}" for k in ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "stop",
                                      "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p",
                                      "stop_token_ids", "ignore_eos", "logprobs_of")}
NAMES["guide"] = "sampling.structured_output"
# sampling.logprobs_of as GenerationRequest.logprobs_of (unset: the default; an unknown number is
# passed on for the one validation to refuse)
LOGPROBS_OF = {policy_pb2.LOGPROBS_OF_UNSPECIFIED: None, policy_pb2.LOGPROBS_OF_MODEL: "model",
               policy_pb2.LOGPROBS_OF_SAMPLING: "sampling"}


@dataclass
class Settings(BaseServiceSettings):
    registry_dir: str = ""  # model registry root (required with backend=local)
    registry_poll_seconds: float = 5.0  # also look in the registry for a newer version this often; 0: events only
    policy_version: str = ""  # pin a version; empty: the latest, then follow rlhf.models.v1
    max_batch_prompts: int = 64  # rows of the engine's running batch (samples decoded together)
    max_waiting_samples: int = 1024  # samples queued for a row; beyond: RESOURCE_EXHAUSTED / HTTP 429
    max_prefill_tokens: int = 4096  # prompt tokens prefilled between two decode steps
    engine_runner: str = "auto"  # auto (fast GPT-2 / Llama forward when the model is one), gpt2, llama or hf
    engine_process: bool = False  # run the engine in a child process: it no longer shares the interpreter lock with HTTP
    max_new_tokens_default: int = 64  # when a request leaves max_new_tokens at 0
    max_new_tokens_limit: int = 512  # larger requests are INVALID_ARGUMENT
    max_prompt_tokens: int = 512  # longer prompts are INVALID_ARGUMENT (and never below the model's context)
    max_prompts_per_request: int = 256  # prompts in one Generate call
    max_n: int = 16  # samples per prompt
    device: str = "cpu"  # torch device of the model, e.g. cuda:0
    http_port: int = 0  # OpenAI/TGI-compatible HTTP API; 0 picks a free port (logged), -1 runs none
    model_name: str = "rlhf-policy"  # the model id of the HTTP APIs (also <model_name>@<version>)
    request_timeout_seconds: float = 120.0  # deadline of an HTTP request (header X-Request-Timeout may shorten it)
    stream_interval: int = 1  # tokens of each sample per write of a stream, after the first (more: fewer, larger writes)
    max_body_bytes: int = 4194304  # larger HTTP request bodies are 413
    api_keys_file: str = ""  # JSON/YAML {teams: {name: limits}, keys: {key: team}}, re-read on change; none: auth off
    api_keys: str = ""  # the same JSON inline (e.g. a secret mounted as an environment variable)
    prompt_collector_addr: str = ""  # host:port of the prompt-collector for opted-in prompts; empty: none sent
    optin_queue_size: int = 1000  # opted-in prompts waiting to be sent; beyond: dropped (counted)
    backend: str = "local"  # local (the registry's policy, embedded) or tgi (a remote TGI server)
    tgi_url: str = ""  # base URL of the TGI server (backend=tgi)
    tgi_api_key: str = ""  # bearer token for the TGI server, if it wants one

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("local", "tgi"):
            raise ValueError(f"backend must be local or tgi, got {self.backend!r}")
        if self.backend == "local" and not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root) with backend=local")
        if self.backend == "tgi" and not self.tgi_url:
            raise ValueError("tgi_url is required (the TGI server's base URL)")
        if self.max_batch_prompts < 1 or self.max_n < 1 or self.max_n > self.max_batch_prompts:
            raise ValueError("max_batch_prompts and max_n must be >= 1, max_n <= max_batch_prompts")
        if self.max_waiting_samples < 0:
            raise ValueError("max_waiting_samples must be >= 0")
        if self.engine_runner not in ("auto", "gpt2", "llama", "hf"):
            raise ValueError(f"engine_runner must be auto, gpt2, llama or hf, got {self.engine_runner!r}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in -1..65535, got {self.http_port}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if not self.request_timeout_seconds > 0:
            raise ValueError("request_timeout_seconds must be > 0")
        if self.registry_poll_seconds < 0:
            raise ValueError("registry_poll_seconds must be >= 0 (0: events only)")


class PolicyServer(policy_grpc.PolicyServiceServicer):
    name = NAME
    service_names = [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name]
    # product teams generate; the trainer (service) samples rollouts and candidates
    rpc_roles = {"Generate": frozenset({PRODUCT, SERVICE, OPERATOR}),
                 "GenerateStream": frozenset({PRODUCT, SERVICE, OPERATOR}),
                 "GetPolicyVersion": ANYONE}

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        s = self.s = settings
        self.metrics = metrics
        self.bus = bus if bus is not None else bus_for(s, metrics)
        if s.backend == "tgi":
            self.backend = TGIBackend(s.tgi_url, s, metrics, s.tgi_api_key)
        else:
            cfg = EngineConfig(max_batch_size=s.max_batch_prompts, max_queue=s.max_waiting_samples,
                               max_prefill_tokens=s.max_prefill_tokens,
                               max_seq_len=s.max_prompt_tokens + s.max_new_tokens_limit, runner=s.engine_runner)
            self.backend = LocalBackend(ModelRegistry(s.registry_dir), s, metrics, cfg, s.policy_version)
        self.keys = ApiKeys(s.api_keys_file or None, s.api_keys)
        # gRPC callers: the credentials file, and the HTTP API's keys as product-team credentials
        self.auth = make_authenticator(s, [self._key_principal] if self.keys.enabled else [])
        self.forwarder = (PromptForwarder(s.prompt_collector_addr, metrics, s.optin_queue_size,
                                          creds=peer_credentials(s))
                          if s.prompt_collector_addr else None)
        self.http = HttpApi(self.backend, s, metrics, self.keys, self.forwarder)
        self.limits = RequestLimits(max_new_tokens=s.max_new_tokens_limit, max_n=s.max_n)
        self.http_server: EmbeddedHttpServer | None = None
        self.http_port: int | None = None
        self._drain: asyncio.Future | None = None

    def _key_principal(self, token: str) -> Principal | None:
        team = self.keys.team_of(token)
        return Principal(name=f"team:{team}", roles=frozenset({PRODUCT}), team=team) if team is not None else None

    # -- lifecycle ------------------------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> None:
        policy_grpc.add_PolicyServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self.backend.start(self.bus, NAME, self.s.registry_poll_seconds)
        await self.bus.start()
        if isinstance(self.backend, LocalBackend):
            await self.backend.model.watcher.start_announcing()
        if self.forwarder is not None:
            await self.forwarder.start()
        if self.s.http_port >= 0:
            self.http_server = EmbeddedHttpServer(self.http.app, self.s.host, self.s.http_port,
                                                  graceful_seconds=min(5.0, self.s.grace_seconds))
            self.http_port = await self.http_server.start()
            log.info("http serving", extra={"fields": {"host": self.s.host, "http_port": self.http_port,
                                                       "backend": self.s.backend, "auth": self.keys.enabled}})

    async def drain(self, grace: float) -> None:
        """The bootstrap's shutdown hook, beside the gRPC server's stop: HTTP refuses new requests
        (503) from now on and those in flight get ``grace`` seconds."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.http.drain(grace))
        await asyncio.shield(self._drain)

    async def stop(self) -> None:
        await self.drain(self.s.grace_seconds)  # already done when the bootstrap drained
        if self.http_server is not None:
            await self.http_server.stop()
        if self.forwarder is not None:
            await self.forwarder.close()
        await self.backend.stop()
        await self.bus.close()

    # -- helpers --------------------------------------------------------------------------------
    def _request(self, sp: policy_pb2.SamplingParams, n: int, return_logprobs: bool,
                 prompt_logprobs: bool = False) -> GenerationRequest:
        values = {"n": n or 1, "max_new_tokens": sp.max_new_tokens or None, "min_new_tokens": sp.min_new_tokens,
                  "temperature": sp.temperature if sp.HasField("temperature") else None,
                  "top_p": sp.top_p if sp.HasField("top_p") else None, "top_k": sp.top_k, "stop": list(sp.stop),
                  "seed": sp.seed if sp.HasField("seed") else None, "return_logprobs": return_logprobs,
                  "repetition_penalty": sp.repetition_penalty if sp.HasField("repetition_penalty") else None,
                  "frequency_penalty": sp.frequency_penalty, "presence_penalty": sp.presence_penalty,
                  "min_p": sp.min_p, "stop_token_ids": list(sp.stop_token_ids), "ignore_eos": sp.ignore_eos,
                  "guide": self._guide(sp.structured_output) if sp.HasField("structured_output") else None,
                  "prompt_logprobs": prompt_logprobs, "logprobs_of": LOGPROBS_OF.get(sp.logprobs_of, sp.logprobs_of)}
        return build_request(values, self.limits, default_max_new_tokens=self.s.max_new_tokens_default, names=NAMES)

    @staticmethod
    def _guide(so: policy_pb2.StructuredOutput) -> Guide:
        kind = so.WhichOneof("format")
        if kind == "json_schema":
            try:
                json.loads(so.json_schema)
            except ValueError:
                raise DataError("sampling.structured_output.json_schema is not valid JSON") from None
            return Guide("json_schema", so.json_schema)
        if kind == "json_object":
            return Guide("json_object")
        if kind == "regex":
            return Guide("regex", so.regex)
        if kind == "choice" and so.choice.options:
            return Guide.choice(list(so.choice.options))
        raise DataError("sampling.structured_output needs one of json_schema, json_object, regex, choice.options")

    def _caller(self) -> tuple[str, Callable[[int], object] | None, list]:
        """The caller's team (its queue in the engine, its metrics label), and for a product team
        the admission of a request against the team's limits (what it took lands in the list)."""
        p = caller()
        if not p.team:
            return (ANONYMOUS if p.anonymous else INTERNAL), None, []
        taken: list = []

        def admit(tokens: int) -> None:
            try:
                taken.append(self.keys.admit(p.team, tokens))
            except RateLimitedError as e:
                raise ResourceExhaustedError(str(e)) from None

        return p.team, admit, taken

    def _done(self, team: str, runs: list, taken: list, t0: float) -> None:
        for a in taken:
            self.keys.settle(a, used_tokens(runs))
        observe(self.metrics, "grpc", self.keys.label(team), runs, t0)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    # -- RPCs -----------------------------------------------------------------------------------
    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        t0 = time.perf_counter()
        prompts = list(request.prompts)
        if not prompts:
            raise DataError("prompts is empty")
        if len(prompts) > self.s.max_prompts_per_request:
            raise DataError(f"at most {self.s.max_prompts_per_request} prompts per request, got {len(prompts)}")
        req = self._request(request.sampling, request.n, request.return_logprobs, request.return_prompt_logprobs)
        deadline = self._deadline(context)
        team, admit, taken = self._caller()
        runs = []
        try:
            # one version answers every prompt of the call
            runs = await self.backend.open(prompts, req, deadline, where=[f"prompts[{i}]" for i in range(len(prompts))],
                                           team=team, admit=admit)
            results = await asyncio.gather(*(complete(r) for r in runs))
        except DeadlineExceededError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        finally:
            for r in runs:
                r.cancel()
            self._done(team, runs, taken, t0)
        resp = policy_pb2.GenerateResponse(policy_version=runs[0].version)
        for run, samples in zip(runs, results):
            pc = resp.results.add()
            if req.return_logprobs or req.prompt_logprobs:
                pc.prompt_token_ids.extend(run.prompt_token_ids or [])
            if req.prompt_logprobs:
                pc.prompt_logprobs.extend(0.0 if lp is None else lp for lp in run.prompt_logprobs or [])
            for s in samples:
                c = pc.completions.add(text=s.text, finish_reason=FINISH[s.finish_reason])
                if req.return_logprobs:
                    c.token_ids.extend(s.token_ids)
                    c.logprobs.extend(s.logprobs)
        return resp

    async def GenerateStream(self, request: policy_pb2.GenerateStreamRequest, context):
        t0 = time.perf_counter()
        if not request.prompt:
            raise DataError("prompt is empty")
        req = self._request(request.sampling, 1, True)
        team, admit, taken = self._caller()
        (run,) = await self.backend.open([request.prompt], req, self._deadline(context), team=team, admit=admit)
        events = run.events()
        try:
            async for ev in events:
                if ev.text:
                    yield policy_pb2.GenerateStreamResponse(text_delta=ev.text, token_id=ev.token_id, logprob=ev.logprob,
                                                            policy_version=run.version)
                if ev.sample is not None:
                    yield policy_pb2.GenerateStreamResponse(finish_reason=FINISH[ev.sample.finish_reason],
                                                            policy_version=run.version)
        except DeadlineExceededError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        finally:
            await events.aclose()  # a client that went away cancels the generation
            self._done(team, [run], taken, t0)

    async def GetPolicyVersion(self, request, context) -> policy_pb2.GetPolicyVersionResponse:
        v = self.backend.version
        if v is None:
            raise UnavailableError("no policy version loaded yet; publish one to the registry")
        return policy_pb2.GetPolicyVersionResponse(policy_version=v)


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> PolicyServer:
    return PolicyServer(settings, metrics, bus)
