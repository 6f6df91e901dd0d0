"""What the OpenAI routes share: the sampling fields of a request, the answer's envelope, usage,
log-probs, and ``GET /v1/models``.

Every answer names the policy version that produced it: ``model`` = ``<model_name>@<version>``,
``system_fingerprint`` = the version, and the ``X-Policy-Version`` header.
"""

from __future__ import annotations

import time
from typing import Callable

from starlette.requests import Request
from starlette.responses import Response

from rlhf.inference.requests import build_request
from rlhf.serving import GenerationRequest
from services.policy_server.api.base import ApiServer, Ctx
from services.policy_server.api.errors import OPENAI, ApiError, dumps, error_body, json_response
from services.policy_server.api.fields import CHAT, COMPLETIONS, check_fields, field, openai_guide, stop_list

# OpenAI's names for GenerationRequest's fields (in error messages)
NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class OpenAIDialect:
    def __init__(self, api: ApiServer):
        self.api = api
        self.s = api.s

    def sampling(self, body: dict, chat: bool, prompt_logprobs: bool = False) -> tuple[GenerationRequest, int]:
        """The sampling settings of an OpenAI request (its fields checked against the route's
        table first), and how many top log-probs it wants (-1: no log-probs)."""
        check_fields(body, CHAT if chat else COMPLETIONS)
        names = dict(NAMES)
        max_tokens = body.get("max_tokens")
        if chat and body.get("max_completion_tokens") is not None:
            max_tokens = body["max_completion_tokens"]
            names["max_new_tokens"] = "max_completion_tokens"
        if chat:
            want = field(body, "logprobs", bool, False)
            k = body.get("top_logprobs")
            names["top_logprobs"] = "top_logprobs"
            if k and not want:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
            top = (k or 0) if want else None
        else:
            top = body.get("logprobs")
            names["top_logprobs"] = "logprobs"
        guide, guide_field = openai_guide(body)
        names["guide"] = guide_field or "response_format"
        top_k = body.get("top_k")
        values = {"n": body.get("n"), "max_new_tokens": max_tokens, "min_new_tokens": body.get("min_tokens"),
                  "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                  "top_k": 0 if top_k == -1 else top_k,  # -1: off, as in vLLM
                  "min_p": body.get("min_p"), "seed": body.get("seed"), "stop": stop_list(body.get("stop")),
                  "stop_token_ids": body.get("stop_token_ids"), "ignore_eos": body.get("ignore_eos"),
                  "repetition_penalty": body.get("repetition_penalty"),
                  "frequency_penalty": body.get("frequency_penalty"), "presence_penalty": body.get("presence_penalty"),
                  "guide": guide, "top_logprobs": top, "return_logprobs": top is not None,
                  "prompt_logprobs": prompt_logprobs and top is not None}
        default = self.s.max_new_tokens_default if chat else 16  # OpenAI's legacy completions default to 16
        limits = self.api.limits if chat else self.api.limits_top_n
        req = build_request(values, limits, default_max_new_tokens=default, names=names)
        return req, (-1 if top is None else req.top_logprobs)

    @staticmethod
    def stream_flags(body: dict) -> tuple[bool, bool]:
        stream = field(body, "stream", bool, False)
        opts = field(body, "stream_options", dict, None)
        if opts is not None and not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.", "invalid_value",
                           "stream_options")
        return stream, bool(stream and (opts or {}).get("include_usage"))

    def base(self, kind: str, version: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": f"{self.api.model_name}@{version}",
                "system_fingerprint": version}

    def chunk_head(self, kind: str, rid: str, first_key: bytes) -> Callable[[str], bytes]:
        """``data: {...,"choices":[{<first_key>`` for the stream's common chunks, per version: the
        per-token part is then written on its own (one json.dumps of the text, not of the chunk)."""
        cache: dict[str, bytes] = {}

        def head(version: str) -> bytes:
            h = cache.get(version)
            if h is None:
                h = cache[version] = b"data: " + dumps(self.base(kind, version, rid))[:-1] + b',"choices":[{' + first_key
            return h

        return head

    def usage_chunk(self, kind: str, version: str, rid: str, usage: dict) -> bytes:
        c = self.base(kind, version, rid)
        c["choices"], c["usage"] = [], usage
        return b"data: " + dumps(c) + b"\n\n"

    @staticmethod
    def usage(runs, samples_per_run) -> dict:
        p = sum(len(r.prompt_token_ids or []) for r in runs)
        c = sum(len(s.token_ids) for ss in samples_per_run for s in ss)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def text_tokens(run, ids: list[int]) -> list[int]:
        return [t for t in ids if not run.is_special(t)]

    @staticmethod
    def finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    @staticmethod
    def stream_error(e: ApiError) -> bytes:
        return b"data: " + dumps(error_body(OPENAI, e)) + b"\n\n"

    def _model_cards(self) -> list[dict]:
        v = self.api.backend.version
        if v is None:
            raise ApiError(503, "no policy version loaded yet", "unavailable")
        created = int(time.time())
        return [{"id": i, "object": "model", "created": created, "owned_by": "rlhf-platform", "version": v,
                 "max_model_len": self.api.backend.limits()[1],
                 # which chat template /v1/chat/completions applies: the model's own, or the fallback lines
                 "chat_template": self.api.backend.info().get("chat_template", "fallback")}
                for i in (self.api.model_name, f"{self.api.model_name}@{v}")]

    async def models(self, request: Request, ctx: Ctx) -> Response:
        cards = self._model_cards()
        return json_response({"object": "list", "data": cards}, headers=self.api.version_headers(cards[0]["version"]))

    async def model(self, request: Request, ctx: Ctx) -> Response:
        """``GET /v1/models/{id}``: one of the names the model answers to."""
        cards = self._model_cards()
        want = request.path_params["model_id"]
        for c in cards:
            if c["id"] == want:
                return json_response(c, headers=self.api.version_headers(c["version"]))
        self.api.check_model(want)  # the version alone is a name too
        return json_response(cards[1], headers=self.api.version_headers(cards[1]["version"]))
