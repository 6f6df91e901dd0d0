"""``POST /v1/completions``: OpenAI's (legacy) completions, plain and streamed.

With ``echo`` and ``logprobs``, the log-probs start with the prompt's tokens (each given the ones
before it; the first has none), as OpenAI's legacy API scores a given text.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from rlhf.inference.engine import SampleResult, StreamEvent
from services.policy_server.api.base import Ctx
from services.policy_server.api.errors import OPENAI, ApiError, dumps, json_response
from services.policy_server.api.fields import field
from services.policy_server.api.openai_common import OpenAIDialect
from services.policy_server.api.streaming import event_stream


class Completions(OpenAIDialect):
    @staticmethod
    def logprobs(run, ids, lps, tops, offset: int, k: int) -> dict:
        tokens = [run.token_text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        out = {"tokens": tokens, "token_logprobs": lps[:len(ids)], "text_offset": offsets, "top_logprobs": None}
        if k and tops is not None:
            out["top_logprobs"] = [None if alts is None else {run.token_text(i): lp for i, lp in alts}
                                   for alts in tops[:len(ids)]]
        return out

    @staticmethod
    def prompt_part(run, k: int) -> tuple[list[int], list, list | None]:
        """The prompt's text tokens (without the BOS the model adds), their log-probs (None for
        the first token of all) and alternatives."""
        ids, lps = run.prompt_token_ids or [], run.prompt_logprobs or []
        tops = run.prompt_top if k else None
        keep = [j for j, t in enumerate(ids) if not run.is_special(t)]
        return ([ids[j] for j in keep], [lps[j] if j < len(lps) else None for j in keep],
                [tops[j] if j > 0 else None for j in keep] if tops is not None else None)

    def echo_logprobs(self, run, k: int) -> dict:
        ids, lps, tops = self.prompt_part(run, k)
        return self.logprobs(run, ids, lps, tops, 0, k)

    @staticmethod
    def joined(a: dict, b: dict) -> dict:
        """Log-probs ``a`` then ``b`` (the prompt's, then the sample's)."""
        out = {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "text_offset")}
        out["top_logprobs"] = (a["top_logprobs"] or []) + (b["top_logprobs"] or []) if b["top_logprobs"] is not None \
            else None
        return out

    async def create(self, request: Request, ctx: Ctx) -> Response:
        api = self.api
        body = await api.body(request)
        api.check_model(body.get("model"))
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a non-empty string or list of strings (token ids are not "
                                "supported)", "invalid_value", "prompt")
        if len(prompts) > self.s.max_prompts_per_request:
            raise ApiError(400, f"at most {self.s.max_prompts_per_request} prompts per request", "invalid_value", "prompt")
        echo = field(body, "echo", bool, False)
        req, k = self.sampling(body, chat=False, prompt_logprobs=echo)
        stream, usage_chunk = self.stream_flags(body)
        user = field(body, "user", str, None)
        runs = await api.open(prompts, req, ctx)
        api.opt_in(request, prompts, user, ctx.team)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if stream:
            return await self._stream(runs, prompts, req, k, echo, usage_chunk, rid, ctx)
        results = await api.complete_all(runs, ctx)
        api.observe(OPENAI, ctx)
        out = self.base("text_completion", runs[0].version, rid)
        choices = []
        for p, (run, samples) in enumerate(zip(runs, results)):
            for s in samples:
                lp = None
                if req.return_logprobs:
                    ids = self.text_tokens(run, s.token_ids)
                    lp = self.logprobs(run, ids, s.logprobs, s.top_logprobs, len(prompts[p]) if echo else 0, k)
                    if echo:
                        lp = self.joined(self.echo_logprobs(run, k), lp)
                choices.append({"text": (prompts[p] if echo else "") + s.text, "index": p * req.n + s.index,
                                "logprobs": lp, "finish_reason": self.finish(s.finish_reason)})
        out["choices"] = choices
        out["usage"] = self.usage(runs, results)
        return json_response(out, headers=api.version_headers(runs[0].version))

    async def _stream(self, runs, prompts, req, k: int, echo: bool, usage_chunk: bool, rid: str, ctx: Ctx):
        n = req.n
        offsets = [[len(prompts[p]) if echo else 0] * n for p in range(len(prompts))]
        sent_echo: set[int] = set()
        sent_echo_lp: set[int] = set()
        ended: list[list[SampleResult]] = [[] for _ in runs]
        heads = self.chunk_head("text_completion", rid, b'"text":')

        def fmt(p: int, ev: StreamEvent) -> bytes:
            run = runs[p]
            idx = p * n + ev.index
            text = ev.text
            if echo and idx not in sent_echo:
                sent_echo.add(idx)
                text = prompts[p] + text
            lp = None
            if req.return_logprobs and not run.is_special(ev.token_id):
                lp = self.logprobs(run, [ev.token_id], [ev.logprob], [ev.top or []], offsets[p][ev.index], k)
                offsets[p][ev.index] += len(lp["tokens"][0])
            if req.return_logprobs and echo and idx not in sent_echo_lp:  # the prompt's, first
                sent_echo_lp.add(idx)
                empty = {"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": [] if k else None}
                lp = self.joined(self.echo_logprobs(run, k), lp or empty)
            if ev.sample is not None:
                ended[p].append(ev.sample)
            if lp is None and ev.finish_reason is None:
                if not text:
                    return b""
                return heads(run.version) + dumps(text) + b',"index":%d,"logprobs":null,"finish_reason":null}]}\n\n' % idx
            chunk = self.base("text_completion", run.version, rid)
            chunk["choices"] = [{"text": text, "index": idx, "logprobs": lp,
                                 "finish_reason": self.finish(ev.finish_reason) if ev.finish_reason else None}]
            return b"data: " + dumps(chunk) + b"\n\n"

        def tail() -> list[bytes]:
            out = []
            if usage_chunk:
                out.append(self.usage_chunk("text_completion", runs[0].version, rid, self.usage(runs, ended)))
            return out + [b"data: [DONE]\n\n"]

        return await event_stream(self.api, runs, ctx, OPENAI, fmt, tail, self.stream_error)
