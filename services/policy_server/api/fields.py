"""Reading a JSON request's fields: type checks for the fields a dialect handles itself.

The sampling fields' rules are not here: each dialect hands them, under
:class:`~rlhf.serving.GenerationRequest`'s names, to :func:`rlhf.inference.requests.build_request`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from services.policy_server.api.errors import ApiError

_MISSING = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
               dict: "an object"}


def field(body: dict, name: str, kind, default=None, *, check: Callable[[Any], bool] | None = None,
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
        want = must or " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{label}' must be {want}, got {json.dumps(v)[:60]}", "invalid_value", label)
    return v


def stop_list(v) -> list | None:
    """A stop field as a list (a string is a list of one); its rule is checked by build_request."""
    if v is None:
        return None
    return [v] if isinstance(v, str) else v


def unsupported(body: dict, name: str, neutral=(None,)) -> None:
    v = body.get(name)
    if v is not None and v != [] and v not in neutral:
        raise ApiError(400, f"'{name}' is not supported by this server", "unsupported_parameter", name)
