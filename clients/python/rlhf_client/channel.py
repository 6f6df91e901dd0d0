"""Channels to the platform's services: message limits, a retry policy and the caller's credentials.

The services use these channels to call each other, and the typed clients
(:mod:`rlhf_client.client`) use them for everyone else, so every caller gets the same behaviour:

* calls answered UNAVAILABLE (a server restarting or not ready) or RESOURCE_EXHAUSTED (a
  server's admission control shedding load) are retried by gRPC itself, up to 5 attempts in all
  with exponential backoff and jitter; retry throttling stops retrying while most calls to a
  server fail, so that retries do not pile onto an overloaded server;
* :class:`Credentials`: a bearer token sent on every call (``authorization: Bearer <token>``), and
  for servers that serve TLS the CA to trust, with a client certificate for mutual TLS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what the servers accept and send, too

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


@dataclass(frozen=True)
class Credentials:
    """What a caller presents: a bearer token, and for TLS the CA (PEM bytes) that signed the
    server's certificate (plus a client certificate and key for mutual TLS)."""

    token: str = ""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def tls(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def _with_metadata(details, extra: list[tuple[str, str]]):
    return details._replace(metadata=list(details.metadata or ()) + extra)


class _BearerAio(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                 grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_metadata(details, self.extra), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_metadata(details, self.extra), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self.extra), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self.extra), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression, self.metadata = d.wait_for_ready, d.compression, metadata


class _BearerSync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    def _d(self, d):
        return _Details(d, list(d.metadata or ()) + self.extra)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._d(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._d(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._d(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._d(details), request_iterator)


def _options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    extra = dict(options)
    return [(k, v) for k, v in CHANNEL_OPTIONS if k not in extra] + list(extra.items())


def channel(target: str, options: Sequence[tuple[str, Any]] = (), creds: Credentials | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (``host:port``) with the platform's options (``options``
    are added and override ones of the same name) and ``creds`` (none: plaintext, anonymous)."""
    creds = creds or Credentials()
    interceptors = [_BearerAio(creds.metadata())] if creds.token else None
    tls = creds.tls()
    if tls is not None:
        return grpc.aio.secure_channel(target, tls, options=_options(options), interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=_options(options), interceptors=interceptors)


def blocking_channel(target: str, options: Sequence[tuple[str, Any]] = (),
                     creds: Credentials | None = None) -> grpc.Channel:
    """The same as :func:`channel` for blocking stubs."""
    creds = creds or Credentials()
    tls = creds.tls()
    ch = grpc.secure_channel(target, tls, options=_options(options)) if tls is not None else \
        grpc.insecure_channel(target, options=_options(options))
    return grpc.intercept_channel(ch, _BearerSync(creds.metadata())) if creds.token else ch
