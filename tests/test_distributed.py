"""rlhf.distributed: `rlhf train` under torchrun (gloo, one thread per rank) takes the steps one
process takes at the same global batch; FSDP2 trains the demo's policy and saves a whole model;
and a 2-rank job killed with kill -9 resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from rlhf.config import from_dict
from rlhf.models import TinyLMConfig, load_causal_lm
from rlhf.train import JOBS, run_local
from tests.training import (assert_equal_weights, children, losses, make_files, run_train, start_train,
                            wait_for_checkpoint, weights, write_config)

pytestmark = pytest.mark.slow

SFT = {"sft": {"max_steps": 20, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "max_length": 32},
       "checkpoint": {"every_steps": 0}}
# 9 comparisons in batches of 4: the last batch has one, and the second rank's share is empty
RM = {"rm": {"batch_size": 4, "epochs": 3, "lr": 1e-3, "max_length": 32}, "min_comparisons": 2,
      "checkpoint": {"every_steps": 0}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("dist"))


def _one_process(stage: str, cfg: dict, out) -> None:
    torch.set_num_threads(1)  # as each torchrun rank
    run_local(stage, from_dict(JOBS[stage], {**cfg, "output": str(out)}))


@pytest.fixture(scope="module")
def sft_two(files, tmp_path_factory):
    """SFT in 2 processes, uninterrupted: the reference of the kill -9 test too."""
    d = tmp_path_factory.mktemp("sft2")
    cfg = {**SFT, "model": str(files / "base"), "data": str(files / "demos.jsonl"), "checkpoint": {"every_steps": 3}}
    run_train("sft", "--config", str(write_config(d / "job.yaml", cfg)), "--set", f"output={d / 'out'}", nproc=2)
    return cfg, d / "out"


def test_sft_in_two_processes_takes_the_steps_of_one(files, sft_two, tmp_path):
    cfg, two = sft_two
    _one_process("sft", cfg, tmp_path / "one")
    a, b = losses(tmp_path / "one"), losses(two)
    assert len(a) == len(b) == 20  # 21 demonstrations, batches of 4: the 6th batch of each epoch has 1
    assert b == pytest.approx(a, rel=1e-5)
    wa, wb = weights(tmp_path / "one"), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4, rtol=0), k


def test_rm_in_two_processes_takes_the_steps_of_one(files, tmp_path):
    cfg = {**RM, "model": str(files / "base"), "data": str(files / "comparisons.jsonl")}
    run_train("rm", "--config", str(write_config(tmp_path / "job.yaml", cfg)), "--set", f"output={tmp_path / 'two'}",
              nproc=2)
    _one_process("rm", cfg, tmp_path / "one")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 9
    assert b == pytest.approx(a, rel=1e-5)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    # The final layer norm's bias and the head's bias shift every score alike, and a comparison
    # sees only differences: their gradient is 0 up to rounding, and Adam turns rounding into steps
    # of the learning rate. Every other weight agrees.
    shift = {"model.safetensors:ln_f.bias", "reward_head.safetensors:bias"}
    assert shift < wa.keys() == wb.keys()
    for k in wa.keys() - shift:
        assert torch.allclose(wa[k], wb[k], atol=1e-4, rtol=0), k


def test_fsdp_trains_the_demo_policy_and_saves_the_whole_model(tmp_path):
    """FSDP2 with 2 ranks shards the demo's policy (4 blocks of 256); the saved Hugging Face model
    loads back whole, and equals what one process trains at the same global batch."""
    files = make_files(tmp_path / "files", TinyLMConfig())  # the demo's policy shape
    cfg = {"model": str(files / "base"), "data": str(files / "demos.jsonl"), "distributed": {"strategy": "fsdp"},
           "sft": {"max_steps": 4, "batch_size": 4, "lr": 3e-4, "warmup_steps": 1, "max_length": 32},
           "checkpoint": {"every_steps": 0}}
    run_train("sft", "--config", str(write_config(tmp_path / "job.yaml", cfg)), "--set", f"output={tmp_path / 'fsdp'}",
              nproc=2)
    _one_process("sft", cfg, tmp_path / "one")
    model = load_causal_lm(tmp_path / "fsdp")  # a plain Hugging Face model, no sharding left in it
    assert sum(p.numel() for p in model.parameters()) > 3_000_000
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    assert wa.keys() == wb.keys()  # the tied output embedding saved once, as one process saves it
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4, rtol=0), k


def test_two_process_job_killed_by_kill_9_resumes_to_the_same_weights(files, sft_two, tmp_path):
    cfg, reference = sft_two
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoints"
    job = write_config(tmp_path / "job.yaml", cfg)
    proc = start_train("sft", "--config", str(job), "--set", f"output={out}", nproc=2, log=tmp_path / "run.log")
    try:
        wait_for_checkpoint(proc, ckpt, random.choice([3, 6, 9]))
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(random.choice(ranks), signal.SIGKILL)  # one rank dies; torchrun ends the other
        assert proc.wait(120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    run_train("sft", "--resume", str(ckpt), nproc=2)
    assert_equal_weights(reference, out)
    assert losses(reference) == losses(out)
