"""The outbox relay: publishes the events the stores wrote to the ``outbox`` table, after commit.

Stores insert an outbox row in the same transaction as the data it describes, so an event is
never announced for something that was rolled back, and nothing stored goes unannounced. The
relay reads unpublished rows in id order, publishes each (the bus awaits the broker's ack) and
then marks it published. Delivery is at least once: a crash between the ack and the mark, or a
failed publish, publishes the row again later, so consumers de-duplicate by ``event_id``.

On PostgreSQL the rows of a batch are locked with ``FOR UPDATE SKIP LOCKED`` for the whole batch,
so two replicas never publish the same row concurrently (each takes different rows). Database
calls run in a worker thread; the event loop never blocks on them. On SQLite (one process per
database file in practice) a batch is read, published and then marked in two short transactions;
two relays on one file may then both publish a row, which at-least-once delivery allows. Pass
``topics`` to relay only some topics (e.g. each service its own).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, Engine

from rlhf.storage.db import is_postgresql, transaction, utcnow
from rlhf.storage.schema import outbox

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class OutboxEvent:
    """An event a store writes to the outbox beside what it stores.

    The service builds it from the stored row (its topic, the message's protobuf full name and
    bytes, the partition key) and hands the store that function, so the storage layer knows no
    wire format.
    """

    topic: str
    message_type: str
    payload: bytes
    key: str | None = None

    def row(self, created_at: datetime) -> dict:
        """The ``outbox`` row of this event, unpublished."""
        return dict(topic=self.topic, message_type=self.message_type, payload=self.payload, key=self.key,
                    created_at=created_at, published_at=None)


class RawPublisher(Protocol):
    async def publish_raw(self, topic: str, value: bytes, message_type: str, key: str | None = None) -> None: ...


class OutboxRelay:
    """Publishes unpublished outbox rows through ``bus.publish_raw`` and marks them published."""

    def __init__(self, engine: Engine, bus: RawPublisher, *, batch_size: int = 100, poll_interval: float = 0.2,
                 topics: Sequence[str] | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        self.engine = engine
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        # Only rows of these topics (None: every topic), so each service can relay its own events.
        self.topics = tuple(topics) if topics is not None else None
        self.published_total = 0
        self.failures_total = 0

    def backlog(self) -> int:
        """Rows of this relay's topics stored and not yet published."""
        q = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        if self.topics is not None:
            q = q.where(outbox.c.topic.in_(self.topics))
        with transaction(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    # -- one batch --------------------------------------------------------------------------------
    def _select(self):
        q = (select(outbox.c.id, outbox.c.topic, outbox.c.message_type, outbox.c.payload, outbox.c.key)
             .where(outbox.c.published_at.is_(None)).order_by(outbox.c.id).limit(self.batch_size))
        if self.topics is not None:
            q = q.where(outbox.c.topic.in_(self.topics))
        if is_postgresql(self.engine):
            q = q.with_for_update(skip_locked=True)
        return q

    @staticmethod
    def _mark(conn: Connection, ids: list[int]) -> None:
        if ids:
            conn.execute(update(outbox).where(outbox.c.id.in_(ids), outbox.c.published_at.is_(None))
                         .values(published_at=utcnow()))

    async def drain_once(self) -> int:
        """Publish one batch of unpublished rows (at most ``batch_size``, in id order) and mark them.

        Returns how many were published. Stops at the first failed publish: that row and the rest
        of the batch stay unpublished for the next round (the error is logged, without payloads).
        """
        n, _ = await self._drain()
        return n

    async def _drain(self) -> tuple[int, bool]:
        """(rows published, whether a publish failed)."""
        if is_postgresql(self.engine):
            return await self._drain_locked()
        return await self._drain_plain()

    async def _publish(self, rows) -> tuple[list[int], bool]:
        """Publish a batch; returns the ids of its published prefix and whether a publish failed.

        Rows go one by one, in id order, until each topic of the batch has had its first row (that
        one may create the topic); the rest are handed to the producer together, still in id
        order, and their acknowledgements awaited together (one at a time, each row waited for its
        own acknowledgement and the relay fell behind the writers).
        Rows after a failure stay unpublished (the ones among them that did reach the broker are
        sent again next round: delivery is at least once, and consumers de-duplicate by event id).
        """
        firsts = {}
        for i, r in enumerate(rows):
            firsts.setdefault(r.topic, i)
        cut = max(firsts.values(), default=-1) + 1
        errors: list[BaseException | None] = []  # per row, in id order, as far as attempted
        for r in rows[:cut]:
            errors.append(await self._publish_one(r))
            if errors[-1] is not None:
                break
        else:
            errors += await asyncio.gather(*(self._publish_one(r) for r in rows[cut:]))
        for r, err in zip(rows, errors):
            if err is not None:
                self.failures_total += 1
                log.warning("outbox: publishing row %d (%s on %s) failed, will retry: %s: %s",
                            r.id, r.message_type, r.topic, type(err).__name__, err)
        done: list[int] = []
        for r, err in zip(rows, errors):
            if err is not None:
                return done, True
            done.append(r.id)
        return done, False

    async def _publish_one(self, r) -> BaseException | None:
        try:
            await self.bus.publish_raw(r.topic, bytes(r.payload), r.message_type, r.key)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any bus error: retry the row next round
            return e
        return None

    async def _drain_plain(self) -> tuple[int, bool]:
        """SQLite: one process writes the file, so read, publish, then mark in a second transaction
        (holding SQLite's write lock across broker round trips would stall every writer)."""
        def read():
            with transaction(self.engine) as conn:
                return conn.execute(self._select()).all()

        rows = await asyncio.to_thread(read)
        if not rows:
            return 0, False
        done, failed = await self._publish(rows)
        if done:
            def mark():
                with transaction(self.engine, write=True) as conn:
                    self._mark(conn, done)

            await asyncio.to_thread(mark)
        self.published_total += len(done)
        return len(done), failed

    async def _drain_locked(self) -> tuple[int, bool]:
        """PostgreSQL: lock the batch (SKIP LOCKED), publish, mark and commit in one transaction."""
        conn: Connection = await asyncio.to_thread(self.engine.connect)
        try:
            def read():
                conn.begin()
                return conn.execute(self._select()).all()

            rows = await asyncio.to_thread(read)
            if not rows:
                await asyncio.to_thread(conn.rollback)
                return 0, False
            done, failed = await self._publish(rows)

            def mark():
                self._mark(conn, done)
                conn.commit()

            await asyncio.to_thread(mark)
            self.published_total += len(done)
            return len(done), failed
        finally:
            await asyncio.shield(asyncio.to_thread(conn.close))  # rolls back what was not committed

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Drain until ``stop`` is set: immediately again after a full batch, otherwise after
        ``poll_interval``; after errors with a growing backoff (up to 10 s)."""
        backoff = self.poll_interval
        while not stop.is_set():
            try:
                n, failed = await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a database hiccup must not end the relay
                log.warning("outbox: drain failed, retrying: %s: %s", type(e).__name__, e)
                n, failed = 0, True
            if n >= self.batch_size:
                backoff = self.poll_interval
                continue
            if failed:
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                wait = backoff
            else:
                backoff = wait = self.poll_interval
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass


__all__ = ["OutboxEvent", "OutboxRelay", "RawPublisher"]
