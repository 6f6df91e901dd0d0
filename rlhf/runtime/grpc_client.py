"""How services call each other: the SDK's channels (:mod:`rlhf_client.channel`: message limits,
the retry policy of UNAVAILABLE and RESOURCE_EXHAUSTED answers, credentials), a service's own
credentials from its settings, and a wait for a server's health to say SERVING.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rlhf_client.channel import Credentials

def peer_credentials(settings) -> Credentials:
    """What a service presents to the others: its ``peer_*`` settings (files: mounted secrets)."""
    from rlhf.runtime.auth import read_secret

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return Credentials(token=read_secret(settings.peer_token_file) if settings.peer_token_file else "",
                       ca=read(settings.peer_tls_ca_file), cert=read(settings.peer_tls_cert_file),
                       key=read(settings.peer_tls_key_file))


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
