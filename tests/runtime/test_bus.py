"""rlhf.runtime.bus: the in-process bus, and KafkaBus against a real broker.

The Kafka tests are integration tests: scripts/test.sh starts a broker (scripts/infra.sh) and sets
RLHF_TEST_KAFKA_BOOTSTRAP; without it they are skipped. Each test uses its own topic and group.
Delivery is asynchronous, so the tests wait for it (up to WAIT seconds; usually well under one).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from rlhf_client import feedback_pb2, models_pb2

from rlhf.errors import UnavailableError
from rlhf.metrics import ServiceMetrics
from rlhf.runtime.bus import TYPE_HEADER, InProcessBus, KafkaBus, make_bus

WAIT = 30.0
FEEDBACK_TYPE = feedback_pb2.FeedbackEvent.DESCRIPTOR.full_name
GARBAGE = b"\x0a\xff\xff"  # field 1, length-delimited, truncated length: never parses


def event(event_id: str) -> feedback_pb2.FeedbackEvent:
    return feedback_pb2.FeedbackEvent(event_id=event_id)


class Received:
    """Records what a handler got; ``fail`` makes its first calls raise."""

    def __init__(self, fail: int = 0):
        self.ids: list[str] = []
        self.calls = 0
        self.fail = fail

    async def __call__(self, msg) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError("handler failure for the test")
        assert isinstance(msg, feedback_pb2.FeedbackEvent)
        self.ids.append(msg.event_id)

    async def wait(self, n: int, timeout: float = WAIT) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.ids) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.ids)} of {n} messages within {timeout}s: {self.ids}")
            await asyncio.sleep(0.02)
        return self.ids


def sample(metrics: ServiceMetrics, name: str, topic: str) -> float:
    return metrics.registry.get_sample_value(name, {"topic": topic}) or 0.0


def skipped(metrics: ServiceMetrics, topic: str) -> float:
    return sample(metrics, "rlhf_kafka_messages_skipped_total", topic)


# ============================================================================== in process


def test_make_bus_picks_the_implementation():
    assert isinstance(make_bus(None), InProcessBus)
    assert isinstance(make_bus(""), InProcessBus)
    assert isinstance(make_bus("127.0.0.1:1"), KafkaBus)


def test_in_process_round_trip_in_order():
    metrics = ServiceMetrics("test")

    async def main():
        bus = InProcessBus(metrics)
        got = Received()
        bus.subscribe("t", feedback_pb2.FeedbackEvent, "g", got)
        await bus.start()
        for i in range(5):
            await bus.publish("t", event(f"e{i}"), key=f"k{i}")
        assert await got.wait(5) == [f"e{i}" for i in range(5)]
        await bus.close()
        await bus.close()  # idempotent

    asyncio.run(main())
    assert sample(metrics, "rlhf_kafka_messages_published_total", "t") == 5
    assert sample(metrics, "rlhf_kafka_consumer_lag_messages", "t") == 0
    assert skipped(metrics, "t") == 0


def test_in_process_each_group_gets_every_message_even_if_published_before_it_subscribed():
    async def main():
        bus = InProcessBus()
        await bus.start()
        await bus.publish("t", event("before"))
        a, b, other_topic = Received(), Received(), Received()
        bus.subscribe("t", feedback_pb2.FeedbackEvent, "group-a", a)
        bus.subscribe("t", feedback_pb2.FeedbackEvent, "group-b", b)
        bus.subscribe("u", feedback_pb2.FeedbackEvent, "group-a", other_topic)
        await bus.publish("t", event("after"))
        await bus.join(timeout=WAIT)
        assert a.ids == ["before", "after"]
        assert b.ids == ["before", "after"]
        assert other_topic.ids == []
        await bus.close()
        with pytest.raises(UnavailableError):
            await bus.publish("t", event("closed"))

    asyncio.run(main())


def test_in_process_skips_wrong_type_and_garbage_and_counts_them():
    metrics = ServiceMetrics("test")

    async def main():
        bus = InProcessBus(metrics)
        got = Received()
        bus.subscribe("t", feedback_pb2.FeedbackEvent, "g", got)
        await bus.start()
        await bus.publish("t", models_pb2.ModelVersionPublishedEvent(event_id="m1", version="v1"))
        await bus.publish_raw("t", GARBAGE, FEEDBACK_TYPE)
        await bus.publish("t", event("good"))
        assert await got.wait(1) == ["good"]
        await bus.join(timeout=WAIT)
        await bus.close()

    asyncio.run(main())
    assert skipped(metrics, "t") == 2


def test_in_process_retries_a_failing_handler_then_skips_it():
    metrics = ServiceMetrics("test")

    async def main():
        bus = InProcessBus(metrics)
        bus.retry_backoff_s = 0.001
        flaky = Received(fail=2)  # fails twice, then succeeds: delivered once, not skipped
        broken = Received(fail=1000)  # fails always: 1 + 3 retries, then skipped
        bus.subscribe("flaky", feedback_pb2.FeedbackEvent, "g", flaky)
        bus.subscribe("broken", feedback_pb2.FeedbackEvent, "g", broken)
        await bus.start()
        await bus.publish("flaky", event("f1"))
        await bus.publish("broken", event("b1"))
        await bus.publish("broken", event("b2"))
        await bus.join(timeout=WAIT)
        assert flaky.ids == ["f1"] and flaky.calls == 3
        assert broken.ids == [] and broken.calls == 8  # both messages tried 4 times: the consumer goes on
        await bus.close()

    asyncio.run(main())
    assert skipped(metrics, "flaky") == 0
    assert skipped(metrics, "broken") == 2


# ========================================================================== Kafka (broker)

BOOTSTRAP = os.environ.get("RLHF_TEST_KAFKA_BOOTSTRAP")
needs_kafka = pytest.mark.skipif(not BOOTSTRAP, reason="RLHF_TEST_KAFKA_BOOTSTRAP is unset (scripts/infra.sh start)")


def unique(prefix: str) -> str:
    return f"test.bus.{prefix}.{uuid.uuid4().hex[:12]}"


@pytest.mark.integration
@needs_kafka
def test_kafka_round_trip():
    metrics = ServiceMetrics("test")
    topic, group = unique("roundtrip"), unique("group")

    async def main():
        bus = KafkaBus(BOOTSTRAP, metrics, client_id="test-bus")
        got = Received()
        bus.subscribe(topic, feedback_pb2.FeedbackEvent, group, got)
        await bus.start()
        for i in range(3):
            await bus.publish(topic, event(f"e{i}"), key="same-key")  # acknowledged on return
        assert sample(metrics, "rlhf_kafka_messages_published_total", topic) == 3
        assert await got.wait(3) == ["e0", "e1", "e2"]
        await bus.close()
        await bus.close()

    asyncio.run(main())
    assert sample(metrics, "rlhf_kafka_consumer_lag_messages", topic) == 0
    assert skipped(metrics, topic) == 0


@pytest.mark.integration
@needs_kafka
def test_kafka_skips_wrong_type_missing_header_and_garbage_and_keeps_consuming():
    from confluent_kafka import Producer

    metrics = ServiceMetrics("test")
    topic, group = unique("skip"), unique("group")

    async def main():
        bus = KafkaBus(BOOTSTRAP, metrics)
        got = Received()
        bus.subscribe(topic, feedback_pb2.FeedbackEvent, group, got)
        await bus.start()
        model = models_pb2.ModelVersionPublishedEvent(event_id="m1", version="v1")
        await bus.publish_raw(topic, model.SerializeToString(), model.DESCRIPTOR.full_name)  # other type
        await bus.publish_raw(topic, GARBAGE, FEEDBACK_TYPE)  # right type, bytes do not parse
        plain = Producer({"bootstrap.servers": BOOTSTRAP})  # no rlhf-message-type header at all
        plain.produce(topic, value=event("no-header").SerializeToString())
        assert plain.flush(WAIT) == 0
        await bus.publish(topic, event("good"))
        assert await got.wait(1) == ["good"]
        assert skipped(metrics, topic) == 3  # all three came before the good one
        await bus.close()

    asyncio.run(main())


@pytest.mark.integration
@needs_kafka
def test_kafka_delivers_a_message_published_twice_twice():
    """At least once: the bus does not deduplicate; handlers must be idempotent on event_id."""
    topic, group = unique("twice"), unique("group")

    async def main():
        bus = KafkaBus(BOOTSTRAP)
        got = Received()
        bus.subscribe(topic, feedback_pb2.FeedbackEvent, group, got)
        await bus.start()
        same = event("dup-1")
        await bus.publish(topic, same)
        await bus.publish(topic, same)
        assert await got.wait(2) == ["dup-1", "dup-1"]
        await bus.close()

    asyncio.run(main())


@pytest.mark.integration
@needs_kafka
def test_kafka_resumes_from_the_committed_offset_after_restart():
    topic, group = unique("resume"), unique("group")

    async def main():
        first = KafkaBus(BOOTSTRAP)
        got1 = Received()
        first.subscribe(topic, feedback_pb2.FeedbackEvent, group, got1)
        await first.start()
        await first.publish(topic, event("a1"))
        await first.publish(topic, event("a2"))
        assert await got1.wait(2) == ["a1", "a2"]
        await first.close()

        publisher = KafkaBus(BOOTSTRAP)  # publishes while no consumer of the group runs
        await publisher.start()
        await publisher.publish(topic, event("a3"))
        await publisher.close()

        second = KafkaBus(BOOTSTRAP)
        got2 = Received()
        await second.start()
        second.subscribe(topic, feedback_pb2.FeedbackEvent, group, got2)  # after start() works too
        assert await got2.wait(1) == ["a3"]
        await asyncio.sleep(1.0)  # anything re-delivered would arrive right behind a3
        assert got2.ids == ["a3"]
        await second.close()

    asyncio.run(main())


@pytest.mark.integration
@needs_kafka
def test_kafka_publish_sets_the_type_header_and_creates_the_topic():
    from confluent_kafka import Consumer

    topic = unique("header")

    async def main():
        bus = KafkaBus(BOOTSTRAP)
        await bus.start()
        await bus.publish(topic, event("h1"), key="k")
        await bus.close()

    asyncio.run(main())
    c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": unique("group"), "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        deadline, m = time.monotonic() + WAIT, None
        while m is None and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                m = None
        assert m is not None, "nothing consumed"
        assert dict(m.headers()) == {TYPE_HEADER: FEEDBACK_TYPE.encode()}
        assert m.key() == b"k"
        assert feedback_pb2.FeedbackEvent.FromString(m.value()).event_id == "h1"
    finally:
        c.close()
