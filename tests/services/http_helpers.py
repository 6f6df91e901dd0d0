"""A service with an HTTP side (the policy-server, the feedback-store) running in a background
thread of the test process."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from rlhf.metrics import ServiceMetrics
from rlhf.runtime.bus import make_bus
from rlhf.runtime.server import serve
from services.policy_server.service import PolicyServer, Settings


@dataclass
class RunningServer:
    service: object
    settings: object
    metrics: ServiceMetrics
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread
    grpc_port: int = 0
    metrics_port: int = 0
    failure: list = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def call(self, coro, timeout: float = 60):
        """Run ``coro`` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 60) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)
        assert not self.failure, self.failure


def start_server(**settings) -> RunningServer:
    """Start a policy-server with ``Settings(**settings)`` (metrics on a free port, HTTP too). The
    tests announce new versions on the server's bus; looking at the registry is off unless asked
    for, so that servers sharing a registry do not each load every version a test publishes."""
    s = Settings(**{"port": 0, "metrics_port": 0, "http_port": 0, "grace_seconds": 5.0, "allow_anonymous": True,
                    "registry_poll_seconds": 0.0, **settings})
    return start_in_thread(PolicyServer, s, ServiceMetrics("policy-server"))


def start_in_thread(cls, s, metrics: ServiceMetrics, on_bus=None) -> RunningServer:
    """Serve ``cls(s, metrics, bus)`` through the bootstrap on an event loop of its own thread, with
    an in-process bus (``on_bus(bus)`` may subscribe to it before the service starts)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        bus = make_bus(None, metrics)
        if on_bus is not None:
            on_bus(bus)
        svc = cls(s, metrics, bus)
        holder.update(service=svc, stop=stop, bus=bus)

        def on_ready(g, m):
            holder.update(grpc=g, metrics=m)
            ready.set()

        try:
            loop.run_until_complete(serve(svc, s, metrics, ready=on_ready, stop_event=stop))
        except BaseException as e:  # surfaced by the caller
            holder.setdefault("failure", []).append(e)
            ready.set()
        finally:
            loop.close()

    t = threading.Thread(target=run, daemon=True, name=f"{cls.name}-under-test")
    t.start()
    assert ready.wait(120), f"{cls.name} did not start"
    if holder.get("failure"):
        raise holder["failure"][0]
    return RunningServer(holder["service"], s, metrics, loop, holder["stop"], t, holder["grpc"], holder["metrics"],
                         holder.setdefault("failure", []))
