"""rlhf.storage.jobs: the trainer's job records, on every backend."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from rlhf.errors import NotFoundError
from rlhf.storage.jobs import JobStore
from rlhf.storage.schema import outbox


def test_a_record_keeps_what_happened_to_its_job(engine):
    store = JobStore(engine)
    job = store.create("ppo", "alice", {"steps": 3, "ppo": {"lr": 1e-5}}, "process", "/registry/checkpoints")
    assert (job.status, job.owner, job.attempts, job.restarts, job.runner) == ("pending", "alice", 0, 0, None)
    assert job.checkpoint_dir == f"/registry/checkpoints/{job.job_id}" and job.config["ppo"] == {"lr": 1e-5}
    store.report(job.job_id, status="running", message="started", runner={"pid": 7}, attempts=1)
    store.report(job.job_id, message="PPO step 1/3", progress=1 / 3, stage="PPO",
                 metrics={"kl": 0.5, "reward": float("nan"), "_responses": ["text"], "flag": True, "name": "x"})
    store.report(job.job_id, message="PPO step 2/3", progress=5.0, metrics={"kl": 0.25}, stage="PPO")
    j = store.get(job.job_id)
    assert (j.status, j.progress, j.runner, j.attempts) == ("running", 1.0, {"pid": 7}, 1)
    assert j.metrics == {"kl": 0.25}  # only finite numbers are kept (no NaN, no text, no flags)
    events = store.events(job.job_id)
    assert [e.message for e in events] == ["queued", "started", "PPO step 1/3", "PPO step 2/3"]
    assert [e.status for e in events] == ["pending", "running", "running", "running"]
    assert store.events(job.job_id, after=events[1].event_id) == events[2:]
    assert [e.metrics for e in store.stage_events("PPO", 0)] == [{"kl": 0.5}, {"kl": 0.25}]
    assert store.count_active() == 1
    # an outcome is final: a late report from a process does not reopen the job
    store.report(job.job_id, status="succeeded", message="done", runner=None)
    assert store.report(job.job_id, status="failed", message="late", only_if_active=True) is None
    assert store.get(job.job_id).status == "succeeded" and store.count_active() == 0
    assert [j.job_id for j in store.list(["pending", "running"])] == []


def test_a_published_version_is_recorded_and_queued_for_announcement_together(engine):
    store = JobStore(engine)
    job = store.create("sft", "bob", {}, "process", "/c")
    store.add_version(job.job_id, "v1", "rlhf.models.v1", "rlhf.models.v1.ModelVersionPublishedEvent", b"\x08\x01")
    store.add_version(job.job_id, "v2", "rlhf.models.v1", "rlhf.models.v1.ModelVersionPublishedEvent", b"\x08\x02")
    assert store.get(job.job_id).published_versions == ["v1", "v2"]
    with engine.connect() as c:
        rows = c.execute(select(outbox.c.topic, outbox.c.key, outbox.c.payload).order_by(outbox.c.id)).all()
    assert [(r.topic, r.key, bytes(r.payload)) for r in rows] == [("rlhf.models.v1", "v1", b"\x08\x01"),
                                                                   ("rlhf.models.v1", "v2", b"\x08\x02")]


def test_cancellation_unknown_jobs_and_served_versions(engine):
    store = JobStore(engine)
    job = store.create("rm", "carol", {}, "kubernetes", "/c")
    assert not store.cancel_requested(job.job_id)
    assert store.request_cancel(job.job_id).cancel_requested and store.cancel_requested(job.job_id)
    for call in (lambda: store.get("nope"), lambda: store.request_cancel("nope"),
                 lambda: store.report("nope", message="x"), lambda: store.add_version("nope", "v", "t", "m", b"")):
        with pytest.raises(NotFoundError, match="no job 'nope'"):
            call()
    assert store.served("policy") == ""
    store.set_served("policy", "v20260102")
    store.set_served("policy", "v20260101")  # an older announcement (a replay) does not go back
    store.set_served("reward", "v1")
    assert (store.served("policy"), store.served("reward")) == ("v20260102", "v1")
    assert not math.isnan(store.get(job.job_id).progress)
