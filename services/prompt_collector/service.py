"""prompt-collector: proto <-> rlhf.storage.prompts.PromptStore, behind the shared bootstrap.

Stored prompts are announced on rlhf.prompts.v1 by the outbox relay (written in the same
transaction as the prompt, published after commit).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from rlhf_client import TOPIC_PROMPTS, prompts_grpc, prompts_pb2

from rlhf.runtime.auth import OPERATOR, PRODUCT, SERVICE, TRAINER
from rlhf.metrics import ServiceMetrics
from rlhf.storage.prompts import PromptIn, PromptStore, to_proto
from services.common import DatabaseSettings, OutboxService

NAME = "prompt-collector"


@dataclass
class Settings(DatabaseSettings):
    max_prompt_chars: int = 4000  # longer prompts are rejected


class PromptCollector(OutboxService, prompts_grpc.PromptCollectorServiceServicer):
    name = NAME
    topic = TOPIC_PROMPTS
    service_names = [prompts_pb2.DESCRIPTOR.services_by_name["PromptCollectorService"].full_name]
    # prompts come from product teams and from the policy-server's opt-in forwarding; the trainer
    # (service) and ML engineers read them
    rpc_roles = {"SubmitPrompts": frozenset({PRODUCT, SERVICE, OPERATOR}),
                 "ListPrompts": frozenset({SERVICE, TRAINER, OPERATOR}),
                 "SamplePrompts": frozenset({SERVICE, TRAINER, OPERATOR})}

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        super().__init__(settings, metrics, bus)
        self.store = PromptStore(self.engine, max_prompt_chars=settings.max_prompt_chars)

    def register(self, server: grpc.aio.Server) -> None:
        prompts_grpc.add_PromptCollectorServiceServicer_to_server(self, server)

    async def SubmitPrompts(self, request, context) -> prompts_pb2.SubmitPromptsResponse:
        items = [PromptIn(text=p.text, user_id=p.user_id, source=p.source, consent=p.consent) for p in request.prompts]
        results = await asyncio.to_thread(self.store.submit, items)
        self.metrics.prompts_collected_total.inc(sum(1 for r in results if not r.duplicate))
        return prompts_pb2.SubmitPromptsResponse(results=[
            prompts_pb2.SubmittedPrompt(prompt_id=r.prompt_id, duplicate=r.duplicate, split=r.split) for r in results])

    async def ListPrompts(self, request, context) -> prompts_pb2.ListPromptsResponse:
        rows, token = await asyncio.to_thread(self.store.list, request.split, request.page_size,
                                              request.page_token)
        return prompts_pb2.ListPromptsResponse(prompts=[to_proto(r) for r in rows], next_page_token=token)

    async def SamplePrompts(self, request, context) -> prompts_pb2.SamplePromptsResponse:
        rows = await asyncio.to_thread(self.store.sample, request.split, request.count, request.seed)
        return prompts_pb2.SamplePromptsResponse(prompts=[to_proto(r) for r in rows])


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> PromptCollector:
    return PromptCollector(settings, metrics, bus)
