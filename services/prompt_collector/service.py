"""prompt-collector: proto <-> rlhf.storage.prompts.PromptStore, behind the shared bootstrap.

Stored prompts are announced on rlhf.prompts.v1 by the outbox relay (written in the same
transaction as the prompt, published after commit).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from rlhf_client import TOPIC_PROMPTS, prompts_grpc, prompts_pb2

from rlhf.metrics import ServiceMetrics
from rlhf.runtime.bus import make_bus
from rlhf.runtime.server import BaseServiceSettings
from rlhf.storage.db import make_engine, migrate
from rlhf.storage.outbox import OutboxRelay
from rlhf.storage.prompts import PromptIn, PromptStore, to_proto

NAME = "prompt-collector"
TOPIC = TOPIC_PROMPTS


@dataclass
class Settings(BaseServiceSettings):
    database_url: str = "sqlite:///rlhf.db"  # SQLAlchemy URL; postgresql+psycopg://... in production
    migrate_on_start: bool = True  # run the schema migrations at start (idempotent)
    max_prompt_chars: int = 4000  # longer prompts are rejected


class PromptCollector(prompts_grpc.PromptCollectorServiceServicer):
    name = NAME
    service_names = [prompts_pb2.DESCRIPTOR.services_by_name["PromptCollectorService"].full_name]

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        self.s = settings
        self.metrics = metrics
        self.engine = make_engine(settings.database_url)
        self.store = PromptStore(self.engine, max_prompt_chars=settings.max_prompt_chars)
        self.bus = bus if bus is not None else make_bus(settings.kafka_bootstrap, metrics)
        self.relay = OutboxRelay(self.engine, self.bus, topics=[TOPIC])
        self._stop = asyncio.Event()
        self._relay_task: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> None:
        prompts_grpc.add_PromptCollectorServiceServicer_to_server(self, server)

    async def start(self) -> None:
        if self.s.migrate_on_start:
            await asyncio.to_thread(migrate, self.engine)
        await self.bus.start()
        self._relay_task = asyncio.create_task(self.relay.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._relay_task is not None:
            await self._relay_task
        await self.bus.close()
        self.engine.dispose()

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
