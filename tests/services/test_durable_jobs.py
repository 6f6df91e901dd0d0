"""Durable jobs (`rlhf up`, SQLite): a job outlives its process (kill -9: the trainer resumes it from
its checkpoint) and the trainer (stopped: the job's process writes a checkpoint; the next trainer
lists the job again and finishes it), and ends with the weights of an uninterrupted run. The online
loop killed in the middle of its PPO resumes at its iteration and step and counts no comparison
twice."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import grpc
import pytest
import torch
from rlhf_client import trainer_grpc, trainer_pb2
from sqlalchemy import text

from rlhf.config import apply_overrides, from_dict
from rlhf.data import write_jsonl
from rlhf.storage.db import make_engine
from rlhf.storage.jobs import JobStore
from rlhf.train import JOBS, run_local
from tests.services import scenario
from tests.services.helpers import submit_demonstrations, tiny_policy_registry, up_on_free_ports, wait_for
from tests.training import assert_equal_weights, checkpoint_step

pytestmark = pytest.mark.slow

SFT = {"sft.max_steps": 800, "sft.batch_size": 4, "sft.lr": 1e-3, "sft.warmup_steps": 1, "sft.max_length": 32,
       "checkpoint.every_steps": 50}
DEMOS = [(f"review {i}: the film was", [" wonderful and fun", " a great film", " the best story"][i % 3]) for i in range(12)]


@pytest.fixture
def one_thread(monkeypatch):
    """The job processes and the reference run alike: one intra-op thread (bit-for-bit weights)."""
    monkeypatch.setenv("RLHF_TRAINER_TORCH_THREADS", "1")
    torch.set_num_threads(1)


def test_a_job_outlives_its_process_and_the_trainer(tmp_path, one_thread):
    reg = tiny_policy_registry(tmp_path / "registry")
    base = reg.latest("policy")
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'rlhf.db'}"))
    close, addrs, _, _ = up_on_free_ports(tmp_path)
    try:
        submit_demonstrations(addrs["feedback-store"], DEMOS)
        with grpc.insecure_channel(addrs["trainer"]) as ch:
            job = trainer_grpc.TrainerServiceStub(ch).StartJob(trainer_pb2.StartJobRequest(
                kind=trainer_pb2.JOB_KIND_SFT, overrides={"model": base, **{k: str(v) for k, v in SFT.items()}}),
                timeout=30).job
        ckpt = Path(job.checkpoint_dir)
        assert job.owner and ckpt.parent == (tmp_path / "registry" / "checkpoints").resolve()

        # its process killed at a random step after a checkpoint: the trainer resumes it from there
        wait_for("a checkpoint", lambda: checkpoint_step(ckpt) >= random.choice([50, 100]), 300, 0.05)
        os.kill(store.get(job.job_id).runner["pid"], signal.SIGKILL)

        def second_run():
            r = store.get(job.job_id)
            return r if r.attempts == 2 and r.status == "running" else None

        resumed = wait_for("the resumed run", second_run, 300)
        assert resumed.restarts == 1 and "resumed from checkpoint step-" in resumed.message
        at = checkpoint_step(ckpt)
        wait_for("progress after the resume", lambda: checkpoint_step(ckpt) > at, 300)
    finally:
        close()  # the trainer stops: the job's process writes a checkpoint at its step and stops too
    stopped = store.get(job.job_id)
    assert stopped.status == "pending" and stopped.runner is None, stopped.message
    assert stopped.message.startswith("interrupted at step") and "checkpoint" in stopped.message
    interrupted_at = int(stopped.message.split()[3])
    assert checkpoint_step(ckpt) == interrupted_at < 800

    close, addrs, _, _ = up_on_free_ports(tmp_path)  # a new trainer on the same database
    try:
        with grpc.insecure_channel(addrs["trainer"]) as ch:
            stub = trainer_grpc.TrainerServiceStub(ch)
            assert job.job_id in {j.job_id for j in stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=30).jobs}
            events = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=900))
            done = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job
    finally:
        close()
    messages = [e.message for e in events]
    assert done.status == trainer_pb2.JOB_STATUS_SUCCEEDED, done.message
    assert done.attempts == 3 and len(done.published_versions) == 1, messages
    assert any("its run ended without a result (its process ended: killed by SIGKILL" in m for m in messages)
    assert sum(m.startswith(f"resumed from checkpoint step-{interrupted_at:08d}") for m in messages) == 1
    # every step reported once before the kill, and from the checkpoint on after each resume
    assert [m for m in messages if m == "SFT step 800"] == ["SFT step 800"]

    # the same job, uninterrupted, through `rlhf train`: the same weights, bit for bit
    write_jsonl(tmp_path / "demos.jsonl", [{"prompt": p, "response": r} for p, r in DEMOS])
    fields = {**SFT, "model": reg.path("policy", base), "data": tmp_path / "demos.jsonl", "output": tmp_path / "cli",
              "checkpoint.every_steps": 0}
    run_local("sft", from_dict(JOBS["sft"], apply_overrides({}, [f"{k}={v}" for k, v in fields.items()])))
    assert_equal_weights(tmp_path / "cli", reg.path("policy", done.published_versions[-1]))


def test_the_online_loop_resumes_at_its_iteration_and_step(tmp_path, one_thread):
    tiny_policy_registry(tmp_path / "registry")
    engine = make_engine(f"sqlite:///{tmp_path / 'rlhf.db'}")
    store = JobStore(engine)
    close, addrs, _, _ = up_on_free_ports(tmp_path)
    killed: list[int] = []

    def kill_mid_ppo(job_id: str, ev) -> None:
        if not killed and ev.message.startswith("PPO step 2/4"):
            pid = store.get(job_id).runner["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        run = scenario.run_online_loop(addrs, overrides={"ppo.steps": "4", "ppo.checkpoint.every_steps": "1"},
                                       on_event=kill_mid_ppo)
    finally:
        close()
    assert killed and run.job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, run.job.message
    assert run.job.attempts == 2
    messages = [e.message for e in run.events]
    # it resumed in the PPO of iteration 1, at the last step it had reported (a step is reported
    # once its checkpoint is written): every step is reported once
    died = next(i for i, m in enumerate(messages) if m.startswith("its run ended without a result"))
    reached = max(int(m.split()[2].split("/")[0]) for m in messages[:died] if m.startswith("PPO step "))
    assert reached >= 2
    assert sum(m.startswith(f"resumed at PPO step {reached} from checkpoint step-{reached:08d}")
               for m in messages[died:]) == 1, messages[died:]
    for k in range(1, 5):
        assert sum(m.startswith(f"PPO step {k}/4") for m in messages) == 1, k
    # no second round of labeling tasks, no second reward model for the iteration
    with engine.connect() as c:
        tasks = c.execute(text("select count(*) from labeling_tasks")).scalar()
        stored = c.execute(text("select count(*) from submissions where kind = 'ranking'")).scalar()
    assert tasks == int(scenario.LOOP_OVERRIDES["prompts_per_iteration"])
    rewards = [v for v in run.job.published_versions if (tmp_path / "registry" / "reward" / v).is_dir()]
    assert len(rewards) == 1 and sum(m.endswith("training the RM") for m in messages) == 1
    data = json.loads((tmp_path / "registry" / "reward" / rewards[0] / "manifest.json").read_text())["data"]
    assert data["comparisons"] + data["heldout_comparisons"] == stored  # each stored comparison once
    engine.dispose()
