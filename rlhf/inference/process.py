"""The inference engine in a process of its own, beside the server's event loop.

In one process the engine's worker thread and the event loop that streams its tokens share one
interpreter lock: while the event loop formats and writes a token event, the worker cannot run
the Python between its kernels, and the other way round. ``bench/serving.py`` measured the cost
(docs/benchmarks.md, "Where the server's CPU goes"). :class:`EngineProcess` runs the same
:class:`~rlhf.inference.engine.InferenceEngine` in a child process and gives the server the
same surface, so the two halves no longer take turns:

* the server's process keeps the tokenizer: it encodes and checks prompts, turns tokens into
  text, applies stop strings, and bounds the queue (``max_queue`` samples waiting for a row);
* the child loads the model and runs the batching loop; once per iteration it sends every new
  token of every request in one message over a pipe;
* cancelling a request, ending one sample (a stop string) and retiring or closing the engine
  are messages the other way.

A child that dies fails its requests with UnavailableError; the server's process does not.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import threading
import time
from dataclasses import asdict, replace

from rlhf.errors import ResourceExhaustedError, UnavailableError
from rlhf.inference.engine import (EngineConfig, EngineFront, EngineRetiredError, Generation, InferenceEngine,
                                   TokenEvent, _Stats)
from rlhf.serving import GenerationRequest

log = logging.getLogger("rlhf.inference")

LOAD_TIMEOUT_S = 600.0  # a child that has not loaded its model by then is given up


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - whatever it is, the caller gets its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the child ----------------------------------------------------------------------------------------


class _Relay:
    """One of the child's metrics: its observations (a gauge: its last value), sent to the parent."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, v) -> None:
        self.values.append(float(v))

    def set(self, v) -> None:
        self.values = [float(v)]

    def inc(self, v=1) -> None:  # tokens: the parent counts them from the events
        pass


class _RelayMetrics:
    """What the engine would record in the server's metrics, collected in the child and sent with
    the tokens (the parent keeps the queue depth and counts the tokens itself)."""

    RELAYED = ("policy_batch_size", "policy_queue_time_seconds", "policy_requests_running")

    def __init__(self) -> None:
        for name in self.RELAYED:
            setattr(self, name, _Relay())
        self.policy_generated_tokens_total = _Relay()
        self.policy_queue_depth = _Relay()

    def take(self) -> dict[str, list[float]]:
        out = {}
        for name in self.RELAYED:
            r = getattr(self, name)
            if r.values:
                out[name], r.values = r.values, []
        return out


class _ChildEngine(InferenceEngine):
    """The engine as the child runs it: no event loop; results go straight onto the pipe."""

    def __init__(self, policy, config: EngineConfig, send):
        self.relay = _RelayMetrics()
        super().__init__(policy, config, self.relay)
        self._send = send
        self.gens: dict[int, Generation] = {}

    def start_thread(self) -> None:
        def run():
            try:
                self._run()
            finally:
                self._send(("closed",))

        self._thread = threading.Thread(target=run, name=f"engine-{self.version}", daemon=True)
        self._thread.start()

    def submit_remote(self, rid: int, prompt_ids: list[int], req: GenerationRequest, deadline: float | None,
                      team: str) -> None:
        try:
            grammar = self.prepare(req)  # compiled here, on the child's message thread, not its worker
        except Exception as exc:  # noqa: BLE001 - the parent compiled it already: unexpected
            self._send(("error", rid, _picklable(exc)))
            return
        gen = Generation(self, prompt_ids, req, deadline, None, team, grammar)  # type: ignore[arg-type]
        gen.rid = rid  # type: ignore[attr-defined]
        self.gens[rid] = gen
        try:
            self._enqueue(gen)
        except Exception as exc:  # noqa: BLE001 - the parent's submit checked the rest
            self.gens.pop(rid, None)
            self._send(("error", rid, _picklable(exc)))

    # the worker thread calls these (InferenceEngine hands them to the event loop instead)
    def _call_soon(self, fn, *args) -> None:
        if fn is not None:
            fn(*args)

    def _iteration(self, admitted) -> None:
        self._sent = False
        super()._iteration(admitted)
        if not self._sent:  # rows left without a token (cancelled, stopped, late): the counts moved
            self._send(("stats", tuple(asdict(self.stats).values()), len(self._rows), self.relay.take()))

    def _dispatch(self, events) -> None:  # type: ignore[override]
        self._sent = True
        out = []
        for g, ev in events:
            if ev.finish is not None:
                g._finished.add(ev.index)
            if not g.cancelled and ev.index not in g.stopped:
                out.append((g.rid, *ev))
            if g.done:
                self.gens.pop(g.rid, None)
        self._send(("tokens", out, self.relay.take(), tuple(asdict(self.stats).values()), len(self._rows)))

    def _prompt_scored(self, g: Generation, lps: list, top: list | None) -> None:
        self._send(("prompt_lp", g.rid, lps, top))  # before the tokens message of the same iteration

    def _deliver_error(self, g: Generation, exc: BaseException) -> None:
        self.gens.pop(getattr(g, "rid", None), None)
        self._send(("error", g.rid, _picklable(exc)))


def _log_setup() -> tuple[str, int] | None:
    """(service, level) of the server's JSON logs, for the child to log the same way."""
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_rlhf_json", False) and hasattr(h.formatter, "service"):
            return h.formatter.service, root.level
    return None


def _child_main(conn, path: str, version: str, max_prompt_tokens: int, device: str, cfg: EngineConfig,
                logs: tuple[str, int] | None) -> None:
    if logs is not None:
        from rlhf.runtime.logs import configure_logging

        configure_logging(logs[0], logging.getLevelName(logs[1]))
    from rlhf.serving import PolicyEngine

    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the parent is gone; the next recv ends the loop
                pass

    try:
        policy = PolicyEngine(path, version, max_prompt_tokens=max_prompt_tokens, device=device)
        engine = _ChildEngine(policy, cfg, send)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        send(("failed", _picklable(exc)))
        return
    send(("ready", {"max_len": engine.max_len, "max_prompt_tokens": engine.max_prompt_tokens,
                    "add_bos": engine.add_bos, "dtype": engine.dtype, "device": str(engine.device),
                    "vocab_size": engine.vocab_size}))
    engine.start_thread()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent closed its end, or died
            engine._stop(EngineRetiredError("the server closed the engine"))
            break
        kind = msg[0]
        if kind == "submit":
            engine.submit_remote(*msg[1:])
        elif kind == "cancel":
            g = engine.gens.get(msg[1])
            if g is not None:
                g.cancel()
        elif kind == "stop":
            g = engine.gens.get(msg[1])
            if g is not None:
                g.stopped.add(msg[2])
        elif kind == "retire":
            engine.retire()
        elif kind == "close":
            engine._stop(msg[1])
    if engine._thread is not None:
        engine._thread.join(10.0)


# -- the server's side ---------------------------------------------------------------------------------


class _RemoteGeneration(Generation):
    rid: int

    def cancel(self) -> None:
        if self.cancelled:
            return
        super().cancel()
        self.engine._cancelled(self)  # type: ignore[attr-defined]

    def stop_sample(self, index: int) -> None:
        if index not in self.stopped:
            self.engine._send(("stop", self.rid, index))  # type: ignore[attr-defined]
        super().stop_sample(index)


class EngineProcess(EngineFront):
    """An :class:`~rlhf.inference.engine.InferenceEngine` in a child process, with its surface.

    The constructor starts the child and blocks until it has loaded the model (call it off the
    event loop); :meth:`start` connects it to the event loop that consumes the results.
    """

    def __init__(self, path, version: str, config: EngineConfig | None = None, metrics=None, *,
                 max_prompt_tokens: int = 512, device: str = "cpu"):
        import torch

        from rlhf.models import load_tokenizer

        self.version = version
        self.cfg = config or EngineConfig()
        self.metrics = metrics
        self.stats = _Stats()
        self.running = 0
        ctx = mp.get_context("spawn")  # a fork would copy the server's threads and torch state
        self._conn, child = ctx.Pipe()
        # the parent bounds the queue (it sees every submit at once); the child takes all it is sent
        child_cfg = replace(self.cfg, max_queue=2 ** 31)
        self._proc = ctx.Process(target=_child_main, name=f"engine-{version}", daemon=True,
                                 args=(child, str(path), version, max_prompt_tokens, device, child_cfg,
                                       _log_setup()))
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(LOAD_TIMEOUT_S):
                raise UnavailableError(f"the engine process of version {version} did not load its model "
                                       f"in {LOAD_TIMEOUT_S:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError) as e:
            self._kill()
            raise UnavailableError(f"the engine process of version {version} exited while loading") from e
        except BaseException:
            self._kill()
            raise
        if msg[0] == "failed":
            self._kill()
            raise msg[1]
        info = msg[1]
        self._init_front(load_tokenizer(path), add_bos=info["add_bos"], dtype=info["dtype"],
                         device=torch.device(info["device"]), max_len=info["max_len"],
                         max_prompt_tokens=info["max_prompt_tokens"], vocab_size=info["vocab_size"])
        self._gens: dict[int, _RemoteGeneration] = {}
        self._queued: set[int] = set()  # requests without a token yet: waiting for rows
        self._ids = itertools.count()
        self._send_lock = threading.Lock()

    # -- lifecycle (event loop) ------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def retire(self) -> None:
        """Take no new requests; the child finishes what it runs and has queued, then exits."""
        if not self._retiring:
            self._retiring = True
            self._send(("retire",))

    async def close(self, abort: BaseException | None = None) -> None:
        """Retire (with ``abort``: fail the running and queued requests at once) and wait for the
        child to end."""
        self._retiring = True
        self._send(("close", abort))
        if self._done is not None:
            await self._done.wait()
        else:
            self._shutdown()
        await asyncio.to_thread(self._proc.join, 10.0)
        if self._proc.is_alive():
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # -- requests (event loop) -------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], req: GenerationRequest, deadline: float | None = None, team: str = "",
               grammar=None) -> Generation:
        """Queue one prompt for ``req.n`` samples on the child (checked here first; a guide is
        compiled here too, to answer a bad one at once, and again in the child)."""
        if self._loop is None:
            raise EngineRetiredError("the engine was not started")
        req = self.check(prompt_ids, req)
        if grammar is None:
            self.prepare(req)
        if self._closed or self._retiring:
            raise EngineRetiredError(f"the engine of version {self.version} is closed")
        n = max(1, req.n)
        if self._waiting_samples + n > self.cfg.max_queue:
            raise ResourceExhaustedError(f"queue full ({self._waiting_samples} samples waiting); retry later")
        gen = _RemoteGeneration(self, prompt_ids, req, deadline, self._loop, team)  # type: ignore[arg-type]
        gen.rid = next(self._ids)
        self._gens[gen.rid] = gen
        self._queued.add(gen.rid)
        self._waiting_samples += n
        self._set_queue_gauge()
        # time.monotonic() is one clock for every process of the machine: the deadline holds there
        self._send(("submit", gen.rid, prompt_ids, req, deadline, team))
        return gen

    def _cancelled(self, gen: _RemoteGeneration) -> None:
        self._send(("cancel", gen.rid))
        self._forget(gen.rid)

    def _send(self, msg) -> None:
        with self._send_lock:
            if self._closed:
                return
            try:
                self._conn.send(msg)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                pass

    def _forget(self, rid: int) -> None:
        gen = self._gens.pop(rid, None)
        if gen is not None and rid in self._queued:
            self._queued.discard(rid)
            self._waiting_samples -= gen.n
            self._set_queue_gauge()

    # -- results (event loop) --------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
                if self._closed:
                    return
        except (EOFError, OSError):
            if not self._closed:
                log.error("the engine process exited", extra={"fields": {"version": self.version,
                                                                          "exitcode": self._proc.exitcode}})
                self._shutdown(UnavailableError(f"the engine process of version {self.version} exited"))

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "tokens":
            _, events, relayed, stats, running = msg
            self.stats = _Stats(*stats)
            self.running = running
            self._relayed(relayed)
            admitted = False
            now = time.perf_counter()
            for rid, index, token_id, logprob, top, finish in events:
                gen = self._gens.get(rid)
                if gen is None:
                    continue
                if rid in self._queued:
                    self._queued.discard(rid)
                    self._waiting_samples -= gen.n
                    admitted = True
                if not gen.cancelled and index not in gen.stopped:
                    gen._push(TokenEvent(index, token_id, logprob, top, finish), now)
                if gen.done:
                    self._gens.pop(rid, None)
            if admitted:
                self._set_queue_gauge()
            if self.metrics is not None:
                self.metrics.policy_generated_tokens_total.inc(len(events))
        elif kind == "stats":
            self.stats = _Stats(*msg[1])
            self.running = msg[2]
            self._relayed(msg[3])
        elif kind == "prompt_lp":
            gen = self._gens.get(msg[1])
            if gen is not None:
                gen.prompt_logprobs, gen.prompt_top = msg[2], msg[3]
        elif kind == "error":
            _, rid, exc = msg
            gen = self._gens.get(rid)
            self._forget(rid)
            if gen is not None:
                gen._fail(exc)
        elif kind == "closed":
            self._shutdown(EngineRetiredError(f"the engine of version {self.version} stopped"))

    def _relayed(self, relayed: dict[str, list[float]]) -> None:
        """The child's observations into the server's metrics."""
        if self.metrics is None:
            return
        for name, values in relayed.items():
            m = getattr(self.metrics, name)
            if name == "policy_requests_running":
                m.set(values[-1])
            else:
                for v in values:
                    m.observe(v)

    def _shutdown(self, exc: BaseException | None = None) -> None:
        """The child is done (or gone): fail what is left, stop reading, let the child exit."""
        if self._closed:
            return
        for rid, gen in list(self._gens.items()):
            self._forget(rid)
            gen._fail(exc or EngineRetiredError(f"the engine of version {self.version} stopped"))
        with self._send_lock:
            self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()  # the child's recv ends: it exits
        if self._done is not None:
            self._done.set()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5.0)
