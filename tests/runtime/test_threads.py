"""rlhf.runtime.threads: a prepared process gives its threads one intra-op thread each, and the
model threads of the engine, the ModelExecutor and trainer jobs the process's count."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from rlhf.runtime import threads
from rlhf.runtime.server import ModelExecutor

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, threading
from rlhf.runtime.threads import prepare_process, use_model_threads
n = prepare_process(int(sys.argv[1]))
import torch
seen = {"returned": n, "main": torch.get_num_threads()}
def plain():
    seen["plain_thread"] = torch.get_num_threads()
def model():
    use_model_threads()
    seen["model_thread"] = torch.get_num_threads()
for f in (plain, model):
    t = threading.Thread(target=f); t.start(); t.join()
print(json.dumps(seen))
"""


def _probe(arg: int, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.ENV)}
    e.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, str(arg)], env=e, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arg, env, want", [
    (3, {}, 3),  # an explicit count wins
    (0, {"OMP_NUM_THREADS": "3"}, 3),  # else what the operator asked OpenMP for
    (0, {threads.ENV: "3", "OMP_NUM_THREADS": "1"}, 3),  # a child of a prepared process keeps its count
])
def test_prepared_process_gives_intra_op_threads_to_the_model_thread_only(arg, env, want):
    seen = _probe(arg, **env)
    assert seen == {"returned": want, "main": 1, "plain_thread": 1, "model_thread": want}


def test_prepare_process_defaults_to_the_cpus_it_may_use():
    assert _probe(0)["returned"] == len(os.sched_getaffinity(0))


def test_prepare_process_after_torch_is_imported_warns_and_leaves_openmp_alone(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    with caplog.at_level("WARNING", logger="rlhf.runtime"):
        assert threads.prepare_process(2) == 2
    assert "after torch was imported" in caplog.text
    assert "OMP_NUM_THREADS" not in os.environ and os.environ[threads.ENV] == "2"


def test_bad_thread_count_is_refused(monkeypatch):
    monkeypatch.setenv(threads.ENV, "-2")
    with pytest.raises(ValueError, match=">= 1"):
        threads.prepare_process()


def test_model_executor_worker_uses_the_model_thread_count(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")

    async def main():
        ex = ModelExecutor("threads-test")
        try:
            return await ex.run(torch.get_num_threads)
        finally:
            await ex.aclose()

    before = torch.get_num_threads()
    try:
        assert asyncio.run(main()) == 3
    finally:
        torch.set_num_threads(before)  # torch.set_num_threads also sets MKL's count, process-wide


def test_the_engine_claims_its_threads(monkeypatch, tmp_path):
    """The engine's worker thread owns torch's intra-op threads (a trainer job runs in a process of
    its own, services.trainer.worker, which claims them there with the trainer's torch_threads)."""
    from rlhf.inference import engine as engine_mod
    from rlhf.inference.engine import EngineConfig, InferenceEngine, complete
    from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
    from rlhf.serving import GenerationRequest, PolicyEngine

    calls: list[tuple[str, int]] = []

    def record(n: int = 0) -> None:
        calls.append((threading.current_thread().name, n))

    monkeypatch.setattr(engine_mod, "use_model_threads", record)
    tok = train_tokenizer(["the film was good and the plot was fun"] * 20, vocab_size=280)
    save_pretrained(build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                               vocab_size=len(tok)), seed=0), tok, tmp_path)
    policy = PolicyEngine(tmp_path, "v1")

    async def main():
        e = InferenceEngine(policy, EngineConfig(seed=0))
        e.start()
        (sample,) = await complete(e.submit(e.encode("the film"), GenerationRequest(max_new_tokens=2)))
        await e.close()
        return sample

    sample = asyncio.run(main())
    assert sample.token_ids
    assert {name.split("-")[0]: n for name, n in calls} == {"engine": 0}, calls
