"""The labeling page: plain HTML, CSS and a little JavaScript (``static/``), and the JSON calls it
makes, served by the feedback-store on its own HTTP port (docs/labeling.md).

Every answer goes through the same :class:`~services.feedback_store.service.FeedbackService`
methods as the gRPC API, so what the page stores is what a gRPC client would have stored.

Safety:

* sign-in: a token (issued by ``rlhf labelers create`` or in the credentials file) posted from the
  sign-in form, which carries a CSRF token bound to a cookie (double submit); the session is that
  token in an HttpOnly, SameSite=Strict cookie (Secure with ``secure_cookies``) that lasts
  ``session_hours``. Every request resolves the token again, so a revoked or reissued token signs
  its sessions out at once;
* every state-changing request (the JSON POSTs, sign-out) needs the ``X-CSRF-Token`` header, an
  HMAC of the session token that the page reads from ``/api/session``, and a same-origin
  ``Origin`` when the browser sends one; JSON bodies must say ``application/json``;
* a Content-Security-Policy without inline script or style, ``nosniff``, no framing, no referrer
  to other sites;
  the script renders prompts and responses with ``textContent`` only, so a response holding HTML
  shows as text;
* logs name routes, status codes, labelers and task ids, never prompt or response text.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import html
import json
import logging
import math
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from rlhf import errors
from rlhf.runtime.auth import LABELER, OPERATOR, AuthError, Principal
from rlhf.storage.feedback import FLAGS, SKIP_REASONS, CandidateLabel

log = logging.getLogger("rlhf.services.feedback.page")

STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "rlhf_session"
LOGIN_COOKIE = "rlhf_login"  # the sign-in form's CSRF token (double submit)
MAX_BODY_BYTES = 2 * 1024 * 1024  # a response of 100,000 characters fits with room to spare
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    # not no-referrer: with it, browsers send "Origin: null" on the page's own POSTs
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin")]
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
REASON_WORDS = {"unclear_prompt": "The prompt is unclear", "needs_expertise": "It needs expertise I do not have",
                "offensive_content": "The content is offensive or distressing",
                "broken_candidates": "The responses are broken, empty or identical", "other": "Another reason"}
FLAG_WORDS = {"fails_instruction": "Fails to follow the instruction", "hallucination": "Makes up information",
              "inappropriate_for_assistant": "Inappropriate for a customer assistant",
              "sexual_or_violent": "Sexual or violent content", "expresses_opinion": "Expresses an opinion it should not",
              "harmful_advice": "Gives harmful advice"}
_HTTP_STATUS = [(AuthError, None), (errors.PermissionDeniedError, 403), (errors.NotFoundError, 404),
                (errors.ConflictError, 409), (errors.DataError, 400), (errors.ConfigError, 400),
                (errors.ResourceExhaustedError, 429), (errors.UnavailableError, 503)]


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: an HMAC keyed by its (secret, HttpOnly) token, so another site
    can neither read nor compute it."""
    return hmac.new(session_token.encode(), b"rlhf-labeling-csrf", hashlib.sha256).hexdigest()


def status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message of an exception from the store or the service."""
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            if cls is AuthError:
                return (403 if exc.denied else 401), str(exc)
            return status, str(exc)
    return 500, "internal error: nothing was stored; try again"


class _SecurityHeaders:
    """ASGI middleware: the security headers on every response (Starlette's own 404s included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


@functools.lru_cache(maxsize=None)
def _template(name: str) -> str:
    return (STATIC / name).read_text()


def _render(template: str, **values: Any) -> str:
    """A page from ``static/<template>``: each ``{{name}}`` replaced by its value, HTML-escaped."""
    text = _template(template)
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", html.escape(str(v), quote=True))
    return text


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False, allow_nan=False), status_code=status,
                    media_type="application/json", headers={"cache-control": "no-store", **(headers or {})})


def _html(text: str, status: int = 200) -> Response:
    return Response(text, status_code=status, media_type="text/html; charset=utf-8",
                    headers={"cache-control": "no-store"})


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class LabelingPage:
    """The ASGI app (``.app``) of the labeling page over a FeedbackService."""

    def __init__(self, service, settings, metrics):
        self.svc = service
        self.s = settings
        self.metrics = metrics
        self.draining = False
        self._static = {p.name: p.read_bytes() for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}
        page, api = "html", "json"
        table = [  # method, path, handler, kind, needs a session, needs the operator role
            ("GET", "/", self.home, page, False, False),
            ("GET", "/health", self.health, api, False, False),
            ("GET", "/login", self.login_form, page, False, False),
            ("POST", "/login", self.login, page, False, False),
            ("POST", "/logout", self.logout, api, True, False),
            ("GET", "/tasks", self.tasks_page, page, True, False),
            ("GET", "/tasks/{task_id}", self.task_page, page, True, False),
            ("GET", "/admin", self.admin_page, page, True, True),
            ("GET", "/static/{name}", self.static, page, False, False),
            ("GET", "/api/session", self.api_session, api, True, False),
            ("GET", "/api/progress", self.api_progress, api, True, False),
            ("GET", "/api/tasks", self.api_tasks, api, True, False),
            ("GET", "/api/tasks/{task_id}", self.api_task, api, True, False),
            ("POST", "/api/tasks/{task_id}/ranking", self.api_ranking, api, True, False),
            ("POST", "/api/tasks/{task_id}/best-of-k", self.api_best_of_k, api, True, False),
            ("POST", "/api/tasks/{task_id}/demonstration", self.api_demonstration, api, True, False),
            ("POST", "/api/tasks/{task_id}/skip", self.api_skip, api, True, False),
            ("GET", "/api/admin/stats", self.api_admin_stats, api, True, True),
        ]
        routes = [Route(path, self._endpoint(handler, path, kind, session, admin), methods=[method])
                  for method, path, handler, kind, session, admin in table]
        self.app = _SecurityHeaders(Starlette(routes=routes, exception_handlers={HTTPException: self._not_routed}))

    # -- plumbing ---------------------------------------------------------------------------------
    def _count(self, route: str, status: int) -> None:
        self.metrics.http_requests_total.labels(self.metrics.service, route, str(status), "labelers").inc()

    async def _not_routed(self, request: Request, exc: HTTPException) -> Response:
        self._count("unrouted", exc.status_code)
        msg = "no such page" if exc.status_code == 404 else "method not allowed"
        if request.url.path.startswith("/api/"):
            return _json({"error": msg}, exc.status_code)
        return _html(_render("message.html", title=msg.capitalize(), message=msg), exc.status_code)

    def _endpoint(self, handler: Callable[..., Awaitable[Response]], route: str, kind: str, session: bool,
                  admin: bool):
        async def endpoint(request: Request) -> Response:
            try:
                if self.draining and route != "/health":
                    raise HttpError(503, "the feedback-store is shutting down; try again in a moment")
                who = self.principal(request) if session else None
                if session and who is None:
                    if kind == "html":
                        return self._counted(route, RedirectResponse("/login", status_code=303))
                    raise HttpError(401, "signed out: sign in again (your session ended, or your token was revoked)")
                if admin and not who.has(OPERATOR):
                    raise HttpError(403, "the admin view is for operators")
                if request.method == "POST" and session:
                    self._check_csrf(request)
                return self._counted(route, await handler(request, who) if session else await handler(request))
            except Exception as exc:  # noqa: BLE001 - every error becomes a status with a message
                status, msg = (exc.status, exc.message) if isinstance(exc, HttpError) else status_of(exc)
                if status == 500:
                    # the type only: a database error's text could quote a statement
                    log.error("labeling page: unhandled error", extra={"fields": {
                        "route": route, "error": type(exc).__name__}})
                if kind == "json":
                    return self._counted(route, _json({"error": msg}, status))
                return self._counted(route, _html(_render("message.html", title=_title(status), message=msg), status))

        return endpoint

    def _counted(self, route: str, resp: Response) -> Response:
        self._count(route, resp.status_code)
        return resp

    def principal(self, request: Request) -> Principal | None:
        token = request.cookies.get(SESSION_COOKIE, "")
        return self.svc.auth.from_token(token) if token else None

    @staticmethod
    def _same_origin(request: Request) -> None:
        """Refuse a request another site's page sent (its Origin names another host, or is
        "null"). The scheme is not compared: behind a proxy that ends TLS the page sees http."""
        origin = request.headers.get("origin")
        if origin is None:
            return
        if origin == "null" or urlsplit(origin).netloc != request.headers.get("host", ""):
            raise HttpError(403, "cross-site request refused")

    def _check_csrf(self, request: Request) -> None:
        self._same_origin(request)
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, csrf_token(request.cookies.get(SESSION_COOKIE, ""))):
            raise HttpError(403, "the request's CSRF token is missing or wrong: reload the page")

    @staticmethod
    async def _body(request: Request) -> bytes:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise HttpError(413, f"the request is larger than {MAX_BODY_BYTES} bytes")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY_BYTES:
                raise HttpError(413, f"the request is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json_body(self, request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HttpError(415, "send the request as application/json")
        try:
            body = json.loads(await self._body(request))
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def _cookie(self, resp: Response, name: str, value: str, max_age: int, request: Request) -> None:
        resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=self.s.secure_cookies or request.url.scheme == "https")

    # -- pages ------------------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        who = self.principal(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse("/tasks" if who.has(LABELER) or not who.has(OPERATOR) else "/admin", status_code=303)

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    def _login_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        resp = _html(_render("login.html", csrf=nonce, error=error, error_hidden="" if error else "hidden"), status)
        self._cookie(resp, LOGIN_COOKIE, nonce, 3600, request)
        return resp

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request)

    async def login(self, request: Request) -> Response:
        self._same_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise HttpError(415, "send the sign-in form")
        try:
            form = parse_qs((await self._body(request)).decode(), max_num_fields=10)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "the sign-in form is malformed") from None
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(form.get("csrf", [""])[0], nonce):
            return self._login_page(request, "The sign-in form expired; please sign in again.", 403)
        token = form.get("token", [""])[0].strip()
        who = self.svc.auth.from_token(token) if token else None
        if who is None:
            log.info("labeling page: sign-in refused", extra={"fields": {"reason": "unknown token"}})
            return self._login_page(request, "That token is not valid (unknown, revoked or replaced by a newer one).", 401)
        log.info("labeling page: signed in", extra={"fields": {"who": who.name}})
        resp = RedirectResponse("/tasks" if who.has(LABELER) or not who.has(OPERATOR) else "/admin", status_code=303)
        self._cookie(resp, SESSION_COOKIE, token, int(self.s.session_hours * 3600), request)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    async def logout(self, request: Request, who: Principal) -> Response:
        resp = _json({"signed_out": True})
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @staticmethod
    def _shell(page: str, title: str, task_id: str = "") -> Response:
        return _html(_render("app.html", page=page, title=title, task_id=task_id))

    async def tasks_page(self, request: Request, who: Principal) -> Response:
        return self._shell("tasks", "My tasks")

    async def task_page(self, request: Request, who: Principal) -> Response:
        task_id = request.path_params["task_id"]
        await self.svc.get_task(who, task_id)  # 403/404 here, before any page is sent
        return self._shell("task", "Task", task_id)

    async def admin_page(self, request: Request, who: Principal) -> Response:
        return self._shell("admin", "Admin")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        data = self._static.get(name)
        if data is None:
            raise HttpError(404, "no such file")
        return Response(data, media_type=STATIC_TYPES[Path(name).suffix], headers={"cache-control": "no-cache"})

    # -- JSON -------------------------------------------------------------------------------------
    async def api_session(self, request: Request, who: Principal) -> Response:
        return _json({"name": who.name, "labeler_id": who.labeler_id, "roles": sorted(who.roles),
                      "labeler": who.has(LABELER), "admin": who.has(OPERATOR),
                      "csrf_token": csrf_token(request.cookies.get(SESSION_COOKIE, "")),
                      "flags": [{"name": f, "words": FLAG_WORDS[f]} for f in FLAGS],
                      "skip_reasons": [{"name": r, "words": REASON_WORDS[r]} for r in SKIP_REASONS],
                      "session_hours": self.s.session_hours})

    @staticmethod
    def _since(request: Request) -> datetime:
        """``?since=`` (the page sends the labeler's local midnight); default: UTC midnight."""
        raw = request.query_params.get("since", "")
        if not raw:
            now = datetime.now(timezone.utc)
            return now.replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise HttpError(400, "since: expected an ISO 8601 time") from None
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)

    def _labeler(self, who: Principal) -> str:
        if not who.labeler_id:
            raise HttpError(403, f"{who.name} is not a labeler: only labelers have tasks")
        return who.labeler_id

    async def api_progress(self, request: Request, who: Principal) -> Response:
        done, remaining = await asyncio.to_thread(self.svc.store.progress, self._labeler(who), self._since(request))
        return _json({"done_today": done, "remaining": remaining})

    async def api_tasks(self, request: Request, who: Principal) -> Response:
        rows, _ = await self.svc.list_tasks(who, self._labeler(who), 100, "")
        return _json({"tasks": [{"task_id": r.task_id, "mode": r.mode, "k": r.k, "created": r.created_at.isoformat(),
                                 "prompt": r.prompt[:300]} for r in rows]})

    async def api_task(self, request: Request, who: Principal) -> Response:
        self._labeler(who)
        t = await self.svc.get_task(who, request.path_params["task_id"])
        return _json({"task_id": t.task_id, "mode": t.mode, "prompt": t.prompt, "candidates": t.candidates,
                      "k": t.k, "policy_version": t.policy_version})

    @staticmethod
    def _labels(body: dict) -> list[CandidateLabel]:
        raw = body.get("labels") or []
        if not isinstance(raw, list):
            raise HttpError(400, "labels: expected a list")
        out = []
        for i, x in enumerate(raw):
            if not isinstance(x, dict):
                raise HttpError(400, f"labels[{i}]: expected an object")
            flags = x.get("flags") or []
            if not isinstance(flags, list):
                raise HttpError(400, f"labels[{i}].flags: expected a list")
            out.append(CandidateLabel(x.get("index"), tuple(flags), x.get("quality") or 0))
        return out

    @staticmethod
    def _field(body: dict, name: str, kind: type, default: Any = None) -> Any:
        v = body.get(name, default)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise HttpError(400, f"{name}: expected {'a number' if kind in (int, float) else 'a ' + kind.__name__}")
        return v

    @staticmethod
    def _submitted(sid: str, dup: bool) -> Response:
        return _json({"submission_id": sid, "duplicate": dup}, 200 if dup else 201)

    async def api_ranking(self, request: Request, who: Principal) -> Response:
        b = await self._json_body(request)
        ranking = b.get("ranking")
        sid, dup = await self.svc.submit_ranking(
            who, self._field(b, "idempotency_key", str, ""), request.path_params["task_id"], "", ranking,
            self._labels(b), self._field(b, "seconds_spent", float, 0.0))
        return self._submitted(sid, dup)

    async def api_best_of_k(self, request: Request, who: Principal) -> Response:
        b = await self._json_body(request)
        sid, dup = await self.svc.submit_best_of_k(
            who, self._field(b, "idempotency_key", str, ""), request.path_params["task_id"], "",
            self._field(b, "best_index", int), self._labels(b), self._field(b, "seconds_spent", float, 0.0))
        return self._submitted(sid, dup)

    async def api_demonstration(self, request: Request, who: Principal) -> Response:
        b = await self._json_body(request)
        sid, dup = await self.svc.submit_demonstration(
            who, self._field(b, "idempotency_key", str, ""), "", self._field(b, "response", str, ""),
            task_id=request.path_params["task_id"], seconds=self._field(b, "seconds_spent", float, 0.0))
        return self._submitted(sid, dup)

    async def api_skip(self, request: Request, who: Principal) -> Response:
        b = await self._json_body(request)
        sid, dup = await self.svc.skip_task(
            who, self._field(b, "idempotency_key", str, ""), request.path_params["task_id"], "",
            self._field(b, "reason", str, ""), self._field(b, "comment", str, ""),
            self._field(b, "seconds_spent", float, 0.0))
        return self._submitted(sid, dup)

    async def api_admin_stats(self, request: Request, who: Principal) -> Response:
        store = self.svc.store
        today = await asyncio.to_thread(store.labeler_stats, self._since(request))
        total = await asyncio.to_thread(store.labeler_stats)
        ratio, tasks, pairs = await asyncio.to_thread(store.agreement)
        by_pair = await asyncio.to_thread(store.agreement_by_labeler_pair)
        open_tasks = await asyncio.to_thread(store.count_open_tasks)
        todays = {s.name: s for s in today}
        reasons: dict[str, int] = {}
        for st in total:
            for r, n in st.skips_by_reason.items():
                reasons[r] = reasons.get(r, 0) + n
        return _json({
            "labelers": [{"name": st.name, "admin": st.admin, "active": st.active, "registered": st.registered,
                          "today": todays[st.name].counts if st.name in todays else {}, "total": st.counts,
                          "open_tasks": st.open_tasks, "median_seconds": _finite(st.median_seconds)}
                         for st in total],
            "skip_reasons": [{"reason": r, "words": REASON_WORDS[r], "count": reasons.get(r, 0)} for r in SKIP_REASONS],
            "agreement": {"ratio": ratio if pairs else None, "tasks": tasks, "pairs": pairs,
                          "labeler_pairs": [{"a": a, "b": b, "tasks": t, "pairs": p, "ratio": ag / p if p else None}
                                            for (a, b), (t, ag, p) in sorted(by_pair.items())]},
            "tasks_open": open_tasks,
        })


def _title(status: int) -> str:
    return {400: "That request was not right", 401: "Please sign in", 403: "Not yours to open",
            404: "Not found", 409: "Already done", 413: "Too large", 415: "Wrong format",
            503: "Try again in a moment"}.get(status, "Something went wrong")
