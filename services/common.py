"""Translation helpers shared by the services (proto <-> domain), and the model-version watcher."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

from google.protobuf.timestamp_pb2 import Timestamp
from rlhf_client import TOPIC_MODELS, common_pb2, models_pb2

from rlhf.registry import ModelRegistry

log = logging.getLogger("rlhf.services")

KIND_NAMES = {common_pb2.MODEL_KIND_POLICY: "policy", common_pb2.MODEL_KIND_REWARD: "reward"}
KIND_ENUMS = {v: k for k, v in KIND_NAMES.items()}


def ts(dt: datetime | float | None = None) -> Timestamp:
    t = Timestamp()
    if dt is None:
        t.GetCurrentTime()
    elif isinstance(dt, datetime):
        t.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc))
    else:
        t.FromNanoseconds(int(dt * 1e9))
    return t


def from_ts(t: Timestamp | None) -> datetime | None:
    if t is None or (t.seconds == 0 and t.nanos == 0):
        return None
    return t.ToDatetime(tzinfo=timezone.utc)


class ModelWatcher:
    """Keeps a service on the newest model version of one kind.

    At start it loads the registry's latest version (if any); afterwards every
    ``ModelVersionPublishedEvent`` of its kind on rlhf.models.v1 triggers ``load(path, version)``
    (run off the event loop by the caller's ``load``) and then ``swap(engine)``. Older or equal
    versions than the one served are ignored, so replays and duplicates change nothing.
    """

    def __init__(self, registry: ModelRegistry, kind: str, load: Callable[[Path, str], Awaitable[object]],
                 swap: Callable[[object], None], pinned_version: str | None = None):
        self.registry = registry
        self.kind = kind
        self.load = load
        self.swap = swap
        self.pinned = pinned_version
        self.version: str | None = None
        self._lock = asyncio.Lock()

    async def load_initial(self) -> None:
        v = self.pinned or self.registry.latest(self.kind)
        if v is not None:
            await self._switch(v)

    async def _switch(self, version: str) -> None:
        async with self._lock:
            if self.version is not None and version <= self.version:
                return
            path = self.registry.path(self.kind, version)
            t0 = time.perf_counter()
            engine = await self.load(path, version)
            self.swap(engine)
            self.version = version
            log.info("model version loaded", extra={"fields": {"kind": self.kind, "version": version,
                                                                "load_seconds": round(time.perf_counter() - t0, 3)}})

    async def on_event(self, ev: models_pb2.ModelVersionPublishedEvent) -> None:
        if self.pinned or KIND_NAMES.get(ev.kind) != self.kind:
            return
        await self._switch(ev.version)

    def subscribe(self, bus, group_id: str) -> None:
        bus.subscribe(TOPIC_MODELS, models_pb2.ModelVersionPublishedEvent, group_id, self.on_event)
