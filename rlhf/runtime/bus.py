"""The event bus every service uses: protobuf messages on topics, one message type per topic.

Two implementations of one interface, :class:`EventBus`:

* :class:`KafkaBus` — Kafka through confluent-kafka (librdkafka). Publishing waits for the broker's
  acknowledgement (idempotent producer, ``acks=all``). Consuming is **at least once**: a message's
  offset is committed only after its handler returned, so a crash between the two, a rebalance, or
  a producer that sent the same event twice delivers it again. Handlers must be idempotent (key
  their writes on the event's id); the bus does not deduplicate.
* :class:`InProcessBus` — the same semantics inside one process (``rlhf up`` without a broker):
  every subscriber group gets every message of its topic once, in order, including messages
  published before it subscribed (each topic keeps its log in memory).

Every message carries the header ``rlhf-message-type`` = the message's full protobuf name. A
consumer skips — counts in ``rlhf_kafka_messages_skipped_total{topic}``, logs a warning without
the payload, commits, and goes on — any message whose header is missing or names another type,
or whose bytes do not parse. A handler that raises is retried :attr:`EventBus.handler_retries`
times, then its message is skipped the same way. Nothing a message contains stops a consumer.

Message bodies are never logged (they hold prompts and responses): only topics, offsets, types.

Security: :func:`kafka_client_config` turns a service's ``kafka_*`` settings into librdkafka's
(``security.protocol``, SASL/SCRAM login, the CA of TLS), and every client of a :class:`KafkaBus`
(producer, consumers, admin) uses them. A refused login or TLS handshake ends :meth:`KafkaBus.start`
with a :class:`~rlhf.errors.ConfigError` that says so, instead of a timeout.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

from google.protobuf.message import Message

from rlhf.errors import ConfigError, UnavailableError
from rlhf.metrics import ServiceMetrics

log = logging.getLogger("rlhf.bus")

TYPE_HEADER = "rlhf-message-type"

Handler = Callable[[Message], Awaitable[None]]


@dataclass
class _Subscription:
    topic: str
    message_cls: type[Message]
    group_id: str
    handler: Handler

    @property
    def type_name(self) -> str:
        return self.message_cls.DESCRIPTOR.full_name


class EventBus(abc.ABC):
    """Publish protobuf messages to topics; hand each topic's messages to subscribed handlers."""

    #: how often a failing handler is called again before its message is skipped
    handler_retries: int = 3
    #: seconds before the first retry; doubles with each further retry
    retry_backoff_s: float = 0.2

    def __init__(self, metrics: ServiceMetrics | None = None):
        self.metrics = metrics

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, create the subscribed topics if needed, start consuming."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the consumers and flush the producer. Idempotent."""

    async def publish(self, topic: str, message: Message, key: str | None = None) -> None:
        """Publish ``message``; returns once the broker acknowledged it."""
        await self.publish_raw(topic, message.SerializeToString(), message.DESCRIPTOR.full_name, key)

    @abc.abstractmethod
    async def publish_raw(self, topic: str, value: bytes, message_type: str, key: str | None = None) -> None:
        """Publish pre-serialized bytes of the protobuf message named ``message_type`` (full name)."""

    @abc.abstractmethod
    def subscribe(self, topic: str, message_cls: type[Message], group_id: str, handler: Handler) -> None:
        """Call ``handler`` with every message of ``topic`` (parsed as ``message_cls``) that the
        consumer group ``group_id`` has not handled yet; a new group starts at the earliest message.
        May be called before or after :meth:`start`."""

    # ---------------------------------------------------------------- shared by both buses

    @staticmethod
    def _check_subscription(topic: str, message_cls: type, group_id: str, handler) -> None:
        if not topic or not group_id:
            raise ValueError("topic and group_id must not be empty")
        if not (isinstance(message_cls, type) and issubclass(message_cls, Message)):
            raise TypeError(f"message_cls must be a protobuf message class, got {message_cls!r}")
        if not callable(handler):
            raise TypeError("handler must be an async callable")

    def _skip(self, topic: str, where: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.kafka_messages_skipped_total.labels(topic=topic).inc()
        log.warning("skipped message on %s %s: %s", topic, where, reason)

    def _decode(self, sub: _Subscription, value: bytes | None, type_name: str | None, where: str) -> Message | None:
        """The parsed message, or None after counting and logging why it was skipped."""
        if type_name is None:
            self._skip(sub.topic, where, f"no {TYPE_HEADER} header (expected {sub.type_name})")
            return None
        if type_name != sub.type_name:
            self._skip(sub.topic, where, f"message type {type_name!r}, expected {sub.type_name!r}")
            return None
        if value is None:
            self._skip(sub.topic, where, "no value")
            return None
        msg = sub.message_cls()
        try:
            msg.ParseFromString(value)
        except Exception as e:  # DecodeError, or anything else the parser raises on garbage
            self._skip(sub.topic, where, f"{len(value)} bytes do not parse as {sub.type_name} ({type(e).__name__})")
            return None
        return msg

    async def _handle(self, sub: _Subscription, msg: Message, where: str) -> bool:
        """Run the handler, retrying on failure. True when it returned, False when skipped."""
        delay = self.retry_backoff_s
        for attempt in range(self.handler_retries + 1):
            try:
                await sub.handler(msg)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                last = attempt == self.handler_retries
                log.warning("handler of group %s failed on %s %s (attempt %d of %d): %s: %s",
                            sub.group_id, sub.topic, where, attempt + 1, self.handler_retries + 1,
                            type(e).__name__, e, exc_info=last)
                if last:
                    break
                await asyncio.sleep(delay)
                delay *= 2
        self._skip(sub.topic, where, f"handler of group {sub.group_id} failed {self.handler_retries + 1} times")
        return False


# ================================================================================ in process


@dataclass
class _Group:
    """One consumer group of one topic in the in-process bus: a cursor into the topic's log."""

    topic: str
    group_id: str
    subs: list[_Subscription] = field(default_factory=list)
    position: int = 0
    wake: asyncio.Event | None = None
    task: asyncio.Task | None = None
    idle: asyncio.Event | None = None


class InProcessBus(EventBus):
    """The bus inside one process. Messages are kept (serialized) for the life of the bus.

    A second :meth:`subscribe` with a group that already exists on the topic joins that group:
    the group still sees each message once, handed to its subscribers in turn."""

    def __init__(self, metrics: ServiceMetrics | None = None):
        super().__init__(metrics)
        self._log: dict[str, list[tuple[bytes, str, str | None]]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for g in self._groups.values():
            self._run(g)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [g.task for g in self._groups.values() if g.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def publish_raw(self, topic: str, value: bytes, message_type: str, key: str | None = None) -> None:
        if not self._started or self._closed:
            raise UnavailableError("the event bus is not started" if not self._closed else "the event bus is closed")
        self._log.setdefault(topic, []).append((bytes(value), message_type, key))
        if self.metrics is not None:
            self.metrics.kafka_messages_published_total.labels(topic=topic).inc()
        for g in self._groups.values():
            if g.topic == topic and g.wake is not None:
                g.wake.set()

    def subscribe(self, topic: str, message_cls: type[Message], group_id: str, handler: Handler) -> None:
        self._check_subscription(topic, message_cls, group_id, handler)
        if self._closed:
            raise UnavailableError("the event bus is closed")
        g = self._groups.get((topic, group_id))
        if g is None:
            g = self._groups[(topic, group_id)] = _Group(topic, group_id)
        g.subs.append(_Subscription(topic, message_cls, group_id, handler))
        if self._started and g.task is None:
            self._run(g)

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every group has handled (or skipped) every message published so far."""
        async def all_idle():
            while True:
                pending = [g for g in self._groups.values()
                           if g.task is not None and g.position < len(self._log.get(g.topic, ()))]
                if not pending:
                    return
                for g in pending:
                    g.wake.set()
                await asyncio.sleep(0.01)
        await asyncio.wait_for(all_idle(), timeout)

    def _run(self, g: _Group) -> None:
        g.wake = asyncio.Event()
        g.wake.set()
        g.task = asyncio.get_running_loop().create_task(self._consume(g), name=f"bus:{g.topic}:{g.group_id}")

    async def _consume(self, g: _Group) -> None:
        turn = itertools.count()
        while True:
            await g.wake.wait()
            g.wake.clear()
            entries = self._log.get(g.topic, [])
            while g.position < len(entries):
                value, type_name, _key = entries[g.position]
                sub = g.subs[next(turn) % len(g.subs)]
                where = f"at offset {g.position} (group {g.group_id})"
                msg = self._decode(sub, value, type_name, where)
                if msg is not None:
                    await self._handle(sub, msg, where)
                g.position += 1
                if self.metrics is not None:
                    self.metrics.kafka_consumer_lag_messages.labels(topic=g.topic).set(len(entries) - g.position)


# ===================================================================================== Kafka


class KafkaBus(EventBus):
    """The bus on a Kafka cluster (``bootstrap`` = ``host:port[,host:port...]``).

    librdkafka's blocking calls never run on the event loop: the producer is polled by one
    background thread (delivery callbacks resolve the publishers' futures with
    ``call_soon_threadsafe``), each subscription has its own consumer in its own thread, which
    hands each message to the loop with ``run_coroutine_threadsafe`` and waits for the handler
    before committing the offset. Topics are created (``partitions`` partitions, the broker's
    default replication) when the bus starts, when a subscription starts, and on first publish."""

    poll_timeout_s = 0.5
    close_grace_s = 10.0  # how long close() lets a running handler finish before cancelling it
    metadata_timeout_s = 15.0  # how long a topic look-up waits for the brokers

    def __init__(self, bootstrap: str, metrics: ServiceMetrics | None = None, client_id: str = "rlhf",
                 *, partitions: int = 1, producer_config: dict | None = None, consumer_config: dict | None = None,
                 client_config: dict | None = None):
        super().__init__(metrics)
        if not bootstrap:
            raise ValueError("bootstrap must name at least one broker")
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.partitions = partitions
        # every client's settings: bootstrap, and the security ones (kafka_client_config)
        self._client_config = {**(client_config or {}), "bootstrap.servers": bootstrap}
        self._producer_config = dict(producer_config or {})
        self._consumer_config = dict(consumer_config or {})
        self._login_error: str | None = None  # the broker refused the login or the TLS handshake
        self._subs: list[_Subscription] = []
        self._consumers: list[tuple[threading.Thread, threading.Event]] = []
        self._known_topics: set[str] = set()
        self._topics_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer = None
        self._admin = None
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise UnavailableError("the event bus is closed")
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient

        self._loop = asyncio.get_running_loop()
        self._admin = AdminClient({**self._client_config, "client.id": f"{self.client_id}-admin",
                                   "error_cb": self._on_admin_error})
        self._producer = Producer({
            **self._client_config,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            **self._producer_config,
        })
        self._poller = threading.Thread(target=self._poll_producer, name="rlhf-bus-producer", daemon=True)
        self._poller.start()
        topics = sorted({s.topic for s in self._subs})
        if topics:
            await self.ensure_topics(topics, self.partitions)
        else:  # a publisher only: still log in now, so that refused credentials stop the start
            await asyncio.to_thread(self._list_topics)
        self._started = True
        for s in self._subs:
            self._start_consumer(s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        consumers, self._consumers = self._consumers, []
        for _, stop in consumers:
            stop.set()
        for thread, _ in consumers:
            await asyncio.to_thread(thread.join)
        if self._producer is not None:
            remaining = await asyncio.to_thread(self._producer.flush, 10.0)
            if remaining:
                log.warning("closing with %d message(s) not acknowledged by the broker", remaining)
        self._closing.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)

    # ------------------------------------------------------------------------- topics

    async def ensure_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Create the topics that do not exist yet (``partitions`` partitions each)."""
        names = [n for n in names if n not in self._known_topics]
        if names:
            await asyncio.to_thread(self._ensure_topics_sync, names, partitions)

    def _on_admin_error(self, err) -> None:  # on the thread that polls the admin client
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            self._login_error = err.str()

    def _list_topics(self) -> dict:
        """The cluster's topics. Looks them up second by second, so that a refused login or TLS
        handshake (reported to the admin's error callback) ends the wait at once, with its reason."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + self.metadata_timeout_s
        while True:
            try:
                return self._admin.list_topics(timeout=1.0).topics
            except KafkaException as e:
                self._admin.poll(0)  # serves the error callback
                if self._login_error is not None:
                    protocol = self._client_config.get("security.protocol", "PLAINTEXT")
                    raise ConfigError(f"Kafka at {self.bootstrap} refused the connection ({protocol}): "
                                      f"{self._login_error}; check the kafka_sasl_* and kafka_ssl_ca_file "
                                      "settings") from None
                if time.monotonic() >= deadline:
                    raise UnavailableError(f"Kafka at {self.bootstrap} did not answer within "
                                           f"{self.metadata_timeout_s:g} s: {e.args[0].str()}") from None

    def _ensure_topics_sync(self, names: list[str], partitions: int) -> None:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        with self._topics_lock:
            names = [n for n in names if n not in self._known_topics]
            if not names:
                return
            existing = self._list_topics()
            missing = [n for n in names if n not in existing or existing[n].error is not None]
            if missing:
                futures = self._admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in missing],
                    request_timeout=15)
                for name, fut in futures.items():
                    try:
                        fut.result(30)
                        log.info("created topic %s (%d partition(s))", name, partitions)
                    except KafkaException as e:
                        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                            raise UnavailableError(f"cannot create topic {name}: {e.args[0].str()}") from e
            self._known_topics.update(names)

    # ------------------------------------------------------------------------ publishing

    def _poll_producer(self) -> None:
        while not self._closing.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:  # a callback raising must not end the thread
                log.exception("producer poll failed")

    async def publish_raw(self, topic: str, value: bytes, message_type: str, key: str | None = None) -> None:
        if not self._started or self._closed:
            raise UnavailableError("the event bus is not started" if not self._closed else "the event bus is closed")
        await self.ensure_topics([topic], self.partitions)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def resolve(err) -> None:
            if not done.done():
                if err is None:
                    done.set_result(None)
                else:
                    done.set_exception(UnavailableError(f"publish to {topic} failed: {err.str()}"))

        def on_delivery(err, _msg) -> None:  # on the producer's poll thread
            try:
                loop.call_soon_threadsafe(resolve, err)
            except RuntimeError:  # the publisher's loop is gone
                pass

        while True:
            try:
                self._producer.produce(topic, value=value, key=key.encode() if key is not None else None,
                                       headers=[(TYPE_HEADER, message_type.encode())], on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: wait for acks to drain it
                await asyncio.sleep(0.05)
        await done
        if self.metrics is not None:
            self.metrics.kafka_messages_published_total.labels(topic=topic).inc()

    # ------------------------------------------------------------------------ consuming

    def subscribe(self, topic: str, message_cls: type[Message], group_id: str, handler: Handler) -> None:
        self._check_subscription(topic, message_cls, group_id, handler)
        if self._closed:
            raise UnavailableError("the event bus is closed")
        sub = _Subscription(topic, message_cls, group_id, handler)
        self._subs.append(sub)
        if self._started:
            self._start_consumer(sub)

    def _start_consumer(self, sub: _Subscription) -> None:
        stop = threading.Event()
        t = threading.Thread(target=self._consume, args=(sub, stop), daemon=True,
                             name=f"rlhf-bus-{sub.topic}-{sub.group_id}")
        self._consumers.append((t, stop))
        t.start()

    def _consume(self, sub: _Subscription, stop: threading.Event) -> None:
        from confluent_kafka import Consumer

        consumer = None
        while not stop.is_set():
            try:
                if consumer is None:
                    self._ensure_topics_sync([sub.topic], self.partitions)
                    consumer = Consumer({
                        **self._client_config,
                        "group.id": sub.group_id,
                        "client.id": self.client_id,
                        "enable.auto.commit": False,
                        "auto.offset.reset": "earliest",
                        **self._consumer_config,
                    })
                    consumer.subscribe([sub.topic])
                self._consume_some(consumer, sub, stop)
            except Exception:
                log.exception("consumer of group %s on %s failed; retrying", sub.group_id, sub.topic)
                stop.wait(1.0)
        if consumer is not None:
            try:
                consumer.close()
            except Exception:
                log.exception("closing the consumer of group %s on %s failed", sub.group_id, sub.topic)

    def _consume_some(self, consumer, sub: _Subscription, stop: threading.Event) -> None:
        from confluent_kafka import KafkaError, KafkaException

        last_lag = 0.0
        while not stop.is_set():
            m = consumer.poll(self.poll_timeout_s)
            if m is None:
                if time.monotonic() - last_lag > 1.0:
                    self._update_lag(consumer, sub.topic)
                    last_lag = time.monotonic()
                continue
            if m.error() is not None:
                err = m.error()
                if err.code() in (KafkaError._PARTITION_EOF,):
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer of group %s on %s: %s", sub.group_id, sub.topic, err.str())
                continue
            where = f"[{m.partition()}] at offset {m.offset()} (group {sub.group_id})"
            type_name = None
            for k, v in m.headers() or ():
                if k == TYPE_HEADER:
                    type_name = v.decode("utf-8", "replace") if v is not None else None
            msg = self._decode(sub, m.value(), type_name, where)
            if msg is not None and not self._run_handler(sub, msg, where, stop):
                return  # stopped before the handler finished: not committed, delivered again later
            try:
                consumer.commit(message=m, asynchronous=False)
            except KafkaException as e:  # e.g. a rebalance took the partition: it is delivered again
                log.warning("commit on %s %s failed: %s", sub.topic, where, e.args[0].str())
            self._update_lag(consumer, sub.topic)
            last_lag = time.monotonic()

    def _run_handler(self, sub: _Subscription, msg: Message, where: str, stop: threading.Event) -> bool:
        """Run the handler on the loop and wait for it. False if the bus stopped first."""
        loop = self._loop
        if loop is None or loop.is_closed():
            stop.set()  # the bus's loop is gone (closed without close()): nothing can handle messages
            return False
        fut = asyncio.run_coroutine_threadsafe(self._handle(sub, msg, where), loop)
        stopped_at = None
        while True:
            try:
                fut.result(timeout=0.2)
                return True
            except concurrent.futures.TimeoutError:
                pass
            except concurrent.futures.CancelledError:
                return False
            if loop.is_closed():
                stop.set()
                return False
            if stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > self.close_grace_s:
                    fut.cancel()
                    return False

    def _update_lag(self, consumer, topic: str) -> None:
        if self.metrics is None:
            return
        try:
            assignment = consumer.assignment()
            if not assignment:
                return
            lag = 0
            for tp in consumer.position(assignment):
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high is None or high < 0 or tp.offset < 0:
                    continue
                lag += max(high - tp.offset, 0)
            self.metrics.kafka_consumer_lag_messages.labels(topic=topic).set(lag)
        except Exception:  # lag is informational; never let it stop consumption
            log.debug("could not read the consumer lag of %s", topic, exc_info=True)


def kafka_client_config(settings) -> dict:
    """librdkafka's security settings from a service's ``kafka_*`` settings
    (:class:`rlhf.runtime.settings.BaseServiceSettings`, which validated them). Reads the password
    from ``kafka_sasl_password_file`` now (a rotated Secret takes effect at the next start)."""
    protocol = settings.kafka_security_protocol.upper()
    config = {"security.protocol": protocol}
    if protocol.startswith("SASL_"):
        try:
            password = Path(settings.kafka_sasl_password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"kafka_sasl_password_file: cannot read {settings.kafka_sasl_password_file}: "
                              f"{e.strerror}") from None
        config.update({"sasl.mechanism": settings.kafka_sasl_mechanism.upper(),
                       "sasl.username": settings.kafka_sasl_username, "sasl.password": password})
    if protocol.endswith("SSL") and settings.kafka_ssl_ca_file:
        config["ssl.ca.location"] = settings.kafka_ssl_ca_file
    return config


def make_bus(bootstrap: str | None, metrics: ServiceMetrics | None = None, client_config: dict | None = None) -> EventBus:
    """A :class:`KafkaBus` on ``bootstrap`` when given (its clients with ``client_config``), else an
    :class:`InProcessBus`."""
    return KafkaBus(bootstrap, metrics, client_config=client_config) if bootstrap else InProcessBus(metrics)


def bus_for(settings, metrics: ServiceMetrics | None = None) -> EventBus:
    """The bus a service's settings ask for: Kafka at ``kafka_bootstrap`` with its security settings,
    or the in-process bus without a bootstrap."""
    if not settings.kafka_bootstrap:
        return InProcessBus(metrics)
    return make_bus(settings.kafka_bootstrap, metrics, kafka_client_config(settings))
