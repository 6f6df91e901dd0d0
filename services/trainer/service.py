"""trainer: proto <-> jobs (services/trainer/jobs.py, runs.py), behind the shared bootstrap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from rlhf_client import TOPIC_FEEDBACK, TOPIC_MODELS, TOPIC_SERVING, feedback_pb2, models_pb2, trainer_grpc, trainer_pb2

from rlhf.runtime.auth import OPERATOR, TRAINER, AuthError, caller
from rlhf.config import apply_overrides, from_dict
from rlhf.errors import ConfigError, DataError, UnavailableError
from rlhf.metrics import ServiceMetrics
from rlhf.registry import ModelRegistry
from rlhf.runtime.bus import bus_for
from rlhf.runtime.grpc_client import peer_credentials
from rlhf.runtime.server import BaseServiceSettings
from rlhf.train import PPOJob, RMJob, SFTJob
from services.common import KIND_NAMES, group_id, ts
from services.trainer import runs
from services.trainer.jobs import Job, JobManager

NAME = "trainer"
TRACKED = 200_000  # feedback event ids and task ids remembered by the comparison counter
STATUS = {"pending": trainer_pb2.JOB_STATUS_PENDING, "running": trainer_pb2.JOB_STATUS_RUNNING,
          "succeeded": trainer_pb2.JOB_STATUS_SUCCEEDED, "failed": trainer_pb2.JOB_STATUS_FAILED,
          "cancelled": trainer_pb2.JOB_STATUS_CANCELLED}
# the job configs are rlhf train's (rlhf.train); StartJob's overrides set their fields
KINDS = {trainer_pb2.JOB_KIND_SFT: ("sft", SFTJob), trainer_pb2.JOB_KIND_RM: ("rm", RMJob),
         trainer_pb2.JOB_KIND_PPO: ("ppo", PPOJob), trainer_pb2.JOB_KIND_ONLINE_LOOP: ("online_loop", runs.OnlineLoopConfig)}
KIND_ENUM = {name: k for k, (name, _) in KINDS.items()}


@dataclass
class Settings(BaseServiceSettings):
    registry_dir: str = ""  # model registry root (required)
    prompt_collector_addr: str = "127.0.0.1:50051"  # host:port of each peer service
    policy_server_addr: str = "127.0.0.1:50052"  # rollouts and candidates
    reward_scorer_addr: str = "127.0.0.1:50053"  # PPO's rewards
    feedback_store_addr: str = "127.0.0.1:50054"  # comparisons, demonstrations, labeling tasks
    max_running_jobs: int = 1  # jobs at once (each trains a model on this process's devices)
    rpc_timeout_seconds: float = 300.0  # deadline of each call to another service
    device: str = "cpu"  # torch device of the model, e.g. cuda:0
    torch_threads: int = 0  # intra-op threads of each job (0: the process's model-thread count, see rlhf.runtime.threads)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root)")


def _job_proto(j: Job) -> trainer_pb2.Job:
    return trainer_pb2.Job(job_id=j.job_id, kind=KIND_ENUM[j.kind], status=STATUS[j.status], progress=j.progress,
                           message=j.message, published_versions=j.published_versions, metrics=j.metrics,
                           create_time=ts(j.create_time), update_time=ts(j.update_time))


class Trainer(trainer_grpc.TrainerServiceServicer):
    name = NAME
    service_names = [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name]
    # ML engineers run jobs (and cancel their own); operators any job
    rpc_roles = {m: frozenset({TRAINER, OPERATOR}) for m in ("StartJob", "GetJob", "ListJobs", "WatchJob", "CancelJob")}

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        self.s = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings.registry_dir)
        self.bus = bus if bus is not None else bus_for(settings, metrics)
        self.jobs: JobManager | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # comparison events per labeling task, each event counted once (consumers are idempotent);
        # both maps forget their oldest entries beyond TRACKED, so a long-lived trainer stays small
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._per_task: OrderedDict[str, int] = OrderedDict()
        self._served: dict[str, str] = {}  # kind -> newest version an instance announced it serves
        self._changed = threading.Condition()  # notified on every counted event
        self.peers: runs.Peers | None = None

    def register(self, server: grpc.aio.Server) -> None:
        trainer_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.jobs = JobManager(self.loop, max_running=self.s.max_running_jobs, torch_threads=self.s.torch_threads)
        self.bus.subscribe(TOPIC_FEEDBACK, feedback_pb2.FeedbackEvent, f"{NAME}-feedback", self._on_feedback)
        # every trainer instance must see every served-version event: a consumer group of its own
        self.bus.subscribe(TOPIC_SERVING, models_pb2.ModelVersionServedEvent, group_id(NAME), self._on_served)
        await self.bus.start()
        self.peers = runs.Peers.connect(
            {"prompt-collector": self.s.prompt_collector_addr, "policy-server": self.s.policy_server_addr,
             "reward-scorer": self.s.reward_scorer_addr, "feedback-store": self.s.feedback_store_addr},
            registry=self.registry, publish_event=self._publish_blocking,
            observe_ppo_step=self.metrics.observe_ppo_step, wait_comparisons=self._wait_comparisons,
            wait_served=self._wait_served,
            device=self.s.device, timeout=self.s.rpc_timeout_seconds, creds=peer_credentials(self.s))

    async def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.cancel_all()
        await self.bus.close()

    # -- what the trainer waits on: comparison events and served-version events ------------------
    async def _on_feedback(self, ev: feedback_pb2.FeedbackEvent) -> None:
        if ev.WhichOneof("payload") != "comparison":
            return
        with self._changed:
            if ev.event_id in self._seen:
                return
            self._seen[ev.event_id] = None
            task = ev.comparison.task_id
            self._per_task[task] = self._per_task.get(task, 0) + 1
            self._per_task.move_to_end(task)
            for d in (self._seen, self._per_task):
                while len(d) > TRACKED:
                    d.popitem(last=False)
            self._changed.notify_all()

    async def _on_served(self, ev: models_pb2.ModelVersionServedEvent) -> None:
        kind = KIND_NAMES.get(ev.kind)
        if kind is None:
            return
        with self._changed:
            if ev.version > self._served.get(kind, ""):
                self._served[kind] = ev.version
                self._changed.notify_all()

    def _comparisons_for(self, task_ids) -> int:
        """Comparison events consumed so far for these labeling tasks (each event once)."""
        with self._changed:
            return sum(self._per_task.get(t, 0) for t in task_ids)

    def _wait(self, ready, check, deadline: float) -> bool:
        """Block a job thread until ``ready()`` (checked on every event), cancellation, or the deadline."""
        with self._changed:
            while not ready():
                check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))  # woken by events; wakes each second for cancel
        return True

    def _wait_comparisons(self, task_ids: list[str], needed: int, timeout: float, check) -> int:
        """Wait until ``needed`` comparisons of these tasks are stored. The feedback events only
        wake the trainer: what counts is what the feedback-store confirms for these task ids, so an
        event that was not stored there (forged, or replayed from elsewhere) trains nothing."""
        deadline = time.monotonic() + timeout
        ids = list(task_ids)
        confirmed, confirmed_at = 0, -1

        def announced() -> int:
            return self._comparisons_for(ids)

        while True:
            if not self._wait(lambda: announced() >= needed and announced() != confirmed_at, check, deadline):
                raise UnavailableError(f"only {confirmed} of {needed} comparisons arrived within {timeout:.0f} s")
            with self._changed:
                confirmed_at = announced()
            confirmed = self.peers.count_stored_comparisons(ids)
            if confirmed >= needed:
                return confirmed

    def _wait_served(self, kind: str, version: str, timeout: float, check) -> None:
        """Wait until an instance announces on rlhf.serving.v1 that it serves ``version`` (or newer)."""
        what = {"policy": "policy-server", "reward": "reward-scorer"}[kind]
        if not self._wait(lambda: self._served.get(kind, "") >= version, check, time.monotonic() + timeout):
            raise UnavailableError(f"the {what} did not serve {kind} version {version} within {timeout:.0f} s")

    def _publish_blocking(self, event) -> None:
        """Called from a job thread: publish on the service's event loop and wait for the ack."""
        fut = asyncio.run_coroutine_threadsafe(self.bus.publish(TOPIC_MODELS, event, key=event.version), self.loop)
        fut.result(timeout=60)

    # -- RPCs ---------------------------------------------------------------------------------------
    async def StartJob(self, request, context) -> trainer_pb2.StartJobResponse:
        if request.kind not in KINDS:
            raise DataError("kind must be one of JOB_KIND_SFT, JOB_KIND_RM, JOB_KIND_PPO, JOB_KIND_ONLINE_LOOP")
        name, cfg_cls = KINDS[request.kind]
        overrides = [f"{k}={v}" for k, v in sorted(request.overrides.items())]
        try:
            cfg = from_dict(cfg_cls, apply_overrides({}, overrides))
        except (ConfigError, ValueError, TypeError) as e:
            raise DataError(f"overrides: {e}") from e
        runs.check_for_trainer(name, cfg, self.registry)
        peers = self.peers
        job = self.jobs.start(name, lambda ctx: runs.run_job(name, ctx, peers, cfg), owner=caller().name)
        return trainer_pb2.StartJobResponse(job=_job_proto(job))

    async def GetJob(self, request, context) -> trainer_pb2.GetJobResponse:
        return trainer_pb2.GetJobResponse(job=_job_proto(self.jobs.get(request.job_id)))

    async def ListJobs(self, request, context) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=[_job_proto(j) for j in sorted(
            self.jobs.jobs.values(), key=lambda j: j.create_time)])

    async def WatchJob(self, request, context):
        self.jobs.get(request.job_id)  # NOT_FOUND before the stream starts
        async for ev in self.jobs.watch(request.job_id):
            yield trainer_pb2.WatchJobResponse(job_id=request.job_id, status=STATUS[ev.status], progress=ev.progress,
                                               message=ev.message, metrics=ev.metrics, event_time=ts(ev.time))

    async def CancelJob(self, request, context) -> trainer_pb2.CancelJobResponse:
        who, job = caller(), self.jobs.get(request.job_id)
        if not (who.anonymous or who.has(OPERATOR) or job.owner == who.name):
            raise AuthError(f"{who.name} may not cancel job {job.job_id}: it belongs to {job.owner}; "
                            "only its owner or an operator may", denied=True)
        return trainer_pb2.CancelJobResponse(job=_job_proto(self.jobs.cancel(request.job_id)))


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> Trainer:
    return Trainer(settings, metrics, bus)
