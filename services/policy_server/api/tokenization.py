"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): a text (or a chat) as the model's
token ids, and token ids as text."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from services.policy_server.api.base import ApiServer, Ctx
from services.policy_server.api.errors import ApiError, json_response
from services.policy_server.api.fields import DETOKENIZE, TOKENIZE, check_fields, field
from services.policy_server.api.openai_chat import messages, render


class Tokenization:
    def __init__(self, api: ApiServer):
        self.api = api

    async def tokenize(self, request: Request, ctx: Ctx) -> Response:
        api = self.api
        body = await api.body(request)
        check_fields(body, TOKENIZE)
        api.check_model(body.get("model"))
        if ("prompt" in body) == ("messages" in body):
            raise ApiError(400, "give 'prompt' or 'messages'", "invalid_value", "prompt")
        if "messages" in body:
            text, _ = render(body, messages(body), api.backend.tokenizer)
        else:
            text = field(body, "prompt", str, "")
        ids = await api.backend.tokenize(text, field(body, "add_special_tokens", bool, True))
        return json_response({"count": len(ids), "max_model_len": api.backend.limits()[1], "tokens": ids},
                             headers=api.version_headers(api.backend.version))

    async def detokenize(self, request: Request, ctx: Ctx) -> Response:
        api = self.api
        body = await api.body(request)
        check_fields(body, DETOKENIZE)
        api.check_model(body.get("model"))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "'tokens' must be a list of token ids", "invalid_value", "tokens")
        return json_response({"prompt": api.backend.detokenize(ids)}, headers=api.version_headers(api.backend.version))
