"""policy-server: proto <-> rlhf.serving.PolicyEngine, behind the shared bootstrap.

Concurrent Generate calls with equal sampling settings are coalesced into one model call by a
DynamicBatcher; streaming calls run one at a time on the model thread and stop when the client
goes away. Every answer carries the version of the engine that produced it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

import grpc
from rlhf_client import policy_grpc, policy_pb2

from rlhf.errors import DataError, UnavailableError
from rlhf.metrics import ServiceMetrics
from rlhf.registry import ModelRegistry
from rlhf.runtime.batching import DynamicBatcher
from rlhf.runtime.bus import make_bus
from rlhf.runtime.server import BaseServiceSettings, ModelExecutor
from rlhf.serving import GenerationRequest, PolicyEngine
from services.common import ModelWatcher

NAME = "policy-server"
FINISH = {"stop": policy_pb2.FINISH_REASON_STOP, "length": policy_pb2.FINISH_REASON_LENGTH}


@dataclass
class Settings(BaseServiceSettings):
    registry_dir: str = ""  # model registry root (required)
    policy_version: str = ""  # pin a version; empty: the latest, then follow rlhf.models.v1
    max_batch_prompts: int = 64  # prompts x n per model call
    max_wait_ms: float = 5.0  # how long a request may wait for others to share its batch
    max_new_tokens_default: int = 64  # when a request leaves max_new_tokens at 0
    max_new_tokens_limit: int = 512  # larger requests are INVALID_ARGUMENT
    max_prompt_tokens: int = 512  # longer prompts are INVALID_ARGUMENT (and never below the model's context)
    max_prompts_per_request: int = 256  # prompts in one Generate call
    max_n: int = 16  # samples per prompt
    device: str = "cpu"  # torch device of the model, e.g. cuda:0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root)")
        if self.max_batch_prompts < 1 or self.max_n < 1:
            raise ValueError("max_batch_prompts and max_n must be >= 1")


class PolicyServer(policy_grpc.PolicyServiceServicer):
    name = NAME
    service_names = [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name]

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        self.s = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings.registry_dir)
        self.engine: PolicyEngine | None = None
        self.executor = ModelExecutor(NAME)
        self.batcher: DynamicBatcher | None = None
        self.bus = bus if bus is not None else make_bus(settings.kafka_bootstrap, metrics)
        self.watcher = ModelWatcher(self.registry, "policy", self._load, self._swap,
                                    pinned_version=settings.policy_version or None)

    # -- lifecycle ------------------------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> None:
        policy_grpc.add_PolicyServiceServicer_to_server(self, server)

    async def start(self) -> None:
        self.batcher = DynamicBatcher(self._run_batch, self.executor.run, max_batch_items=self.s.max_batch_prompts,
                                      max_wait_seconds=self.s.max_wait_ms / 1000)
        self.batcher.start()
        await self.watcher.load_initial()
        self.watcher.subscribe(self.bus, f"{NAME}-{socket.gethostname()}-{os.getpid()}")
        await self.bus.start()

    async def stop(self) -> None:
        await self.bus.close()
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown()

    async def _load(self, path, version):
        return await asyncio.to_thread(PolicyEngine, path, version, max_prompt_tokens=self.s.max_prompt_tokens,
                                       device=self.s.device)

    def _swap(self, engine) -> None:
        self.engine = engine

    # -- helpers --------------------------------------------------------------------------------
    def _engine(self) -> PolicyEngine:
        if self.engine is None:
            raise UnavailableError("no policy version loaded yet; publish one to the registry")
        return self.engine

    def _request(self, sp: policy_pb2.SamplingParams, n: int, return_logprobs: bool) -> GenerationRequest:
        max_new = sp.max_new_tokens or self.s.max_new_tokens_default
        if sp.max_new_tokens < 0 or max_new > self.s.max_new_tokens_limit:
            raise DataError(f"sampling.max_new_tokens must be in 1..{self.s.max_new_tokens_limit}")
        temperature = sp.temperature if sp.HasField("temperature") else 1.0
        top_p = sp.top_p if sp.HasField("top_p") else 1.0
        if temperature < 0:
            raise DataError("sampling.temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise DataError("sampling.top_p must be in (0, 1]")
        if sp.top_k < 0 or sp.min_new_tokens < 0 or sp.min_new_tokens > max_new:
            raise DataError("sampling.top_k and sampling.min_new_tokens must be >= 0, min_new_tokens <= max_new_tokens")
        if n < 0 or n > self.s.max_n:
            raise DataError(f"n must be in 1..{self.s.max_n}")
        if any(len(s) > 64 for s in sp.stop) or len(sp.stop) > 8:
            raise DataError("sampling.stop takes at most 8 strings of at most 64 characters")
        return GenerationRequest(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=sp.top_k,
                                 min_new_tokens=sp.min_new_tokens, stop=tuple(s for s in sp.stop if s),
                                 seed=sp.seed if sp.HasField("seed") else None, n=max(1, n),
                                 return_logprobs=return_logprobs)

    def _run_batch(self, key, prompts: list[str]):
        req, engine = key[0], key[1]  # a seeded request has a third, unique element
        out = engine.generate(prompts, req)
        self.metrics.policy_generated_tokens_total.inc(sum(len(s.token_ids) for r in out for s in r.samples))
        return out

    # -- RPCs -----------------------------------------------------------------------------------
    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        prompts = list(request.prompts)
        if not prompts:
            raise DataError("prompts is empty")
        if len(prompts) > self.s.max_prompts_per_request:
            raise DataError(f"at most {self.s.max_prompts_per_request} prompts per request, got {len(prompts)}")
        req = self._request(request.sampling, request.n, request.return_logprobs)
        engine = self._engine()  # the version that answers this call, even if a new one arrives
        engine.check(prompts, req)
        # seeded requests run alone so that their samples do not depend on who else was batched
        key = (req, engine) if req.seed is None else (req, engine, object())
        results = await self.batcher.submit(key, prompts)
        resp = policy_pb2.GenerateResponse(policy_version=engine.version)
        for r in results:
            pc = resp.results.add()
            if req.return_logprobs:
                pc.prompt_token_ids.extend(r.prompt_token_ids)
            for s in r.samples:
                c = pc.completions.add(text=s.text, finish_reason=FINISH[s.finish_reason])
                if req.return_logprobs:
                    c.token_ids.extend(s.token_ids)
                    c.logprobs.extend(s.logprobs)
        return resp

    async def GenerateStream(self, request: policy_pb2.GenerateStreamRequest, context):
        if not request.prompt:
            raise DataError("prompt is empty")
        req = self._request(request.sampling, 1, True)
        engine = self._engine()
        engine.check([request.prompt], req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = False

        def on_step(tokens, logprobs):
            loop.call_soon_threadsafe(queue.put_nowait, (int(tokens[0]), float(logprobs[0])))
            return not cancelled  # stop sampling when the client went away

        async def run():
            try:
                return await self.executor.run(engine.generate, [request.prompt], req, on_step)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.ensure_future(run())
        tok = engine.tokenizer
        ids: list[int] = []
        sent = ""
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                tid, lp = item
                if tid == tok.eos_token_id:
                    continue
                ids.append(tid)
                text = tok.decode(ids, skip_special_tokens=True)
                if req.stop and any(s in text for s in req.stop):
                    continue  # the final message carries the cut text
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for the next token
                delta, sent = text[len(sent):], text
                yield policy_pb2.GenerateStreamResponse(text_delta=delta, token_id=tid, logprob=lp,
                                                        policy_version=engine.version)
            result = (await task)[0].samples[0]
            self.metrics.policy_generated_tokens_total.inc(len(result.token_ids))
            tail = result.text[len(sent):] if result.text.startswith(sent) else ""
            yield policy_pb2.GenerateStreamResponse(text_delta=tail, finish_reason=FINISH[result.finish_reason],
                                                    policy_version=engine.version)
        finally:
            cancelled = True
            if not task.done():
                await asyncio.wait([task])

    async def GetPolicyVersion(self, request, context) -> policy_pb2.GetPolicyVersionResponse:
        return policy_pb2.GetPolicyVersionResponse(policy_version=self._engine().version)


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> PolicyServer:
    return PolicyServer(settings, metrics, bus)
