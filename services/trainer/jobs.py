"""Jobs: durable records (rlhf.storage.jobs), run by processes of their own, followed and resumed.

:class:`JobManager` is the trainer service's side. StartJob stores a pending record; the
supervisor (one loop, every ``poll_seconds``) launches pending jobs through a launcher
(:mod:`services.trainer.launchers`: a local process, torchrun when a job has several, or a
Kubernetes Job), follows what runs, and when a run ends without a result (its process was killed,
its node lost) resumes the job from its last checkpoint or marks it failed, as the settings say.
A trainer that restarts finds its jobs in the database: running ones whose processes still live
are followed again, the others resumed. It also exports the PPO steps the jobs report.

:class:`JobContext` is the job process's side (rank 0 writes): events, progress, cancellation,
the versions it publishes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Protocol

from rlhf.checkpoint import Checkpoints
from rlhf.errors import ResourceExhaustedError
from rlhf.storage.jobs import ACTIVE, CANCELLED, FAILED, PENDING, RUNNING, JobRecord, JobStore

log = logging.getLogger("rlhf.trainer.jobs")

CANCEL_CHECK_SECONDS = 1.0  # how often a job's process reads its cancellation flag
CANCEL_GRACE_SECONDS = 30.0  # a cancelled job's process that has not stopped by then is killed


class JobCancelled(Exception):
    pass


class JobContext:
    """A job's process's handle on its record. ``main``: rank 0, the one that writes."""

    def __init__(self, store: JobStore, job_id: str, main: bool = True):
        self.store, self.job_id, self.main = store, job_id, main
        self._checked = 0.0
        self._cancelled = False

    def check(self) -> None:
        """Raise JobCancelled once the job was cancelled (the flag is read at most once a second)."""
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= CANCEL_CHECK_SECONDS:
            self._checked = now
            self._cancelled = self.store.cancel_requested(self.job_id)
        if self._cancelled:
            raise JobCancelled()

    def event(self, message: str, progress: float | None = None, metrics: dict | None = None, stage: str = "") -> None:
        if self.main:
            self.store.report(self.job_id, message=message, progress=progress, metrics=metrics, stage=stage,
                              only_if_active=True)

    def published(self, event) -> None:
        """A version this job wrote into the registry: recorded, and announced through the outbox."""
        from rlhf_client import TOPIC_MODELS

        self.store.add_version(self.job_id, event.version, TOPIC_MODELS, event.DESCRIPTOR.full_name,
                               event.SerializeToString())


# -- the supervisor --------------------------------------------------------------------------------


class Launcher(Protocol):
    name: str

    def launch(self, job: JobRecord, attempt: int) -> dict:
        """Start a run of ``job``; returns the record's ``runner`` (what identifies the run)."""

    def state(self, job: JobRecord) -> tuple[bool, str]:
        """(whether the run is still going, a description: its exit code, its pods' phases)."""

    def cancel(self, job: JobRecord) -> None:
        """The job was cancelled: stop its run (a local process reads the flag itself)."""

    def kill(self, job: JobRecord) -> None:
        """Stop the run now."""

    def stop_all(self, jobs: list[JobRecord], timeout: float) -> None:
        """The trainer is stopping: interrupt the runs that would not outlive it (SIGTERM: each
        writes a checkpoint; the next trainer resumes them)."""


class JobManager:
    """Starts, follows, cancels and resumes the jobs of the trainer's database."""

    def __init__(self, store: JobStore, launcher: Launcher, *, max_running: int = 1, resume: bool = True,
                 max_restarts: int = 3, checkpoint_root: str = "", poll_seconds: float = 0.5,
                 stop_timeout: float = 60.0, observe_ppo_step: Callable[[dict], None] | None = None):
        self.store, self.launcher = store, launcher
        self.max_running, self.resume, self.max_restarts = max_running, resume, max_restarts
        self.checkpoint_root, self.poll_seconds, self.stop_timeout = checkpoint_root, poll_seconds, stop_timeout
        self.observe_ppo_step = observe_ppo_step
        self._lock = threading.Lock()
        self._cancel_times: dict[str, float] = {}
        self._observed: dict[str, str] = {}  # job id -> the run's last reported state
        self._seen_ppo = self._seen_event = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None

    # -- the service's calls ----------------------------------------------------------------------
    def start_job(self, kind: str, config: dict, owner: str) -> JobRecord:
        with self._lock:
            n = self.store.count_active()
            if n >= self.max_running:
                raise ResourceExhaustedError(f"{n} job(s) already running; at most {self.max_running}")
            job = self.store.create(kind, owner, config, self.launcher.name, self.checkpoint_root)
        self.wake()
        return job

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self) -> list[JobRecord]:
        return self.store.list()

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.final:
            return job
        job = self.store.request_cancel(job_id)
        if job.runner is None:  # not started (or between runs): nothing to stop
            return self.store.report(job_id, status=CANCELLED, message="cancelled", only_if_active=True) or job
        self._cancel_times[job_id] = time.monotonic()
        self.launcher.cancel(job)
        self.wake()
        return self.store.get(job_id)

    async def watch(self, job_id: str):
        """Every event of the job from its start, then live ones until it ends."""
        self.store.get(job_id)
        after = 0
        while True:
            events = await asyncio.to_thread(self.store.events, job_id, after)
            for ev in events:
                after = ev.event_id
                yield ev
            if events:
                continue
            job = await asyncio.to_thread(self.store.get, job_id)
            if job.final and not await asyncio.to_thread(self.store.events, job_id, after):
                return
            await self._wait_change(1.0)

    # -- the loop ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self._seen_ppo = await asyncio.to_thread(self.store.last_event_id)  # export only what happens from now on
        self._task = asyncio.create_task(self._supervise(), name="trainer-jobs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        running = [j for j in await asyncio.to_thread(self.store.list, ACTIVE) if j.runner is not None]
        await asyncio.to_thread(self.launcher.stop_all, running, self.stop_timeout)

    def wake(self) -> None:
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_change(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _supervise(self) -> None:
        while True:
            try:
                changed = await asyncio.to_thread(self.tick)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the supervisor
                log.exception("supervising the jobs failed; retrying")
                changed = False
            if changed:
                await self._notify()
            await self._wait_change(self.poll_seconds)

    def tick(self) -> bool:
        """One round: launch, follow, resume. Returns whether any job reported something."""
        self._export_ppo_steps()
        latest = self.store.last_event_id()  # what the jobs' processes reported since (wakes WatchJob)
        changed, self._seen_event = latest != self._seen_event, latest
        jobs = self.store.list(ACTIVE)
        for job in jobs:
            if job.runner is None:
                changed |= self._start(job)
            else:
                changed |= self._follow(job)
        return changed

    def _export_ppo_steps(self) -> None:
        for ev in self.store.stage_events("PPO", self._seen_ppo):
            self._seen_ppo = ev.event_id
            if self.observe_ppo_step is not None:
                self.observe_ppo_step(ev.metrics)

    def _start(self, job: JobRecord) -> bool:
        if job.cancel_requested:
            self.store.report(job.job_id, status=CANCELLED, message="cancelled", only_if_active=True)
            return True
        attempt = job.attempts + 1
        resumed = Checkpoints(job.checkpoint_dir).latest() if job.attempts else None
        try:
            runner = self.launcher.launch(job, attempt)
        except Exception as e:  # noqa: BLE001 - a launch that fails fails the job, with its reason
            log.exception("launching a job failed", extra={"fields": {"job_id": job.job_id}})
            self.store.report(job.job_id, status=FAILED, message=f"could not start the job: {type(e).__name__}: {e}",
                              only_if_active=True)
            return True
        how = f"resumed from checkpoint {resumed.name}" if resumed else "resumed" if job.attempts else "started"
        self.store.report(job.job_id, status=RUNNING, message=f"{how} ({runner['describe']}, attempt {attempt})",
                          runner=runner, attempts=attempt)
        return True

    def _follow(self, job: JobRecord) -> bool:
        alive, state = self.launcher.state(job)
        changed = False
        if alive:
            if self._observed.get(job.job_id) != state and job.launcher == "kubernetes":
                self._observed[job.job_id] = state
                self.store.report(job.job_id, message=state, only_if_active=True)
                changed = True
            since = self._cancel_times.get(job.job_id)
            if job.cancel_requested and since is not None and time.monotonic() - since > CANCEL_GRACE_SECONDS:
                self.launcher.kill(job)
            return changed
        job = self.store.get(job.job_id)  # the process may have written its outcome as it ended
        self._observed.pop(job.job_id, None)
        if job.final or job.runner is None:  # ended with a result, or interrupted and waiting to resume
            self._cancel_times.pop(job.job_id, None)
            return False
        if job.cancel_requested:
            self.store.report(job.job_id, status=CANCELLED, message=f"cancelled ({state})", runner=None)
        elif self.resume and job.restarts < self.max_restarts:
            self.store.report(job.job_id, status=PENDING, runner=None, restarts=job.restarts + 1,
                              message=f"its run ended without a result ({state}); resuming from its last checkpoint")
        else:
            why = ("resume_jobs=false" if not self.resume
                   else f"it was resumed {job.restarts} time(s) already (max_job_restarts={self.max_restarts})")
            self.store.report(job.job_id, status=FAILED, runner=None,
                              message=f"its run ended without a result ({state}); not resumed: {why}")
        return True


__all__ = ["JobCancelled", "JobContext", "JobManager", "Launcher"]
