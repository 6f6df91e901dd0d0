"""Where the policy-server's generations come from: the embedded engine, or a remote TGI server.

Both backends give the gRPC servicer and the HTTP APIs the same thing for one prompt: a
:class:`Run` whose ``events()`` yield :class:`~rlhf.inference.engine.StreamEvent` (token, text
delta, and on each sample's last event the whole :class:`~rlhf.inference.engine.SampleResult`).

* :class:`LocalBackend` (``backend=local``, the default): the policy versions of the model
  registry on :class:`~rlhf.inference.engine.InferenceEngine`, hot-reloaded on ``rlhf.models.v1``.
  A new version gets a new engine; the old one is retired and finishes the requests that picked
  it, so a reload fails nothing. With ``engine_process`` each engine runs in a child process
  (:class:`~rlhf.inference.process.EngineProcess`, the same surface).
* :class:`TGIBackend` (``backend=tgi``): a Text Generation Inference server (or anything that
  speaks its protocol, such as another policy-server) through the ``text-generation`` client.
  The version is the remote's ``/info`` ``model_sha`` (else ``model_id``), refreshed every few
  seconds. Stop strings are cut here (TGI keeps them in its text); sample ``j`` of a seeded
  request uses seed + j, as locally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import AsyncIterator, Callable, Protocol

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import (ContextLengthError, EngineConfig, EngineRetiredError, Generation, InferenceEngine,
                                   SampleResult, StreamEvent, stream_batches, stream_samples)
from rlhf.inference.process import EngineProcess
from rlhf.inference.text import SampleText, chat_template_kind
from rlhf.serving import GenerationRequest, PolicyEngine

log = logging.getLogger("rlhf.services.policy")


class Run(Protocol):
    version: str
    prompt_token_ids: list[int] | None  # None when the backend does not tell
    first_token_at: float | None  # time.perf_counter() of the first token
    generated: int  # tokens delivered so far, over all samples
    # with GenerationRequest.prompt_logprobs, once the first token came: each prompt token's
    # log-prob (None for the first) and its top alternatives (with top_logprobs)
    prompt_logprobs: list[float | None] | None
    prompt_top: list[list[tuple[int, float]]] | None

    def events(self) -> AsyncIterator[StreamEvent]: ...

    def batches(self) -> AsyncIterator[list[StreamEvent]]: ...

    def cancel(self) -> None: ...

    def not_streaming(self) -> None:
        """Only the finished samples are wanted (no per-token wake-ups)."""

    def token_text(self, token_id: int) -> str: ...

    def is_special(self, token_id: int) -> bool: ...

    def full_text(self, sample: SampleResult) -> str: ...


def observe(metrics, api: str, team: str, runs: list, t0: float) -> None:
    """Time to first token, request duration and prompt tokens of a request (its ``runs``,
    arrived at ``t0``, a time.perf_counter() value) on ``api`` (openai, tgi or grpc)."""
    firsts = [r.first_token_at for r in runs if r.first_token_at is not None]
    if firsts:
        metrics.policy_time_to_first_token_seconds.labels(api, team).observe(min(firsts) - t0)
    metrics.policy_request_duration_seconds.labels(api, team).observe(time.perf_counter() - t0)
    metrics.policy_prompt_tokens_total.labels(api, team).inc(sum(len(r.prompt_token_ids or []) for r in runs))


def used_tokens(runs: list) -> int:
    """Prompt and generated tokens of a request so far (a team's quota counts them)."""
    return sum(len(r.prompt_token_ids or []) + r.generated for r in runs)


def reserved_tokens(prompt_tokens: int, req: GenerationRequest) -> int:
    """The most a prompt of ``prompt_tokens`` may use with ``req``."""
    return prompt_tokens + req.max_new_tokens * max(1, req.n)


def names(prompts: list, where: str) -> list[str]:
    """How errors name each prompt: ``where`` alone for one prompt, else ``where[i]``."""
    return [where] if len(prompts) == 1 else [f"{where}[{i}]" for i in range(len(prompts))]


async def complete(run: Run) -> list[SampleResult]:
    """Every sample of ``run`` in index order (cancelling the await cancels the run)."""
    run.not_streaming()
    out: dict[int, SampleResult] = {}
    async for ev in run.events():
        if ev.sample is not None:
            out[ev.index] = ev.sample
    return [out[i] for i in sorted(out)]


# -- the embedded engine ----------------------------------------------------------------------------


class LocalRun:
    def __init__(self, engine: InferenceEngine, gen: Generation):
        self.engine = engine
        self.gen = gen
        self.version = engine.version
        self.prompt_token_ids = gen.prompt_ids
        self.req_stop = gen.req.stop

    @property
    def first_token_at(self) -> float | None:
        return self.gen.first_token_at

    @property
    def generated(self) -> int:
        return self.gen.generated

    @property
    def prompt_logprobs(self) -> list[float | None] | None:
        return self.gen.prompt_logprobs

    @property
    def prompt_top(self) -> list[list[tuple[int, float]]] | None:
        return self.gen.prompt_top

    def events(self) -> AsyncIterator[StreamEvent]:
        return stream_samples(self.gen)

    def batches(self) -> AsyncIterator[list[StreamEvent]]:
        return stream_batches(self.gen)

    def cancel(self) -> None:
        self.gen.cancel()

    def not_streaming(self) -> None:
        self.gen.wake_per_token = bool(self.req_stop)

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id == self.engine.eos_id or token_id in self.engine.tokenizer.all_special_ids

    def full_text(self, sample: SampleResult) -> str:
        """All the sample's tokens as text (TGI's generated_text keeps a stop string)."""
        return self.engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)


class LocalBackend:
    """The registry's policy versions on the embedded engine, through the services' shared model
    lifecycle (:class:`services.common.ServedModel`: load beside, swap, retire, close)."""

    name = "local"

    def __init__(self, registry, settings, metrics, engine_config: EngineConfig, pinned_version: str = ""):
        from services.common import ServedModel

        self.s = settings
        self.metrics = metrics
        self.cfg = engine_config
        self.model = ServedModel(registry, "policy", self._load, metrics, pinned_version)

    async def start(self, bus, service: str, poll_seconds: float = 0.0) -> None:
        await self.model.start(bus, service, poll_seconds)

    async def stop(self) -> None:
        await self.model.close()

    def _load(self, path, version: str) -> InferenceEngine | EngineProcess:
        """Runs on the watcher's loader thread."""
        if self.s.engine_process:
            return EngineProcess(path, version, self.cfg, self.metrics, max_prompt_tokens=self.s.max_prompt_tokens,
                                 device=self.s.device)
        policy = PolicyEngine(path, version, max_prompt_tokens=self.s.max_prompt_tokens, device=self.s.device)
        return InferenceEngine(policy, self.cfg, self.metrics)

    # serving
    @property
    def engine(self) -> InferenceEngine | EngineProcess | None:
        return self.model.current

    @property
    def version(self) -> str | None:
        return self.model.version

    @property
    def ready(self) -> bool:
        # an engine process that died is closed: health turns 503 until a new version loads
        return self.engine is not None and not self.engine.closed

    def current(self) -> InferenceEngine | EngineProcess:
        return self.model.get()

    @property
    def tokenizer(self):
        return self.current().tokenizer

    def limits(self) -> tuple[int, int]:
        """(max prompt tokens, max prompt + new tokens)."""
        e = self.current()
        return e.max_prompt_tokens, e.max_len

    async def open(self, prompts: list[str], req: GenerationRequest, deadline: float | None = None, *,
                   where: list[str] | None = None, truncate: int | None = None, team: str = "",
                   admit: Callable[[int], object] | None = None) -> list[LocalRun]:
        """Tokenize (a long prompt off the event loop), check and queue each prompt, all on the
        current version's engine, in ``team``'s queue. ``truncate``: keep only each prompt's last
        that many tokens. ``admit(tokens)`` runs after the checks and before the queueing, with
        the most the request may use (prompt + max_new_tokens per sample); it may refuse it by
        raising. ``where``: how errors name each prompt."""
        where = where or names(prompts, "prompt")

        async def on(engine) -> list[LocalRun]:
            ids = [await engine.encode_async(p, w, truncate) for p, w in zip(prompts, where)]
            grammar = await asyncio.to_thread(engine.prepare, req) if req.guide is not None else None
            checked = [engine.check(x, req, w) for x, w in zip(ids, where)]
            if engine is not self.engine:  # a new version came while tokenizing: start again on it
                raise EngineRetiredError(f"version {engine.version} was replaced")
            if admit is not None:
                admit(sum(reserved_tokens(len(x), c) for x, c in zip(ids, checked)))
            runs: list[LocalRun] = []
            try:
                for x, c in zip(ids, checked):  # no await in between: one version answers every prompt
                    runs.append(LocalRun(engine, engine.submit(x, c, deadline, team, grammar)))
            except BaseException:
                for r in runs:
                    r.cancel()
                raise
            return runs

        return await self.model.use(on)

    async def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        e = self.current()
        ids = await e.encode_async(prompt, bounded=False)
        return ids if add_special_tokens else ids[len(e._bos()):]

    def detokenize(self, ids: list[int]) -> str:
        e = self.current()
        bad = [t for t in ids if not 0 <= t < e.vocab_size]
        if bad:
            raise DataError(f"tokens: {bad[0]} is not a token id of this model (0..{e.vocab_size - 1})")
        return e.tokenizer.decode(ids)

    def info(self) -> dict:
        e = self.current()
        return {"model_dtype": e.dtype,
                "model_device_type": e.device.type,
                "chat_template": chat_template_kind(e.tokenizer)}


# -- a remote TGI server ----------------------------------------------------------------------------

_TGI_FINISH = {"eos_token": "eos", "stop_sequence": "stop", "length": "length"}
_TOO_LONG = re.compile(r"(must have less than|must be <=|the limit is|too long|exceeds? the|maximum context length)",
                       re.I)


def _tgi_error(exc: BaseException) -> BaseException:
    """text-generation's exceptions as the library's error types."""
    from text_generation import errors as te

    msg = f"TGI backend: {exc}"
    if isinstance(exc, (te.ValidationError, te.BadRequestError)):
        return ContextLengthError(msg) if _TOO_LONG.search(str(exc)) else DataError(msg)
    if isinstance(exc, (te.OverloadedError, te.RateLimitExceededError)):
        return ResourceExhaustedError(msg)
    if isinstance(exc, asyncio.TimeoutError):
        from rlhf.inference.engine import DeadlineExceededError

        return DeadlineExceededError("deadline exceeded (TGI backend)")
    return UnavailableError(msg)


class TGIRun:
    def __init__(self, backend: "TGIBackend", prompt: str, req: GenerationRequest, deadline: float | None,
                 truncate: int | None = None):
        self.b = backend
        self.truncate = truncate
        self.prompt = prompt
        self.req = req
        self.deadline = deadline
        self.version = backend.version or "unknown"
        self.prompt_token_ids: list[int] | None = None
        self.first_token_at: float | None = None
        self.generated = 0
        self.prompt_logprobs = self.prompt_top = None  # the TGI backend refuses prompt_logprobs
        self._texts: dict[int, str] = {}
        self._special: set[int] = set()
        self._tasks: list[asyncio.Task] = []

    def _params(self, j: int) -> dict:
        r = self.req
        sampling = r.temperature > 0
        p = dict(max_new_tokens=r.max_new_tokens, do_sample=sampling,
                 stop_sequences=list(r.stop) or None,
                 seed=(r.seed + j) % (2 ** 63) if r.seed is not None else None,
                 top_n_tokens=r.top_logprobs or None, truncate=self.truncate)
        if sampling:
            p.update(temperature=r.temperature if r.temperature != 1.0 else None,
                     top_k=r.top_k or None, top_p=r.top_p if r.top_p < 1.0 else None)
        if r.repetition_penalty != 1.0:
            p["repetition_penalty"] = r.repetition_penalty
        if r.frequency_penalty != 0.0:
            p["frequency_penalty"] = r.frequency_penalty
        if r.guide is not None:
            from text_generation.types import Grammar, GrammarType

            g = r.guide
            if g.kind in ("json_schema", "json_object"):
                schema = json.loads(g.spec) if g.spec else {"type": "object"}
                p["grammar"] = Grammar(type=GrammarType.Json, value=schema)
            else:
                p["grammar"] = Grammar(type=GrammarType.Regex, value=g.regex())
        return p

    def _timeout(self) -> float | None:
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def token_text(self, token_id: int) -> str:
        return self._texts.get(token_id, "")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def full_text(self, sample: SampleResult) -> str:
        return "".join(self._texts.get(t, "") for t in sample.token_ids if t not in self._special)

    async def _one(self, j: int, out: asyncio.Queue) -> None:
        """Sample ``j``: its stream responses onto ``out`` as (j, response), then (j, None); an
        error as (-1, exception)."""
        try:
            async with asyncio.timeout(self._timeout()):
                async for resp in self.b.client().generate_stream(self.prompt, **self._params(j)):
                    await out.put((j, resp))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await out.put((-1, e))
        else:
            await out.put((j, None))

    async def events(self) -> AsyncIterator[StreamEvent]:
        n = max(1, self.req.n)
        q: asyncio.Queue = asyncio.Queue()
        texts = [SampleText(None, self.req.stop) for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list] = [[] for _ in range(n)]
        done: set[int] = set()
        tasks = [asyncio.create_task(self._one(j, q)) for j in range(n)]
        self._tasks = tasks
        try:
            while len(done) < n:
                j, resp = await q.get()
                if j < 0:
                    raise _tgi_error(resp) from resp
                if j in done:
                    continue
                st = texts[j]
                if resp is None:  # the stream ended without its final message
                    done.add(j)
                    sample = SampleResult(j, st.text + st.finish(), ids[j], lps[j],
                                          tops[j] if self.req.top_logprobs else None, "length")
                    yield StreamEvent(j, -1, 0.0, None, "", "length", sample)
                    continue
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.generated += 1
                tok = resp.token
                self._texts.setdefault(tok.id, tok.text)
                if tok.special:
                    self._special.add(tok.id)
                top = None
                if resp.top_tokens:
                    top = [(t.id, t.logprob) for t in resp.top_tokens]
                    for t in resp.top_tokens:
                        self._texts.setdefault(t.id, t.text)
                ids[j].append(tok.id)
                lps[j].append(tok.logprob if tok.logprob is not None else 0.0)
                if self.req.top_logprobs:
                    tops[j].append(top or [])
                fin = None
                delta = "" if tok.special else st.add_text(tok.text)
                if not st.stopped and resp.details is not None:
                    reason = getattr(resp.details.finish_reason, "value", resp.details.finish_reason)
                    fin = _TGI_FINISH.get(str(reason), "length")
                    delta += st.finish()
                if st.stopped:
                    fin = "stop"
                    tasks[j].cancel()  # the remote would go on otherwise
                    ids[j], lps[j] = ids[j][:st.n_kept], lps[j][:st.n_kept]
                    if self.req.top_logprobs:
                        tops[j] = tops[j][:st.n_kept]
                sample = None
                if fin is not None:
                    done.add(j)
                    sample = SampleResult(j, st.text, ids[j], lps[j], tops[j] if self.req.top_logprobs else None, fin)
                yield StreamEvent(j, tok.id, lps[j][-1], top, delta, fin, sample)
        finally:
            for t in tasks:
                t.cancel()

    async def batches(self) -> AsyncIterator[list[StreamEvent]]:
        events = self.events()
        try:
            async for ev in events:
                yield [ev]
        finally:
            await events.aclose()

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()

    def not_streaming(self) -> None:
        pass


class TGIBackend:
    name = "tgi"

    def __init__(self, url: str, settings, metrics, api_key: str = "", info_interval: float = 5.0):
        self.url = url.rstrip("/")
        self.s = settings
        self.metrics = metrics
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.info_interval = info_interval
        self._info: dict | None = None
        self._task: asyncio.Task | None = None

    def client(self):
        from text_generation import AsyncClient

        return AsyncClient(self.url, headers=self.headers, timeout=int(max(1, self.s.request_timeout_seconds)))

    async def _fetch_info(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=5.0) as c:
            r = await c.get(f"{self.url}/info", headers=self.headers)
            r.raise_for_status()
            info = r.json()
        if self._info is None or info.get("model_sha") != self._info.get("model_sha"):
            log.info("TGI backend version", extra={"fields": {"version": info.get("model_sha") or info.get("model_id")}})
        self._info = info

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.info_interval)
            try:
                await self._fetch_info()
            except Exception as e:  # noqa: BLE001 - keep the last known answer
                log.warning("TGI backend /info failed", extra={"fields": {"error": type(e).__name__}})

    async def start(self, bus=None, service: str = "", poll_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                await self._fetch_info()
                break
            except Exception as e:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise UnavailableError(f"TGI backend {self.url}: /info not answering ({type(e).__name__})") from None
                await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._refresh())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def version(self) -> str | None:
        if self._info is None:
            return None
        return str(self._info.get("model_sha") or self._info.get("model_id") or "unknown")

    @property
    def ready(self) -> bool:
        return self._info is not None

    @property
    def tokenizer(self):
        return None  # prompts are counted by the remote; chat uses the fallback template

    def limits(self) -> tuple[int, int]:
        i = self._info or {}
        total = int(i.get("max_total_tokens") or 0)
        return int(i.get("max_input_tokens") or i.get("max_input_length") or 0), total

    # what a TGI server does not do (GenerationRequest field -> its neutral value)
    UNSUPPORTED = {"presence_penalty": 0.0, "min_p": 0.0, "stop_token_ids": (), "ignore_eos": False,
                   "prompt_logprobs": False, "logprobs_of": "model"}

    async def open(self, prompts: list[str], req: GenerationRequest, deadline: float | None = None, *,
                   where: list[str] | None = None, truncate: int | None = None, team: str = "",
                   admit: Callable[[int], object] | None = None) -> list[TGIRun]:
        """As :meth:`LocalBackend.open`; the remote counts the prompt's tokens, so ``admit`` gets
        an estimate of them (a token per 4 bytes)."""
        if self._info is None:
            raise UnavailableError("the TGI backend has not answered yet")
        for name, neutral in self.UNSUPPORTED.items():
            if getattr(req, name) != neutral:
                raise DataError(f"{name} is not available with the TGI backend")
        for p, w in zip(prompts, where or names(prompts, "prompt")):
            if not p:
                raise DataError(f"{w} is empty")
        if admit is not None:
            admit(sum(reserved_tokens(len(p.encode()) // 4, req) for p in prompts))
        return [TGIRun(self, p, req, deadline, truncate) for p in prompts]

    async def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        raise DataError("tokenizing is not available with the TGI backend")

    def detokenize(self, ids: list[int]) -> str:
        raise DataError("detokenizing is not available with the TGI backend")

    def info(self) -> dict:
        i = self._info or {}
        return {"model_dtype": i.get("model_dtype", "unknown"), "model_device_type": i.get("model_device_type", "unknown"),
                "chat_template": chat_template_kind(self.tokenizer)}
