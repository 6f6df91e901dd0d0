"""Start services: one per process (`rlhf serve NAME`) or all five in one process (`rlhf up`).

Both go through the one bootstrap, :func:`rlhf.runtime.server.serve`. Settings come from
``RLHF_<SERVICE>_*`` environment variables (``rlhf serve``) or from ``rlhf up``'s options.
In one process without ``--kafka``, an in-process event bus stands in for Kafka.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from rlhf.errors import ConfigError
from rlhf.metrics import ServiceMetrics
from rlhf.runtime.bus import make_bus
from rlhf.runtime.logs import configure_logging
from rlhf.runtime.auth import SERVICE, Principal, shared_secret_resolver
from rlhf.runtime.server import LOOPBACK, authenticator_for, serve
from rlhf.runtime.settings import load_settings
from services import SERVICES

log = logging.getLogger("rlhf.launch")
ORDER = ["prompt-collector", "feedback-store", "policy-server", "reward-scorer", "trainer"]


def module_of(name: str):
    if name not in SERVICES:
        raise ConfigError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
    return importlib.import_module(SERVICES[name])


def serve_one(name: str, environ=os.environ) -> None:
    """`rlhf serve NAME`: settings from the environment, then serve until SIGTERM."""
    mod = module_of(name)
    settings = load_settings(mod.Settings, name, environ)
    configure_logging(name, settings.log_level)
    metrics = ServiceMetrics(name)
    asyncio.run(serve(mod.build(settings, metrics), settings, metrics))


class _SharedBus:
    """One bus for services in one process: they may not start or close it themselves."""

    def __init__(self, bus):
        self._bus = bus

    async def start(self):
        return None

    async def close(self):
        return None

    def __getattr__(self, item):
        return getattr(self._bus, item)


@dataclasses.dataclass
class UpOptions:
    data_dir: Path  # registry and SQLite database live here
    host: str = "127.0.0.1"
    base_port: int = 50051  # prompt-collector, policy-server, reward-scorer, feedback-store, trainer: +0..+4
    base_metrics_port: int = 9101
    http_port: int = 0  # the policy-server's HTTP API; 0: a free port (logged), -1: none
    labeling_port: int = 0  # the feedback-store's labeling page; 0: a free port (logged), -1: none
    kafka: str | None = None
    database_url: str | None = None
    log_level: str = "INFO"
    announce: bool = False  # print the HTTP addresses (labeling page, inference API) to stderr once up


PORT_OFFSET = {"prompt-collector": 0, "policy-server": 1, "reward-scorer": 2, "feedback-store": 3, "trainer": 4}


def _internal_token_file(data_dir: Path) -> Path:
    return (data_dir / "secrets" / "services.token").resolve()


def internal_token(data_dir: Path) -> str:
    """The token the services of one `rlhf up` present to each other (a new one per start, in a
    file only this user can read): with credentials configured, they are each other's
    ``service`` callers without an entry in the credentials file."""
    f = _internal_token_file(data_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.parent.chmod(0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def up_settings(opts: UpOptions, environ=os.environ) -> dict:
    """Each service's settings for `rlhf up`: its wiring (ports, addresses, registry, database,
    broker) from up's options, everything else from ``RLHF_<SERVICE>_*`` variables as with
    ``rlhf serve`` (API keys, limits, ...); a variable for a wired field is an error."""
    db = opts.database_url or f"sqlite:///{(opts.data_dir / 'rlhf.db').resolve()}"
    registry = str((opts.data_dir / "registry").resolve())
    # the services call each other with a token of their own (written by up(); see internal_token)
    token_file = str(_internal_token_file(opts.data_dir))
    addr = {n: f"{opts.host}:{opts.base_port + o}" for n, o in PORT_OFFSET.items()}
    extra = {
        "prompt-collector": {"database_url": db, "migrate_on_start": False},
        "feedback-store": {"database_url": db, "migrate_on_start": False, "http_port": opts.labeling_port},
        # prompts of requests that opt in (user and consent) go on to the prompt-collector
        "policy-server": {"registry_dir": registry, "prompt_collector_addr": addr["prompt-collector"],
                          "http_port": opts.http_port},
        "reward-scorer": {"registry_dir": registry},
        "trainer": {"registry_dir": registry, "database_url": db, "migrate_on_start": False,
                    "prompt_collector_addr": addr["prompt-collector"],
                    "policy_server_addr": addr["policy-server"], "reward_scorer_addr": addr["reward-scorer"],
                    "feedback_store_addr": addr["feedback-store"]},
    }
    out, problems = {}, []
    for name in ORDER:
        wired = {"host": opts.host, "port": opts.base_port + PORT_OFFSET[name],
                 "metrics_port": opts.base_metrics_port + PORT_OFFSET[name] if opts.base_metrics_port > 0 else -1,
                 "kafka_bootstrap": opts.kafka, "peer_token_file": token_file, **extra[name]}
        # on loopback a developer's machine is trusted unless credentials are configured; on any
        # other address `rlhf up` needs them, like `rlhf serve`
        defaults = {"log_level": opts.log_level, "allow_anonymous": opts.host in LOOPBACK}
        try:
            out[name] = load_settings(module_of(name).Settings, name, environ, base={**wired, **defaults},
                                      fixed=frozenset(wired))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))  # every service's problems at once
    return out


async def up(opts: UpOptions, stop_event: asyncio.Event | None = None, ready=None) -> None:
    """Every service in this process until SIGTERM/SIGINT (or ``stop_event``)."""
    from rlhf.storage.db import make_engine, migrate

    opts.data_dir.mkdir(parents=True, exist_ok=True)
    token = internal_token(opts.data_dir)
    settings = up_settings(opts)
    engine = make_engine(settings["feedback-store"].database_url)
    await asyncio.to_thread(migrate, engine)  # once, before the three services that share the database
    engine.dispose()
    metrics = {name: ServiceMetrics(name) for name in ORDER}
    # the one in-process bus of all five reports its lag and throughput on the trainer's /metrics
    shared = make_bus(opts.kafka, metrics["trainer"]) if opts.kafka is None else None
    if shared is not None:
        await shared.start()
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    tasks, ports, built = [], {}, {}
    for name in ORDER:
        s = settings[name]
        svc = built[name] = module_of(name).build(s, metrics[name], _SharedBus(shared) if shared is not None else None)
        svc.auth = authenticator_for(svc, s)
        if svc.auth.enabled:  # the other services of this `rlhf up` call with the internal token
            svc.auth.add_resolver(shared_secret_resolver(token, Principal("rlhf-up", frozenset({SERVICE}))))
        started = asyncio.Event()

        def on_ready(g, m, name=name, started=started):
            ports[name] = (g, m)
            started.set()

        tasks.append(asyncio.create_task(serve(svc, s, metrics[name], ready=on_ready, stop_event=stop), name=name))
        await asyncio.wait([asyncio.create_task(started.wait()), tasks[-1]], return_when=asyncio.FIRST_COMPLETED)
        if tasks[-1].done():
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks[-1].result()  # re-raise why it failed
    if ready is not None:
        ready(ports)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    urls = {what: f"http://{host}:{port}/" for what, port in (
        ("labeling page", getattr(built["feedback-store"], "http_port", None)),
        ("inference API", getattr(built["policy-server"], "http_port", None))) if port}
    log.info("all services up", extra={"fields": {**{n: {"grpc": g, "metrics": m} for n, (g, m) in ports.items()},
                                                  **urls}})
    if opts.announce:
        for what, url in urls.items():
            print(f"{what}: {url}", file=sys.stderr, flush=True)
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if shared is not None:
            await shared.close()


def up_in_thread(opts: UpOptions, timeout: float = 180.0):
    """Start :func:`up` on its own event loop in a thread; returns ``close()``, which stops the
    services and re-raises whatever made them fail. Raises at once if they do not start."""
    return run_in_thread(lambda stop, ready: up(opts, stop_event=stop, ready=lambda ports: ready()), "the services",
                         timeout)


def run_in_thread(main, what: str, timeout: float = 180.0):
    """``main(stop_event, ready)`` (a coroutine that calls ``ready()`` once it serves and returns
    once ``stop_event`` is set) on an event loop of its own in a thread. Returns ``close()``, which
    sets the event, waits, and re-raises what made it fail; raises at once if it does not start."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main(stop, ready.set))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)
            ready.set()

    t = threading.Thread(target=run, name="services", daemon=True)
    t.start()
    if not ready.wait(timeout):
        raise TimeoutError(f"{what} did not start within {timeout:.0f} s")
    if failure:
        raise failure[0]

    def close() -> None:
        loop.call_soon_threadsafe(stop.set)
        t.join(120)
        if failure:
            raise failure[0]

    return close
