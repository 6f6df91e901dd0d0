"""Server-sent events for both dialects: the runs' tokens as they come, written in batches.

:func:`event_stream` awaits the first batch of tokens before the response starts (so errors up
to the first token get their HTTP status), then writes one chunk per batch of events, or with
the setting ``stream_interval`` N > 1 one per N tokens of each sample (fewer, larger writes:
less CPU per token, coarser streaming). An error after the start is one error event in the
dialect's shape, and the response's ``outcome`` (what ``rlhf_http_requests_total`` counts) is
that error's status: a stream that failed is not counted as a success.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from rlhf.inference.engine import StreamEvent
from rlhf.runtime.http import EventStreamResponse, until_disconnected
from services.policy_server.api.base import ApiServer, Ctx
from services.policy_server.api import errors
from services.policy_server.api.errors import ApiError, as_api_error


async def merged(runs: list) -> AsyncIterator[list[tuple[int, StreamEvent]]]:
    """The runs' event batches as (run index, event), in arrival order."""
    if len(runs) == 1:
        batches = runs[0].batches()
        try:
            async for b in batches:
                yield [(0, ev) for ev in b]
        finally:
            await batches.aclose()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, run) -> None:
        try:
            async for b in run.batches():
                await q.put((k, b, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((k, None, e))
            return
        await q.put((k, None, None))

    tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(runs)]
    try:
        open_ = len(runs)
        while open_:
            k, b, err = await q.get()
            if err is not None:
                raise err
            if b is None:
                open_ -= 1
                continue
            yield [(k, ev) for ev in b]
    finally:
        for t in tasks:
            t.cancel()
        for r in runs:
            r.cancel()


async def event_stream(api: ApiServer, runs: list, ctx: Ctx, dialect: str,
                       fmt: Callable[[int, StreamEvent], bytes], tail: Callable[[], list[bytes]],
                       error_fmt: Callable[[ApiError], bytes]) -> EventStreamResponse:
    """``fmt(run index, event) -> bytes`` per event, ``tail()`` after the last one."""
    events = merged(runs)
    try:
        first = await until_disconnected(ctx.request, events.__anext__())
    except StopAsyncIteration:
        first = []
    except BaseException:
        await events.aclose()
        raise
    interval = api.s.stream_interval
    resp: EventStreamResponse

    async def body() -> AsyncIterator[bytes]:
        held: list[bytes] = []  # events not yet written
        try:
            chunk = b"".join(fmt(k, ev) for k, ev in first)
            if chunk:
                yield chunk
            samples = {(k, ev.index) for k, ev in first}
            async for b in events:
                held.extend(fmt(k, ev) for k, ev in b)
                if interval > 1:
                    samples.update((k, ev.index) for k, ev in b)
                    if len(held) < interval * len(samples):
                        continue
                chunk = b"".join(held)
                held.clear()
                if chunk:
                    yield chunk
            chunk = b"".join(held)
            held.clear()
            if chunk:
                yield chunk
            for chunk in tail():
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            resp.outcome = 499  # the client went away
            raise
        except Exception as exc:  # noqa: BLE001 - mid-stream: an error event in the API's shape
            e = as_api_error(exc)
            resp.outcome = errors.status(dialect, e)
            api.failed(dialect, ctx.team, e)
            yield b"".join(held) + error_fmt(e)
        finally:
            await events.aclose()
            api.observe(dialect, ctx)

    resp = EventStreamResponse(body(), headers=api.version_headers(runs[0].version))
    return resp
