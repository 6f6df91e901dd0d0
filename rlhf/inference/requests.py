"""What a generation request may ask for: the one validation behind every API surface.

The gRPC ``PolicyService``, the OpenAI routes and the TGI routes each read their own field names
and JSON or protobuf types, then hand the values, under the names of
:class:`~rlhf.serving.GenerationRequest`, to :func:`build_request`. The rules and their limits
live here, once: a bad value breaks the same :class:`Rule` on every surface, and each surface
answers it in its own error shape (gRPC INVALID_ARGUMENT, OpenAI 400, TGI validation error) with
the field under that surface's name (``sampling.max_new_tokens``, ``max_tokens``,
``parameters.max_new_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from rlhf.errors import DataError
from rlhf.inference.guided import KINDS, Guide
from rlhf.serving import GenerationRequest

# Limits that are the same on every server (the rest are settings: RequestLimits).
MAX_STOP_STRINGS = 8  # stop strings per request
MAX_STOP_CHARS = 64  # characters per stop string
MAX_TEMPERATURE = 2.0  # OpenAI's range, 0..2
MAX_TOP_LOGPROBS = 20  # alternatives per token: OpenAI chat's top_logprobs
MAX_TOP_N_TOKENS = 5  # alternatives per token: OpenAI completions' logprobs and TGI's top_n_tokens
SEED_MODULUS = 2 ** 63  # seeds are taken modulo this (torch generators take 63 bits)
MAX_PENALTY = 2.0  # OpenAI's range of frequency_penalty and presence_penalty, -2..2
MAX_REPETITION_PENALTY = 10.0  # repetition_penalty in (0, 10]
MAX_STOP_TOKEN_IDS = 16  # stop_token_ids per request


@dataclass(frozen=True)
class RequestLimits:
    """The limits a server sets (from its settings) besides the fixed ones above."""

    max_new_tokens: int = 512  # largest max_new_tokens a request may ask for
    max_n: int = 16  # samples per prompt
    top_logprobs: int = MAX_TOP_LOGPROBS  # alternatives per token on this surface


class InvalidFieldError(DataError):
    """A field breaks a rule. ``param`` is the field's name on the surface that was called,
    ``rule`` the name of the rule (the same on every surface)."""

    def __init__(self, param: str, rule: str, message: str):
        super().__init__(message)
        self.param, self.rule = param, rule


@dataclass(frozen=True)
class Rule:
    """One field's rule: ``ok(value, limits, values)`` and what it demands, in words."""

    field: str
    ok: Callable[[Any, RequestLimits, Mapping[str, Any]], bool]
    must: Callable[[RequestLimits], str]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _stop_ok(v, L: RequestLimits, _) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in v))


RULES: dict[str, Rule] = {r.field: r for r in [
    Rule("n", lambda v, L, _: _integer(v) and 1 <= v <= L.max_n, lambda L: f"an integer in 1..{L.max_n}"),
    Rule("max_new_tokens", lambda v, L, _: _integer(v) and 1 <= v <= L.max_new_tokens,
         lambda L: f"an integer in 1..{L.max_new_tokens}"),
    Rule("min_new_tokens", lambda v, L, vals: _integer(v) and 0 <= v <= vals.get("max_new_tokens", L.max_new_tokens),
         lambda L: "an integer from 0 to the request's max_new_tokens"),
    Rule("temperature", lambda v, L, _: _number(v) and 0 <= v <= MAX_TEMPERATURE,
         lambda L: f"a number in 0..{MAX_TEMPERATURE:g} (0 is greedy)"),
    Rule("top_p", lambda v, L, _: _number(v) and 0 < v <= 1, lambda L: "a number in (0, 1]"),
    Rule("top_k", lambda v, L, _: _integer(v) and v >= 0, lambda L: "an integer >= 0 (0: off)"),
    Rule("seed", lambda v, L, _: _integer(v), lambda L: "an integer"),
    Rule("top_logprobs", lambda v, L, _: _integer(v) and 0 <= v <= L.top_logprobs,
         lambda L: f"an integer in 0..{L.top_logprobs}"),
    Rule("stop", _stop_ok,
         lambda L: f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"),
    Rule("logprobs_of", lambda v, L, _: v in ("model", "sampling"), lambda L: "'model' or 'sampling'"),
    Rule("repetition_penalty", lambda v, L, _: _number(v) and 0 < v <= MAX_REPETITION_PENALTY,
         lambda L: f"a number in (0, {MAX_REPETITION_PENALTY:g}] (1: none)"),
    Rule("frequency_penalty", lambda v, L, _: _number(v) and abs(v) <= MAX_PENALTY,
         lambda L: f"a number in -{MAX_PENALTY:g}..{MAX_PENALTY:g} (0: none)"),
    Rule("presence_penalty", lambda v, L, _: _number(v) and abs(v) <= MAX_PENALTY,
         lambda L: f"a number in -{MAX_PENALTY:g}..{MAX_PENALTY:g} (0: none)"),
    Rule("min_p", lambda v, L, _: _number(v) and 0 <= v <= 1, lambda L: "a number in 0..1 (0: off)"),
    Rule("stop_token_ids", lambda v, L, _: isinstance(v, (tuple, list)) and len(v) <= MAX_STOP_TOKEN_IDS
         and all(_integer(t) and t >= 0 for t in v),
         lambda L: f"a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)"),
    Rule("ignore_eos", lambda v, L, vals: isinstance(v, bool) and not (v and vals.get("guide")),
         lambda L: "a boolean, and not true with structured output"),
    Rule("guide", lambda v, L, vals: isinstance(v, Guide) and v.kind in KINDS and not vals.get("min_new_tokens"),
         lambda L: "one structured-output format, without a minimum of new tokens"),
]}


def _shown(v) -> str:
    s = repr(list(v) if isinstance(v, tuple) else v)
    return s if len(s) <= 60 else s[:57] + "..."


def invalid(field: str, value, limits: RequestLimits, names: Mapping[str, str] | None = None) -> InvalidFieldError:
    """The error for ``value`` breaking ``field``'s rule, naming the field as the surface does."""
    param = (names or {}).get(field, field)
    return InvalidFieldError(param, field, f"'{param}' must be {RULES[field].must(limits)}, got {_shown(value)}")


def build_request(values: Mapping[str, Any], limits: RequestLimits, *, default_max_new_tokens: int,
                  names: Mapping[str, str] | None = None) -> GenerationRequest:
    """A checked :class:`GenerationRequest` from ``values`` (GenerationRequest's field names; a
    missing or None value takes its default). An absent ``max_new_tokens`` is
    ``default_max_new_tokens``, and the engine may lower it to the room left in the model's
    context (``fit_to_context``). Raises :class:`InvalidFieldError` naming the field by
    ``names[field]`` (the surface's own name) at the first rule broken."""
    vals = {k: v for k, v in values.items() if v is not None}
    defaulted = "max_new_tokens" not in vals
    if defaulted:
        vals["max_new_tokens"] = min(default_max_new_tokens, limits.max_new_tokens)
    for field, rule in RULES.items():
        if field in vals and not rule.ok(vals[field], limits, vals):
            raise invalid(field, vals[field], limits, names)
    unknown = set(vals) - set(GenerationRequest.__dataclass_fields__)
    if unknown:
        raise TypeError(f"not fields of a GenerationRequest: {sorted(unknown)}")
    if "stop" in vals:
        vals["stop"] = tuple(s for s in vals["stop"] if s)
    if "stop_token_ids" in vals:
        vals["stop_token_ids"] = tuple(vals["stop_token_ids"])
    if "seed" in vals:
        vals["seed"] = vals["seed"] % SEED_MODULUS
    for k in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p"):
        if k in vals:
            vals[k] = float(vals[k])
    return GenerationRequest(**vals, fit_to_context=defaulted)
