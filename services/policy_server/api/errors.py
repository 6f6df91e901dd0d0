"""Errors of the HTTP APIs, each in its dialect's shape.

OpenAI ``{"error": {"message", "type", "param", "code"}}``; TGI ``{"error": "...", "error_type":
"..."}``. :func:`as_api_error` turns the library's and the backends' errors into statuses.
"""

from __future__ import annotations

import json
import math
import logging
from typing import Any

from starlette.responses import Response

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import DeadlineExceededError, PromptTooLongError
from rlhf.inference.requests import InvalidFieldError
from rlhf.runtime.apikeys import AuthError, RateLimitedError

log = logging.getLogger("rlhf.services.policy.http")

OPENAI, TGI = "openai", "tgi"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "service_unavailable", 504: "timeout"}
TGI_TYPE = {400: "validation", 401: "authentication", 404: "not_found", 413: "validation", 429: "overloaded",
            500: "generation", 503: "unavailable", 504: "timeout"}


def dumps(obj: Any) -> bytes:
    """JSON as clients parse it: a NaN or infinite number (a log-prob that overflowed, say) is
    written as null, never as the bare NaN that JSON parsers reject."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False).encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_body(style: str, e: ApiError) -> dict:
    if style == OPENAI:
        return {"error": {"message": e.message, "type": OPENAI_TYPE.get(e.status, "server_error"),
                          "param": e.param, "code": e.code}}
    return {"error": e.message, "error_type": TGI_TYPE.get(e.status, "generation")}


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
    if isinstance(exc, InvalidFieldError):
        return ApiError(400, str(exc), "invalid_value", exc.param)
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
