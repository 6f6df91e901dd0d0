"""Dynamic batching: requests from concurrent callers share one model call.

Callers ``await batcher.submit(key, items)``; requests with the same ``key`` (e.g. the same
sampling parameters) are packed together until ``max_batch_items`` items are collected or the
oldest has waited ``max_wait_seconds``; ``fn(key, items)`` then runs off the event loop (in the
given executor function) and each caller gets the slice of results for its own items. A request
larger than ``max_batch_items`` runs alone. The queue is bounded: beyond ``max_pending_items``
waiting items, ``submit`` raises ResourceExhaustedError at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Sequence

from rlhf.errors import ResourceExhaustedError


@dataclass
class _Pending:
    items: Sequence[Any]
    future: asyncio.Future
    enqueued: float


@dataclass
class _Group:
    requests: list[_Pending] = field(default_factory=list)
    n_items: int = 0


class DynamicBatcher:
    def __init__(self, fn: Callable[[Hashable, list[Any]], list[Any]],
                 run: Callable[..., Awaitable[Any]], *, max_batch_items: int = 64,
                 max_wait_seconds: float = 0.005, max_pending_items: int = 4096,
                 on_batch: Callable[[int], None] | None = None):
        self.fn = fn
        self.run = run  # e.g. ModelExecutor.run: runs fn in the model thread
        self.max_batch_items = max_batch_items
        self.max_wait = max_wait_seconds
        self.max_pending = max_pending_items
        self.on_batch = on_batch
        self._groups: "OrderedDict[Hashable, _Group]" = OrderedDict()
        self._pending_items = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        if self._closed:
            raise ResourceExhaustedError("server is shutting down")
        if not items:
            return []
        if self._pending_items + len(items) > self.max_pending:
            raise ResourceExhaustedError(
                f"batch queue full ({self._pending_items} items waiting); retry later")
        loop = asyncio.get_running_loop()
        p = _Pending(list(items), loop.create_future(), loop.time())
        g = self._groups.setdefault(key, _Group())
        g.requests.append(p)
        g.n_items += len(items)
        self._pending_items += len(items)
        self._wakeup.set()
        return await p.future

    def _take(self, key: Hashable) -> list[_Pending]:
        g = self._groups[key]
        taken, n = [], 0
        while g.requests and (not taken or n + len(g.requests[0].items) <= self.max_batch_items):
            p = g.requests.pop(0)
            taken.append(p)
            n += len(p.items)
        g.n_items -= n
        self._pending_items -= n
        if not g.requests:
            del self._groups[key]
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # the group whose oldest request has waited longest goes first
            key, g = min(self._groups.items(), key=lambda kv: kv[1].requests[0].enqueued)
            wait = g.requests[0].enqueued + self.max_wait - loop.time()
            if g.n_items < self.max_batch_items and wait > 0 and not self._closed:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take(key)
            batch = [p for p in batch if not p.future.cancelled()]  # callers that went away
            if not batch:
                continue
            items = [it for p in batch for it in p.items]
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                results = await self.run(self.fn, key, items)
            except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            i = 0
            for p in batch:
                part = results[i : i + len(p.items)]
                i += len(p.items)
                if not p.future.done():
                    p.future.set_result(part)
