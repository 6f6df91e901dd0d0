"""HTTP beside gRPC in one service process: uvicorn inside the service's own event loop.

:class:`EmbeddedHttpServer` runs an ASGI app with ``uvicorn.Server.serve()`` as a task of the
running loop, on a socket it binds itself (so the port is known before the first request, and
port 0 picks a free one). The bootstrap (:func:`rlhf.runtime.server.serve`) owns SIGTERM/SIGINT,
so uvicorn's own signal handlers are not installed; the service stops the server in its
``stop()``.

Two helpers for generation endpoints, where a caller that goes away must stop costing compute:
:class:`EventStreamResponse` (server-sent events that cancel their producer when the client
disconnects) and :func:`until_disconnected` (a non-streaming handler's work, cancelled the same
way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

log = logging.getLogger("rlhf.runtime.http")
T = TypeVar("T")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the service bootstrap owns the signals
        yield


class EmbeddedHttpServer:
    def __init__(self, app, host: str, port: int, graceful_seconds: float = 5.0):
        self.app = app
        self.host = host
        self.requested_port = port
        self.graceful_seconds = graceful_seconds
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind, start serving, and return the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind the HTTP port {self.host}:{self.requested_port}: {e.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        # httptools (uvicorn's C parser, pinned): less Python per streamed chunk than h11
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, http="httptools",
                                ws="none", loop="none", timeout_graceful_shutdown=self.graceful_seconds,
                                timeout_keep_alive=30, backlog=2048)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stop taking connections, let open responses finish (up to ``graceful_seconds``), stop."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except asyncio.CancelledError:
            raise
        except BaseException:  # noqa: BLE001 - shutting down anyway
            log.exception("HTTP server stopped with an error")
        finally:
            if self._sock is not None:
                self._sock.close()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnect.
    Call after the request body was read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnect()
    return task.result()


class EventStreamResponse:
    """``text/event-stream`` from an async iterator of ready-made ``bytes`` chunks.

    The iterator runs as a task beside a watcher of the connection: when the client disconnects
    the task is cancelled (so a generator's ``finally`` cancels its generation at once, even when
    it is waiting for a token), and the iterator is always closed. ``on_close()`` runs last.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None):
        self.chunks = chunks
        self.headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        self.on_close = on_close
        self.status_code = 200
        self.outcome = 200  # how the stream ended, as a status (the producer sets it: an error's, or 499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"text/event-stream; charset=utf-8")]
        raw += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(pump())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ClientDisconnect):
                await task
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                self.on_close()
