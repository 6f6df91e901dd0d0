"""OutboxRelay with fake buses (the real Kafka bus is tested with the runtime)."""

from __future__ import annotations

import asyncio
import logging

from rlhf_client import feedback_pb2, prompts_pb2
from sqlalchemy import select

from rlhf.storage.feedback import FeedbackStore, TaskIn
from rlhf.storage.outbox import OutboxRelay
from rlhf.storage.prompts import PromptIn, PromptStore
from rlhf.storage.schema import outbox
from services.feedback_store.messages import announce as announce_feedback
from services.prompt_collector.service import announce as announce_prompt


class FakeBus:
    """Records every publish_raw call; ``delay`` seconds per call imitates waiting for the ack."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, bytes, str, str | None]] = []
        self.delay = delay

    async def publish_raw(self, topic: str, value: bytes, message_type: str, key: str | None = None) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.calls.append((topic, value, message_type, key))


class FailingBus(FakeBus):
    """Fails the calls whose 1-based number is in ``fail_on`` (every call when it is None)."""

    def __init__(self, fail_on: set[int] | None = None):
        super().__init__()
        self.fail_on = fail_on
        self.attempts = 0

    async def publish_raw(self, topic, value, message_type, key=None):
        self.attempts += 1
        if self.fail_on is None or self.attempts in self.fail_on:
            raise ConnectionError("broker unavailable")
        await super().publish_raw(topic, value, message_type, key)


def prompt_texts(n: int, prefix: str = "secret prompt") -> list[PromptIn]:
    return [PromptIn(f"{prefix} {i}".encode(), f"user{i}", "api", True) for i in range(n)]


def rows(engine):
    with engine.connect() as conn:
        return conn.execute(select(outbox.c.id, outbox.c.published_at, outbox.c.key).order_by(outbox.c.id)).all()


def test_drain_publishes_in_id_order_and_marks(engine):
    out = PromptStore(engine, announce_prompt).submit(prompt_texts(5))
    bus = FakeBus()
    relay = OutboxRelay(engine, bus, batch_size=2)
    assert [asyncio.run(relay.drain_once()) for _ in range(4)] == [2, 2, 1, 0]
    assert [prompts_pb2.PromptCollectedEvent.FromString(v).event_id for _, v, _, _ in bus.calls] == \
        [o.prompt_id for o in out]
    assert {(t, m) for t, _, m, _ in bus.calls} == {("rlhf.prompts.v1", "rlhf.prompts.v1.PromptCollectedEvent")}
    assert [k for *_, k in bus.calls] == [o.prompt_id for o in out]
    assert all(r.published_at is not None and r.published_at.tzinfo is not None for r in rows(engine))
    assert relay.published_total == 5


def test_both_services_events_in_one_outbox(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(2))
    fb = FeedbackStore(engine, announce_feedback)
    task = fb.create_tasks([TaskIn("q", "p", 1, ["a", "b"], "v1")])[0]
    sid, _ = fb.submit_best_of_k("k", task.task_id, "alice", 1)
    PromptStore(engine, announce_prompt).submit(prompt_texts(1, prefix="later"))
    bus = FakeBus()
    assert asyncio.run(OutboxRelay(engine, bus).drain_once()) == 4
    assert [t for t, *_ in bus.calls] == ["rlhf.prompts.v1"] * 2 + ["rlhf.feedback.v1", "rlhf.prompts.v1"]
    event = feedback_pb2.FeedbackEvent.FromString(bus.calls[2][1])
    assert event.event_id == sid and bus.calls[2][2] == "rlhf.feedback.v1.FeedbackEvent"
    assert bus.calls[2][3] == task.task_id


def test_topics_filter(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(2))
    fb = FeedbackStore(engine, announce_feedback)
    task = fb.create_tasks([TaskIn("q", "p", 1, ["a", "b"], "v1")])[0]
    fb.submit_best_of_k("k", task.task_id, "alice", 1)
    bus = FakeBus()
    assert asyncio.run(OutboxRelay(engine, bus, topics=["rlhf.feedback.v1"]).drain_once()) == 1
    assert [t for t, *_ in bus.calls] == ["rlhf.feedback.v1"]
    assert sum(r.published_at is None for r in rows(engine)) == 2


def test_backlog_counts_the_relay_topics_unpublished_rows(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(3))
    fb = FeedbackStore(engine, announce_feedback)
    task = fb.create_tasks([TaskIn("q", "p", 1, ["a", "b"], "v1")])[0]
    fb.submit_best_of_k("k", task.task_id, "alice", 1)
    prompts = OutboxRelay(engine, FakeBus(), batch_size=2, topics=["rlhf.prompts.v1"])
    assert (prompts.backlog(), OutboxRelay(engine, FakeBus()).backlog()) == (3, 4)
    asyncio.run(prompts.drain_once())
    assert (prompts.backlog(), OutboxRelay(engine, FakeBus()).backlog()) == (1, 2)


def test_failed_publish_leaves_rows_for_the_next_round(engine, caplog):
    PromptStore(engine, announce_prompt).submit(prompt_texts(5))
    ids = [r.id for r in rows(engine)]
    bus = FailingBus(fail_on={3})
    relay = OutboxRelay(engine, bus)
    with caplog.at_level(logging.WARNING, logger="rlhf.storage.outbox"):
        assert asyncio.run(relay.drain_once()) == 2
    state = rows(engine)
    assert [r.published_at is not None for r in state] == [True, True, False, False, False]
    assert "failed" in caplog.text and f"row {ids[2]}" in caplog.text
    assert "secret" not in caplog.text  # no payloads in logs
    # rows 4 and 5 went to the broker beside row 3 but stay unmarked behind it: the next round
    # starts again at the failed row, in order (at least once; consumers de-duplicate by event id)
    first_round = len(bus.calls)
    assert asyncio.run(relay.drain_once()) == 3
    published = [prompts_pb2.PromptCollectedEvent.FromString(v).prompt.text for _, v, _, _ in bus.calls]
    assert published[:2] == ["secret prompt 0", "secret prompt 1"]
    assert published[first_round:] == [f"secret prompt {i}" for i in range(2, 5)]
    assert set(published) == {f"secret prompt {i}" for i in range(5)}
    assert all(r.published_at is not None for r in rows(engine))
    assert relay.failures_total == 1


class CountingBus(FakeBus):
    """Records how many publishes were waiting for their acknowledgement at once."""

    def __init__(self):
        super().__init__(delay=0.01)
        self.in_flight = self.most_in_flight = 0

    async def publish_raw(self, topic, value, message_type, key=None):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await super().publish_raw(topic, value, message_type, key)
        finally:
            self.in_flight -= 1


def test_a_batch_is_published_without_waiting_row_by_row(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(20))
    bus = CountingBus()
    assert asyncio.run(OutboxRelay(engine, bus).drain_once()) == 20
    assert bus.most_in_flight == 19  # the first row alone (it may create the topic), then the rest together
    published = [prompts_pb2.PromptCollectedEvent.FromString(v).prompt.text for _, v, _, _ in bus.calls]
    assert published == [f"secret prompt {i}" for i in range(20)]  # FakeBus acks in call order


def test_bus_down_publishes_nothing(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(3))
    relay = OutboxRelay(engine, FailingBus())
    assert asyncio.run(relay.drain_once()) == 0
    assert asyncio.run(relay.drain_once()) == 0
    assert all(r.published_at is None for r in rows(engine))


def test_run_until_stopped(engine):
    store = PromptStore(engine, announce_prompt)
    bus = FakeBus()
    relay = OutboxRelay(engine, bus, batch_size=3, poll_interval=0.01)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        await asyncio.to_thread(store.submit, prompt_texts(7))
        for _ in range(500):
            if len(bus.calls) == 7:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(store.submit, prompt_texts(1, prefix="later"))
        for _ in range(500):
            if len(bus.calls) == 8:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert len(bus.calls) == 8
    assert all(r.published_at is not None for r in rows(engine))


def test_run_survives_failures_and_stops(engine):
    PromptStore(engine, announce_prompt).submit(prompt_texts(2))
    bus = FailingBus(fail_on={1, 2, 3})
    relay = OutboxRelay(engine, bus, poll_interval=0.01)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        for _ in range(1000):
            if len(bus.calls) == 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 15)

    asyncio.run(main())
    assert bus.attempts == 5 and len(bus.calls) == 2
    assert all(r.published_at is not None for r in rows(engine))


def test_event_loop_not_blocked(engine):
    """While a drain waits on the bus, other coroutines run (database calls are in threads)."""
    PromptStore(engine, announce_prompt).submit(prompt_texts(3))
    relay = OutboxRelay(engine, FakeBus(delay=0.05))
    ticks = []

    async def ticker():
        for _ in range(10):
            ticks.append(1)
            await asyncio.sleep(0.005)

    async def main():
        await asyncio.gather(relay.drain_once(), ticker())

    asyncio.run(main())
    assert len(ticks) == 10


def test_two_relays_never_publish_a_row_twice(engine):
    """PostgreSQL: FOR UPDATE SKIP LOCKED gives concurrent relays disjoint rows."""
    assert engine.dialect.name == "postgresql"
    PromptStore(engine, announce_prompt).submit(prompt_texts(40))
    bus_a, bus_b = FakeBus(delay=0.002), FakeBus(delay=0.002)
    relay_a = OutboxRelay(engine, bus_a, batch_size=5)
    relay_b = OutboxRelay(engine, bus_b, batch_size=5)

    async def drain(relay):
        while await relay.drain_once():
            pass

    async def main():
        await asyncio.gather(drain(relay_a), drain(relay_b))

    asyncio.run(main())
    keys = [k for *_, k in bus_a.calls + bus_b.calls]
    assert len(keys) == 40 and len(set(keys)) == 40
    assert bus_a.calls and bus_b.calls  # both took part
    assert all(r.published_at is not None for r in rows(engine))


# Row locking is PostgreSQL's; on SQLite one process owns the database file.
test_two_relays_never_publish_a_row_twice.backends = ("postgresql",)
