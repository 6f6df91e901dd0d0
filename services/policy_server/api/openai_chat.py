"""``POST /v1/chat/completions``: OpenAI's chat completions, plain and streamed.

A model whose tokenizer has a chat template is prompted with it (or with the request's
``chat_template``); others with the fallback of :func:`rlhf.inference.text.render_chat` (whose
stop strings are added to the request's).
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from rlhf.inference.engine import SampleResult, StreamEvent
from rlhf.inference.text import ChatMessage, render_chat
from services.policy_server.api.base import Ctx
from services.policy_server.api.errors import OPENAI, ApiError, dumps, json_response
from services.policy_server.api.fields import field
from services.policy_server.api.openai_common import OpenAIDialect
from services.policy_server.api.streaming import event_stream

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def messages(body: dict) -> list[ChatMessage]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_value", f"messages[{i}]")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
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


def render(body: dict, msgs: list[ChatMessage], tokenizer) -> tuple[str, tuple[str, ...]]:
    """The prompt of a chat request, with its template options."""
    return render_chat(msgs, tokenizer, template=field(body, "chat_template", str, None),
                       add_generation_prompt=field(body, "add_generation_prompt", bool, True),
                       continue_final_message=field(body, "continue_final_message", bool, False))


class Chat(OpenAIDialect):
    def logprobs(self, run, ids, lps, tops, k: int) -> dict:
        content = []
        for j, t in enumerate(ids):
            text = run.token_text(t)
            alts = [{"token": run.token_text(i), "logprob": lp, "bytes": list(run.token_text(i).encode())}
                    for i, lp in (tops[j] if (k and tops is not None and j < len(tops)) else [])]
            content.append({"token": text, "logprob": lps[j], "bytes": list(text.encode()), "top_logprobs": alts})
        return {"content": content, "refusal": None}

    async def create(self, request: Request, ctx: Ctx) -> Response:
        api = self.api
        body = await api.body(request)
        api.check_model(body.get("model"))
        msgs = messages(body)
        req, k = self.sampling(body, chat=True)
        prompt, template_stop = render(body, msgs, api.backend.tokenizer)
        if template_stop:
            req = replace(req, stop=tuple(dict.fromkeys(req.stop + template_stop)))
        stream, usage_chunk = self.stream_flags(body)
        user = field(body, "user", str, None)
        runs = await api.open([prompt], req, ctx, where="the messages")
        api.opt_in(request, [m.content for m in msgs if m.role == "user"][-1:], user, ctx.team)
        run = runs[0]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return await self._stream(run, req, k, usage_chunk, rid, ctx)
        (samples,) = await api.complete_all(runs, ctx)
        api.observe(OPENAI, ctx)
        out = self.base("chat.completion", run.version, rid)
        out["choices"] = [{
            "index": s.index,
            "message": {"role": "assistant", "content": s.text, "refusal": None},
            "logprobs": self.logprobs(run, self.text_tokens(run, s.token_ids), s.logprobs, s.top_logprobs, k)
            if req.return_logprobs else None,
            "finish_reason": self.finish(s.finish_reason)} for s in samples]
        out["usage"] = self.usage(runs, [samples])
        return json_response(out, headers=api.version_headers(run.version))

    async def _stream(self, run, req, k: int, usage_chunk: bool, rid: str, ctx: Ctx):
        started: set[int] = set()
        ended: list[SampleResult] = []
        heads = self.chunk_head("chat.completion.chunk", rid, b'"index":')

        def chunk(index: int, delta: dict, lp=None, finish=None) -> bytes:
            c = self.base("chat.completion.chunk", run.version, rid)
            c["choices"] = [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]
            return b"data: " + dumps(c) + b"\n\n"

        def fmt(_: int, ev: StreamEvent) -> bytes:
            out = b""
            if ev.index not in started:
                started.add(ev.index)
                out += chunk(ev.index, {"role": "assistant", "content": ""})
            lp = None
            if req.return_logprobs and not run.is_special(ev.token_id):
                lp = self.logprobs(run, [ev.token_id], [ev.logprob], [ev.top or []], k)
            if ev.sample is not None:
                ended.append(ev.sample)
            if ev.text and lp is None:
                out += (heads(run.version) + b'%d,"delta":{"content":' % ev.index + dumps(ev.text)
                        + b'},"logprobs":null,"finish_reason":null}]}\n\n')
            elif ev.text or lp is not None:
                out += chunk(ev.index, {"content": ev.text}, lp)
            if ev.finish_reason is not None:
                out += chunk(ev.index, {}, None, self.finish(ev.finish_reason))
            return out

        def tail() -> list[bytes]:
            out = []
            if usage_chunk:
                out.append(self.usage_chunk("chat.completion.chunk", run.version, rid, self.usage([run], [ended])))
            return out + [b"data: [DONE]\n\n"]

        return await event_stream(self.api, [run], ctx, OPENAI, fmt, tail, self.stream_error)
