"""The TGI dialect: ``POST /generate``, ``/generate_stream``, ``/`` (the client's compatibility
route), ``GET /info`` and ``/health``, in Text Generation Inference's request and answer shapes.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response

from rlhf.inference.engine import SampleResult, StreamEvent
from rlhf.inference.requests import MAX_STOP_STRINGS, build_request
from rlhf.serving import GenerationRequest
from services.policy_server.api.base import ApiServer, Ctx
from services.policy_server.api.errors import TGI, ApiError, dumps, error_body, json_response
from services.policy_server.api.fields import TGI as TGI_FIELDS
from services.policy_server.api.fields import TGI_PARAMETERS, check_fields, field, stop_list, tgi_guide
from services.policy_server.api.streaming import event_stream

PRE = "parameters."
# TGI's names for GenerationRequest's fields (in error messages)
NAMES = {k: PRE + k for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "repetition_penalty",
                               "frequency_penalty")}
NAMES.update(top_logprobs=PRE + "top_n_tokens", guide=PRE + "grammar")
FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}


class TGIDialect:
    def __init__(self, api: ApiServer):
        self.api = api
        self.s = api.s

    def request(self, body: dict, stream: bool) -> tuple[str, GenerationRequest, dict]:
        check_fields(body, TGI_FIELDS)
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise ApiError(400, "`inputs` must be a non-empty string", "invalid_value", "inputs")
        p = body.get("parameters") or {}
        if not isinstance(p, dict):
            raise ApiError(400, "`parameters` must be an object", "invalid_value", "parameters")
        check_fields(p, TGI_PARAMETERS, PRE)
        decoder_input_details = field(p, "decoder_input_details", bool, False, prefix=PRE)
        if stream and decoder_input_details:
            raise ApiError(400, "`decoder_input_details` == true is not supported when streaming tokens",
                           "invalid_value", PRE + "decoder_input_details")
        temperature, top_k, top_p = p.get("temperature"), p.get("top_k"), p.get("top_p")
        do_sample = field(p, "do_sample", bool, False, prefix=PRE)
        # TGI samples when asked to, or when any warper is set
        sampling = do_sample or (temperature not in (None, 1.0)) or bool(top_k) or (top_p not in (None, 1.0))
        seed = p.get("seed")
        if sampling and seed is None:
            seed = secrets.randbits(63)  # as TGI: a sampled answer reports the seed it used
        values = {"max_new_tokens": p.get("max_new_tokens"),
                  "temperature": temperature if temperature is not None else 1.0,
                  "top_k": top_k, "top_p": top_p, "seed": seed, "stop": stop_list(p.get("stop")),
                  "repetition_penalty": p.get("repetition_penalty"), "frequency_penalty": p.get("frequency_penalty"),
                  "guide": tgi_guide(p), "top_logprobs": p.get("top_n_tokens"), "return_logprobs": True,
                  "prompt_logprobs": decoder_input_details}
        req = build_request(values, self.api.limits_top_n, default_max_new_tokens=self.s.max_new_tokens_default,
                            names=NAMES)
        if not sampling:
            req = replace(req, temperature=0.0, seed=None)
        flags = {"details": field(p, "details", bool, False, prefix=PRE),
                 "decoder_input_details": decoder_input_details,
                 "return_full_text": field(p, "return_full_text", bool, False, prefix=PRE),
                 "seed": req.seed,
                 "truncate": field(p, "truncate", int, None, check=lambda v: v > 0, must="an integer > 0", prefix=PRE),
                 "top_n": req.top_logprobs}
        return inputs, req, flags

    @staticmethod
    def token(run, token_id: int, logprob: float) -> dict:
        return {"id": token_id, "text": run.token_text(token_id), "logprob": logprob, "special": run.is_special(token_id)}

    def response(self, run, s: SampleResult, inputs: str, f: dict) -> dict:
        text = run.full_text(s)
        out = {"generated_text": (inputs + text) if f["return_full_text"] else text}
        if f["details"] or f["decoder_input_details"]:
            prefill = []
            if f["decoder_input_details"]:
                lps = run.prompt_logprobs or []
                prefill = [{"id": t, "text": run.token_text(t), "logprob": lps[j] if j < len(lps) else None}
                           for j, t in enumerate(run.prompt_token_ids or [])]
            d = {"finish_reason": FINISH[s.finish_reason], "generated_tokens": len(s.token_ids),
                 "seed": f["seed"], "prefill": prefill,
                 "tokens": [self.token(run, t, lp) for t, lp in zip(s.token_ids, s.logprobs)]}
            if f["top_n"] and s.top_logprobs is not None:
                d["top_tokens"] = [[self.token(run, i, lp) for i, lp in alts] for alts in s.top_logprobs]
            out["details"] = d
        return out

    async def _one(self, request: Request, ctx: Ctx, body: dict | None, stream: bool):
        body = body if body is not None else await self.api.body(request)
        inputs, req, flags = self.request(body, stream)
        (run,) = await self.api.open([inputs], req, ctx, flags["truncate"], where="inputs")
        self.api.opt_in(request, [inputs], None, ctx.team)
        return inputs, run, flags

    async def generate(self, request: Request, ctx: Ctx, body: dict | None = None, as_list: bool = False) -> Response:
        inputs, run, flags = await self._one(request, ctx, body, stream=False)
        ((s,),) = await self.api.complete_all([run], ctx)
        self.api.observe(TGI, ctx)
        out = self.response(run, s, inputs, flags)
        return json_response([out] if as_list else out, headers=self.api.version_headers(run.version))

    async def generate_stream(self, request: Request, ctx: Ctx, body: dict | None = None) -> Response:
        inputs, run, flags = await self._one(request, ctx, body, stream=True)
        count = [0]

        def fmt(_: int, ev: StreamEvent) -> bytes:
            tok = self.token(run, ev.token_id, ev.logprob)
            ev_out = {"index": count[0], "token": tok, "top_tokens": None, "generated_text": None, "details": None}
            count[0] += 1
            if flags["top_n"] and ev.top:
                ev_out["top_tokens"] = [self.token(run, i, lp) for i, lp in ev.top]
            if ev.sample is not None:
                text = run.full_text(ev.sample)
                ev_out["generated_text"] = (inputs + text) if flags["return_full_text"] else text
                ev_out["details"] = {"finish_reason": FINISH[ev.sample.finish_reason],
                                     "generated_tokens": len(ev.sample.token_ids), "seed": flags["seed"],
                                     "input_length": len(run.prompt_token_ids or [])}
            return b"data:" + dumps(ev_out) + b"\n\n"

        return await event_stream(self.api, [run], ctx, TGI, fmt, list,
                                  lambda e: b"data:" + dumps(error_body(TGI, e)) + b"\n\n")

    async def compat(self, request: Request, ctx: Ctx) -> Response:
        """TGI's ``POST /``: a stream when ``stream`` is true, else a list of one answer."""
        body = await self.api.body(request)
        if field(body, "stream", bool, False):
            return await self.generate_stream(request, ctx, body)
        return await self.generate(request, ctx, body, as_list=True)

    async def info(self, request: Request, ctx: Ctx) -> Response:
        api = self.api
        v = api.backend.version
        if v is None:
            raise ApiError(503, "no policy version loaded yet", "unavailable")
        max_prompt, max_total = api.backend.limits()
        info = {"model_id": api.model_name, "model_sha": v, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self.s.max_batch_prompts + self.s.max_waiting_samples,
                "max_best_of": 1, "max_stop_sequences": MAX_STOP_STRINGS, "max_input_tokens": max_prompt,
                "max_input_length": max_prompt, "max_total_tokens": max_total, "validation_workers": 1,
                "max_client_batch_size": 1, "router": "rlhf-policy-server", "version": "0.1.0", "sha": None,
                "docker_label": None, "backend": api.backend.name, **api.backend.info()}
        return json_response(info, headers=api.version_headers(v))

    async def health(self, request: Request, ctx: Ctx) -> Response:
        if self.api.draining:
            raise ApiError(503, "the server is shutting down", "draining")
        if not self.api.backend.ready:
            raise ApiError(503, "no policy version is being served", "unavailable")
        return Response(b"", status_code=200, headers=self.api.version_headers(self.api.backend.version))
