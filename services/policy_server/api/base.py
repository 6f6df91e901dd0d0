"""The plumbing both HTTP dialects share: authentication and team limits, draining, deadlines,
request metrics, the request body, the model name, opt-in forwarding, and opening runs on the
backend.

:class:`ApiServer` holds that state; :meth:`ApiServer.endpoint` wraps a dialect's handler so
that every request is refused while draining (503), authenticated (401), given a deadline,
counted in ``rlhf_http_requests_total`` by its outcome and team (a stream by how it ended) and
answered in the dialect's error shape. A generation is admitted against its team's limits
(429) only once it is known to be valid (:meth:`ApiServer.open`), and its unused tokens go back
to the team's quota when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from rlhf.inference.requests import MAX_TOP_N_TOKENS, RequestLimits
from rlhf.runtime.apikeys import ANONYMOUS, Admission, ApiKeys
from rlhf.runtime.http import EventStreamResponse, until_disconnected
from rlhf.serving import GenerationRequest
from services.policy_server.api import errors
from services.policy_server.backends import complete, names, observe, used_tokens
from services.policy_server.api.errors import OPENAI, TGI, ApiError, as_api_error, error_body, json_response, reason

log = logging.getLogger("rlhf.services.policy.http")

TRUE = {"1", "true", "yes", "on"}


@dataclass
class Ctx:
    """One request as its handler sees it."""

    team: str
    t0: float  # time.perf_counter() at arrival
    deadline: float  # time.monotonic() by which it must be answered
    request: Request
    admission: Admission | None = None  # what the team's limits gave the request
    runs: list = field(default_factory=list)  # what it generates


class ApiServer:
    def __init__(self, backend, settings, metrics, keys: ApiKeys, forwarder=None):
        self.backend = backend
        self.s = settings
        self.metrics = metrics
        self.keys = keys
        self.forwarder = forwarder
        self.model_name = settings.model_name
        # the request limits, and those of the fields that allow fewer alternatives per token
        # (OpenAI completions' logprobs, TGI's top_n_tokens)
        self.limits = RequestLimits(max_new_tokens=settings.max_new_tokens_limit, max_n=settings.max_n)
        self.limits_top_n = replace(self.limits, top_logprobs=MAX_TOP_N_TOKENS)
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- draining ---------------------------------------------------------------------------------

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

    # -- every request ------------------------------------------------------------------------------

    def record(self, route: str, status: int, team: str | None) -> None:
        self.metrics.http_requests_total.labels(self.metrics.service, route, str(status), self.keys.label(team)).inc()

    def failed(self, dialect: str, team: str | None, e: ApiError) -> None:
        self.metrics.policy_request_failures_total.labels(dialect, self.keys.label(team), reason(e)).inc()

    @staticmethod
    def version_headers(version: str | None) -> dict:
        return {"X-Policy-Version": version} if version else {}

    async def not_found(self, request: Request, exc: HTTPException) -> Response:
        style = OPENAI if request.url.path.startswith("/v1/") else TGI
        msg = "no such route" if exc.status_code == 404 else (exc.detail or "error")
        e = ApiError(exc.status_code, f"{msg}: {request.method} {request.url.path}", "not_found")
        self.record("other", exc.status_code, None)
        return json_response(error_body(style, e), exc.status_code)

    def endpoint(self, handler, route: str, style: str, auth: bool = True, drains: bool = True, admit: bool = True):
        """``handler`` behind the plumbing; ``admit``: count the request against its team's rate
        limit on arrival (a generation is admitted by :meth:`open` instead, once it is valid)."""
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            self._enter()
            streaming = False
            status = 500
            ctx = None
            try:
                if drains and self.draining:
                    raise ApiError(503, "the server is shutting down; retry on another replica", "draining",
                                   retry_after=1.0)
                team = self.keys.authenticate(request.headers.get("authorization")) if auth else ANONYMOUS
                ctx = Ctx(team, t0, time.monotonic() + self._timeout(request), request)
                if admit:
                    ctx.admission = self.keys.admit(team)
                resp = await handler(request, ctx)
                status = resp.status_code
                if isinstance(resp, EventStreamResponse):
                    streaming = True
                    inner = resp.on_close

                    def closed() -> None:
                        if inner is not None:
                            inner()
                        self._done(ctx)
                        self.record(route, resp.outcome, ctx.team)
                        self._leave()

                    resp.on_close = closed
                return resp
            except ClientDisconnect:
                status = 499
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every error is answered in the API's shape
                e = as_api_error(exc)
                status = errors.status(style, e)
                self.failed(style, ctx.team if ctx else None, e)
                headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if e.retry_after else {}
                headers.update(self.version_headers(self.backend.version))
                return json_response(error_body(style, e), status, headers)
            finally:
                if not streaming:
                    if ctx is not None:
                        self._done(ctx)
                    self.record(route, status, ctx.team if ctx else None)
                    self._leave()

        return endpoint

    def _done(self, ctx: Ctx) -> None:
        """The request ended: what its team reserved and it did not use goes back."""
        for r in ctx.runs:
            r.cancel()
        self.keys.settle(ctx.admission, used_tokens(ctx.runs))

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

    async def body(self, request: Request) -> dict:
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

    # -- generation -------------------------------------------------------------------------------

    def check_model(self, name) -> None:
        if name is None or name == "":
            return
        v = self.backend.version
        if not isinstance(name, str) or name not in (self.model_name, v, f"{self.model_name}@{v}"):
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}` "
                                f"(version {v}, also addressable as `{self.model_name}@{v}`)", "model_not_found", "model")

    def opt_in(self, request: Request, texts: list[str], user, team: str) -> None:
        if self.forwarder is None:
            return
        if (request.headers.get("x-rlhf-consent") or "").strip().lower() not in TRUE:
            return
        user = user or request.headers.get("x-rlhf-user")
        if isinstance(user, str) and user:
            self.forwarder.offer(texts, user, f"api:{team}")

    async def open(self, prompts: list[str], req: GenerationRequest, ctx: Ctx, truncate: int | None = None,
                   where: str = "prompt") -> list:
        """Queue the prompts (one version answers them all), after the team's limits admitted the
        request; the runs."""

        def admit(tokens: int) -> None:
            ctx.admission = self.keys.admit(ctx.team, tokens)

        ctx.runs = await self.backend.open(prompts, req, ctx.deadline, where=names(prompts, where),
                                           truncate=truncate, team=ctx.team, admit=admit)
        return ctx.runs

    def observe(self, api: str, ctx: Ctx) -> None:
        observe(self.metrics, api, self.keys.label(ctx.team), ctx.runs, ctx.t0)

    async def complete_all(self, runs: list, ctx: Ctx) -> list:
        """Every sample of every run (lists of SampleResults, per run); a client that goes away
        cancels them."""
        async def all_done():
            return await asyncio.gather(*(complete(r) for r in runs))

        try:
            return await until_disconnected(ctx.request, all_done())
        finally:
            for r in runs:
                r.cancel()
