"""What the services share: time conversions, the model lifecycle (a watcher of new versions and
the hot swap), and the two service shapes (a model served through a dynamic batcher; a database
with an outbox relay)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from rlhf_client import TOPIC_MODELS, TOPIC_SERVING, common_pb2, models_pb2

from rlhf.errors import DataError, UnavailableError
from rlhf.inference.engine import EngineRetiredError
from rlhf.metrics import ServiceMetrics, set_at_scrape
from rlhf.registry import ModelRegistry
from rlhf.runtime.batching import DynamicBatcher
from rlhf.runtime.bus import bus_for
from rlhf.runtime.server import BaseServiceSettings, ModelExecutor

log = logging.getLogger("rlhf.services")
T = TypeVar("T")

KIND_NAMES = {common_pb2.MODEL_KIND_POLICY: "policy", common_pb2.MODEL_KIND_REWARD: "reward"}
KIND_ENUMS = {name: kind for kind, name in KIND_NAMES.items()}


def group_id(name: str) -> str:
    """A consumer group of this instance's own: every replica must see every event of the topic."""
    return f"{name}-{socket.gethostname()}-{os.getpid()}"


def ts(dt: datetime | float | None = None) -> Timestamp:
    t = Timestamp()
    if dt is None:
        t.GetCurrentTime()
    elif isinstance(dt, datetime):
        t.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc))
    else:
        t.FromNanoseconds(int(dt * 1e9))
    return t


def from_ts(t: Timestamp | None, field: str = "since") -> datetime | None:
    if t is None or (t.seconds == 0 and t.nanos == 0):
        return None
    try:
        return t.ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError) as e:
        raise DataError(f"{field}: timestamp out of range ({t.seconds} s, {t.nanos} ns)") from e


class ModelWatcher:
    """Keeps a service on the newest model version of one kind.

    At start it loads the registry's latest version (if any); afterwards every
    ``ModelVersionPublishedEvent`` of its kind on rlhf.models.v1 triggers ``load(path, version)``
    and then ``swap(engine)``. Older or equal versions than the one served are ignored, so replays
    and duplicates change nothing. With :meth:`poll` it also looks at the registry every few
    seconds, so a version written there without an event (by another process, or while the bus
    was down) is served all the same; a version that fails to load is not tried again.

    Once :meth:`start_announcing` was called (after the service's bus started), the watcher says
    on rlhf.serving.v1 which version this instance serves, at once and after every switch: the
    trainer waits on these events instead of polling the services.

    ``load`` runs off the event loop, on the watcher's one loader thread. Under ``rlhf serve`` that
    thread ran its first torch work before a model thread claimed the intra-op threads, so it keeps
    one and forms no second OpenMP team (rlhf.runtime.threads). Call :meth:`close` at stop.
    """

    def __init__(self, registry: ModelRegistry, kind: str, load: Callable[[Path, str], object],
                 swap: Callable[[object], None], pinned_version: str | None = None):
        self.registry = registry
        self.kind = kind
        self.load = load
        self.swap = swap
        self.pinned = pinned_version
        self.version: str | None = None
        self._bus = None
        self._service = ""
        self._announcing = False
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{kind}-loader")
        self._poller: asyncio.Task | None = None
        self._failed: set[str] = set()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._loader.shutdown(wait=False, cancel_futures=True)

    def poll(self, seconds: float) -> None:
        """Check the registry for a newer version every ``seconds`` (0: never; a pinned version
        is never replaced)."""
        if seconds > 0 and not self.pinned and self._poller is None:
            self._poller = asyncio.create_task(self._poll(seconds), name=f"{self.kind}-registry-poll")

    async def _poll(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            v = None
            try:
                v = await asyncio.to_thread(self.registry.latest, self.kind)
                if v is not None and v not in self._failed and (self.version is None or v > self.version):
                    log.info("newer model version found in the registry", extra={"fields": {"kind": self.kind,
                                                                                              "version": v}})
                    await self._switch(v)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the next poll tries again; a broken version is skipped
                if v is not None:
                    self._failed.add(v)
                log.error("loading a model version from the registry failed",
                          extra={"fields": {"kind": self.kind, "version": v, "error": type(e).__name__}})

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
            engine = await asyncio.get_running_loop().run_in_executor(self._loader, self.load, path, version)
            self.swap(engine)
            self.version = version
            log.info("model version loaded", extra={"fields": {"kind": self.kind, "version": version,
                                                                "load_seconds": round(time.perf_counter() - t0, 3)}})
        await self._announce()

    async def start_announcing(self) -> None:
        """From now on announce the version served (call after the bus started)."""
        self._announcing = True
        await self._announce()

    async def _announce(self) -> None:
        if not self._announcing or self._bus is None or self.version is None:
            return
        ev = models_pb2.ModelVersionServedEvent(
            event_id=uuid.uuid4().hex, kind=KIND_ENUMS[self.kind], version=self.version, service=self._service,
            instance=group_id(self._service), serve_time=ts())
        try:
            await self._bus.publish(TOPIC_SERVING, ev, key=self.version)
        except Exception as e:  # noqa: BLE001 - serving goes on; a waiting trainer times out and says so
            log.warning("could not announce the served version", extra={"fields": {
                "kind": self.kind, "version": self.version, "error": f"{type(e).__name__}: {e}"}})

    async def on_event(self, ev: models_pb2.ModelVersionPublishedEvent) -> None:
        if self.pinned or KIND_NAMES.get(ev.kind) != self.kind:
            return
        await self._switch(ev.version)

    def subscribe(self, bus, group_id: str, service: str) -> None:
        bus.subscribe(TOPIC_MODELS, models_pb2.ModelVersionPublishedEvent, group_id, self.on_event)
        self._bus, self._service = bus, service


class ServedModel:
    """The model version a service serves, hot-swapped, and the versions it replaced while they
    finish their work: the one model lifecycle of the policy-server and the reward-scorer.

    A :class:`ModelWatcher` loads each new version beside the current one; the swap starts the
    new engine (``start()``, when it has one), makes it current, and retires the old one
    (``retire()``: it finishes what it runs and has queued) and closes it in the background
    (``close()``). Engines without these methods (the reward-scorer's, whose batches hold their
    own reference) are simply replaced. :meth:`use` calls a function on the current engine, again
    on the newer one when a swap retired the engine in between.
    """

    def __init__(self, registry: ModelRegistry, kind: str, load: Callable[[Path, str], object],
                 metrics: ServiceMetrics, pinned_version: str | None = None):
        self.kind = kind
        self.metrics = metrics
        self.current = None
        self._retired: list = []
        self._closers: set[asyncio.Task] = set()
        self.watcher = ModelWatcher(registry, kind, load, self._swap, pinned_version=pinned_version or None)

    async def start(self, bus, service: str, poll_seconds: float = 0.0) -> None:
        """Load the newest (or pinned) version and follow rlhf.models.v1 (before ``bus.start()``),
        and the registry itself every ``poll_seconds`` (0: only the events)."""
        await self.watcher.load_initial()
        self.watcher.subscribe(bus, group_id(service), service)
        self.watcher.poll(poll_seconds)

    async def close(self) -> None:
        engines = [e for e in [self.current, *self._retired] if e is not None]
        self.current = None
        await asyncio.gather(*(e.close() for e in engines if hasattr(e, "close")))
        self.watcher.close()

    def _swap(self, engine) -> None:
        if hasattr(engine, "start"):
            engine.start()
        old, self.current = self.current, engine
        self.metrics.model_loaded(self.kind, engine.version)
        if old is not None and hasattr(old, "retire"):
            old.retire()  # finishes what it runs and has queued, then its thread ends
            self._retired.append(old)
            t = asyncio.create_task(self._forget(old))
            self._closers.add(t)
            t.add_done_callback(self._closers.discard)

    async def _forget(self, engine) -> None:
        await engine.close()
        if engine in self._retired:
            self._retired.remove(engine)

    @property
    def version(self) -> str | None:
        return self.current.version if self.current is not None else None

    def get(self):
        if self.current is None:
            raise UnavailableError(f"no {self.kind} version loaded yet; publish one to the registry")
        return self.current

    async def use(self, fn: Callable[[object], Awaitable[T]]) -> T:
        """``await fn(engine)`` on the current engine; when a newer version replaced that engine
        before ``fn`` could queue its work there (EngineRetiredError), on the newer one."""
        for _ in range(3):
            engine = self.get()
            try:
                return await fn(engine)
            except EngineRetiredError:
                if self.current is engine:
                    raise
        raise UnavailableError(f"the {self.kind} version changed repeatedly; retry")


# -- shared lifecycles ------------------------------------------------------------------------------


@dataclass
class DatabaseSettings(BaseServiceSettings):
    database_url: str = "sqlite:///rlhf.db"  # SQLAlchemy URL; postgresql+psycopg://... in production
    migrate_on_start: bool = True  # run the schema migrations at start (idempotent)
    statement_timeout_seconds: float = 30.0  # PostgreSQL cancels a statement running longer (UNAVAILABLE); 0: no limit

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.statement_timeout_seconds >= 0:
            raise ValueError(f"statement_timeout_seconds must be >= 0, got {self.statement_timeout_seconds}")


class OutboxService:
    """A service that stores in the database and announces through the outbox on ``topic``.

    Its health is NOT_SERVING while the database does not answer (:meth:`check_ready`, which the
    bootstrap polls), and its calls are answered UNAVAILABLE then (rlhf.storage.db).
    """

    topic: str

    def __init__(self, settings: DatabaseSettings, metrics: ServiceMetrics, bus=None):
        from rlhf.storage.db import make_engine
        from rlhf.storage.outbox import OutboxRelay

        self.s = settings
        self.metrics = metrics
        self.engine = make_engine(settings.database_url, statement_timeout_s=settings.statement_timeout_seconds)
        self.bus = bus if bus is not None else bus_for(settings, metrics)
        self.relay = OutboxRelay(self.engine, self.bus, topics=[self.topic])
        metrics.observe_database(self.engine)
        set_at_scrape(metrics.outbox_backlog_messages.labels(self.topic), self.relay.backlog)
        self._stop = asyncio.Event()
        self._relay_task: asyncio.Task | None = None

    async def start(self) -> None:
        from rlhf.storage.db import migrate

        if self.s.migrate_on_start:
            await asyncio.to_thread(migrate, self.engine)
        await self.bus.start()
        self._relay_task = asyncio.create_task(self.relay.run(self._stop))

    async def check_ready(self) -> None:
        """Raises UnavailableError while the database does not answer."""
        from rlhf.storage.db import ping

        await asyncio.to_thread(ping, self.engine)

    async def stop(self) -> None:
        self._stop.set()
        if self._relay_task is not None:
            await self._relay_task
        await self.bus.close()
        self.engine.dispose()


@dataclass
class ModelSettings(BaseServiceSettings):
    registry_dir: str = ""  # model registry root (required)
    device: str = "cpu"  # torch device of the model, e.g. cuda:0
    registry_poll_seconds: float = 5.0  # also look in the registry for a newer version this often; 0: events only

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root)")
        if self.registry_poll_seconds < 0:
            raise ValueError("registry_poll_seconds must be >= 0 (0: events only)")


class ModelService:
    """A service that serves the newest model version of ``kind`` through a dynamic batcher.

    Subclasses set ``kind``, implement ``_make_engine(path, version)`` (runs on the watcher's loader thread)
    and ``_run_batch(key, items)`` (runs on the model thread), and give the batcher's settings.
    """

    kind: str

    def __init__(self, settings: ModelSettings, metrics: ServiceMetrics, bus=None, pinned_version: str = ""):
        self.s = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings.registry_dir)
        self.executor = ModelExecutor(self.name)
        self.batcher: DynamicBatcher | None = None
        self.bus = bus if bus is not None else bus_for(settings, metrics)
        self.model = ServedModel(self.registry, self.kind, self._make_engine, metrics, pinned_version)

    @property
    def engine(self):
        return self.model.current

    def _batcher(self) -> DynamicBatcher:
        raise NotImplementedError

    def _make_engine(self, path: Path, version: str):
        raise NotImplementedError

    async def start(self) -> None:
        self.batcher = self._batcher()
        self.batcher.start()
        await self.model.start(self.bus, self.name, self.s.registry_poll_seconds)
        await self.bus.start()
        await self.model.watcher.start_announcing()

    async def stop(self) -> None:
        await self.bus.close()
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown()
        await self.model.close()
