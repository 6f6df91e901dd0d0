"""Benchmarks of the inference engine and the policy-server's HTTP API (docs/benchmarks.md).

    .venv/bin/python bench/serving.py [--threads N] [--repeats N] [--stream-interval 1,4]
                                      [--engine-process off,on] [--sampler plain,penalties,json_schema]
                                      [--name NAME] [--only engine,server] [--quick]
                                      [--model smollm2] [--batch 16]

On the demo-sized GPT-2 (4 layers, width 256, vocab 4096, random weights; the tokenizer is a
4096-token BPE trained on the IMDB sample when it is there):

1. engine: new tokens per second for a batch of 16 prompts (``--batch``; 32 tokens each, 48 new
   tokens, EOS never sampled, temperature 1, no top-k/top-p, fp32) through ``rlhf.inference`` (as
   many requests submitted at once to an InferenceEngine, text included), beside ``transformers``'
   ``model.generate(do_sample=True)`` and ``rlhf.generation.sample`` on the same model and ids.
   One fresh process; sides alternated; ``--repeats`` rounds of 4 batches each.
2. server: 64 concurrent clients, each sending streaming ``/v1/completions`` requests one after
   another (48 tokens each), against ``rlhf serve policy-server`` in its own process; throughput
   (completion tokens per second), time to first token and end-to-end latency per request
   (p50/p99), beside the raw engine under the same closed loop of 64 callers in one process
   (no HTTP). The client is a minimal asyncio HTTP/1.1 reader, in this process. ``--stream-interval
   1,4`` runs the server once per round with each ``stream_interval`` (tokens per write after the
   first), ``--engine-process off,on`` with its engine in the server's process and in a child
   process of its own. Each run also records where the CPUs went: the cores used by the process's main thread
   (the event loop), by its other threads (the engine's worker and its OpenMP team), and by the
   client, from the kernel's per-thread CPU times.

``--sampler plain,penalties,json_schema`` runs the engine and each server variant once per sampler
setting, so the cost per token of the sampler's features is known: ``penalties`` sets
repetition, frequency and presence penalties on every request; ``json_schema`` constrains every
sample to a JSON schema (structured output; no ``min_tokens`` then, and a sample may end early:
tokens per second counts the tokens generated).

``--model`` serves a real model instead, as ``rlhf import-model`` takes it (``smollm2``:
SmolLM2-135M-Instruct, a Llama with grouped-query attention; the smollm2 extra), imported once into
bench/.cache; the prompts are cut to 32 of its tokens in the same way.

Writes bench/results/serving-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import machine_info, summary, thread_env, write_json  # noqa: E402

SHAPE = dict(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=4096)
PROMPT_TOKENS, NEW_TOKENS, BATCH = 32, 48, 16
CLIENTS = 64
REVIEW_SCHEMA = {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                                   "review": {"type": "string"}},
                 "required": ["stars", "review"], "additionalProperties": False}
# sampler settings: the fields of each request (OpenAI's names; GenerationRequest's in sampler_request)
SAMPLERS = {
    "plain": {},
    "penalties": {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "review",
                                                                               "schema": REVIEW_SCHEMA}}},
}


def sampler_request(sampler: str):
    """The engine's GenerationRequest of a benchmark request with ``sampler``'s settings."""
    from rlhf.inference.guided import Guide
    from rlhf.serving import GenerationRequest

    if sampler == "json_schema":
        return GenerationRequest(max_new_tokens=NEW_TOKENS, guide=Guide("json_schema", json.dumps(REVIEW_SCHEMA)))
    return GenerationRequest(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **SAMPLERS[sampler])


def sampler_body(sampler: str) -> dict:
    """The HTTP request's sampling fields with ``sampler``'s settings."""
    base = {} if sampler == "json_schema" else {"min_tokens": NEW_TOKENS}
    return {**base, **SAMPLERS[sampler]}


# -- assets -----------------------------------------------------------------------------------------


def texts(n: int = 2000) -> list[str]:
    from rlhf.judge import default_data_dir, load_imdb

    try:
        return [r.text for r in load_imdb(default_data_dir())[:n]]
    except Exception:  # noqa: BLE001 - synthetic text when the shared data is not there
        words = "the movie was good bad great dull fun and acting plot story film really not very".split()
        return [" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(40)) for i in range(n)]


def build_assets(quick: bool, real_model: str | None = None) -> tuple[Path, str, list[str]]:
    """A registry with the demo-shaped random policy, or the imported ``real_model``; returns
    (registry root, version, prompts)."""
    from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
    from rlhf.registry import ModelRegistry

    shape = dict(SHAPE, n_layer=2, n_embd=64, n_head=2) if quick else SHAPE
    root = BENCH / ".cache" / (f"serving-{real_model}" if real_model else "serving-quick" if quick else "serving")
    reg = ModelRegistry(root / "registry")
    corpus = texts()
    tok = None
    if real_model:
        from rlhf.model_import import import_model

        v = import_model(real_model, reg.root).version
    else:
        v = reg.latest("policy")
    if v is None:
        tok = train_tokenizer(corpus, vocab_size=shape["vocab_size"])
        model = build_tiny_lm(TinyLMConfig(**{**shape, "vocab_size": len(tok)}), seed=0)
        v = reg.publish("policy", lambda d: save_pretrained(model, tok, d), base_model="bench-random").version
    from rlhf.models import load_tokenizer

    tok = tok or load_tokenizer(reg.path("policy", v))
    prompts = []
    for t in corpus:  # prompts of exactly PROMPT_TOKENS tokens that re-tokenize to themselves
        ids = tok(t, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        if len(ids) < PROMPT_TOKENS:
            continue
        p = tok.decode(ids)
        if tok(p, add_special_tokens=False)["input_ids"] == ids:
            prompts.append(p)
        if len(prompts) >= 256:
            break
    return reg.root, v, prompts


# -- worker: engine vs generate (one process) -------------------------------------------------------


def engine_vs_generate(registry: Path, version: str, prompts: list[str], repeats: int, batches: int,
                       samplers: list[str] = ("plain",), batch_size: int = BATCH) -> dict:
    """Tokens per second of each side, ``repeats`` alternated turns of ``batches`` timed batches
    (after one untimed batch). Each turn's torch work runs on a thread of its own that ends with the
    turn (the engine's worker; a fresh thread for the others), so only one OpenMP thread team is alive
    at a time, as in a server process (rlhf.runtime.threads)."""
    import threading

    import torch

    from rlhf.generation import SamplingParams, sample, tokenize_prompts
    from rlhf.inference.engine import EngineConfig, InferenceEngine, complete
    from rlhf.registry import ModelRegistry
    from rlhf.runtime.threads import use_model_threads
    from rlhf.serving import PolicyEngine

    path = ModelRegistry(registry).path("policy", version)
    policy = PolicyEngine(path, version)
    model, tok = policy.model, policy.tokenizer
    rows = prompts[:batch_size]
    ids, mask = tokenize_prompts(tok, rows, 512)
    assert ids.shape == (batch_size, PROMPT_TOKENS), ids.shape
    eos = tok.eos_token_id
    loop = asyncio.new_event_loop()

    def timed(batch) -> float:
        batch()  # untimed: warms this thread's allocator and thread team
        t0 = time.perf_counter()
        n = sum(batch() for _ in range(batches))
        return n / (time.perf_counter() - t0)

    def on_own_thread(batch) -> float:
        out: list[float] = []

        def run():
            use_model_threads()
            out.append(timed(batch))

        t = threading.Thread(target=run)
        t.start()
        t.join()
        return out[0]

    def engine_turn(profile: bool = False, sampler: str = "plain"):
        req = sampler_request(sampler)

        async def start():
            e = InferenceEngine(policy, EngineConfig(max_batch_size=64, seed=0))
            e.start()
            return e

        engine = loop.run_until_complete(start())

        def batch() -> int:
            async def go():
                gens = [engine.submit(engine.encode(p), req) for p in rows]
                return await asyncio.gather(*(complete(g) for g in gens))

            return sum(len(s.token_ids) for (s,) in loop.run_until_complete(go()))

        try:
            return (timed(batch), type(engine.runner).__name__,
                    profile_engine_step(engine, loop, rows, req) if profile else None)
        finally:
            loop.run_until_complete(engine.close())

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=eos,
                                 eos_token_id=eos)
        return (out.shape[1] - ids.shape[1]) * batch_size

    def old() -> int:
        r = sample(model, ids, mask, SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS), eos, eos)
        return r.response_ids.numel()

    sides = {"engine": lambda: engine_turn()[0], "hf-generate": lambda: on_own_thread(hf),
             "generation.sample": lambda: on_own_thread(old)}
    for sampler in samplers:
        if sampler != "plain":
            sides[f"engine+{sampler}"] = lambda sampler=sampler: engine_turn(sampler=sampler)[0]
    tps: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(repeats):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in order:
            tps[name].append(sides[name]())
    _, runner, prof = engine_turn(profile=True)
    return {"tokens_per_second": tps, "runner": runner, "profile": prof}


def profile_engine_step(engine, loop, rows, req) -> dict:
    """Where one batch's generation time goes, from the engine's own timers (seconds per batch)."""
    from dataclasses import asdict

    from rlhf.inference.engine import complete

    async def go():
        gens = [engine.submit(engine.encode(p), req) for p in rows]
        await asyncio.gather(*(complete(g) for g in gens))

    before = asdict(engine.stats)
    t0 = time.perf_counter()
    loop.run_until_complete(go())
    wall = time.perf_counter() - t0
    after = asdict(engine.stats)
    d = {k: after[k] - before[k] for k in ("forward_seconds", "choose_seconds", "iteration_seconds", "decode_steps")}
    d["wall_seconds"] = wall
    return d


# -- worker: raw engine under 64 closed-loop callers ------------------------------------------------


def raw_engine_closed_loop(registry: Path, version: str, prompts: list[str], requests_per_client: int) -> dict:
    from rlhf.inference.engine import EngineConfig, InferenceEngine, stream_samples
    from rlhf.registry import ModelRegistry
    from rlhf.serving import GenerationRequest, PolicyEngine

    policy = PolicyEngine(ModelRegistry(registry).path("policy", version), version)
    req = GenerationRequest(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    async def go():
        e = InferenceEngine(policy, EngineConfig(max_batch_size=64, max_queue=256, seed=0))
        e.start()
        ttft, e2e, tokens = [], [], 0

        async def client(i: int):
            nonlocal tokens
            for k in range(requests_per_client):
                t0 = time.perf_counter()
                first = None
                async for ev in stream_samples(e.submit(e.encode(prompts[(i + k) % len(prompts)]), req)):
                    if first is None:
                        first = time.perf_counter() - t0
                    if ev.sample is not None:
                        tokens += len(ev.sample.token_ids)
                ttft.append(first)
                e2e.append(time.perf_counter() - t0)

        await asyncio.gather(*(client(i) for i in range(2)))  # warm-up
        ttft.clear(), e2e.clear()
        tokens = 0
        rows0, steps0 = e.stats.decode_rows, e.stats.decode_steps
        cpu0 = thread_cpu(os.getpid())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        wall = time.perf_counter() - t0
        cpu = cpu_split(os.getpid(), cpu0, wall)
        mean_rows = (e.stats.decode_rows - rows0) / max(1, e.stats.decode_steps - steps0)
        await e.close()
        return {"tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall,
                "ttft": ttft, "e2e": e2e, "mean_rows_per_step": mean_rows, "cpu": cpu}

    return asyncio.run(go())


# -- the server side ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def thread_cpu(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) so far of each thread of process ``pid`` and of its child
    processes (the engine process, with ``engine_process``), keyed (pid, tid) (Linux; {} elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for p in [pid, *_children(pid)] if os.path.isdir("/proc") else []:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{p}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended
            out[(p, int(tid))] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def cpu_split(pid: int, before: dict[tuple[int, int], float], wall: float) -> dict:
    """Cores used during ``wall`` seconds by the process's main thread (the event loop) and by all
    other threads, its own and its child processes' (the model thread and its OpenMP team, helpers)."""
    after = thread_cpu(pid)
    if not after:
        return {}
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    main = used.pop((pid, pid), 0.0)
    return {"main_thread_cores": main / wall, "other_threads_cores": sum(used.values()) / wall}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def http_client(port: int, prompts: list[str], i: int, n: int, out: dict, sampler: str = "plain") -> None:
    """One client on one keep-alive connection: ``n`` streaming completions, one after another."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for k in range(n):
            body = json.dumps({"model": "rlhf-policy", "prompt": prompts[(i + k) % len(prompts)], "stream": True,
                               "max_tokens": NEW_TOKENS, **sampler_body(sampler),
                               "stream_options": {"include_usage": True}}).encode()
            t0 = time.perf_counter()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
            first, last_data = None, b""
            while True:  # chunked transfer encoding
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter() - t0
                if b'"usage"' in data:
                    last_data = data
            e2e = time.perf_counter() - t0
            usage = next(json.loads(line[6:])["usage"] for line in last_data.split(b"\n")
                         if line.startswith(b"data: {") and b'"usage"' in line)
            out["tokens"] += usage["completion_tokens"]
            out["ttft"].append(first)
            out["e2e"].append(e2e)
    finally:
        writer.close()


def server_closed_loop(registry: Path, version: str, prompts: list[str], threads: int, requests_per_client: int,
                       stream_interval: int = 1, engine_process: bool = False, sampler: str = "plain") -> dict:
    port = free_port()
    env = thread_env(threads)
    env.update(RLHF_POLICY_SERVER_REGISTRY_DIR=str(registry), RLHF_POLICY_SERVER_HTTP_PORT=str(port),
               RLHF_POLICY_SERVER_METRICS_PORT="-1", RLHF_POLICY_SERVER_LOG_LEVEL="WARNING",
               RLHF_POLICY_SERVER_MAX_BATCH_PROMPTS="64", RLHF_POLICY_SERVER_MAX_WAITING_SAMPLES="256",
               RLHF_POLICY_SERVER_STREAM_INTERVAL=str(stream_interval),
               RLHF_POLICY_SERVER_ENGINE_PROCESS=str(engine_process).lower(),
               RLHF_POLICY_SERVER_ALLOW_ANONYMOUS="true")  # loopback only; docs/security.md
    logs = BENCH / ".cache" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = open(logs / "serving-policy-server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "policy-server"], env=env, cwd=ROOT,
                            stderr=log_file)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("policy-server did not become healthy")
            time.sleep(0.2)

        async def go(n_clients: int, n: int) -> dict:
            out = {"tokens": 0, "ttft": [], "e2e": []}
            cpu0, client0 = thread_cpu(proc.pid), time.process_time()
            t0 = time.perf_counter()
            await asyncio.gather(*(http_client(port, prompts, i, n, out, sampler) for i in range(n_clients)))
            out["wall_seconds"] = wall = time.perf_counter() - t0
            out["cpu"] = {**cpu_split(proc.pid, cpu0, wall), "client_cores": (time.process_time() - client0) / wall}
            out["tokens_per_second"] = out["tokens"] / out["wall_seconds"]
            return out

        asyncio.run(go(2, 2))  # warm-up
        return asyncio.run(go(CLIENTS, requests_per_client))
    finally:
        proc.terminate()
        rc = proc.wait(60)
        log_file.close()
        if rc != 0:
            print(f"policy-server exited with {rc}; see {logs / 'serving-policy-server.log'}", file=sys.stderr)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def latency(r: dict) -> dict:
    return {k: {"p50": pct(r[k], 50), "p99": pct(r[k], 99), "mean": statistics.mean(r[k])} for k in ("ttft", "e2e")}


# -- main ---------------------------------------------------------------------------------------------


def run_worker(args: list[str], threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], env=thread_env(threads), cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_cpu(runs: list[dict]) -> dict:
    """Mean cores used by each part over the runs, and CPU seconds of the other threads (the model
    thread's team) per 1,000 generated tokens."""
    runs = [r for r in runs if r.get("cpu")]
    if not runs:
        return {}
    out = {k: statistics.mean(r["cpu"][k] for r in runs) for k in runs[0]["cpu"]}
    out["other_threads_seconds_per_1k_tokens"] = statistics.mean(
        r["cpu"]["other_threads_cores"] * r["wall_seconds"] / r["tokens"] * 1000 for r in runs)
    return out


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine / server process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--name", default=None)
    ap.add_argument("--only", default="engine,server")
    ap.add_argument("--stream-interval", default="1",
                    help="the policy-server's stream_interval (tokens per write after the first), or a "
                         "comma-separated list of them, each run in every round")
    ap.add_argument("--engine-process", default="off",
                    help="off, on, or off,on: the policy-server's engine in its own process (each run in every round)")
    ap.add_argument("--sampler", default="plain",
                    help="plain, penalties, json_schema, or a comma-separated list: the sampler settings of every "
                         "request (each run in every round)")
    ap.add_argument("--quick", action="store_true", help="a tiny model and short runs (smoke test)")
    ap.add_argument("--model", help="a real model instead of the demo-shaped GPT-2, as rlhf import-model takes it (smollm2)")
    ap.add_argument("--batch", type=int, default=BATCH, help="prompts per batch of the engine-vs-generate part (1-64)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, registry, version, prompts_file, *rest = a.worker
        from rlhf.runtime.threads import prepare_process

        prepare_process()  # as `rlhf serve` does: intra-op threads (OMP_NUM_THREADS) for the model thread only
        prompts = json.loads(Path(prompts_file).read_text())
        if kind == "engine":
            res = engine_vs_generate(Path(registry), version, prompts, int(rest[0]), int(rest[1]), rest[2].split(","),
                                     int(rest[3]))
        else:
            res = raw_engine_closed_loop(Path(registry), version, prompts, int(rest[0]))
        print(json.dumps(res))
        return

    name = a.name or ((f"cpu-{a.threads}threads" if not a.quick else "cpu-quick") + (f"-{a.model}" if a.model else "")
                      + (f"-batch{a.batch}" if a.batch != BATCH else ""))
    if not 1 <= a.batch <= 64:
        ap.error("--batch: 1 to 64 prompts")
    intervals = [int(x) for x in a.stream_interval.split(",")]
    if not intervals or min(intervals) < 1:
        ap.error("--stream-interval: integers >= 1")
    modes = a.engine_process.split(",")
    if not modes or not set(modes) <= {"off", "on"}:
        ap.error("--engine-process: off, on, or off,on")
    samplers = a.sampler.split(",")
    if not samplers or not set(samplers) <= set(SAMPLERS):
        ap.error(f"--sampler: one or more of {', '.join(SAMPLERS)}")
    variants = [(si, m == "on", sm) for sm in samplers for m in modes for si in intervals]
    repeats, batches, rpc = (1, 1, 1) if a.quick else (a.repeats, 4, a.requests_per_client)
    registry, version, prompts = build_assets(a.quick, a.model)
    pf = BENCH / ".cache" / "serving-prompts.json"
    pf.write_text(json.dumps(prompts))
    only = set(a.only.split(","))
    res: dict = {"machine": machine_info("cpu", a.threads), "threads": a.threads, "shape": a.model or SHAPE,
                 "batch": a.batch, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "clients": CLIENTS,
                 "requests_per_client": rpc, "stream_intervals": intervals, "engine_process": modes,
                 "samplers": samplers,
                 "loadavg_start": loadavg()}
    if "engine" in only:
        r = run_worker(["engine", str(registry), version, str(pf), str(repeats), str(batches), ",".join(samplers),
                        str(a.batch)], a.threads)
        res["engine"] = {k: summary(v) for k, v in r["tokens_per_second"].items()}
        res["engine"]["runner"] = r["runner"]
        res["engine"]["profile"] = r["profile"]
        res["engine_raw"] = r["tokens_per_second"]
        e, g = res["engine"]["engine"]["median"], res["engine"]["hf-generate"]["median"]
        res["engine"]["ratio_vs_generate"] = e / g
        print(f"engine {e:,.0f} tok/s vs generate {g:,.0f} ({e / g:.2f}x)", flush=True)
    if "server" in only:
        raws, servers = [], {v: [] for v in variants}
        for rep in range(repeats):  # alternated: raw engine, then each server variant, raw engine, ...
            raws.append(run_worker(["closed", str(registry), version, str(pf), str(rpc)], a.threads))
            line = f"round {rep + 1}: raw engine {raws[-1]['tokens_per_second']:,.0f} tok/s"
            for v in variants:
                servers[v].append(server_closed_loop(registry, version, prompts, a.threads, rpc, *v))
                line += f", server ({variant_label(*v)}) {servers[v][-1]['tokens_per_second']:,.0f} tok/s"
            print(line, flush=True)
        raw_tps = summary([r["tokens_per_second"] for r in raws])
        by_variant = []
        for (si, ep, sm), runs in servers.items():
            tps = summary([r["tokens_per_second"] for r in runs])
            by_variant.append({
                "stream_interval": si, "engine_process": ep, "sampler": sm,
                "server_tokens_per_second": tps, "ratio": tps["median"] / raw_tps["median"],
                "server_latency": latency({k: [x for r in runs for x in r[k]] for k in ("ttft", "e2e")}),
                "server_cpu": mean_cpu(runs)})
        res["server"] = {
            "raw_engine_tokens_per_second": raw_tps,
            "raw_engine_latency": latency({k: [x for r in raws for x in r[k]] for k in ("ttft", "e2e")}),
            "raw_mean_rows_per_step": statistics.mean(r["mean_rows_per_step"] for r in raws),
            "raw_engine_cpu": mean_cpu(raws),
            "variants": by_variant,
        }
    res["loadavg_end"] = loadavg()
    out = BENCH / "results" / f"serving-{name}"
    write_json(out.with_suffix(".json"), res)
    out.with_suffix(".md").write_text(render(res, name))
    print(out.with_suffix(".md").read_text())


def variant_label(stream_interval: int, engine_process: bool, sampler: str = "plain") -> str:
    return (f"`stream_interval` {stream_interval}" + (", engine process" if engine_process else "")
            + (f", sampler {sampler}" if sampler != "plain" else ""))


def render(r: dict, name: str) -> str:
    m = r["machine"]
    L = [f"# Inference engine and HTTP API: `{name}`\n",
         f"Machine: {m.get('cpu_model')}, {m.get('cpu_cores')} cores, torch {m.get('torch')}, "
         f"{r['threads']} torch threads; load average {r['loadavg_start']:.1f} at the start, "
         f"{r['loadavg_end']:.1f} at the end.\n",
         (f"Model: {r['shape']} (imported), fp32. " if isinstance(r["shape"], str) else
          f"Model: GPT-2 {r['shape']['n_layer']} layers x {r['shape']['n_embd']}, vocab {r['shape']['vocab_size']}, "
          "random weights, fp32. ") +
         f"Prompts {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens each "
         "(EOS never sampled), temperature 1.\n"]
    if "engine" in r:
        e = r["engine"]
        L.append(f"## Batch {r['batch']}: new tokens per second (median, min–max)\n")
        L.append("| side | tokens/s | vs generate |\n|---|---|---|")
        g = e["hf-generate"]["median"]
        engine_sides = [(k, f"`rlhf.inference` engine, sampler {k.split('+')[1]}") for k in e
                        if k.startswith("engine+")]
        for k, label in (("hf-generate", "transformers `generate(do_sample=True)`"),
                         ("generation.sample", "`rlhf.generation.sample`"),
                         ("engine", f"`rlhf.inference` engine ({e['runner']})"), *engine_sides):
            s = e[k]
            L.append(f"| {label} | {s['median']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f}) | {s['median'] / g:.2f}x |")
        p = e["profile"]
        other = p["iteration_seconds"] - p["forward_seconds"] - p["choose_seconds"]
        L.append(f"\nWhere one batch's {p['wall_seconds'] * 1000:.0f} ms go (the engine's timers, "
                 f"{p['decode_steps']} decode steps): forward passes {p['forward_seconds'] * 1000:.0f} ms, "
                 f"token choice {p['choose_seconds'] * 1000:.0f} ms, the rest of the worker's iterations "
                 f"{other * 1000:.0f} ms; outside the worker (callers, text) "
                 f"{(p['wall_seconds'] - p['iteration_seconds']) * 1000:.0f} ms.\n")
    if "server" in r:
        s = r["server"]
        L.append(f"## {r['clients']} concurrent streaming clients, {r['requests_per_client']} requests each\n")
        L.append("| | tokens/s (median, min–max) | vs raw engine | TTFT p50 / p99 | end-to-end p50 / p99 |\n"
                 "|---|---|---|---|---|")
        raw = s["raw_engine_tokens_per_second"]
        rows = [("raw engine (in process, no HTTP)", raw, None, s["raw_engine_latency"])]
        for b in s["variants"]:
            label = variant_label(b["stream_interval"], b["engine_process"], b.get("sampler", "plain"))
            rows.append((f"policy-server, HTTP `/v1/completions` stream, {label}",
                         b["server_tokens_per_second"], b["ratio"], b["server_latency"]))
        for label, tps, ratio, lat in rows:
            L.append(f"| {label} | {tps['median']:,.0f} ({tps['min']:,.0f}–{tps['max']:,.0f}) | "
                     f"{'–' if ratio is None else f'**{ratio * 100:.0f} %**'} | "
                     f"{lat['ttft']['p50'] * 1000:.0f} / {lat['ttft']['p99'] * 1000:.0f} ms | "
                     f"{lat['e2e']['p50']:.2f} / {lat['e2e']['p99']:.2f} s |")
        L.append(f"\n`stream_interval` N: after the first token, one write per N tokens of each sample. Engine "
                 f"process: the engine runs in a child process of the server (`engine_process`). Mean rows "
                 f"per decode step (raw engine): {s['raw_mean_rows_per_step']:.1f}.\n")
        rc = s.get("raw_engine_cpu")
        if rc:
            L.append("Where the CPUs went during the timed runs (mean cores busy; the main thread runs the event "
                     "loop, the other threads are the engine's worker with its OpenMP team and helpers, in the "
                     "server's process or in its engine process; the client of the server runs in the "
                     "benchmark's process):\n")
            L.append("| | main thread (event loop) | other threads (model) | model CPU s / 1k tokens | client |\n"
                     "|---|---|---|---|---|")
            L.append(f"| raw engine | {rc['main_thread_cores']:.2f} | {rc['other_threads_cores']:.2f} | "
                     f"{rc['other_threads_seconds_per_1k_tokens']:.2f} | (in the main thread) |")
            for b in s["variants"]:
                sc = b.get("server_cpu")
                if sc:
                    label = variant_label(b["stream_interval"], b["engine_process"], b.get("sampler", "plain"))
                    L.append(f"| policy-server, {label} | "
                             f"{sc['main_thread_cores']:.2f} | "
                             f"{sc['other_threads_cores']:.2f} | {sc['other_threads_seconds_per_1k_tokens']:.2f} | "
                             f"{sc['client_cores']:.2f} |")
            L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
