"""The policy-server's HTTP API: OpenAI- and TGI-compatible, on the same backend as its gRPC API.

Routes (docs/inference-api.md has the fields, errors and a curl example for each):

    POST /v1/completions, POST /v1/chat/completions, GET /v1/models      OpenAI
    POST /generate, POST /generate_stream, POST /, GET /info, GET /health  TGI

This module only translates between the two JSON dialects and the backend
(:mod:`services.policy_server.backends`); batching, sampling and text are in :mod:`rlhf.inference`.
Every generation answer names the policy version that produced it: the ``X-Policy-Version``
header, and OpenAI's ``model`` (``<model_name>@<version>``) and ``system_fingerprint``.

Errors come in each API's own shape: OpenAI ``{"error": {"message", "type", "param", "code"}}``,
TGI ``{"error": "...", "error_type": "..."}``; 400 bad parameters, 401 no valid key, 404 unknown
model or route, 413 prompt (or body) too long, 429 rate limit or full queue (with Retry-After),
503 draining or no model yet, 504 deadline passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import DeadlineExceededError, PromptTooLongError, SampleResult, StreamEvent
from rlhf.inference.text import ChatMessage, render_chat
from rlhf.runtime.apikeys import ApiKeys, AuthError, RateLimitedError
from rlhf.runtime.http import EventStreamResponse, until_disconnected
from rlhf.serving import GenerationRequest

log = logging.getLogger("rlhf.services.policy.http")

OPENAI, TGI = "openai", "tgi"
MAX_STOP = 8  # stop strings per request (as the gRPC API)
MAX_STOP_CHARS = 64
TRUE = {"1", "true", "yes", "on"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
                500: "server_error", 503: "service_unavailable", 504: "timeout"}
_TGI_TYPE = {400: "validation", 401: "authentication", 404: "not_found", 413: "validation", 429: "overloaded",
             500: "generation", 503: "unavailable", 504: "timeout"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error_body(style: str, e: ApiError) -> dict:
    if style == OPENAI:
        return {"error": {"message": e.message, "type": _OPENAI_TYPE.get(e.status, "server_error"),
                          "param": e.param, "code": e.code}}
    return {"error": e.message, "error_type": _TGI_TYPE.get(e.status, "generation")}


def as_api_error(exc: BaseException) -> ApiError:
    """The library's and the backends' errors as HTTP statuses."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AuthError):
        return ApiError(401, str(exc), "invalid_api_key")
    if isinstance(exc, RateLimitedError):
        return ApiError(429, str(exc), "rate_limit_exceeded", retry_after=exc.retry_after)
    if isinstance(exc, PromptTooLongError):
        return ApiError(413, str(exc), "context_length_exceeded", "prompt")
    if isinstance(exc, DataError):
        return ApiError(400, str(exc), "invalid_value")
    if isinstance(exc, ResourceExhaustedError):
        return ApiError(429, str(exc), "queue_full", retry_after=1.0)
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc) or "deadline exceeded", "timeout")
    if isinstance(exc, UnavailableError):
        return ApiError(503, str(exc), "unavailable", retry_after=1.0)
    log.error("unhandled error in the HTTP API", exc_info=exc, extra={"fields": {"error": type(exc).__name__}})
    return ApiError(500, "internal error", "internal_error")


# -- request fields ---------------------------------------------------------------------------------

_MISSING = object()


def _field(body: dict, name: str, kind, default=None, *, check: Callable[[Any], bool] | None = None,
           must: str = "", prefix: str = ""):
    """``body[name]`` checked for type (bool is not a number) and ``check``; absent or null ->
    ``default``."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    label = f"{prefix}{name}"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if ok and isinstance(v, float) and not math.isfinite(v):
        ok = False
    if not ok or (check is not None and not check(v)):
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
        want = must or " or ".join(names.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{label}' must be {want}, got {json.dumps(v)[:60]}", "invalid_value", label)
    return v


def _stop_list(v, param: str) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(400, f"'{param}' must be a string or a list of strings", "invalid_value", param)
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise ApiError(400, f"'{param}' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
                       "invalid_value", param)
    return tuple(s for s in items if s)


def _unsupported(body: dict, name: str, neutral=(None,)) -> None:
    v = body.get(name)
    if v is not None and v != [] and v not in neutral:
        raise ApiError(400, f"'{name}' is not supported by this server", "unsupported_parameter", name)


@dataclass
class _Ctx:
    team: str
    t0: float
    deadline: float
    request: Request


# -- the app ----------------------------------------------------------------------------------------


class HttpApi:
    def __init__(self, backend, settings, metrics, keys: ApiKeys, forwarder=None):
        self.backend = backend
        self.s = settings
        self.metrics = metrics
        self.keys = keys
        self.forwarder = forwarder
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.model_name = settings.model_name
        r = [
            Route("/v1/completions", self._endpoint(self.completions, "/v1/completions", OPENAI), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat, "/v1/chat/completions", OPENAI), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.models, "/v1/models", OPENAI), methods=["GET"]),
            Route("/generate", self._endpoint(self.tgi_generate, "/generate", TGI), methods=["POST"]),
            Route("/generate_stream", self._endpoint(self.tgi_generate_stream, "/generate_stream", TGI), methods=["POST"]),
            Route("/", self._endpoint(self.tgi_compat, "/", TGI), methods=["POST"]),
            Route("/info", self._endpoint(self.tgi_info, "/info", TGI, auth=False, drains=False), methods=["GET"]),
            Route("/health", self._endpoint(self.tgi_health, "/health", TGI, auth=False, drains=False), methods=["GET"]),
        ]
        self.app = Starlette(routes=r, exception_handlers={HTTPException: self._http_exception})

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        style = OPENAI if request.url.path.startswith("/v1/") else TGI
        msg = "no such route" if exc.status_code == 404 else (exc.detail or "error")
        e = ApiError(exc.status_code, f"{msg}: {request.method} {request.url.path}", "not_found")
        self._record("other", exc.status_code)
        return _json(_error_body(style, e), exc.status_code)

    # -- plumbing ---------------------------------------------------------------------------------

    async def drain(self, grace_seconds: float) -> None:
        """New requests get 503 from now on; wait up to ``grace_seconds`` for those in flight."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except asyncio.TimeoutError:
            log.warning("HTTP requests still in flight after the grace period", extra={"fields": {"requests": self.in_flight}})

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _record(self, route: str, status: int) -> None:
        self.metrics.http_requests_total.labels(self.metrics.service, route, str(status)).inc()

    def _version_headers(self, version: str | None) -> dict:
        return {"X-Policy-Version": version} if version else {}

    def _endpoint(self, handler, route: str, style: str, auth: bool = True, drains: bool = True):
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            self._enter()
            streaming = False
            status = 500
            try:
                if drains and self.draining:
                    raise ApiError(503, "the server is shutting down; retry on another replica", "draining",
                                   retry_after=1.0)
                team = self.keys.check(request.headers.get("authorization")) if auth else "anonymous"
                ctx = _Ctx(team, t0, time.monotonic() + self._timeout(request), request)
                resp = await handler(request, ctx)
                status = resp.status_code
                if isinstance(resp, EventStreamResponse):
                    streaming = True
                    inner = resp.on_close

                    def closed() -> None:
                        if inner is not None:
                            inner()
                        self._record(route, 200)
                        self._leave()

                    resp.on_close = closed
                return resp
            except ClientDisconnect:
                status = 499
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every error is answered in the API's shape
                e = as_api_error(exc)
                status = e.status
                headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if e.retry_after else {}
                headers.update(self._version_headers(self.backend.version))
                return _json(_error_body(style, e), e.status, headers)
            finally:
                if not streaming:
                    self._record(route, status)
                    self._leave()

        return endpoint

    def _timeout(self, request: Request) -> float:
        t = self.s.request_timeout_seconds
        h = request.headers.get("x-request-timeout")
        if h:
            try:
                v = float(h)
            except ValueError:
                raise ApiError(400, "X-Request-Timeout must be a number of seconds", "invalid_value") from None
            if v > 0:
                t = min(t, v)
        return t

    async def _body(self, request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > self.s.max_body_bytes:
            raise ApiError(413, f"request body over {self.s.max_body_bytes} bytes", "body_too_large")
        raw = await request.body()
        if len(raw) > self.s.max_body_bytes:
            raise ApiError(413, f"request body over {self.s.max_body_bytes} bytes", "body_too_large")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        return body

    def _check_model(self, name) -> None:
        if name is None or name == "":
            return
        v = self.backend.version
        if not isinstance(name, str) or name not in (self.model_name, v, f"{self.model_name}@{v}"):
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}` "
                                f"(version {v}, also addressable as `{self.model_name}@{v}`)", "model_not_found", "model")

    def _max_new(self, body_value: int | None, prompt: str, default: int) -> int:
        if body_value is not None:
            return body_value
        n = self.backend.count_tokens(prompt)
        total = self.backend.limits()[1]
        if n is not None and total:
            return max(1, min(default, total - n))
        return default

    def _opt_in(self, request: Request, texts: list[str], user, team: str) -> None:
        if self.forwarder is None:
            return
        if (request.headers.get("x-rlhf-consent") or "").strip().lower() not in TRUE:
            return
        user = user or request.headers.get("x-rlhf-user")
        if isinstance(user, str) and user:
            self.forwarder.offer(texts, user, f"api:{team}")

    def _open(self, prompts: list[str], req: GenerationRequest, ctx: _Ctx, truncate: int | None = None) -> list:
        runs = []
        try:
            for i, p in enumerate(prompts):
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                runs.append(self.backend.open(p, req, ctx.deadline, where, truncate))
        except BaseException:
            for r in runs:
                r.cancel()
            raise
        return runs

    def _observe(self, api: str, runs: list, t0: float) -> None:
        firsts = [r.first_token_at for r in runs if r.first_token_at is not None]
        if firsts:
            self.metrics.policy_time_to_first_token_seconds.labels(api).observe(min(firsts) - t0)
        self.metrics.policy_request_duration_seconds.labels(api).observe(time.perf_counter() - t0)

    async def _complete_all(self, runs: list, ctx: _Ctx) -> list[list[SampleResult]]:
        from services.policy_server.backends import complete

        async def all_done():
            return await asyncio.gather(*(complete(r) for r in runs))

        try:
            return await until_disconnected(ctx.request, all_done())
        finally:
            for r in runs:
                r.cancel()

    @staticmethod
    async def _merged(runs: list) -> AsyncIterator[list[tuple[int, StreamEvent]]]:
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

    async def _sse(self, runs: list, ctx: _Ctx, api: str, fmt, tail: Callable[[], list[bytes]],
                   error_fmt) -> EventStreamResponse:
        """Server-sent events: ``fmt(run index, event) -> bytes`` per event; the first batch is
        awaited before the response starts, so errors up to the first token get their status."""
        merged = self._merged(runs)
        try:
            first = await until_disconnected(ctx.request, merged.__anext__())
        except StopAsyncIteration:
            first = []
        except BaseException:
            await merged.aclose()
            raise

        # after the first write, one write per batch of events; with stream_interval N > 1, one per N
        # tokens of each sample (fewer, larger writes: less CPU per token, coarser streaming)
        interval = self.s.stream_interval

        async def body() -> AsyncIterator[bytes]:
            held: list[bytes] = []  # events not yet written
            try:
                chunk = b"".join(fmt(k, ev) for k, ev in first)
                if chunk:
                    yield chunk
                samples = {(k, ev.index) for k, ev in first}
                async for b in merged:
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
                raise
            except Exception as exc:  # noqa: BLE001 - mid-stream: an error event in the API's shape
                yield b"".join(held) + error_fmt(as_api_error(exc))
            finally:
                await merged.aclose()
                self._observe(api, runs, ctx.t0)

        return EventStreamResponse(body(), headers=self._version_headers(runs[0].version))

    # -- OpenAI -------------------------------------------------------------------------------------

    def _openai_request(self, body: dict, chat: bool, prompt_for_default: str) -> tuple[GenerationRequest, int]:
        """The sampling settings of an OpenAI request, and how many top log-probs it wants (-1: no log-probs)."""
        s = self.s
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise ApiError(400, f"'{name}' is not supported by this server (only 0)", "unsupported_parameter", name)
        if body.get("logit_bias"):
            raise ApiError(400, "'logit_bias' is not supported by this server", "unsupported_parameter", "logit_bias")
        n = _field(body, "n", int, 1, check=lambda v: 1 <= v <= s.max_n, must=f"an integer in 1..{s.max_n}")
        best_of = _field(body, "best_of", int, None)
        if best_of is not None and best_of != n:
            raise ApiError(400, "'best_of' other than n is not supported", "unsupported_parameter", "best_of")
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        max_tokens = None
        for name in names:
            max_tokens = _field(body, name, int, max_tokens, check=lambda v: 1 <= v <= s.max_new_tokens_limit,
                                must=f"an integer in 1..{s.max_new_tokens_limit}")
        default = s.max_new_tokens_default if chat else 16  # OpenAI's legacy completions default to 16
        max_new = self._max_new(max_tokens, prompt_for_default, default)
        min_new = _field(body, "min_tokens", int, 0, check=lambda v: 0 <= v <= max_new,
                         must="an integer from 0 to max_tokens")
        temperature = _field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2, must="a number in 0..2")
        top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, must="a number in (0, 1]")
        top_k = _field(body, "top_k", int, 0, check=lambda v: v >= 0 or v == -1, must="an integer >= 0")
        seed = _field(body, "seed", int, None)
        stop = _stop_list(body.get("stop"), "stop")
        if chat:
            want = _field(body, "logprobs", bool, False)
            k = _field(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= 20, must="an integer in 0..20")
            if k and not want:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
            top = k if want else -1
        else:
            lp = _field(body, "logprobs", int, None, check=lambda v: 0 <= v <= 5, must="an integer in 0..5")
            top = -1 if lp is None else lp
        req = GenerationRequest(max_new_tokens=max_new, temperature=float(temperature), top_p=float(top_p),
                                top_k=max(0, top_k), min_new_tokens=min_new, stop=stop,
                                seed=None if seed is None else seed % (2 ** 63), n=n, return_logprobs=top >= 0,
                                top_logprobs=max(0, top))
        return req, top

    def _stream_flags(self, body: dict) -> tuple[bool, bool]:
        stream = _field(body, "stream", bool, False)
        opts = _field(body, "stream_options", dict, {}) or {}
        return stream, bool(stream and opts.get("include_usage"))

    def _base(self, kind: str, version: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": f"{self.model_name}@{version}",
                "system_fingerprint": version}

    def _chunk_head(self, kind: str, rid: str, first_key: bytes) -> Callable[[str], bytes]:
        """``data: {...,"choices":[{<first_key>`` for the stream's common chunks, per version: the
        per-token part is then written on its own (one json.dumps of the text, not of the chunk)."""
        cache: dict[str, bytes] = {}

        def head(version: str) -> bytes:
            h = cache.get(version)
            if h is None:
                h = cache[version] = b"data: " + _dumps(self._base(kind, version, rid))[:-1] + b',"choices":[{' + first_key
            return h

        return head

    @staticmethod
    def _usage(runs, samples_per_run) -> dict:
        p = sum(len(r.prompt_token_ids or []) for r in runs)
        c = sum(len(s.token_ids) for ss in samples_per_run for s in ss)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def _text_tokens(run, ids: list[int]) -> list[int]:
        return [t for t in ids if not run.is_special(t)]

    def _completion_logprobs(self, run, ids, lps, tops, offset: int, k: int) -> dict:
        tokens = [run.token_text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        out = {"tokens": tokens, "token_logprobs": lps[:len(ids)], "text_offset": offsets, "top_logprobs": None}
        if k and tops is not None:
            out["top_logprobs"] = [{run.token_text(i): lp for i, lp in alts} for alts in tops[:len(ids)]]
        return out

    def _chat_logprobs(self, run, ids, lps, tops, k: int) -> dict:
        content = []
        for j, t in enumerate(ids):
            text = run.token_text(t)
            alts = [{"token": run.token_text(i), "logprob": lp, "bytes": list(run.token_text(i).encode())}
                    for i, lp in (tops[j] if (k and tops is not None and j < len(tops)) else [])]
            content.append({"token": text, "logprob": lps[j], "bytes": list(text.encode()), "top_logprobs": alts})
        return {"content": content, "refusal": None}

    @staticmethod
    def _finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    async def completions(self, request: Request, ctx: _Ctx) -> Response:
        body = await self._body(request)
        self._check_model(body.get("model"))
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a non-empty string or list of strings (token ids are not "
                                "supported)", "invalid_value", "prompt")
        if len(prompts) > self.s.max_prompts_per_request:
            raise ApiError(400, f"at most {self.s.max_prompts_per_request} prompts per request", "invalid_value", "prompt")
        for name in ("suffix",):
            _unsupported(body, name)
        echo = _field(body, "echo", bool, False)
        req, k = self._openai_request(body, chat=False, prompt_for_default=prompts[0])
        if echo and req.return_logprobs:
            raise ApiError(400, "'echo' together with 'logprobs' is not supported", "unsupported_parameter", "echo")
        stream, usage_chunk = self._stream_flags(body)
        user = _field(body, "user", str, None)
        runs = self._open(prompts, req, ctx)
        self._opt_in(request, prompts, user, ctx.team)
        rid = f"cmpl-{uuid.uuid4().hex}"
        n = req.n
        if stream:
            offsets = [[len(prompts[p]) if echo else 0] * n for p in range(len(prompts))]
            sent_echo: set[int] = set()
            ended: list[list[SampleResult]] = [[] for _ in runs]
            heads = self._chunk_head("text_completion", rid, b'"text":')

            def fmt(p: int, ev: StreamEvent) -> bytes:
                run = runs[p]
                idx = p * n + ev.index
                text = ev.text
                if echo and idx not in sent_echo:
                    sent_echo.add(idx)
                    text = prompts[p] + text
                lp = None
                if req.return_logprobs and not run.is_special(ev.token_id):
                    lp = self._completion_logprobs(run, [ev.token_id], [ev.logprob], [ev.top or []],
                                                   offsets[p][ev.index], k)
                    offsets[p][ev.index] += len(lp["tokens"][0])
                if ev.sample is not None:
                    ended[p].append(ev.sample)
                if lp is None and ev.finish_reason is None:
                    if not text:
                        return b""
                    return heads(run.version) + _dumps(text) + b',"index":%d,"logprobs":null,"finish_reason":null}]}\n\n' % idx
                chunk = self._base("text_completion", run.version, rid)
                chunk["choices"] = [{"text": text, "index": idx, "logprobs": lp,
                                     "finish_reason": self._finish(ev.finish_reason) if ev.finish_reason else None}]
                return b"data: " + _dumps(chunk) + b"\n\n"

            def tail() -> list[bytes]:
                out = []
                if usage_chunk:
                    c = self._base("text_completion", runs[0].version, rid)
                    c["choices"], c["usage"] = [], self._usage(runs, ended)
                    out.append(b"data: " + _dumps(c) + b"\n\n")
                return out + [b"data: [DONE]\n\n"]

            return await self._sse(runs, ctx, OPENAI, fmt, tail, self._openai_stream_error)
        results = await self._complete_all(runs, ctx)
        self._observe(OPENAI, runs, ctx.t0)
        out = self._base("text_completion", runs[0].version, rid)
        choices = []
        for p, (run, samples) in enumerate(zip(runs, results)):
            for s in samples:
                lp = None
                if req.return_logprobs:
                    ids = self._text_tokens(run, s.token_ids)
                    lp = self._completion_logprobs(run, ids, s.logprobs, s.top_logprobs, 0, k)
                choices.append({"text": (prompts[p] if echo else "") + s.text, "index": p * n + s.index,
                                "logprobs": lp, "finish_reason": self._finish(s.finish_reason)})
        out["choices"] = choices
        out["usage"] = self._usage(runs, results)
        return _json(out, headers=self._version_headers(runs[0].version))

    def _openai_stream_error(self, e: ApiError) -> bytes:
        return b"data: " + _dumps(_error_body(OPENAI, e)) + b"\n\n"

    def _messages(self, body: dict) -> list[ChatMessage]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", "invalid_value", f"messages[{i}]")
            role = m.get("role")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant (tools are not "
                                    "supported)", "invalid_value", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                                       f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                               "invalid_value", f"messages[{i}].content")
            out.append(ChatMessage(role, content))
        return out

    async def chat(self, request: Request, ctx: _Ctx) -> Response:
        body = await self._body(request)
        self._check_model(body.get("model"))
        messages = self._messages(body)
        for name in ("tools", "functions", "tool_choice", "function_call"):
            _unsupported(body, name, neutral=(None, [], "none", "auto"))
        fmt_ = body.get("response_format")
        if fmt_ not in (None, {"type": "text"}):
            raise ApiError(400, "only response_format {'type': 'text'} is supported", "unsupported_parameter",
                           "response_format")
        prompt, template_stop = render_chat(messages, self.backend.tokenizer)
        req, k = self._openai_request(body, chat=True, prompt_for_default=prompt)
        if template_stop:
            req = GenerationRequest(**{**req.__dict__, "stop": tuple(dict.fromkeys(req.stop + template_stop))})
        stream, usage_chunk = self._stream_flags(body)
        user = _field(body, "user", str, None)
        runs = self._open([prompt], req, ctx)
        last_user = [m.content for m in messages if m.role == "user"][-1:]
        self._opt_in(request, last_user, user, ctx.team)
        run = runs[0]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            started: set[int] = set()
            ended: list[SampleResult] = []
            heads = self._chunk_head("chat.completion.chunk", rid, b'"index":')

            def fmt(_: int, ev: StreamEvent) -> bytes:
                out = b""
                if ev.index not in started:
                    started.add(ev.index)
                    c = self._base("chat.completion.chunk", run.version, rid)
                    c["choices"] = [{"index": ev.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
                    out += b"data: " + _dumps(c) + b"\n\n"
                lp = None
                if req.return_logprobs and not run.is_special(ev.token_id):
                    lp = self._chat_logprobs(run, [ev.token_id], [ev.logprob], [ev.top or []], k)
                if ev.sample is not None:
                    ended.append(ev.sample)
                if ev.text and lp is None:
                    out += (heads(run.version) + b'%d,"delta":{"content":' % ev.index + _dumps(ev.text)
                            + b'},"logprobs":null,"finish_reason":null}]}\n\n')
                elif ev.text or lp is not None:
                    c = self._base("chat.completion.chunk", run.version, rid)
                    c["choices"] = [{"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp,
                                     "finish_reason": None}]
                    out += b"data: " + _dumps(c) + b"\n\n"
                if ev.finish_reason is not None:
                    c = self._base("chat.completion.chunk", run.version, rid)
                    c["choices"] = [{"index": ev.index, "delta": {}, "logprobs": None,
                                     "finish_reason": self._finish(ev.finish_reason)}]
                    out += b"data: " + _dumps(c) + b"\n\n"
                return out

            def tail() -> list[bytes]:
                out = []
                if usage_chunk:
                    c = self._base("chat.completion.chunk", run.version, rid)
                    c["choices"], c["usage"] = [], self._usage(runs, [ended])
                    out.append(b"data: " + _dumps(c) + b"\n\n")
                return out + [b"data: [DONE]\n\n"]

            return await self._sse(runs, ctx, OPENAI, fmt, tail, self._openai_stream_error)
        (samples,) = await self._complete_all(runs, ctx)
        self._observe(OPENAI, runs, ctx.t0)
        out = self._base("chat.completion", run.version, rid)
        out["choices"] = [{
            "index": s.index,
            "message": {"role": "assistant", "content": s.text, "refusal": None},
            "logprobs": self._chat_logprobs(run, self._text_tokens(run, s.token_ids), s.logprobs, s.top_logprobs, k)
            if req.return_logprobs else None,
            "finish_reason": self._finish(s.finish_reason)} for s in samples]
        out["usage"] = self._usage(runs, [samples])
        return _json(out, headers=self._version_headers(run.version))

    async def models(self, request: Request, ctx: _Ctx) -> Response:
        v = self.backend.version
        if v is None:
            raise ApiError(503, "no policy version loaded yet", "unavailable")
        created = int(time.time())
        data = [{"id": self.model_name, "object": "model", "created": created, "owned_by": "rlhf-platform",
                 "version": v},
                {"id": f"{self.model_name}@{v}", "object": "model", "created": created, "owned_by": "rlhf-platform",
                 "version": v}]
        return _json({"object": "list", "data": data}, headers=self._version_headers(v))

    # -- TGI ----------------------------------------------------------------------------------------

    def _tgi_request(self, body: dict) -> tuple[str, GenerationRequest, dict]:
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise ApiError(400, "`inputs` must be a non-empty string", "invalid_value", "inputs")
        p = body.get("parameters") or {}
        if not isinstance(p, dict):
            raise ApiError(400, "`parameters` must be an object", "invalid_value", "parameters")
        s = self.s
        pre = "parameters."
        best_of = _field(p, "best_of", int, None, prefix=pre)
        if best_of not in (None, 1):
            raise ApiError(400, "`best_of` > 1 is not supported", "unsupported_parameter", "best_of")
        if p.get("repetition_penalty") not in (None, 1, 1.0) or p.get("frequency_penalty") not in (None, 0, 0.0):
            raise ApiError(400, "repetition and frequency penalties are not supported", "unsupported_parameter")
        if p.get("typical_p") not in (None, 1, 1.0) or p.get("watermark") or p.get("grammar") or p.get("adapter_id"):
            raise ApiError(400, "typical_p, watermark, grammar and adapters are not supported", "unsupported_parameter")
        max_new = _field(p, "max_new_tokens", int, None, check=lambda v: 1 <= v <= s.max_new_tokens_limit,
                         must=f"an integer in 1..{s.max_new_tokens_limit}", prefix=pre)
        temperature = _field(p, "temperature", (int, float), None, check=lambda v: v > 0, must="a number > 0", prefix=pre)
        top_k = _field(p, "top_k", int, None, check=lambda v: v > 0, must="an integer > 0", prefix=pre)
        top_p = _field(p, "top_p", (int, float), None, check=lambda v: 0 < v <= 1, must="a number in (0, 1]", prefix=pre)
        do_sample = _field(p, "do_sample", bool, False, prefix=pre)
        # TGI samples when asked to, or when any warper is set
        sampling = do_sample or (temperature not in (None, 1.0)) or bool(top_k) or (top_p not in (None, 1.0))
        seed = _field(p, "seed", int, None, check=lambda v: v >= 0, must="an integer >= 0", prefix=pre)
        top_n = _field(p, "top_n_tokens", int, 0, check=lambda v: 0 <= v <= 5, must="an integer in 0..5", prefix=pre)
        truncate = _field(p, "truncate", int, None, check=lambda v: v > 0, must="an integer > 0", prefix=pre)
        flags = {"details": _field(p, "details", bool, False, prefix=pre),
                 "decoder_input_details": _field(p, "decoder_input_details", bool, False, prefix=pre),
                 "return_full_text": _field(p, "return_full_text", bool, False, prefix=pre),
                 "seed": seed, "truncate": truncate, "top_n": top_n}
        req = GenerationRequest(
            max_new_tokens=self._max_new(max_new, inputs, s.max_new_tokens_default),
            temperature=float(temperature or 1.0) if sampling else 0.0, top_k=top_k or 0, top_p=float(top_p or 1.0),
            stop=_stop_list(p.get("stop"), "parameters.stop"), seed=seed, n=1, return_logprobs=True,
            top_logprobs=top_n)
        return inputs, req, flags

    _TGI_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}

    @staticmethod
    def _tgi_token(run, token_id: int, logprob: float) -> dict:
        return {"id": token_id, "text": run.token_text(token_id), "logprob": logprob, "special": run.is_special(token_id)}

    def _tgi_response(self, run, s: SampleResult, inputs: str, f: dict) -> dict:
        text = run.full_text(s)
        out = {"generated_text": (inputs + text) if f["return_full_text"] else text}
        if f["details"] or f["decoder_input_details"]:
            prefill = []
            if f["decoder_input_details"]:
                prefill = [{"id": t, "text": run.token_text(t), "logprob": None} for t in (run.prompt_token_ids or [])]
            d = {"finish_reason": self._TGI_FINISH[s.finish_reason], "generated_tokens": len(s.token_ids),
                 "seed": f["seed"], "prefill": prefill,
                 "tokens": [self._tgi_token(run, t, lp) for t, lp in zip(s.token_ids, s.logprobs)]}
            if f["top_n"] and s.top_logprobs is not None:
                d["top_tokens"] = [[self._tgi_token(run, i, lp) for i, lp in alts] for alts in s.top_logprobs]
            out["details"] = d
        return out

    async def _tgi_one(self, request: Request, ctx: _Ctx, body: dict | None = None):
        body = body if body is not None else await self._body(request)
        inputs, req, flags = self._tgi_request(body)
        (run,) = self._open([inputs], req, ctx, flags["truncate"])
        self._opt_in(request, [inputs], None, ctx.team)
        return inputs, run, flags

    async def tgi_generate(self, request: Request, ctx: _Ctx, body: dict | None = None, as_list: bool = False) -> Response:
        inputs, run, flags = await self._tgi_one(request, ctx, body)
        ((s,),) = await self._complete_all([run], ctx)
        self._observe(TGI, [run], ctx.t0)
        out = self._tgi_response(run, s, inputs, flags)
        return _json([out] if as_list else out, headers=self._version_headers(run.version))

    async def tgi_generate_stream(self, request: Request, ctx: _Ctx, body: dict | None = None) -> Response:
        inputs, run, flags = await self._tgi_one(request, ctx, body)
        count = [0]

        def fmt(_: int, ev: StreamEvent) -> bytes:
            tok = self._tgi_token(run, ev.token_id, ev.logprob)
            ev_out = {"index": count[0], "token": tok, "top_tokens": None, "generated_text": None, "details": None}
            count[0] += 1
            if flags["top_n"] and ev.top:
                ev_out["top_tokens"] = [self._tgi_token(run, i, lp) for i, lp in ev.top]
            if ev.sample is not None:
                text = run.full_text(ev.sample)
                ev_out["generated_text"] = (inputs + text) if flags["return_full_text"] else text
                ev_out["details"] = {"finish_reason": self._TGI_FINISH[ev.sample.finish_reason],
                                     "generated_tokens": len(ev.sample.token_ids), "seed": flags["seed"],
                                     "input_length": len(run.prompt_token_ids or [])}
            return b"data:" + _dumps(ev_out) + b"\n\n"

        return await self._sse([run], ctx, TGI, fmt, list,
                               lambda e: b"data:" + _dumps(_error_body(TGI, e)) + b"\n\n")

    async def tgi_compat(self, request: Request, ctx: _Ctx) -> Response:
        """TGI's ``POST /``: a stream when ``stream`` is true, else a list of one answer."""
        body = await self._body(request)
        if _field(body, "stream", bool, False):
            return await self.tgi_generate_stream(request, ctx, body)
        return await self.tgi_generate(request, ctx, body, as_list=True)

    async def tgi_info(self, request: Request, ctx: _Ctx) -> Response:
        v = self.backend.version
        if v is None:
            raise ApiError(503, "no policy version loaded yet", "unavailable")
        max_prompt, max_total = self.backend.limits()
        info = {"model_id": self.model_name, "model_sha": v, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self.s.max_batch_prompts + self.s.max_waiting_samples,
                "max_best_of": 1, "max_stop_sequences": MAX_STOP, "max_input_tokens": max_prompt,
                "max_input_length": max_prompt, "max_total_tokens": max_total, "validation_workers": 1,
                "max_client_batch_size": 1, "router": "rlhf-policy-server", "version": "0.1.0", "sha": None,
                "docker_label": None, "backend": self.backend.name, **self.backend.info()}
        return _json(info, headers=self._version_headers(v))

    async def tgi_health(self, request: Request, ctx: _Ctx) -> Response:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "draining")
        if not self.backend.ready:
            raise ApiError(503, "no policy version is being served", "unavailable")
        return Response(b"", status_code=200, headers=self._version_headers(self.backend.version))
