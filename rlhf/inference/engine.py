"""The inference engine behind the policy-server's gRPC and HTTP APIs: continuous batching.

Requests from every caller share one running batch. A worker thread (model work never runs on
the event loop) repeats one *iteration*:

1. drop the rows whose caller went away (cancelled, a stop string matched) or whose deadline
   passed; admit waiting requests while rows are free (a request with ``n`` samples takes ``n``
   rows; its prompt is prefilled once and its keys/values copied to the other ``n - 1`` rows);
2. prefill the admitted prompts (right-padded, one forward pass) and choose each new row's first
   token;
3. one decode step for every running row (one token each, KV cache, each row with its own
   sampling settings: temperature / top-k / top-p / min-p / penalties / structured output / seed /
   min_new_tokens), then retire the rows that ended (EOS or a stop token, ``max_new_tokens``, or
   the end of the row's cache).

So a request joins the running batch at the next iteration instead of waiting for the batch to
finish, and the batch stays full while requests come and go. Tokens go back to the callers once
per iteration (one ``call_soon_threadsafe`` for all of them). The queue of waiting requests is
bounded (beyond ``max_queue`` waiting samples :meth:`InferenceEngine.submit` raises
ResourceExhaustedError at once) and fair between teams (:mod:`rlhf.inference.queue`); each
request may carry a deadline.

Prompts are tokenized off the event loop when they are long (:meth:`EngineFront.encode_async`,
on a thread, through the Rust tokenizer's call that releases the interpreter lock), after a
bound on their bytes that refuses an oversized prompt without tokenizing it.

An engine serves one model version. A new version gets a new engine; the old one is *retired*:
it finishes what it runs and has queued, then its thread ends (requests that picked it finish
on it). The forward passes are in :mod:`rlhf.inference.runners`, the token choice in
:mod:`rlhf.inference.sampling`, tokens -> text in :mod:`rlhf.inference.text`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, NamedTuple

import torch

from rlhf.errors import DataError, ResourceExhaustedError, UnavailableError
from rlhf.inference.runners import make_runner
from rlhf.inference.guided import Grammars
from rlhf.inference.queue import FairQueue
from rlhf.inference.sampling import BatchParams, PenaltyState, choose
from rlhf.inference.text import SampleText, fast_codec
from rlhf.runtime.threads import use_model_threads
from rlhf.serving import GenerationRequest, PolicyEngine

log = logging.getLogger("rlhf.inference")

LONG_PROMPT_CHARS = 2048  # longer prompts are tokenized on a thread, off the event loop


class ContextLengthError(DataError):
    """The prompt, or the prompt with the tokens asked for, does not fit the model's context or
    the server's prompt limit (OpenAI's and vLLM's 400 ``context_length_exceeded``)."""


class PromptTooLongError(ContextLengthError):
    """The prompt alone exceeds the server's prompt limit."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it finished."""


class EngineRetiredError(UnavailableError):
    """The engine stopped taking requests (a newer version replaced it, or the server stops)."""


@dataclass
class EngineConfig:
    """How the engine batches (the policy-server's settings fill it)."""

    max_batch_size: int = 64  # rows decoded together (a request with n samples takes n rows)
    max_queue: int = 256  # samples waiting for a row; beyond that submit() raises ResourceExhaustedError
    max_prefill_tokens: int = 4096  # prompt tokens prefilled between two decode steps (bounds the pause)
    max_seq_len: int = 1024  # prompt + response positions per row (also capped by the model's context)
    runner: str = "auto"  # "auto": the fast GPT-2 / Llama runner when the model is one, else "hf"
    seed: int | None = None  # seeds the engine's generator for requests without a seed (tests)


class TokenEvent(NamedTuple):
    """One generated token of sample ``index``; ``finish`` is "eos" / "stop_token" (one of the
    request's ``stop_token_ids``) / "length" on its last token."""

    index: int
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None  # (token id, log-prob) alternatives, best first
    finish: str | None


# -- the caller's side of one request ---------------------------------------------------------------


class Generation:
    """A submitted request: iterate it (``async for batch in gen``) for lists of TokenEvents.

    :meth:`cancel` ends the whole request (its rows leave the batch at the next iteration),
    :meth:`stop_sample` ends one sample (a stop string matched). Iteration ends when every sample
    finished; it raises DeadlineExceededError, or whatever error the model step raised.
    """

    def __init__(self, engine: "InferenceEngine", prompt_ids: list[int], req: GenerationRequest,
                 deadline: float | None, loop: asyncio.AbstractEventLoop, team: str = "", grammar=None):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.req = req
        self.team = team  # the queue is fair between teams
        self.grammar = grammar  # the compiled guide of a structured-output request
        # with req.prompt_logprobs: each prompt token's log-prob given those before it (None for
        # the first), and its top alternatives; set before the first token's event
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top: list[list[tuple[int, float]]] | None = None
        self.generated = 0  # tokens delivered so far, over all samples
        self.n = max(1, req.n)
        self.deadline = deadline  # a time.monotonic() value
        self.cancelled = False
        self.stopped: set[int] = set()  # samples the caller ended (read by the worker thread)
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._last_at = 0.0
        self._loop = loop
        self._events: deque[TokenEvent] = deque()
        self._finished: set[int] = set()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        # a caller that only wants the finished samples is woken when a sample ends, not per token
        # (unless a stop string has to be watched for), so that it costs the event loop nothing
        # while it runs
        self.wake_per_token = True

    @property
    def done(self) -> bool:
        return self._error is not None or len(self._finished | self.stopped) >= self.n

    # called on the event loop (the engine's dispatch); ``now``: time.perf_counter() of the dispatch
    def _push(self, ev: TokenEvent, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        elif now != self._last_at and self.engine.metrics is not None:
            self.engine.metrics.policy_inter_token_latency_seconds.observe(now - self._last_at)
        self._last_at = now
        self.generated += 1
        self._events.append(ev)
        if ev.finish is not None:
            self._finished.add(ev.index)
            self._wake()
        elif self.wake_per_token:
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        """The caller went away: the request's rows leave the batch at the next iteration."""
        self.cancelled = True

    def stop_sample(self, index: int) -> None:
        """Sample ``index`` is complete for the caller (a stop string matched)."""
        self.stopped.add(index)
        self._wake()

    def __aiter__(self):
        return self._iter()

    async def _iter(self) -> AsyncIterator[list[TokenEvent]]:
        while True:
            if self._events:
                batch = [ev for ev in self._events if ev.index not in self.stopped]
                self._events.clear()
                if batch:
                    yield batch
                continue
            if self._error is not None:
                raise self._error
            if self.done:
                return
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


# -- the engine's side ------------------------------------------------------------------------------


@dataclass
class _Row:
    gen: Generation
    index: int  # sample index within the request
    pos: int  # positions written in the row's slot (= the next token's position)
    max_new: int
    min_new: int
    generator: torch.Generator | None  # a seeded sample's own random numbers
    matcher: object = None  # a structured-output row's grammar state
    generated: int = 0
    last: int = 0  # the last token chosen (the next decode step's input)


@dataclass
class _Stats:
    iterations: int = 0
    decode_steps: int = 0
    prefills: int = 0
    tokens: int = 0
    rows_dropped: int = 0  # rows that left before finishing (caller gone, stop string, deadline)
    max_rows: int = 0
    decode_rows: int = 0  # rows summed over decode steps (/ decode_steps: the mean batch)
    # where the worker's time goes (seconds): model forward passes, token choice, whole iterations
    forward_seconds: float = 0.0
    choose_seconds: float = 0.0
    iteration_seconds: float = 0.0


class EngineFront:
    """What the event loop's side needs of an engine before it queues a request: the prompt's
    token ids and the checks, with the limits of the model version, and the lifecycle state both
    engines share (closed, queue depth). Shared by the in-process
    :class:`InferenceEngine` and :class:`rlhf.inference.process.EngineProcess`."""

    tokenizer: object
    add_bos: bool
    max_len: int
    max_prompt_tokens: int
    cfg: EngineConfig
    metrics: object

    def _init_front(self, tokenizer, *, add_bos: bool, dtype: str, device, max_len: int,
                    max_prompt_tokens: int, vocab_size: int) -> None:
        """The model version's limits and codec, and the lifecycle state both engines start with."""
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self._encode, self.decode, self._encode_long = fast_codec(tokenizer)
        self.add_bos, self.dtype, self.device = add_bos, dtype, device
        self.max_len, self.max_prompt_tokens = max_len, max_prompt_tokens
        self.vocab_size = vocab_size  # the width of the model's logits
        self.grammars = Grammars(tokenizer, vocab_size, self.eos_id)
        # a token covers at most this many bytes of text (x4: headroom for normalisers that map
        # several bytes to one character), so a prompt of more bytes than this has too many tokens
        longest = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1)
        self.bytes_per_token = 4 * max(1, longest)
        self._waiting_samples = 0
        self._retiring = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_depth(self) -> int:
        """Samples queued and not yet given a row."""
        return self._waiting_samples

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model sees them (BOS first when the model wants it)."""
        return self._bos() + self._encode(prompt)

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if self.add_bos and bos is not None else []

    async def encode_async(self, prompt: str, where: str = "prompt", truncate: int | None = None,
                           bounded: bool = True) -> list[int]:
        """:meth:`encode` without stalling the event loop: a prompt of more bytes than the prompt
        limit can hold is refused untokenized (ContextLengthError; not when ``bounded`` is false),
        a long one is tokenized on a thread. ``truncate``: keep only the prompt's last that many
        tokens (its head is cut before tokenizing when it is too long to matter)."""
        n_bytes = len(prompt) if len(prompt) > LONG_PROMPT_CHARS * 64 else len(prompt.encode())
        if truncate is not None:
            keep = (truncate + 1) * self.bytes_per_token
            if n_bytes > keep:
                cut = prompt.encode()[-keep:].decode(errors="ignore")
                prompt, n_bytes = cut, len(cut.encode())
        elif bounded and n_bytes > self.max_prompt_tokens * self.bytes_per_token:
            raise PromptTooLongError(
                f"{where} has {n_bytes} bytes, so at least {n_bytes // self.bytes_per_token} tokens; the limit is "
                f"{self.max_prompt_tokens} prompt tokens")
        if len(prompt) > LONG_PROMPT_CHARS:
            ids = self._bos() + await asyncio.to_thread(self._encode_long, prompt)
        else:
            ids = self.encode(prompt)
        if truncate is not None and len(ids) > truncate:
            bos = self._bos()
            ids = bos + ids[len(ids) - truncate + len(bos):]
        return ids

    def prepare(self, req: GenerationRequest):
        """The compiled grammar of a structured-output request (DataError for a bad one), else
        None. Compiling can take milliseconds: call it off the event loop."""
        if req.guide is None:
            return None
        return self.grammars.compile(req.guide)

    def _set_queue_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.policy_queue_depth.set(self._waiting_samples)

    def check(self, prompt_ids: list[int], req: GenerationRequest, where: str = "prompt") -> GenerationRequest:
        """``req`` if this engine can serve it for the prompt (with a defaulted ``max_new_tokens``
        lowered to the room the prompt leaves in the context), else DataError (ContextLengthError
        when it does not fit)."""
        n = len(prompt_ids)
        if n == 0:
            raise DataError(f"{where} is empty")
        if n > self.max_prompt_tokens:
            raise PromptTooLongError(f"{where} has {n} tokens; the limit is {self.max_prompt_tokens} prompt tokens "
                                     f"(the model's context is {self.max_len} tokens)")
        if req.fit_to_context and n + req.max_new_tokens > self.max_len:
            req = replace(req, max_new_tokens=max(1, self.max_len - n),
                          min_new_tokens=min(req.min_new_tokens, max(1, self.max_len - n)))
        if n + req.max_new_tokens > self.max_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                f"{n + req.max_new_tokens} tokens ({n} in {where}, {req.max_new_tokens} in the completion); at most "
                f"{self.max_len - n} new tokens fit after it.")
        if max(1, req.n) > self.cfg.max_batch_size:
            raise DataError(f"n={req.n} exceeds the batch of {self.cfg.max_batch_size} rows")
        bad = [t for t in req.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise DataError(f"stop_token_ids: {bad[0]} is not a token id of this model (0..{self.vocab_size - 1})")
        return req


class InferenceEngine(EngineFront):
    """Continuous batching over one :class:`~rlhf.serving.PolicyEngine` (one model version)."""

    def __init__(self, policy: PolicyEngine, config: EngineConfig | None = None, metrics=None):
        self.policy = policy
        self.version = policy.version
        self.cfg = config or EngineConfig()
        self.metrics = metrics
        self.runner = make_runner(policy.model, self.cfg.max_batch_size, self.cfg.max_seq_len,
                                  pad_token_id=policy.tokenizer.pad_token_id or 0, kind=self.cfg.runner)
        max_len = min(self.runner.max_len, policy.context_length)
        self._init_front(policy.tokenizer, add_bos=policy.add_bos,
                         dtype=str(next(policy.model.parameters()).dtype).replace("torch.", ""),
                         device=policy.device, max_len=max_len,
                         max_prompt_tokens=min(policy.max_prompt_tokens, max_len - 1),
                         vocab_size=int(policy.model.config.vocab_size))
        self.stats = _Stats()
        self._gen = torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None
        self._cond = threading.Condition()
        self._waiting: FairQueue[Generation] = FairQueue(lambda g: g.team)
        self._rows: list[_Row] = []
        self._penalties: PenaltyState | None = None  # allocated when the first penalised row comes
        self._params: BatchParams | None = None
        self._abort: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle (event loop) ------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; call from the event loop that consumes the results."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.version}", daemon=True)
        self._thread.start()

    def retire(self) -> None:
        """Take no new requests once the running and queued ones are done; then the thread ends."""
        with self._cond:
            self._retiring = True
            self._cond.notify()

    async def close(self, abort: BaseException | None = None) -> None:
        """Retire and wait for the thread to end. With ``abort``, the running and queued requests
        fail with it at once instead of finishing."""
        self._stop(abort)
        if self._done is not None:
            await self._done.wait()
        if self._thread is not None:  # the thread is past its last step; let it end before returning
            await asyncio.to_thread(self._thread.join, 10.0)

    def _stop(self, abort: BaseException | None = None) -> None:
        with self._cond:
            self._retiring = True
            if abort is not None:
                self._abort = abort
            self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    # -- requests (event loop) -------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], req: GenerationRequest, deadline: float | None = None, team: str = "",
               grammar=None) -> Generation:
        """Queue one prompt for ``req.n`` samples (checked with :meth:`check` first) in ``team``'s
        queue; ``grammar``: :meth:`prepare`'s result (compiled here when not given)."""
        if self._loop is None:
            raise EngineRetiredError("the engine was not started")
        req = self.check(prompt_ids, req)
        if grammar is None:
            grammar = self.prepare(req)
        gen = Generation(self, prompt_ids, req, deadline, self._loop, team, grammar)
        self._enqueue(gen)
        return gen

    def _enqueue(self, gen: Generation) -> None:
        with self._cond:
            if self._closed or self._abort is not None:
                raise EngineRetiredError(f"the engine of version {self.version} is closed")
            if self._waiting_samples + gen.n > self.cfg.max_queue:
                raise ResourceExhaustedError(f"queue full ({self._waiting_samples} samples waiting); retry later")
            self._waiting.append(gen)
            self._waiting_samples += gen.n
            self._set_queue_gauge()
            self._cond.notify()

    # -- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        use_model_threads()  # this thread owns the process's intra-op threads (rlhf.runtime.threads)
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._rows and not self._retiring:
                        self._cond.wait()
                    if self._abort is not None:
                        self._fail_all(self._abort)
                    if self._retiring and not self._waiting and not self._rows:
                        self._closed = True
                        break
                    admitted = self._admit()
                try:
                    self._iteration(admitted)
                except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
                    log.exception("engine step failed", extra={"fields": {"version": self.version,
                                                                          "rows": len(self._rows)}})
                    for g in {r.gen for r in self._rows} | set(admitted):
                        self._deliver_error(g, exc)
                    self._rows = []
                    self._params = None
        finally:
            with self._cond:
                self._closed = True
                self._fail_all(EngineRetiredError(f"the engine of version {self.version} stopped"))
            self._call_soon(self._done.set if self._done is not None else None)

    def _call_soon(self, fn, *args) -> None:
        if fn is None or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _fail_all(self, exc: BaseException) -> None:
        """(under the lock) Fail every queued and running request."""
        for g in list(self._waiting) + [r.gen for r in self._rows]:
            self._deliver_error(g, exc)
        self._waiting.clear()
        self._waiting_samples = 0
        self._set_queue_gauge()
        self._rows = []
        self._params = None

    def _admit(self) -> list[Generation]:
        """(under the lock) Waiting requests that fit into the free rows, the teams taking turns
        (first come first served within a team); cancelled ones and ones past their deadline leave
        the queue."""
        now = time.monotonic()
        gone = self._waiting.remove_if(lambda g: g.cancelled or (g.deadline is not None and now >= g.deadline))
        for g in gone:
            self._waiting_samples -= g.n
            if not g.cancelled:
                self._deliver_error(g, DeadlineExceededError("deadline exceeded while queued"))
        free = self.cfg.max_batch_size - len(self._rows)
        budget = self.cfg.max_prefill_tokens
        out: list[Generation] = []
        t = time.perf_counter()
        while self._waiting:
            g = self._waiting.head()
            if g.n > free or (out and len(g.prompt_ids) > budget):
                break
            self._waiting.pop()
            out.append(g)
            free -= g.n
            budget -= len(g.prompt_ids)
            self._waiting_samples -= g.n
            if self.metrics is not None:
                self.metrics.policy_queue_time_seconds.observe(t - g.submitted)
        self._set_queue_gauge()
        return out

    @torch.inference_mode()
    def _iteration(self, admitted: list[Generation]) -> None:
        t0 = time.perf_counter()
        events: list[tuple[Generation, TokenEvent]] = []
        self.stats.iterations += 1
        self._drop_rows()
        if admitted:
            self._prefill(admitted, events)
        if self._rows:
            self._decode(events)
        if self.metrics is not None:
            self.metrics.policy_requests_running.set(len({id(r.gen) for r in self._rows}))
        if events:
            self._call_soon(self._dispatch, events)
        self.stats.iteration_seconds += time.perf_counter() - t0

    def _drop_rows(self) -> None:
        """Rows of cancelled requests, of stopped samples and past their deadline leave the batch."""
        now = time.monotonic()
        late: set[Generation] = set()
        keep = []
        for r in self._rows:
            g = r.gen
            if g.deadline is not None and now >= g.deadline and not g.cancelled:
                late.add(g)
            if g.cancelled or r.index in g.stopped or g in late:
                continue
            keep.append(r)
        if len(keep) != len(self._rows):
            self.stats.rows_dropped += len(self._rows) - len(keep)
            self._compact(keep)
        for g in late:
            self._deliver_error(g, DeadlineExceededError("deadline exceeded"))

    def _compact(self, keep: list[_Row]) -> None:
        """Make ``keep`` the running rows in slots 0..len-1: each kept row beyond the end moves
        (its cache slot is copied) into a slot that a leaving row freed."""
        n = len(keep)
        kept = {id(r) for r in keep}
        holes = [i for i, r in enumerate(self._rows[:n]) if id(r) not in kept]
        movers = [(i, r) for i, r in enumerate(self._rows) if i >= n and id(r) in kept]
        new = list(self._rows[:n])
        for hole, (src, r) in zip(holes, movers):
            self.runner.copy_slot(src, hole, r.pos)
            if self._penalties is not None:
                self._penalties.move(src, hole)
            new[hole] = r
        self._rows = new
        self._params = None

    @staticmethod
    def _row_generator(req: GenerationRequest, index: int) -> torch.Generator | None:
        if req.seed is None:
            return None
        # sample j of a request with seed s draws from seed s + j
        return torch.Generator().manual_seed((int(req.seed) + index) % (2 ** 63))

    @staticmethod
    def _batch_params(rows: list[_Row], device) -> BatchParams:
        return BatchParams([r.gen.req for r in rows], [r.generator for r in rows], device)

    def _prefill(self, admitted: list[Generation], events) -> None:
        """Prefill each admitted prompt into the next free slot; a request's other n - 1 rows get
        copies of its prompt's cache (slots after the prompts)."""
        slot0, b = len(self._rows), len(admitted)
        t0 = time.perf_counter()
        logits = self.runner.prefill([g.prompt_ids for g in admitted], slot0)  # (b, V)
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.prefills += 1
        by_slot: dict[int, tuple[int, _Row]] = {}
        tail = slot0 + b
        for bi, g in enumerate(admitted):
            P = len(g.prompt_ids)
            for j in range(g.n):
                slot = slot0 + bi if j == 0 else tail
                if j > 0:
                    self.runner.copy_slot(slot0 + bi, slot, P)
                    tail += 1
                min_new = g.req.max_new_tokens if g.req.ignore_eos else g.req.min_new_tokens
                by_slot[slot] = (bi, _Row(g, j, P, g.req.max_new_tokens, min_new, self._row_generator(g.req, j)))
        slots = sorted(by_slot)
        src = [by_slot[s][0] for s in slots]
        rows = [by_slot[s][1] for s in slots]
        if src != list(range(b)):
            logits = logits[torch.tensor(src, device=logits.device)]  # one row of logits per sample
        params = self._batch_params(rows, logits.device)
        if params.any_penalty and self._penalties is None:
            self._penalties = PenaltyState(self.runner.max_slots, logits.shape[1], logits.device)
        for slot, r in zip(slots, rows):
            if self._penalties is not None:
                self._penalties.start(slot, r.gen.prompt_ids)
            if r.gen.grammar is not None:
                r.matcher = self.grammars.matcher(r.gen.grammar)
        for g in admitted:
            if g.req.prompt_logprobs:
                self._score_prompt(g)
        finished = self._choose(rows, logits, params, events, slot0)
        self._rows.extend(rows)
        self._params = None
        if finished:
            self._compact([r for r in self._rows if id(r) not in finished])

    def _decode(self, events) -> None:
        rows = self._rows
        dev = self.runner.device
        tokens = torch.tensor([r.last for r in rows], device=dev)  # (n,)
        positions = torch.tensor([r.pos for r in rows], device=dev)  # (n,)
        t0 = time.perf_counter()
        logits = self.runner.decode(tokens, positions)  # (n, V)
        self.stats.forward_seconds += time.perf_counter() - t0
        for r in rows:
            r.pos += 1
        if self._params is None:
            self._params = self._batch_params(rows, logits.device)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        if self.metrics is not None:
            self.metrics.policy_batch_size.observe(len(rows))
        finished = self._choose(rows, logits, self._params, events, 0)
        if finished:
            self._compact([r for r in rows if id(r) not in finished])

    def _choose(self, rows: list[_Row], logits: torch.Tensor, params: BatchParams, events, slot0: int) -> set[int]:
        """Choose each row's next token, queue the events; the ids of the rows that ended.
        ``rows`` are in slots ``slot0, slot0 + 1, ...``."""
        t0 = time.perf_counter()
        block = None
        # a structured-output row may end only where its grammar allows (its mask says so)
        if any(r.generated < r.min_new and r.matcher is None for r in rows):
            block = torch.tensor([r.generated < r.min_new and r.matcher is None for r in rows], device=logits.device)
        pen = None
        if params.any_penalty:
            counts, seen = self._penalties.view(slot0 + len(rows))
            pen = (counts[slot0:], seen[slot0:])
        guided = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        tokens, lps, top = choose(logits, params, block, self.eos_id, self._gen, pen,
                                  ([i for i, _ in guided], [m for _, m in guided]) if guided else None)
        if self._penalties is not None:
            self._penalties.add_at(slot0, tokens)
        tok_l, lp_l = tokens.tolist(), lps.tolist()
        top_v = top.values.tolist() if top is not None else None
        top_i = top.indices.tolist() if top is not None else None
        self.stats.choose_seconds += time.perf_counter() - t0
        finished: set[int] = set()
        for i, r in enumerate(rows):
            t = tok_l[i]
            r.generated += 1
            r.last = t
            if r.matcher is not None and t != self.eos_id:
                r.matcher.accept_token(t)
            if t == self.eos_id:
                fin = "eos"
            elif t in r.gen.req.stop_token_ids:
                fin = "stop_token"
            elif r.generated >= r.max_new or r.pos >= self.max_len:  # r.pos: where t would be written
                fin = "length"
            else:
                fin = None
            k = r.gen.req.top_logprobs
            alts = list(zip(top_i[i][:k], top_v[i][:k])) if k and top_i is not None else None
            events.append((r.gen, TokenEvent(r.index, t, lp_l[i], alts, fin)))
            if fin is not None:
                finished.add(id(r))
        self.stats.tokens += len(rows)
        if self.metrics is not None:
            self.metrics.policy_generated_tokens_total.inc(len(rows))
        return finished

    # -- back on the event loop ------------------------------------------------------------------

    @staticmethod
    def _dispatch(events: list[tuple[Generation, TokenEvent]]) -> None:
        now = time.perf_counter()
        for g, ev in events:
            if not g.cancelled and ev.index not in g.stopped:
                g._push(ev, now)

    def _score_prompt(self, g: Generation) -> None:
        """(worker) The log-prob of each prompt token given the ones before it, and its top
        alternatives when the request wants them: one forward pass of the model over the prompt."""
        ids = torch.tensor([g.prompt_ids], device=self.runner.device)  # (1, P)
        out = self.policy.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)  # (P - 1, V)
        nxt = ids[0, 1:]
        lps = [None] + logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        top = None
        if g.req.top_logprobs:
            v, i = torch.topk(logp, g.req.top_logprobs, dim=-1)
            top = [[]] + [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
        self._prompt_scored(g, lps, top)

    def _prompt_scored(self, g: Generation, lps: list, top: list | None) -> None:
        # read on the event loop only after the first token's event, which is dispatched later
        g.prompt_logprobs, g.prompt_top = lps, top

    def _deliver_error(self, g: Generation, exc: BaseException) -> None:
        self._call_soon(g._fail, exc)


# -- tokens -> samples ------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """One finished sample. ``token_ids``/``logprobs`` end with the EOS token when the sample ended
    on it (as :meth:`rlhf.serving.PolicyEngine.generate` returns them); a stop string cuts them
    after the token that completed it."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str = "length"  # "eos" | "stop" (a stop string or stop token) | "length"


@dataclass
class StreamEvent:
    """One token of sample ``index`` and the text it released; the sample's last event has
    ``finish_reason`` and the whole ``sample``."""

    index: int
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None
    text: str
    finish_reason: str | None = None
    sample: SampleResult | None = None


async def stream_batches(gen: Generation) -> AsyncIterator[list[StreamEvent]]:
    """The request's tokens as text, sample by sample, in the batches they arrived in (one per
    engine iteration, more when the caller fell behind); stop strings end a sample early (its
    row leaves the batch). Closing the iterator early cancels the request."""
    tok = gen.engine.tokenizer
    eos = gen.engine.eos_id
    texts = [SampleText(tok, gen.req.stop, gen.engine.decode) for _ in range(gen.n)]
    ids: list[list[int]] = [[] for _ in range(gen.n)]
    lps: list[list[float]] = [[] for _ in range(gen.n)]
    tops: list[list] = [[] for _ in range(gen.n)]
    want_top = gen.req.top_logprobs > 0
    try:
        async for batch in gen:
            out = []
            for ev in batch:
                i = ev.index
                st = texts[i]
                if st.stopped:
                    continue
                ids[i].append(ev.token_id)
                lps[i].append(ev.logprob)
                if want_top:
                    tops[i].append(ev.top or [])
                fin = ev.finish
                if fin == "stop_token" or (ev.token_id == eos and fin == "eos"):
                    delta = st.finish()  # the token that ended the sample is not text
                    fin = "stop" if fin == "stop_token" else fin
                else:
                    delta = st.add(ev.token_id)
                    if st.stopped:
                        gen.stop_sample(i)
                    elif fin is not None:
                        delta += st.finish()
                if st.stopped:  # a stop string: the tokens end with the one that completed it
                    fin = "stop"
                    ids[i], lps[i] = ids[i][:st.n_kept], lps[i][:st.n_kept]
                    if want_top:
                        tops[i] = tops[i][:st.n_kept]
                sample = None
                if fin is not None:
                    sample = SampleResult(i, st.text, ids[i], lps[i], tops[i] if want_top else None, fin)
                out.append(StreamEvent(i, ev.token_id, ev.logprob, ev.top, delta, fin, sample))
            if out:
                yield out
    finally:
        if not gen.done:
            gen.cancel()


async def stream_samples(gen: Generation) -> AsyncIterator[StreamEvent]:
    """:func:`stream_batches`, one event at a time."""
    batches = stream_batches(gen)
    try:
        async for batch in batches:
            for ev in batch:
                yield ev
    finally:
        await batches.aclose()


async def complete(gen: Generation) -> list[SampleResult]:
    """Every sample of the request, in index order (a cancelled await cancels the request)."""
    gen.wake_per_token = bool(gen.req.stop)
    out: dict[int, SampleResult] = {}
    async for ev in stream_samples(gen):
        if ev.sample is not None:
            out[ev.index] = ev.sample
    return [out[i] for i in sorted(out)]
