"""prompt-collector: proto <-> rlhf.storage.prompts.PromptStore, behind the shared bootstrap.

Stored prompts are announced on rlhf.prompts.v1 by the outbox relay (written in the same
transaction as the prompt, published after commit; :func:`announce` builds the event).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rlhf_client import TOPIC_PROMPTS, prompts_grpc, prompts_pb2

from rlhf.runtime.auth import OPERATOR, PRODUCT, SERVICE, TRAINER
from rlhf.metrics import ServiceMetrics
from rlhf.storage.outbox import OutboxEvent
from rlhf.storage.prompts import PromptIn, PromptRow, PromptStore
from services.common import DatabaseSettings, OutboxService

NAME = "prompt-collector"
EVENT_TYPE = prompts_pb2.PromptCollectedEvent.DESCRIPTOR.full_name  # rlhf.prompts.v1.PromptCollectedEvent


def to_proto(row: PromptRow) -> prompts_pb2.Prompt:
    t = Timestamp()
    t.FromDatetime(row.created_at)
    return prompts_pb2.Prompt(prompt_id=row.prompt_id, text=row.text, split=row.split, source=row.source,
                              create_time=t)


def announce(row: PromptRow) -> OutboxEvent:
    """The outbox event of a newly stored prompt: a PromptCollectedEvent on rlhf.prompts.v1."""
    p = to_proto(row)
    event = prompts_pb2.PromptCollectedEvent(event_id=row.prompt_id, prompt=p, event_time=p.create_time)
    return OutboxEvent(TOPIC_PROMPTS, EVENT_TYPE, event.SerializeToString(), row.prompt_id)


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
        self.store = PromptStore(self.engine, announce, max_prompt_chars=settings.max_prompt_chars)

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
