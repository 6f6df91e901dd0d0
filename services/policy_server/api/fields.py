"""The fields each route accepts, as tables: every field is implemented, or accepted only at its
neutral value and otherwise refused with 400 naming it; an unknown field (a typo such as
``max_token``) is refused the same way. docs/inference-api.md's field tables and /openapi.json
are generated from these tables (:mod:`services.policy_server.api.reference`).

The sampling fields' ranges are not checked here: each dialect hands them, under
:class:`~rlhf.serving.GenerationRequest`'s names, to :func:`rlhf.inference.requests.build_request`
(``rule`` names the GenerationRequest field whose rule applies).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from rlhf.inference.guided import Guide
from services.policy_server.api.errors import ApiError


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # JSON type(s) as in JSON Schema, "|" between alternatives
    doc: str
    rule: str | None = None  # the GenerationRequest field whose rule (rlhf.inference.requests.RULES) applies
    neutral: tuple | None = None  # not implemented: only these values are accepted (None: implemented)


def _f(name, type_, doc, rule=None, neutral=None) -> Field:
    return Field(name, type_, doc, rule, neutral)


_SAMPLING = [
    _f("temperature", "number", "0 is greedy; default 1", "temperature"),
    _f("top_p", "number", "nucleus sampling; default 1", "top_p"),
    _f("top_k", "integer", "keep the k likeliest tokens; 0 or -1: off", "top_k"),
    _f("min_p", "number", "drop tokens less likely than min_p times the likeliest", "min_p"),
    _f("seed", "integer", "same seed, version and request: same samples", "seed"),
    _f("stop", "string|array", "a sample ends before the first of these strings", "stop"),
    _f("stop_token_ids", "array", "a sample also ends at these tokens (not in the text)", "stop_token_ids"),
    _f("ignore_eos", "boolean", "never end on the end-of-sequence token", "ignore_eos"),
    _f("min_tokens", "integer", "end-of-sequence is blocked before this many tokens", "min_new_tokens"),
    _f("repetition_penalty", "number", "> 1 discourages the prompt's and the sample's tokens", "repetition_penalty"),
    _f("frequency_penalty", "number", "lowers a token's logit per earlier occurrence", "frequency_penalty"),
    _f("presence_penalty", "number", "lowers a token's logit once it occurred", "presence_penalty"),
    _f("n", "integer", "samples per prompt", "n"),
    _f("best_of", "integer", "only equal to n", neutral=()),
    _f("stream", "boolean", "server-sent events"),
    _f("stream_options", "object", "{include_usage}: a last chunk with the usage; only with stream"),
    _f("user", "string", "the end user, for prompt collection (see opt-in)"),
    _f("response_format", "object", "{type: text | json_object | json_schema, json_schema: {schema}}", "guide"),
    _f("guided_json", "object|string", "structured output: a JSON schema", "guide"),
    _f("guided_regex", "string", "structured output: a regular expression", "guide"),
    _f("guided_choice", "array", "structured output: one of these strings", "guide"),
    _f("logit_bias", "object", "not supported", neutral=(None, {})),
    _f("bad_words", "array", "not supported", neutral=(None, [])),
]

_MODEL = _f("model", "string", "rlhf-policy, rlhf-policy@VERSION or VERSION")

COMPLETIONS = [
    _MODEL,
    _f("prompt", "string|array", "a string or a list of strings"),
    _f("max_tokens", "integer", "default 16", "max_new_tokens"),
    *_SAMPLING,
    _f("logprobs", "integer", "log-probs of each token and this many alternatives", "top_logprobs"),
    _f("echo", "boolean", "the prompt before the text; with logprobs, the prompt's log-probs too"),
    _f("suffix", "string", "not supported", neutral=(None, "")),
]

CHAT = [
    _MODEL,
    _f("messages", "array", "roles system/developer, user, assistant; text content or text parts"),
    _f("max_tokens", "integer", "default: the setting max_new_tokens_default", "max_new_tokens"),
    _f("max_completion_tokens", "integer", "the same as max_tokens", "max_new_tokens"),
    *_SAMPLING,
    _f("logprobs", "boolean", "log-probs of each token"),
    _f("top_logprobs", "integer", "alternatives per token (needs logprobs)", "top_logprobs"),
    _f("chat_template", "string", "a Jinja chat template instead of the model's"),
    _f("add_generation_prompt", "boolean", "end the prompt with the assistant's turn; default true"),
    _f("continue_final_message", "boolean", "continue the last (assistant) message instead"),
    _f("tools", "array", "not supported", neutral=(None, [])),
    _f("tool_choice", "string|object", "not supported", neutral=(None, "none", "auto")),
    _f("parallel_tool_calls", "boolean", "not supported", neutral=(None, True, False)),
    _f("functions", "array", "not supported", neutral=(None, [])),
    _f("function_call", "string|object", "not supported", neutral=(None, "none", "auto")),
    _f("modalities", "array", "text only", neutral=(None, ["text"])),
    _f("store", "boolean", "nothing is stored for the caller", neutral=(None, False)),
    _f("metadata", "object", "not supported", neutral=(None, {})),
]

TGI = [
    _f("inputs", "string", "the prompt"),
    _f("parameters", "object", "the fields below"),
    _f("stream", "boolean", "POST /: a stream of events instead of a list of one answer"),
]

TGI_PARAMETERS = [
    _f("max_new_tokens", "integer", "default: the setting max_new_tokens_default, within the context",
       "max_new_tokens"),
    _f("do_sample", "boolean", "sample (else greedy, unless a sampling parameter is set)"),
    _f("temperature", "number", "sampling temperature", "temperature"),
    _f("top_k", "integer", "keep the k likeliest tokens", "top_k"),
    _f("top_p", "number", "nucleus sampling", "top_p"),
    _f("seed", "integer", "the seed; details.seed reports the one used", "seed"),
    _f("stop", "array", "stop sequences (kept in generated_text, as TGI does)", "stop"),
    _f("repetition_penalty", "number", "> 1 discourages the prompt's and the sample's tokens", "repetition_penalty"),
    _f("frequency_penalty", "number", "lowers a token's logit per earlier occurrence", "frequency_penalty"),
    _f("grammar", "object", "{type: json | regex, value: schema | regex}", "guide"),
    _f("truncate", "integer", "keep only the prompt's last that many tokens"),
    _f("return_full_text", "boolean", "the prompt before the generated text"),
    _f("details", "boolean", "tokens, finish reason, seed"),
    _f("decoder_input_details", "boolean", "the prompt's tokens and log-probs (not with /generate_stream)"),
    _f("top_n_tokens", "integer", "alternatives per token", "top_logprobs"),
    _f("best_of", "integer", "only 1", neutral=(None, 1)),
    _f("typical_p", "number", "not supported", neutral=(None, 1, 1.0)),
    _f("watermark", "boolean", "not supported", neutral=(None, False)),
    _f("adapter_id", "string", "not supported", neutral=(None, "")),
]

TOKENIZE = [
    _MODEL,
    _f("prompt", "string", "the text (or messages)"),
    _f("messages", "array", "a chat, rendered with its template"),
    _f("add_special_tokens", "boolean", "the tokens the model adds (BOS); default true"),
    _f("add_generation_prompt", "boolean", "with messages: end with the assistant's turn; default true"),
]

DETOKENIZE = [
    _MODEL,
    _f("tokens", "array", "token ids"),
]


def check_fields(body: dict, table: list[Field], prefix: str = "") -> None:
    """Refuse (400) a field the table does not know, and a not-implemented one at a value other
    than its neutral ones."""
    known = {f.name: f for f in table}
    for name, v in body.items():
        f = known.get(name)
        if f is None:
            near = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ApiError(400, f"Unrecognized request argument supplied: {prefix}{name}{hint}", "unknown_parameter",
                           f"{prefix}{name}")
        if f.neutral is not None and v not in f.neutral and not (f.name == "best_of" and v == body.get("n", 1)):
            raise ApiError(400, f"'{prefix}{name}' is not supported by this server", "unsupported_parameter",
                           f"{prefix}{name}")


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


def _schema_text(v, param: str) -> str:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ApiError(400, f"'{param}' is not valid JSON", "invalid_value", param) from None
    if not isinstance(v, dict):
        raise ApiError(400, f"'{param}' must be a JSON schema (an object)", "invalid_value", param)
    return json.dumps(v)


def openai_guide(body: dict) -> tuple[Guide | None, str | None]:
    """The structured output an OpenAI request asks for (response_format or one guided_* field),
    and the field that asked."""
    asked = []
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        if not isinstance(rf, dict) or rf.get("type") not in ("json_object", "json_schema"):
            raise ApiError(400, "'response_format' must be {'type': 'text' | 'json_object' | 'json_schema'}",
                           "invalid_value", "response_format")
        if rf["type"] == "json_object":
            asked.append((Guide("json_object"), "response_format"))
        else:
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema'", "invalid_value",
                               "response_format")
            asked.append((Guide("json_schema", _schema_text(js["schema"], "response_format.json_schema.schema")),
                          "response_format"))
    if body.get("guided_json") is not None:
        asked.append((Guide("json_schema", _schema_text(body["guided_json"], "guided_json")), "guided_json"))
    if body.get("guided_regex") is not None:
        asked.append((Guide("regex", field(body, "guided_regex", str)), "guided_regex"))
    if body.get("guided_choice") is not None:
        options = body["guided_choice"]
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise ApiError(400, "'guided_choice' must be a non-empty list of non-empty strings", "invalid_value",
                           "guided_choice")
        asked.append((Guide.choice(options), "guided_choice"))
    if len(asked) > 1:
        raise ApiError(400, f"only one structured output format per request, got {', '.join(n for _, n in asked)}",
                       "invalid_value", asked[1][1])
    return asked[0] if asked else (None, None)


def tgi_guide(p: dict) -> Guide | None:
    """TGI's ``grammar``: {type: json, value: a schema} or {type: regex, value: a regex}."""
    g = p.get("grammar")
    if g is None:
        return None
    if not isinstance(g, dict) or g.get("type") not in ("json", "json_object", "regex") or "value" not in g:
        raise ApiError(400, "'parameters.grammar' must be {type: json | regex, value: ...}", "invalid_value",
                       "parameters.grammar")
    if g["type"] == "regex":
        if not isinstance(g["value"], str):
            raise ApiError(400, "a regex grammar's value must be a string", "invalid_value", "parameters.grammar")
        return Guide("regex", g["value"])
    return Guide("json_schema", _schema_text(g["value"], "parameters.grammar.value"))
