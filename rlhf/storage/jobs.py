"""The trainer's job records: durable, so that ``ListJobs``, ``GetJob`` and ``WatchJob`` outlive the
process that started a job, and a job outlives the process that runs it.

Two kinds of writer share a record: the trainer service (creates it, launches, follows and
resumes it, records cancellations) and the job's own process (rank 0 reports events, progress,
published versions and the outcome). Each change is one transaction: the record's new state and,
for a reported change, the event row that WatchJob replays. A published version's announcement
(``ModelVersionPublishedEvent`` on rlhf.models.v1) goes into the outbox in the same transaction
as the version's entry in the record; the trainer's relay publishes it.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from rlhf.errors import NotFoundError
from rlhf.storage.db import transaction, utcnow
from rlhf.storage.schema import outbox, trainer_job_events, trainer_jobs, trainer_served_versions

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (PENDING, RUNNING)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    kind: str
    owner: str
    config: dict
    status: str
    progress: float
    message: str
    metrics: dict[str, float]
    published_versions: list[str]
    checkpoint_dir: str
    launcher: str
    runner: dict | None
    attempts: int
    restarts: int
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True)
class JobEvent:
    event_id: int
    job_id: str
    time: datetime
    status: str
    progress: float
    message: str
    metrics: dict[str, float] = field(default_factory=dict)
    stage: str = ""


def _record(r) -> JobRecord:
    return JobRecord(job_id=r.id, kind=r.kind, owner=r.owner, config=dict(r.config), status=r.status,
                     progress=r.progress, message=r.message, metrics=dict(r.metrics),
                     published_versions=list(r.published_versions), checkpoint_dir=r.checkpoint_dir,
                     launcher=r.launcher, runner=dict(r.runner) if r.runner is not None else None,
                     attempts=r.attempts, restarts=r.restarts, cancel_requested=bool(r.cancel_requested), created_at=r.created_at,
                     updated_at=r.updated_at)


def _event(r) -> JobEvent:
    return JobEvent(event_id=r.id, job_id=r.job_id, time=r.time, status=r.status, progress=r.progress,
                    message=r.message, metrics=dict(r.metrics), stage=r.stage)


def clean_metrics(metrics: dict | None) -> dict[str, float]:
    """The numeric, finite values of a metrics dict (JSON holds no NaN; a proto map no strings)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k.startswith("_"):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class JobStore:
    """Job records in the platform's database (tables ``trainer_jobs`` and ``trainer_job_events``)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # -- reading ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        with transaction(self.engine) as conn:
            r = conn.execute(select(trainer_jobs).where(trainer_jobs.c.id == job_id)).first()
        if r is None:
            raise NotFoundError(f"no job {job_id!r}")
        return _record(r)

    def list(self, statuses: Sequence[str] | None = None) -> list[JobRecord]:
        """Jobs, oldest first (only those in ``statuses`` when given)."""
        q = select(trainer_jobs).order_by(trainer_jobs.c.created_at, trainer_jobs.c.id)
        if statuses is not None:
            q = q.where(trainer_jobs.c.status.in_(list(statuses)))
        with transaction(self.engine) as conn:
            return [_record(r) for r in conn.execute(q)]

    def count_active(self) -> int:
        with transaction(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(trainer_jobs)
                                    .where(trainer_jobs.c.status.in_(ACTIVE))).scalar_one())

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events after event id ``after``, in order."""
        q = (select(trainer_job_events).where(trainer_job_events.c.job_id == job_id, trainer_job_events.c.id > after)
             .order_by(trainer_job_events.c.id).limit(limit))
        with transaction(self.engine) as conn:
            return [_event(r) for r in conn.execute(q)]

    def stage_events(self, stage: str, after: int, limit: int = 1000) -> list[JobEvent]:
        """Every job's events of ``stage`` (e.g. PPO steps) after event id ``after``, in order."""
        q = (select(trainer_job_events).where(trainer_job_events.c.stage == stage, trainer_job_events.c.id > after)
             .order_by(trainer_job_events.c.id).limit(limit))
        with transaction(self.engine) as conn:
            return [_event(r) for r in conn.execute(q)]

    def last_event_id(self) -> int:
        with transaction(self.engine) as conn:
            return int(conn.execute(select(func.coalesce(func.max(trainer_job_events.c.id), 0))).scalar_one())

    def cancel_requested(self, job_id: str) -> bool:
        with transaction(self.engine) as conn:
            return bool(conn.execute(select(trainer_jobs.c.cancel_requested)
                                     .where(trainer_jobs.c.id == job_id)).scalar_one_or_none())

    # -- writing ------------------------------------------------------------------------------------
    def create(self, kind: str, owner: str, config: dict, launcher: str, checkpoint_root: str, message: str = "queued",
               job_id: str | None = None) -> JobRecord:
        """A new pending job; its checkpoints go to ``checkpoint_root/<job id>``."""
        job_id = job_id or uuid.uuid4().hex
        now = utcnow()
        row = dict(id=job_id, kind=kind, owner=owner, config=config, status=PENDING, progress=0.0, message=message,
                   metrics={}, published_versions=[], checkpoint_dir=f"{checkpoint_root.rstrip('/')}/{job_id}",
                   launcher=launcher, runner=None, attempts=0, restarts=0, cancel_requested=False, created_at=now, updated_at=now)
        with transaction(self.engine, write=True) as conn:
            conn.execute(insert(trainer_jobs).values(**row))
            self._add_event(conn, job_id, now, PENDING, 0.0, message, {}, "")
        return self.get(job_id)

    @staticmethod
    def _add_event(conn, job_id: str, now: datetime, status: str, progress: float, message: str, metrics: dict,
                   stage: str) -> None:
        conn.execute(insert(trainer_job_events).values(job_id=job_id, time=now, status=status, progress=progress,
                                                       message=message, metrics=metrics, stage=stage))

    def report(self, job_id: str, *, status: str | None = None, message: str | None = None,
               progress: float | None = None, metrics: dict | None = None, stage: str = "",
               runner: dict | None | type[Ellipsis] = ..., attempts: int | None = None,
               restarts: int | None = None, only_if_active: bool = False) -> JobRecord | None:
        """Change the record and add the event that says so (one transaction). ``metrics`` are
        merged into the record's; ``runner`` replaces it (None: no run in charge). With
        ``only_if_active`` nothing changes when the job already ended (returns None)."""
        now = utcnow()
        clean = clean_metrics(metrics)
        with transaction(self.engine, write=True) as conn:
            r = conn.execute(select(trainer_jobs).where(trainer_jobs.c.id == job_id)).first()
            if r is None:
                raise NotFoundError(f"no job {job_id!r}")
            if only_if_active and r.status in FINAL:
                return None
            values: dict[str, Any] = {"updated_at": now}
            if status is not None:
                values["status"] = status
            if message is not None:
                values["message"] = message
            if progress is not None:
                values["progress"] = max(0.0, min(1.0, float(progress)))
            if clean:
                values["metrics"] = {**r.metrics, **clean}
            if runner is not ...:
                values["runner"] = runner
            if attempts is not None:
                values["attempts"] = attempts
            if restarts is not None:
                values["restarts"] = restarts
            conn.execute(update(trainer_jobs).where(trainer_jobs.c.id == job_id).values(**values))
            self._add_event(conn, job_id, now, values.get("status", r.status), values.get("progress", r.progress),
                            values.get("message", r.message), clean, stage)
        return self.get(job_id)

    def add_version(self, job_id: str, version: str, topic: str, message_type: str, payload: bytes) -> None:
        """Record a version the job published and queue its announcement (outbox), together."""
        now = utcnow()
        with transaction(self.engine, write=True) as conn:
            r = conn.execute(select(trainer_jobs.c.published_versions).where(trainer_jobs.c.id == job_id)).first()
            if r is None:
                raise NotFoundError(f"no job {job_id!r}")
            conn.execute(update(trainer_jobs).where(trainer_jobs.c.id == job_id)
                         .values(published_versions=[*r.published_versions, version], updated_at=now))
            conn.execute(insert(outbox).values(topic=topic, message_type=message_type, payload=payload, key=version,
                                               created_at=now))

    def request_cancel(self, job_id: str) -> JobRecord:
        with transaction(self.engine, write=True) as conn:
            n = conn.execute(update(trainer_jobs).where(trainer_jobs.c.id == job_id)
                             .values(cancel_requested=True, updated_at=utcnow())).rowcount
        if not n:
            raise NotFoundError(f"no job {job_id!r}")
        return self.get(job_id)

    # -- served versions ------------------------------------------------------------------------------
    def set_served(self, kind: str, version: str) -> None:
        """Remember that an instance serves ``version`` of ``kind`` (only ever moves forward)."""
        now = utcnow()
        with transaction(self.engine, write=True) as conn:
            old = conn.execute(select(trainer_served_versions.c.version)
                               .where(trainer_served_versions.c.kind == kind)).scalar_one_or_none()
            if old is None:
                conn.execute(insert(trainer_served_versions).values(kind=kind, version=version, updated_at=now))
            elif version > old:
                conn.execute(update(trainer_served_versions).where(trainer_served_versions.c.kind == kind)
                             .values(version=version, updated_at=now))

    def served(self, kind: str) -> str:
        with transaction(self.engine) as conn:
            return conn.execute(select(trainer_served_versions.c.version)
                                .where(trainer_served_versions.c.kind == kind)).scalar_one_or_none() or ""
