"""Channels services use to call each other: the server's message limits and a retry policy.

Calls answered UNAVAILABLE (a server restarting or not ready) or RESOURCE_EXHAUSTED (a server's
admission control shedding load, see :mod:`rlhf.runtime.server`) are retried by gRPC itself, up to
5 attempts in all with exponential backoff and jitter; retry throttling stops retrying while
most calls to a server fail, so that retries do not pile onto an overloaded server.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.runtime.server import MAX_MESSAGE_BYTES

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
SERVICE_CONFIG = {
    "methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],  # [{}]: every method
    # a token bucket per server: retries stop while the tokens are below half
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]


def _options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    extra = dict(options)
    return [(k, v) for k, v in CHANNEL_OPTIONS if k not in extra] + list(extra.items())


def channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to ``target`` (``host:port``) with the platform's options;
    ``options`` are added (and override ones of the same name)."""
    return grpc.aio.insecure_channel(target, options=_options(options))


def blocking_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """The same as :func:`channel` for blocking stubs (the trainer's job threads)."""
    return grpc.insecure_channel(target, options=_options(options))


async def wait_ready(target: str, timeout: float = 30.0, service: str = "") -> None:
    """Wait until the server at ``target`` answers its health check with SERVING (for ``service``;
    "" is the server as a whole). Raises TimeoutError naming the last answer."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{target} not SERVING after {timeout:g} s ({last})")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=min(remaining, 1.0), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
