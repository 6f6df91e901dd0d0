"""confluent-kafka (librdkafka, the bus's client) against kafka-python (pure Python), on one broker,
in one run, doing what the bus does (docs/dependencies.md has the decision and the figures).

For each client and each event size (protobuf ``FeedbackEvent``s, a few hundred bytes to a few KB,
the sizes the platform sends), on a fresh topic:

* ``publish 1 by 1``: acks=all, idempotent producer, linger 5 ms, each publish waits for its
  acknowledgement (a service publishing one event): latency p50/p99 and events/s;
* ``publish batch``: the same producer, a batch handed over and all acknowledgements awaited (the
  outbox relay): events/s;
* ``consume + commit``: a new consumer group reads the topic from the start and commits each
  message's offset synchronously after "handling" it (the bus's at-least-once loop): events/s.

Clients and repetitions alternate (A B A B ...), and every figure is the median of the repetitions,
so that a load change on a shared machine hits both clients alike. CPU seconds per event (all
threads of the process, librdkafka's included) are reported beside the wall-clock rates: they
move less with other load than wall time does.

    nice python bench/kafka_clients.py --bootstrap 127.0.0.1:19092 --out bench/results/kafka-clients.json

Needs ``pip install kafka-python==3.0.12`` (the ``bench`` extra) beside confluent-kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

from rlhf_client import feedback_pb2

TYPE_HEADER = "rlhf-message-type"
EVENT_TYPE = feedback_pb2.FeedbackEvent.DESCRIPTOR.full_name


def event_of_size(target: int) -> bytes:
    """A serialized FeedbackEvent of about ``target`` bytes: a prompt and four candidates."""
    filler = "the movie was good and the acting was fun "
    per = max(8, (target - 120) // 5)
    text = (filler * (per // len(filler) + 1))[:per]
    ev = feedback_pb2.FeedbackEvent(event_id=uuid.uuid4().hex, comparison=feedback_pb2.Comparison(
        submission_id=uuid.uuid4().hex, task_id=uuid.uuid4().hex, prompt=text, candidates=[text] * 4,
        labeler_id="bench", ranking=[feedback_pb2.RankGroup(indices=[i]) for i in range(4)]))
    return ev.SerializeToString()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# -- confluent-kafka ----------------------------------------------------------------------------------

class Confluent:
    name = "confluent-kafka"

    def __init__(self, bootstrap: str):
        import confluent_kafka

        self.version = f"{confluent_kafka.__version__} (librdkafka {confluent_kafka.libversion()[0]})"
        self.bootstrap = bootstrap

    def producer(self):
        from confluent_kafka import Producer

        return Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5})

    def publish_one_by_one(self, topic: str, value: bytes, n: int) -> tuple[Timer, list[float]]:
        p = self.producer()
        p.produce(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())])
        p.flush(30)  # connected, producer id assigned
        lat = []
        with Timer() as t:
            for _ in range(n):
                t0 = time.perf_counter()
                errs = []
                p.produce(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())],
                          on_delivery=lambda err, _m: errs.append(err))
                while not errs:  # as the bus does: poll for the delivery report (flush() would
                    p.poll(0.05)  # skip linger.ms, which the bus's publishes wait out)
                assert errs == [None], errs
                lat.append(time.perf_counter() - t0)
        return t, lat

    def publish_batch(self, topic: str, value: bytes, n: int) -> Timer:
        p = self.producer()
        p.produce(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())])
        p.flush(30)
        errs = []
        with Timer() as t:
            for _ in range(n):
                while True:
                    try:
                        p.produce(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())],
                                  on_delivery=lambda err, _m: errs.append(err))
                        break
                    except BufferError:
                        p.poll(0.01)
                p.poll(0)
            p.flush(60)
        assert len(errs) == n and not any(errs), errs[:3]
        return t

    def consume_commit(self, topic: str, n: int) -> Timer:
        from confluent_kafka import Consumer

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        got = 0
        first = None
        while first is None:  # joined the group and got the first message
            m = c.poll(1.0)
            if m is not None and m.error() is None:
                first = m
        with Timer() as t:
            m = first
            while True:
                feedback_pb2.FeedbackEvent.FromString(m.value())
                c.commit(message=m, asynchronous=False)
                got += 1
                if got >= n:
                    break
                m = None
                while m is None or m.error() is not None:
                    m = c.poll(1.0)
        c.close()
        return t


# -- kafka-python -------------------------------------------------------------------------------------

class KafkaPython:
    name = "kafka-python"

    def __init__(self, bootstrap: str):
        import kafka

        self.version = kafka.__version__
        self.bootstrap = bootstrap

    def producer(self):
        from kafka import KafkaProducer

        return KafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all", linger_ms=5)

    def publish_one_by_one(self, topic: str, value: bytes, n: int) -> tuple[Timer, list[float]]:
        p = self.producer()
        p.send(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())]).get(timeout=30)
        lat = []
        with Timer() as t:
            for _ in range(n):
                t0 = time.perf_counter()
                p.send(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())]).get(timeout=30)
                lat.append(time.perf_counter() - t0)
        p.close()
        return t, lat

    def publish_batch(self, topic: str, value: bytes, n: int) -> Timer:
        p = self.producer()
        p.send(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())]).get(timeout=30)
        with Timer() as t:
            futures = [p.send(topic, value, headers=[(TYPE_HEADER, EVENT_TYPE.encode())]) for _ in range(n)]
            p.flush(60)
            for f in futures:
                f.get(timeout=60)
        p.close()
        return t

    def consume_commit(self, topic: str, n: int) -> Timer:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        c = KafkaConsumer(topic, bootstrap_servers=self.bootstrap, group_id=f"bench-{uuid.uuid4().hex}",
                          enable_auto_commit=False, auto_offset_reset="earliest")
        batch: list = []
        while not batch:  # joined the group and got the first messages
            batch = [m for ms in c.poll(timeout_ms=1000, max_records=1).values() for m in ms]
        got = 0
        with Timer() as t:
            while True:
                for m in batch:
                    feedback_pb2.FeedbackEvent.FromString(m.value)
                    c.commit({TopicPartition(m.topic, m.partition): OffsetAndMetadata(m.offset + 1, "", -1)})
                    got += 1
                if got >= n:
                    break
                batch = [m for ms in c.poll(timeout_ms=1000, max_records=1).values() for m in ms]
        c.close()
        return t


# -- the run ------------------------------------------------------------------------------------------

def create_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)


def run(args) -> dict:
    clients = [Confluent(args.bootstrap), KafkaPython(args.bootstrap)]
    sizes = [int(s) for s in args.sizes.split(",")]
    raw: dict = {c.name: {s: {"one_by_one": [], "p50": [], "p99": [], "batch": [], "consume": [],
                              "cpu_one": [], "cpu_batch": [], "cpu_consume": []} for s in sizes} for c in clients}
    for rep in range(args.repeats):
        for size in sizes:
            value = event_of_size(size)
            for client in (clients if rep % 2 == 0 else clients[::-1]):
                topic = f"bench.kafka-clients.{uuid.uuid4().hex[:12]}"
                create_topic(args.bootstrap, topic)
                r = raw[client.name][size]
                t, lat = client.publish_one_by_one(topic, value, args.one_by_one)
                r["one_by_one"].append(args.one_by_one / t.wall)
                r["p50"].append(_pct(lat, 0.5) * 1e3)
                r["p99"].append(_pct(lat, 0.99) * 1e3)
                r["cpu_one"].append(t.cpu / args.one_by_one * 1e6)
                t = client.publish_batch(topic, value, args.batch)
                r["batch"].append(args.batch / t.wall)
                r["cpu_batch"].append(t.cpu / args.batch * 1e6)
                t = client.consume_commit(topic, args.consume)
                r["consume"].append(args.consume / t.wall)
                r["cpu_consume"].append(t.cpu / args.consume * 1e6)
                print(f"rep {rep + 1}/{args.repeats} {client.name:15s} {len(value):5d} B: "
                      f"{r['one_by_one'][-1]:7.0f}/s 1-by-1 (p50 {r['p50'][-1]:.2f} ms), "
                      f"{r['batch'][-1]:7.0f}/s batch, {r['consume'][-1]:6.0f}/s consume+commit", flush=True)
    summary = {c.name: {str(s): {k: round(statistics.median(v), 3) for k, v in raw[c.name][s].items()}
                        for s in sizes} for c in clients}
    return {
        "clients": {c.name: c.version for c in clients},
        "event_bytes": {str(s): len(event_of_size(s)) for s in sizes},
        "counts": {"one_by_one": args.one_by_one, "batch": args.batch, "consume": args.consume,
                   "repeats": args.repeats},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "niceness": os.nice(0)},
        "median": summary,
    }


def markdown(result: dict) -> str:
    lines = ["| client | event | publish 1 by 1 (events/s) | p50 / p99 (ms) | CPU µs/event | publish batch (events/s) "
             "| CPU µs/event | consume + commit (events/s) | CPU µs/event |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_size in result["median"].items():
        for size, m in by_size.items():
            lines.append(f"| {name} | {result['event_bytes'][size]} B | {m['one_by_one']:.0f} | {m['p50']:.2f} / "
                         f"{m['p99']:.2f} | {m['cpu_one']:.0f} | {m['batch']:.0f} | {m['cpu_batch']:.0f} | "
                         f"{m['consume']:.0f} | {m['cpu_consume']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("RLHF_TEST_KAFKA_BOOTSTRAP"),
                    help="broker host:port (default: $RLHF_TEST_KAFKA_BOOTSTRAP, which scripts/infra.sh writes)")
    ap.add_argument("--sizes", default="300,1500,6000", help="event sizes in bytes, comma-separated")
    ap.add_argument("--one-by-one", type=int, default=300, help="events published one by one, per repetition")
    ap.add_argument("--batch", type=int, default=3000, help="events published as one batch, per repetition")
    ap.add_argument("--consume", type=int, default=600, help="events consumed and committed, per repetition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here (and a .md table beside it)")
    args = ap.parse_args(argv)
    if not args.bootstrap:
        ap.error("no broker: pass --bootstrap or source .cache/infra/env")
    if args.consume > args.one_by_one + args.batch:
        ap.error("--consume must not exceed --one-by-one + --batch (the events on the topic)")
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
