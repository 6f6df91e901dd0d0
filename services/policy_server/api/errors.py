"""Errors of the HTTP APIs, each in its dialect's shape.

OpenAI ``{"error": {"message", "type", "param", "code"}}``; TGI ``{"error": "...", "error_type":
"..."}``, with TGI's statuses (a validation error is 422, as TGI answers it). :func:`as_api_error`
turns the library's and the backends' errors into statuses and codes; :data:`ERRORS` is the one
table of them, which docs/inference-api.md prints.
"""

from __future__ import annotations

import json
import math
import logging
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import ContextLengthError, DeadlineExceededError
from rlhf.inference.requests import InvalidFieldError
from rlhf.runtime.apikeys import AuthError, QuotaExceededError, RateLimitedError

log = logging.getLogger("rlhf.services.policy.http")

OPENAI, TGI = "openai", "tgi"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


@dataclass(frozen=True)
class ErrorKind:
    code: str  # OpenAI's error code (and the key of this table)
    status: int  # HTTP status (OpenAI's; TGI's may differ: tgi_status)
    when: str  # for the docs
    reason: str  # rlhf_policy_request_failures_total{reason}
    tgi_status: int | None = None


_KINDS = [
    ErrorKind("invalid_value", 400, "a field breaks its rule (the message names the field and the rule)", "validation",
              422),
    ErrorKind("invalid_json", 400, "the body is not a JSON object", "validation", 422),
    ErrorKind("unknown_parameter", 400, "a field this route does not know (e.g. a typo)", "validation", 422),
    ErrorKind("unsupported_parameter", 400, "a field this server does not implement, at a value other than "
              "its neutral one", "validation", 422),
    ErrorKind("context_length_exceeded", 400, "the prompt is over the prompt limit, or the prompt and max_tokens "
              "over the model's context (the numbers are in the message)", "context_length", 422),
    ErrorKind("invalid_api_key", 401, "no key, or an unknown one (when keys are configured)", "unauthenticated"),
    ErrorKind("model_not_found", 404, "an unknown model", "validation"),
    ErrorKind("not_found", 404, "an unknown route", "validation"),
    ErrorKind("body_too_large", 413, "a body over max_body_bytes", "validation"),
    ErrorKind("rate_limit_exceeded", 429, "the team's requests per minute (with Retry-After)", "rate_limited"),
    ErrorKind("quota_exceeded", 429, "the team's tokens per minute or per day (with Retry-After)", "quota"),
    ErrorKind("queue_full", 429, "the engine's queue is full (with Retry-After)", "queue_full"),
    ErrorKind("internal_error", 500, "a bug (logged)", "internal"),
    ErrorKind("draining", 503, "the server is shutting down", "unavailable"),
    ErrorKind("unavailable", 503, "no policy version loaded yet, or the engine process died", "unavailable"),
    ErrorKind("timeout", 504, "the request's deadline passed", "timeout"),
]
ERRORS: dict[str, ErrorKind] = {k.code: k for k in _KINDS}

OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "service_unavailable", 504: "timeout"}
TGI_TYPE = {400: "validation", 401: "authentication", 404: "not_found", 413: "validation", 422: "validation",
            429: "overloaded", 500: "generation", 503: "unavailable", 504: "timeout"}


def status(style: str, e: ApiError) -> int:
    """The HTTP status of ``e`` in a dialect (TGI answers validation errors with 422)."""
    kind = ERRORS.get(e.code or "")
    if style == TGI and kind is not None and kind.tgi_status is not None:
        return kind.tgi_status
    return e.status


def reason(e: ApiError) -> str:
    kind = ERRORS.get(e.code or "")
    return kind.reason if kind is not None else ("validation" if 400 <= e.status < 500 else "internal")


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
    return {"error": e.message, "error_type": TGI_TYPE.get(status(style, e), "generation")}


def as_api_error(exc: BaseException) -> ApiError:
    """The library's and the backends' errors as HTTP statuses."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AuthError):
        return ApiError(401, str(exc), "invalid_api_key")
    if isinstance(exc, QuotaExceededError):
        return ApiError(429, str(exc), "quota_exceeded", retry_after=exc.retry_after)
    if isinstance(exc, RateLimitedError):
        return ApiError(429, str(exc), "rate_limit_exceeded", retry_after=exc.retry_after)
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "context_length_exceeded", "messages" if "messages" in str(exc) else "prompt")
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
