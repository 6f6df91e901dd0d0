"""Jobs: id, status, progress, events, cancel. Each job body runs in its own thread.

A job body is ``fn(ctx: JobContext)``; it reports with ``ctx.event(message, progress, metrics)``,
checks ``ctx.cancelled`` between units of work (raising JobCancelled via ``ctx.check()``), and
records published model versions with ``ctx.published(version)``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc

from rlhf.errors import NotFoundError, RLHFError, ResourceExhaustedError
from rlhf.runtime.threads import use_model_threads

log = logging.getLogger("rlhf.trainer.jobs")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)


class JobCancelled(Exception):
    pass


@dataclass
class JobEvent:
    time: float
    status: str
    progress: float
    message: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Job:
    job_id: str
    kind: str
    owner: str = ""  # the principal that started it (rlhf.runtime.auth)
    status: str = PENDING
    progress: float = 0.0
    message: str = ""
    published_versions: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)
    events: list[JobEvent] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)


class JobContext:
    def __init__(self, manager: "JobManager", job: Job):
        self._m = manager
        self.job = job

    @property
    def cancelled(self) -> bool:
        return self.job.cancel.is_set()

    def check(self) -> None:
        if self.job.cancel.is_set():
            raise JobCancelled()

    def event(self, message: str, progress: float | None = None, metrics: dict | None = None) -> None:
        self._m._update(self.job, message=message, progress=progress, metrics=metrics)

    def published(self, version: str) -> None:
        self.job.published_versions.append(version)


class JobManager:
    """Holds the jobs of this trainer process; at most ``max_running`` run at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_running: int = 1, max_jobs_kept: int = 1000,
                 torch_threads: int = 0):
        self.loop = loop
        self.torch_threads = torch_threads  # intra-op threads of each job's thread (0: the process's default)
        self.jobs: dict[str, Job] = {}
        self.max_running = max_running
        self.max_jobs_kept = max_jobs_kept
        self._cond = asyncio.Condition()
        self._lock = threading.Lock()

    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status in (PENDING, RUNNING))

    def get(self, job_id: str) -> Job:
        j = self.jobs.get(job_id)
        if j is None:
            raise NotFoundError(f"no job {job_id!r}")
        return j

    def start(self, kind: str, body: Callable[[JobContext], dict | None], owner: str = "") -> Job:
        with self._lock:
            if self.running() >= self.max_running:
                raise ResourceExhaustedError(f"{self.running()} job(s) already running; at most {self.max_running}")
            job = Job(job_id=uuid.uuid4().hex, kind=kind, owner=owner)
            self.jobs[job.job_id] = job
            self._trim()
        ctx = JobContext(self, job)
        self._update(job, status=PENDING, message="queued", progress=0.0)
        threading.Thread(target=self._run, args=(ctx, body), name=f"job-{job.job_id[:8]}", daemon=True).start()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status not in FINAL:
            job.cancel.set()
        return job

    def cancel_all(self) -> None:
        for j in self.jobs.values():
            j.cancel.set()

    def _trim(self) -> None:
        done = [j for j in self.jobs.values() if j.status in FINAL]
        for j in sorted(done, key=lambda j: j.update_time)[: max(0, len(self.jobs) - self.max_jobs_kept)]:
            del self.jobs[j.job_id]

    def _run(self, ctx: JobContext, body) -> None:
        use_model_threads(self.torch_threads)  # a job's thread runs its model work (rlhf.runtime.threads)
        job = ctx.job
        self._update(job, status=RUNNING, message="started")
        try:
            result = body(ctx) or {}
            self._update(job, status=SUCCEEDED, message="done", progress=1.0, metrics=result)
        except JobCancelled:
            self._update(job, status=CANCELLED, message="cancelled")
        except RLHFError as e:
            self._update(job, status=FAILED, message=str(e))
        except grpc.RpcError as e:  # a peer service refused: its status says why
            self._update(job, status=FAILED, message=f"a call to another service failed: {e.code().name}: {e.details()}")
        except Exception as e:  # noqa: BLE001 - a job's failure is its status, not the process's
            log.exception("job failed", extra={"fields": {"job_id": job.job_id, "kind": job.kind}})
            self._update(job, status=FAILED, message=f"{type(e).__name__}: {e}")

    def _update(self, job: Job, status: str | None = None, message: str | None = None,
                progress: float | None = None, metrics: dict | None = None) -> None:
        if status is not None:
            job.status = status
        if message is not None:
            job.message = message
        if progress is not None:
            job.progress = max(0.0, min(1.0, float(progress)))
        clean = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        job.metrics.update(clean)
        job.update_time = time.time()
        job.events.append(JobEvent(job.update_time, job.status, job.progress, job.message, clean))
        log.info("job event", extra={"fields": {"job_id": job.job_id, "kind": job.kind, "status": job.status,
                                                 "progress": round(job.progress, 3), "message": job.message}})
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def watch(self, job_id: str):
        """Every event of the job from its start, then live ones until it ends."""
        job = self.get(job_id)
        i = 0
        while True:
            while i < len(job.events):
                ev = job.events[i]
                i += 1
                yield ev
            if job.status in FINAL and i >= len(job.events):
                return
            async with self._cond:
                if i >= len(job.events) and job.status not in FINAL:
                    try:
                        await asyncio.wait_for(self._cond.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
