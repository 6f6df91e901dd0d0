"""Shared pieces of the services tests: a tiny policy in a fresh registry, ports, stubs, metrics."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
from rlhf.registry import ModelRegistry

WORDS = ("the movie was good great fun and the best love of a film story bad dull but it is "
         "wonderful acting plot really not so much time very").split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
PROMPTS = [f"review {i}: the film was" for i in range(24)]


def tiny_policy_registry(root: Path, seed: int = 0) -> ModelRegistry:
    """A registry holding one tiny random policy (no reward model yet)."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=seed)
    reg = ModelRegistry(root)
    reg.publish("policy", lambda d: save_pretrained(model, tok, d), config={"add_bos": True}, base_model="tiny")
    return reg


@contextmanager
def one_thread():
    """One intra-op thread everywhere (the services' model threads, the trainer's job processes,
    this test's thread), for PPO runs whose figures are compared: a reduction split differently
    rounds differently, and PPO's whitening of nearly equal rewards makes that visible."""
    import torch

    from rlhf.runtime.threads import ENV

    saved = os.environ.get(ENV)
    os.environ[ENV] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_serving(target: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become SERVING within {timeout} s")
            time.sleep(0.2)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None


def fresh_database(server_url: str, prefix: str = "rlhf_it") -> str:
    """A new, migrated PostgreSQL database on the server of ``server_url``; returns its URL."""
    from sqlalchemy import create_engine, text

    from rlhf.storage.db import make_engine, migrate

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = server_url.rsplit("/", 1)[0] + "/" + name
    eng = make_engine(url)
    migrate(eng)
    eng.dispose()
    return url


def up_on_free_ports(data_dir: Path, metrics: bool = False, http: bool = False, attempts: int = 5,
                     labeling_port: int = -1):
    """`rlhf up` in a thread on five consecutive free gRPC ports (ten with metrics) in a range the OS
    rarely hands out; another base is tried when a port was taken meanwhile. ``labeling_port``: the
    labeling page's (-1: none).
    Returns (close, addrs by service name, metrics base port or None, http port or None)."""
    from services.launch import PORT_OFFSET, UpOptions, up_in_thread

    for attempt in range(attempts):
        base = free_ports(1)[0] % 20000 + 30000
        http_port = free_ports(1)[0] if http else -1
        try:
            close = up_in_thread(UpOptions(data_dir=data_dir, base_port=base,
                                           base_metrics_port=base + 10 if metrics else 0, http_port=http_port,
                                           labeling_port=labeling_port))
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            if "bind" not in str(e) or attempt == attempts - 1:
                raise
            continue
        addrs = {n: f"127.0.0.1:{base + off}" for n, off in PORT_OFFSET.items()}
        for a in addrs.values():
            wait_serving(a)
        return close, addrs, (base + 10 if metrics else None), (http_port if http else None)
    raise AssertionError("unreachable")


def serve_in_thread(name: str, settings, timeout: float = 120.0):
    """One service (``rlhf serve NAME`` with these settings) on an event loop in a thread.
    Returns (its gRPC address, close()); close() stops it and re-raises what made it fail."""
    from rlhf.metrics import ServiceMetrics
    from rlhf.runtime.server import serve
    from services.launch import module_of, run_in_thread

    port: list[int] = []

    def main(stop, ready):
        metrics = ServiceMetrics(name)
        return serve(module_of(name).build(settings, metrics), settings, metrics,
                     ready=lambda g, m: (port.append(g), ready()), stop_event=stop)

    close = run_in_thread(main, name, timeout)
    return f"127.0.0.1:{port[0]}", close


def wait_for(what: str, predicate, timeout: float = 120.0, interval: float = 0.3):
    """``predicate()``'s first true value, asked every ``interval`` seconds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


def submit_demonstrations(target: str, demos: list[tuple[str, str]]) -> None:
    """Store (prompt, response) demonstrations in the feedback-store, in this order."""
    from rlhf_client import common_pb2, feedback_grpc, feedback_pb2

    with grpc.insecure_channel(target) as ch:
        fb = feedback_grpc.FeedbackServiceStub(ch)
        for i, (p, r) in enumerate(demos):
            fb.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                idempotency_key=f"d{i}", prompt=p, prompt_id=str(i), split=common_pb2.SPLIT_TRAIN,
                labeler_id="writer", response=r), timeout=30)
