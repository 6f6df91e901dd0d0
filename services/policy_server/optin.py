"""Prompt-collection opt-in: consented prompts go to the prompt-collector in the background.

A request that names its end user and carries their consent (see docs/inference-api.md) hands its
prompt to :meth:`PromptForwarder.offer`, which only appends to a bounded queue: the response
never waits for the prompt-collector and never fails because of it. A background task sends the
queue in batches (``SubmitPrompts`` over gRPC); when the queue is full, or the collector is not
configured or failing, prompts are dropped and counted
(``rlhf_policy_prompts_forwarded_total{outcome="dropped"|"failed"}``), never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc

log = logging.getLogger("rlhf.services.policy.optin")


@dataclass
class _Item:
    text: str
    user_id: str
    source: str


class PromptForwarder:
    def __init__(self, target: str, metrics, max_queue: int = 1000, batch: int = 64, timeout: float = 5.0,
                 creds=None):
        self.target = target
        self.creds = creds  # the policy-server's own credentials (rlhf_client.channel.Credentials)
        self.metrics = metrics
        self.batch = batch
        self.timeout = timeout
        self._q: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task | None = None
        self._channel = None

    def _count(self, outcome: str, n: int = 1) -> None:
        self.metrics.policy_prompts_forwarded_total.labels(outcome).inc(n)

    def offer(self, texts: list[str], user_id: str, source: str) -> None:
        """Queue consented prompts for the prompt-collector; never blocks, never raises."""
        for t in texts:
            if not t:
                continue
            try:
                self._q.put_nowait(_Item(t, user_id, source))
            except asyncio.QueueFull:
                self._count("dropped")

    async def start(self) -> None:
        from rlhf_client.channel import channel

        self._channel = channel(self.target, creds=self.creds)
        self._task = asyncio.create_task(self._run(), name="prompt-forwarder")

    async def close(self, flush_seconds: float = 2.0) -> None:
        """Send what is queued (for up to ``flush_seconds``), then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._q.join(), flush_seconds)
        except asyncio.TimeoutError:
            self._count("dropped", self._q.qsize())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        from rlhf_client import prompts_grpc

        stub = prompts_grpc.PromptCollectorServiceStub(self._channel)
        while True:
            items = [await self._q.get()]
            while len(items) < self.batch and not self._q.empty():
                items.append(self._q.get_nowait())
            try:
                await self._send(stub, items)
            finally:
                for _ in items:
                    self._q.task_done()

    async def _send(self, stub, items: list[_Item]) -> None:
        from rlhf_client import prompts_pb2

        def req(batch):
            return prompts_pb2.SubmitPromptsRequest(prompts=[
                prompts_pb2.PromptInput(text=i.text.encode(), user_id=i.user_id, source=i.source, consent=True)
                for i in batch])

        try:
            await stub.SubmitPrompts(req(items), timeout=self.timeout)
            self._count("sent", len(items))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT and len(items) > 1:
                # the collector refuses a whole batch for one bad prompt: send them one by one
                for i in items:
                    await self._send(stub, [i])
                return
            self._count("failed", len(items))
            log.warning("prompt forwarding failed", extra={"fields": {"code": e.code().name, "prompts": len(items)}})
        except Exception as e:  # noqa: BLE001 - forwarding must never take the server down
            self._count("failed", len(items))
            log.warning("prompt forwarding failed", extra={"fields": {"error": type(e).__name__, "prompts": len(items)}})
