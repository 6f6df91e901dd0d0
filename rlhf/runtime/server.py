"""The one bootstrap every service runs on: a grpc.aio server with health, reflection, metrics,
admission control, error mapping and graceful shutdown.

A service module provides an object of the :class:`Service` protocol (its gRPC servicers, the
full names of its gRPC services, ``start``/``stop``) and a settings dataclass derived from
:class:`BaseServiceSettings`; :func:`serve` does the rest::

    settings = load_settings(Settings, "reward-scorer")
    configure_logging("reward-scorer", settings.log_level)
    metrics = ServiceMetrics("reward-scorer")
    asyncio.run(serve(build(settings, metrics), settings, metrics))

Every RPC passes through :class:`ServiceInterceptor` (unary and streaming alike):

* admission control: at most ``max_concurrency`` calls execute at once and at most ``max_queue``
  more wait for a slot; a call beyond that ends at once with RESOURCE_EXHAUSTED
  "server busy: N calls in flight, retry later" (health and reflection calls are not limited);
* exceptions raised by handlers become status codes: DataError, ConflictError and other
  ValueErrors -> INVALID_ARGUMENT, NotFoundError and ModelNotFoundError -> NOT_FOUND,
  PermissionDeniedError -> PERMISSION_DENIED,
  ResourceExhaustedError -> RESOURCE_EXHAUSTED, UnavailableError (where rlhf.errors has it) ->
  UNAVAILABLE, NotImplementedError -> UNIMPLEMENTED, anything else -> INTERNAL "internal error"
  (logged with its traceback; never with the request);
* ``rlhf_grpc_requests_total{service,method,code}`` and ``rlhf_grpc_request_duration_seconds``
  record every call, ``rlhf_grpc_in_flight_requests`` the calls admitted and not finished.

Why a naive grpc.aio server CANCELLED thousands of calls issued at once
-----------------------------------------------------------------------
Reproduced with grpcio 1.85.1: a bare ``grpc.aio.server()`` with a handler sleeping 10 ms, and
5,000 unary calls started at once on one ``grpc.aio`` channel, ended 1,000 to 2,300 of them with
CANCELLED (details "CANCELLED"), depending on the machine's speed. The cause is on the server,
in gRPC core, below Python: the aio server asks core for incoming calls one at a time from its
event loop (``request_call`` in its main loop), so calls that arrived but that the application
has not yet asked for wait in core's *pending-request* list. Core protects that list with a
random-early-drop "backlog protector": beyond ``grpc.server.max_pending_requests`` (default 1000)
arriving calls are dropped with rising probability and beyond
``grpc.server.max_pending_requests_hard_limit`` (default 3000) always; a dropped call is killed
before any handler or interceptor sees it, and the client gets CANCELLED. Setting these two
options high turns all 5,000 into OK. Not the cause: client-side defaults (the client opens all
5,000 streams; the default MAX_CONCURRENT_STREAMS is unlimited), an interceptor (there was
none). A blocked event loop makes it worse (nobody takes calls off the pending list), hence
model work runs in :class:`ModelExecutor`'s thread.

A second trap is ``grpc.max_concurrent_streams``: with core's default
``grpc.http.overload_protection`` on, a server counts streams that are still being deallocated
against the limit and refuses new ones with RST_STREAM(REFUSED_STREAM) although the client
respects the limit, which the client reports as UNAVAILABLE (800 to 2,000 of 5,000 with limits of
500 or 1,000). With the protection off, the client queues calls beyond the limit on its side.

So the server (:data:`SERVER_OPTIONS`) sets both pending-request limits out of reach, bounds
each connection to :data:`MAX_CONCURRENT_STREAMS` streams without the overload protection, and
does its load shedding itself, in the interceptor, where it answers RESOURCE_EXHAUSTED with a
message (which :func:`rlhf.runtime.grpc_client.channel` retries with backoff). The test
``test_5000_calls_at_once_on_one_channel`` holds this: every call ends OK or RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from rlhf_client.channel import MAX_MESSAGE_BYTES

from rlhf import errors
from rlhf.metrics import ServiceMetrics
from rlhf.runtime.auth import (ANYONE, AuthError, Authenticator, check_roles, make_authenticator, reset_caller,
                               set_caller)
from rlhf.runtime.reflection import SERVICE_NAME as REFLECTION_V1
from rlhf.runtime.reflection import enable_reflection
from rlhf.runtime.settings import BaseServiceSettings, load_settings  # noqa: F401  (re-exported)
from rlhf.runtime.threads import use_model_threads

log = logging.getLogger("rlhf.runtime.server")

MAX_CONCURRENT_STREAMS = 1024  # per connection; the client queues calls beyond it
_INT_MAX = 2**31 - 1

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    # count open streams, not streams still being deallocated (which made the server refuse
    # streams the client was entitled to: UNAVAILABLE)
    ("grpc.http.overload_protection", 0),
    # core's drop of calls not yet taken by the application (CANCELLED): see the module docstring
    ("grpc.server.max_pending_requests", _INT_MAX),
    ("grpc.server.max_pending_requests_hard_limit", _INT_MAX),
    # a port already in use is an error, not a second server sharing it
    ("grpc.so_reuseport", 0),
]

READY_CHECK_INTERVAL_S = 1.0  # how often a service's check_ready runs
READY_CHECK_TIMEOUT_S = 5.0  # a check_ready that takes longer has failed

# services whose calls skip admission control (they are cheap and must answer under load)
UNLIMITED_SERVICES = frozenset({grpc_health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1})
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
# services any caller may use without credentials (the orchestrator's health probes send none)
OPEN_SERVICES = frozenset({grpc_health.SERVICE_NAME})


class Malformed:
    """A request whose bytes did not parse: the call is answered INVALID_ARGUMENT (gRPC itself
    would answer UNKNOWN, which clients cannot tell from a server bug)."""

    def __init__(self, message: str, reason: str):
        self.message, self.reason = message, reason


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message.full_name if message is not None else "request message"

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or anything else the parser raises on garbage
            return Malformed(name, type(e).__name__)
    return parse


MAX_STATUS_CHARS = 2000  # a status message travels in HTTP/2 trailers: no 5 MB id echoed back


def _cert_names(context) -> list[str]:
    """The common names of the client's certificate (mutual TLS), if it sent one."""
    try:
        ctx = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no TLS on this call
        return []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in ctx.get("x509_common_name", ())]


class Service(Protocol):
    """What a service module provides to :func:`serve`."""

    name: str  # e.g. "reward-scorer"
    service_names: list[str]  # full gRPC service names, for health and reflection
    # the roles that may call each RPC (method name -> roles of rlhf.runtime.auth); every method of
    # the service must be listed, or serve() refuses to start
    rpc_roles: dict[str, frozenset[str]]

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicers to ``server`` (``add_XServicer_to_server(self, server)``)."""

    async def start(self) -> None:
        """After the server started: load models, start consumers. Health says SERVING after it."""

    async def stop(self) -> None:
        """After in-flight calls drained: close consumers, flush. Also called if start() failed."""

    # Optional: ``auth``, an rlhf.runtime.auth.Authenticator the service built itself (to add token
    # resolvers of its own, or to use for HTTP too); otherwise serve() builds one from the settings.
    # Optional: ``async def drain(self, grace: float) -> None`` runs beside the gRPC server's
    # graceful stop, from its first moment: a service that answers more than gRPC (HTTP, say)
    # refuses new work there too and lets what is in flight finish within ``grace`` seconds.
    #
    # Optional: ``async def check_ready(self) -> None`` raises while the service cannot serve (its
    # database is unreachable, say). Polled every READY_CHECK_INTERVAL_S while serving: health
    # says NOT_SERVING from the first failed check until one passes again.


# -- exceptions -> status codes ------------------------------------------------------------------

def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception is answered with."""
    msg = str(exc) or type(exc).__name__
    if len(msg) > MAX_STATUS_CHARS:
        msg = msg[:MAX_STATUS_CHARS] + f"... ({len(msg)} characters, cut)"
    if isinstance(exc, AuthError):
        return (grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED), msg
    if isinstance(exc, errors.PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, msg
    if isinstance(exc, (errors.NotFoundError, errors.ModelNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, errors.ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    if isinstance(exc, errors.UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, msg
    # only the library's own input errors: a bare ValueError from deep inside is a bug (INTERNAL)
    if isinstance(exc, (errors.DataError, errors.ConflictError, errors.ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, "method not implemented"
    return grpc.StatusCode.INTERNAL, "internal error"


# -- admission control, error mapping, metrics -------------------------------------------------

class Admission:
    """At most ``max_concurrency`` calls execute; at most ``max_queue`` more wait for a slot."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency + max_queue
        self.admitted = 0  # executing + waiting
        self._slots = asyncio.Semaphore(max_concurrency)

    def try_enter(self) -> bool:
        if self.admitted >= self.limit:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    @property
    def slot(self) -> asyncio.Semaphore:
        return self._slots


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authentication and roles, admission control, exception -> status mapping and request
    metrics for every RPC.

    With ``auth``, each call's credentials become an :class:`~rlhf.runtime.auth.Principal`
    (UNAUTHENTICATED without valid ones) that must hold one of the roles ``rpc_roles`` gives the
    method (PERMISSION_DENIED otherwise); the handler reads it with ``rlhf.runtime.auth.caller()``.
    Health checks need no credentials (the orchestrator's probes send none); reflection needs any.
    """

    def __init__(self, metrics: ServiceMetrics, max_concurrency: int = 64, max_queue: int = 256,
                 auth: Authenticator | None = None, rpc_roles: dict[str, frozenset[str]] | None = None):
        self.metrics = metrics
        self.auth = auth if auth is not None else Authenticator(allow_anonymous=True)
        self.rpc_roles = rpc_roles or {}
        self.admission = Admission(max_concurrency, max_queue)
        self._in_flight = metrics.grpc_in_flight.labels(metrics.service)
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        cached = self._cache.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full)
        self._cache[full] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        service, _, method = full.lstrip("/").rpartition("/")
        limited = service not in UNLIMITED_SERVICES
        roles = None if service in OPEN_SERVICES else \
            ANYONE if service in UNLIMITED_SERVICES else self.rpc_roles.get(method, frozenset())
        gate = (method, roles)
        if handler.request_deserializer is not None and not handler.request_streaming:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, gate, limited))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, gate, limited))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, gate, limited))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, gate, limited))
        return handler

    # what each call goes through, before and after the handler
    async def _authenticate(self, context, gate: tuple[str, frozenset[str] | None]):
        """The caller, or abort UNAUTHENTICATED / PERMISSION_DENIED (None: an open service)."""
        method, roles = gate
        if roles is None:
            return None
        try:
            p = self.auth.authenticate(context.invocation_metadata() or (), _cert_names(context))
            check_roles(p, roles, method)
        except AuthError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED if e.denied else grpc.StatusCode.UNAUTHENTICATED,
                                str(e))
        return set_caller(p)

    async def _enter(self, context, limited: bool) -> bool:
        if not limited:
            return False
        if not self.admission.try_enter():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.admission.admitted} calls in flight, retry later")
        self._in_flight.inc()
        return True

    def _leave(self, admitted: bool) -> None:
        if admitted:
            self.admission.leave()
            self._in_flight.dec()

    def _record(self, method: str, code: grpc.StatusCode, start: float) -> None:
        m = self.metrics
        m.grpc_requests_total.labels(m.service, method, code.name).inc()
        m.grpc_request_duration_seconds.labels(m.service, method).observe(time.perf_counter() - start)

    @staticmethod
    def _final_code(context, default: grpc.StatusCode) -> grpc.StatusCode:
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else default

    @staticmethod
    def _cancel_code(context) -> grpc.StatusCode:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    @staticmethod
    def _status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
        code, msg = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", method, exc_info=exc,
                      extra={"fields": {"method": method, "error": type(exc).__name__}})
        return code, msg

    def _wrap_unary(self, behavior: Callable, gate: tuple, limited: bool) -> Callable:
        method = gate[0]

        async def unary(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            admitted = False
            who = None
            try:
                who = await self._authenticate(context, gate)
                if isinstance(request, Malformed):
                    raise errors.DataError(f"malformed request: not a valid {request.message} ({request.reason})")
                admitted = await self._enter(context, limited)
                if admitted:
                    async with self.admission.slot:
                        result = await _call(behavior, request, context)
                else:
                    result = await _call(behavior, request, context)
                code = self._final_code(context, grpc.StatusCode.OK)
                return result
            except grpc.aio.AbortError:
                code = self._final_code(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = self._cancel_code(context)
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                code, msg = self._status(exc, method)
                await context.abort(code, msg)
            finally:
                if who is not None:
                    reset_caller(who)
                self._leave(admitted)
                self._record(method, code, start)

        return unary

    def _wrap_stream(self, behavior: Callable, gate: tuple, limited: bool) -> Callable:
        if inspect.iscoroutinefunction(behavior):
            # a streaming handler that writes with context.write() and returns None: same shape
            return self._wrap_unary(behavior, gate, limited)
        method = gate[0]

        async def stream(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            admitted = False
            who = None
            try:
                who = await self._authenticate(context, gate)
                if isinstance(request, Malformed):
                    raise errors.DataError(f"malformed request: not a valid {request.message} ({request.reason})")
                admitted = await self._enter(context, limited)
                async with (self.admission.slot if admitted else contextlib.nullcontext()):
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async with contextlib.aclosing(result):
                            async for item in result:
                                yield item
                    elif inspect.isawaitable(result):
                        await result
                    elif result is not None:  # a plain generator (runs on the event loop)
                        for item in result:
                            yield item
                code = self._final_code(context, grpc.StatusCode.OK)
            except grpc.aio.AbortError:
                code = self._final_code(context, grpc.StatusCode.UNKNOWN)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = self._cancel_code(context)
                raise
            except Exception as exc:  # noqa: BLE001
                code, msg = self._status(exc, method)
                await context.abort(code, msg)
            finally:
                if who is not None:
                    with contextlib.suppress(ValueError):  # a generator closed in another context
                        reset_caller(who)
                self._leave(admitted)
                self._record(method, code, start)

        return stream


async def _call(behavior: Callable, request, context):
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


# -- model work off the event loop -------------------------------------------------------------

class ModelExecutor:
    """One dedicated worker thread for a service's model (torch) work.

    ``await executor.run(fn, *args)`` runs ``fn`` in that thread, so the event loop keeps taking
    and answering calls while a model runs; calls run one after another, in order. Shut it down
    in the service's ``stop()``.
    """

    def __init__(self, name: str = "model"):
        self.name = name
        # the worker owns the process's intra-op threads (rlhf.runtime.threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model", initializer=use_model_threads)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = False) -> None:
        """Cancel queued work; with ``wait``, block until the running call finished (not from the
        event loop: use :meth:`aclose` there)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    async def aclose(self) -> None:
        """Cancel queued work and wait for the running call, without blocking the event loop."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._pool.shutdown, True)


# -- the bootstrap -------------------------------------------------------------------------------

class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard health service (grpc.health.v1.Health), whose Watch streams end at shutdown.

    Same answers as the reference servicer in ``grpc_health.v1.health.aio`` (Check: the status,
    NOT_FOUND for an unknown service; Watch: the status now and on every change, SERVICE_UNKNOWN
    for an unknown service), except that :meth:`close` also ends the Watch streams (after they
    sent NOT_SERVING) instead of leaving them open until the server cancels them at the end of the
    grace period, which held every shutdown for the full ``grace_seconds`` while any client
    watched.
    """

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.NOT_SERVING}
        self._changed = asyncio.Event()  # replaced by a fresh one at every change
        self._closing = False

    def set(self, service: str, status: int) -> None:
        if self._closing:
            return
        self._status[service] = status
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Everything NOT_SERVING, for good; Watch streams send that and end."""
        for service in self._status:
            self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._closing = True
        self._notify()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> None:
        last = None
        while True:
            changed = self._changed  # taken before reading, so no change is missed
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._closing:
                return
            await changed.wait()


def authenticator_for(service: Service, settings: BaseServiceSettings) -> Authenticator:
    """The service's own authenticator, or one from the settings' credentials."""
    auth = getattr(service, "auth", None)
    return auth if auth is not None else make_authenticator(settings)


def check_rpc_roles(service: Service) -> dict[str, frozenset[str]]:
    """The service's ``rpc_roles``; every method of its gRPC services must have an entry."""
    from google.protobuf import descriptor_pool

    roles = getattr(service, "rpc_roles", None) or {}
    missing = []
    for full in service.service_names:
        desc = descriptor_pool.Default().FindServiceByName(full)
        missing += [f"{full}/{m.name}" for m in desc.methods if m.name not in roles]
    if missing:
        raise errors.ConfigError(f"{service.name}: no roles declared for {', '.join(missing)} (rpc_roles)")
    return roles


def server_tls_credentials(settings: BaseServiceSettings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is configured; mutual TLS (client certificates
    required, signed by ``tls_client_ca_file``) when that is set too."""
    if not settings.tls_cert_file:
        return None
    key, cert = Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes()
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def watch_readiness(service: Service, health: HealthServicer, names: list[str]) -> None:
    """Poll ``service.check_ready()`` (if it has one) and set every health status to SERVING or
    NOT_SERVING by its outcome, logging each change with the reason. Runs until cancelled; a check
    still running (a database that hangs) counts as failed and is not started twice."""
    check = getattr(service, "check_ready", None)
    if check is None:
        return
    ready = True
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None or pending.done():
                pending = asyncio.ensure_future(check())
            done, _ = await asyncio.wait({pending}, timeout=READY_CHECK_TIMEOUT_S)
            if not done:
                problem = f"the readiness check did not finish within {READY_CHECK_TIMEOUT_S:g} s"
            elif pending.cancelled():
                problem = "the readiness check was cancelled"
            else:
                exc = pending.exception()
                problem = None if exc is None else (str(exc) or type(exc).__name__)
            if (problem is None) != ready:
                ready = problem is None
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for n in names:
                    health.set(n, status)
                if ready:
                    log.info("ready again: SERVING")
                else:
                    log.warning("not ready: NOT_SERVING", extra={"fields": {"reason": problem}})
            await asyncio.sleep(READY_CHECK_INTERVAL_S)
    finally:
        if pending is not None:
            pending.cancel()


def build_server(service: Service, settings: BaseServiceSettings, metrics: ServiceMetrics,
                 health: HealthServicer, auth: Authenticator | None = None) -> grpc.aio.Server:
    """The grpc.aio server with the interceptor, the service, health and reflection (not bound)."""
    auth = auth if auth is not None else authenticator_for(service, settings)
    interceptor = ServiceInterceptor(metrics, settings.max_concurrency, settings.max_queue, auth,
                                     check_rpc_roles(service))
    server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS)
    service.register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection([*service.service_names, grpc_health.SERVICE_NAME], server)  # v1 and v1alpha
    return server


async def serve(service: Service, settings: BaseServiceSettings, metrics: ServiceMetrics, *,
                ready: Callable[[int, int], None] | None = None,
                stop_event: asyncio.Event | None = None) -> None:
    """Run ``service`` until SIGTERM/SIGINT or ``stop_event``, then shut down gracefully.

    Order: bind and start the gRPC server (health NOT_SERVING), start the metrics server, await
    ``service.start()``, health SERVING, log "serving" and call ``ready(grpc_port, metrics_port)``
    (``metrics_port`` is -1 without a metrics server). On stop: health NOT_SERVING, no new calls,
    in-flight calls get ``grace_seconds`` to finish (then they are cancelled; a second signal
    cancels them at once) while ``service.drain(grace_seconds)`` runs (if the service has one),
    ``await service.stop()``, the metrics server stops, and this returns.
    """
    loop = asyncio.get_running_loop()
    stop = stop_event if stop_event is not None else asyncio.Event()
    names = ["", *service.service_names]
    NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
    SERVING = health_pb2.HealthCheckResponse.SERVING

    health = HealthServicer()
    for n in names:
        health.set(n, NOT_SERVING)
    auth = authenticator_for(service, settings)
    if not auth.enabled and settings.host not in LOOPBACK:
        log.warning("authentication is off (allow_anonymous) on a non-loopback address: every caller is trusted",
                    extra={"fields": {"host": settings.host}})
    server = build_server(service, settings, metrics, health, auth)
    address = f"{settings.host}:{settings.port}"
    tls = server_tls_credentials(settings)
    port = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot bind the gRPC port {settings.host}:{settings.port}")

    httpd = None
    metrics_port = -1
    signals: dict[int, Any] = {}
    started = start_attempted = False
    force = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("stopping on %s", sig.name, extra={"fields": {"signal": sig.name}})
            stop.set()
        else:
            log.warning("second %s: cancelling in-flight calls now", sig.name)
            force.set()

    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    previous = signal.getsignal(sig)
                    loop.add_signal_handler(sig, on_signal, sig)
                    signals[sig] = previous
        if settings.metrics_port >= 0:
            httpd, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
            metrics_port = httpd.server_port
        await server.start()
        started = True

        start_attempted = True
        start_task = asyncio.ensure_future(service.start())
        stop_task = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if start_task.done():
                start_task.result()  # a failed start raises here
            if not stop.is_set():
                for n in names:
                    health.set(n, SERVING)
                log.info("serving", extra={"fields": {
                    "host": settings.host, "grpc_port": port, "metrics_port": metrics_port,
                    "services": list(service.service_names), "tls": tls is not None,
                    "mutual_tls": bool(settings.tls_client_ca_file),
                    "auth": "credentials" if auth.enabled else "anonymous"}})
                if ready is not None:
                    ready(port, metrics_port)
                readiness = asyncio.ensure_future(watch_readiness(service, health, names))
                try:
                    await stop_task
                finally:
                    readiness.cancel()
        finally:
            stop_task.cancel()
            if not start_task.done():  # stopped while starting (or serve() itself was cancelled)
                start_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start_task
    except Exception:
        log.exception("service %s failed", service.name)
        raise
    finally:
        health.close()
        if started:
            log.info("draining", extra={"fields": {"grace_seconds": settings.grace_seconds}})
            stopping = asyncio.ensure_future(server.stop(settings.grace_seconds))
            drain = getattr(service, "drain", None)
            draining = asyncio.ensure_future(drain(settings.grace_seconds)) if drain and start_attempted else None
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                await server.stop(0)
                await stopping
            if draining is not None:
                await asyncio.wait({draining, forced}, return_when=asyncio.FIRST_COMPLETED)
                draining.cancel()
            forced.cancel()
        else:
            await server.stop(None)
        try:
            if start_attempted:
                await service.stop()
        finally:
            if httpd is not None:
                await asyncio.to_thread(httpd.shutdown)
                httpd.server_close()
            for sig, previous in signals.items():
                loop.remove_signal_handler(sig)
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(sig, previous)
            log.info("stopped")


__all__ = [
    "Admission", "BaseServiceSettings", "HealthServicer", "MAX_MESSAGE_BYTES", "ModelExecutor", "SERVER_OPTIONS", "Service",
    "ServiceInterceptor", "build_server", "load_settings", "serve",
    "status_for",
]
