"""trainer: proto <-> jobs (services/trainer/jobs.py, runs.py), behind the shared bootstrap.

Jobs are records in the platform's database (rlhf.storage.jobs) and run in processes of their own
(services/trainer/launchers.py, worker.py): a trainer that restarts lists them again, follows the
ones still running and resumes the others from their checkpoints. The versions a job publishes
are announced on rlhf.models.v1 through the outbox, in the transaction that records them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from rlhf_client import TOPIC_MODELS, TOPIC_SERVING, models_pb2, trainer_grpc, trainer_pb2

from rlhf.config import apply_overrides, from_dict, to_dict
from rlhf.errors import ConfigError, DataError
from rlhf.metrics import ServiceMetrics
from rlhf.registry import ModelRegistry
from rlhf.runtime.auth import OPERATOR, TRAINER, AuthError, caller
from rlhf.runtime.grpc_client import peer_credentials
from rlhf.runtime.settings import env_name, env_prefix
from rlhf.storage.jobs import JobRecord, JobStore
from rlhf.train import PPOJob, RMJob, SFTJob
from services.common import KIND_NAMES, DatabaseSettings, OutboxService, group_id, ts
from services.trainer import runs
from services.trainer.jobs import JobManager

NAME = "trainer"
STATUS = {"pending": trainer_pb2.JOB_STATUS_PENDING, "running": trainer_pb2.JOB_STATUS_RUNNING,
          "succeeded": trainer_pb2.JOB_STATUS_SUCCEEDED, "failed": trainer_pb2.JOB_STATUS_FAILED,
          "cancelled": trainer_pb2.JOB_STATUS_CANCELLED}
# the job configs are rlhf train's (rlhf.train); StartJob's overrides set their fields
KINDS = {trainer_pb2.JOB_KIND_SFT: ("sft", SFTJob), trainer_pb2.JOB_KIND_RM: ("rm", RMJob),
         trainer_pb2.JOB_KIND_PPO: ("ppo", PPOJob), trainer_pb2.JOB_KIND_ONLINE_LOOP: ("online_loop", runs.OnlineLoopConfig)}
KIND_ENUM = {name: k for k, (name, _) in KINDS.items()}
CONFIGS = {name: cls for name, cls in KINDS.values()}


@dataclass
class Settings(DatabaseSettings):
    registry_dir: str = ""  # model registry root (required); job checkpoints go to its checkpoints/ directory
    database_url: str = ""  # SQLAlchemy URL of the job records (postgresql+psycopg://... in production); empty: SQLite file trainer.db in registry_dir
    prompt_collector_addr: str = "127.0.0.1:50051"  # host:port of each peer service
    policy_server_addr: str = "127.0.0.1:50052"  # rollouts and candidates
    reward_scorer_addr: str = "127.0.0.1:50053"  # PPO's rewards
    feedback_store_addr: str = "127.0.0.1:50054"  # comparisons, demonstrations, labeling tasks
    max_running_jobs: int = 1  # jobs at once, pending or running (each trains a model on this machine's devices, or its own pods)
    rpc_timeout_seconds: float = 300.0  # deadline of each call to another service
    device: str = "cpu"  # torch device of the jobs, e.g. cuda (each process of a job takes the GPU of its local rank)
    torch_threads: int = 0  # intra-op threads of a job, split among its processes (0: the process's model-thread count, see rlhf.runtime.threads)
    launcher: Literal["process", "kubernetes"] = "process"  # where jobs run: local processes (torchrun when a job has several), or Kubernetes Indexed Jobs
    resume_jobs: bool = True  # a job whose run ended without a result (its process killed, its node lost) resumes from its last checkpoint; false: it fails, saying why
    max_job_restarts: int = 3  # resumes after runs that ended without a result, per job; then it fails
    job_stop_seconds: float = 60.0  # on shutdown, how long a local job process may take to write its checkpoint (SIGTERM) before it is killed
    kubernetes_namespace: str = ""  # launcher kubernetes: namespace of the Jobs (empty: the trainer's own)
    kubernetes_pod_template: str = ""  # launcher kubernetes: YAML file of the job pods' template (the Helm chart renders it from the trainer's pod)
    kubernetes_job_ttl_seconds: int = 86_400  # launcher kubernetes: a finished Job (and its pods' logs) is deleted after this long

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root)")
        if self.max_running_jobs < 1:
            raise ValueError("max_running_jobs must be >= 1")
        if self.max_job_restarts < 0 or self.job_stop_seconds < 0 or self.kubernetes_job_ttl_seconds < 0:
            raise ValueError("max_job_restarts, job_stop_seconds and kubernetes_job_ttl_seconds must be >= 0")
        if not self.database_url:
            self.database_url = f"sqlite:///{Path(self.registry_dir).resolve() / 'trainer.db'}"

    @property
    def checkpoint_root(self) -> str:
        return str(Path(self.registry_dir).resolve() / "checkpoints")


def job_config(kind: str, config: dict):
    """A job's config from its record."""
    return from_dict(CONFIGS[kind], config)


def job_environment(s: Settings, environ=os.environ) -> dict[str, str]:
    """The environment of a job's process: this trainer's settings as RLHF_TRAINER_* variables."""
    env = {k: v for k, v in environ.items() if not k.startswith(env_prefix(NAME))}
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        env[env_name(NAME, f.name)] = "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return env


def peers_for(s: Settings, store: JobStore) -> runs.Peers:
    """The other services, as a job's process calls them."""
    return runs.Peers.connect(
        {"prompt-collector": s.prompt_collector_addr, "policy-server": s.policy_server_addr,
         "reward-scorer": s.reward_scorer_addr, "feedback-store": s.feedback_store_addr},
        registry=ModelRegistry(s.registry_dir), served=store.served, device=s.device, timeout=s.rpc_timeout_seconds,
        creds=peer_credentials(s))


def make_launcher(s: Settings):
    from services.trainer import launchers

    if s.launcher == "kubernetes":
        return launchers.KubernetesLauncher(s.kubernetes_namespace, s.kubernetes_pod_template, s.kubernetes_job_ttl_seconds)
    return launchers.ProcessLauncher(job_environment(s), s.torch_threads)


def check_launchable(kind: str, cfg, launcher: str) -> None:
    """What a launcher cannot run, refused at StartJob."""
    if kind == "online_loop":
        if any(j.distributed.processes * j.distributed.nodes > 1 for j in (cfg.rm, cfg.ppo)):
            raise ConfigError("the online loop runs in one process: leave rm.distributed and ppo.distributed at "
                              "1 process and 1 node (start SFT, RM and PPO jobs of their own to use several)")
        return
    if cfg.distributed.nodes > 1 and launcher != "kubernetes":
        raise ConfigError(f"distributed.nodes={cfg.distributed.nodes}: several nodes need the Kubernetes launcher "
                          "(the trainer's launcher setting)")


def _job_proto(j: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(job_id=j.job_id, kind=KIND_ENUM[j.kind], status=STATUS[j.status], progress=j.progress,
                           message=j.message, published_versions=j.published_versions, metrics=j.metrics,
                           create_time=ts(j.created_at), update_time=ts(j.updated_at), owner=j.owner,
                           checkpoint_dir=j.checkpoint_dir, attempts=j.attempts)


class Trainer(OutboxService, trainer_grpc.TrainerServiceServicer):
    name = NAME
    topic = TOPIC_MODELS  # the versions jobs publish, announced through the outbox
    service_names = [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name]
    # ML engineers run jobs (and cancel their own); operators any job
    rpc_roles = {m: frozenset({TRAINER, OPERATOR}) for m in ("StartJob", "GetJob", "ListJobs", "WatchJob", "CancelJob")}

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        super().__init__(settings, metrics, bus)
        self.registry = ModelRegistry(settings.registry_dir)
        self.store = JobStore(self.engine)
        self.jobs: JobManager | None = None

    def register(self, server: grpc.aio.Server) -> None:
        trainer_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        # every trainer instance must see every served-version event: a consumer group of its own
        self.bus.subscribe(TOPIC_SERVING, models_pb2.ModelVersionServedEvent, group_id(NAME), self._on_served)
        await super().start()
        s = self.s
        self.jobs = JobManager(self.store, make_launcher(s), max_running=s.max_running_jobs, resume=s.resume_jobs,
                               max_restarts=s.max_job_restarts, checkpoint_root=s.checkpoint_root,
                               stop_timeout=s.job_stop_seconds, observe_ppo_step=self.metrics.observe_ppo_step)
        await self.jobs.start()

    async def stop(self) -> None:
        if self.jobs is not None:
            await self.jobs.stop()  # local job processes write a checkpoint; the next start resumes them
        await super().stop()

    async def _on_served(self, ev: models_pb2.ModelVersionServedEvent) -> None:
        """A job waiting for a version to be served reads it from the database."""
        kind = KIND_NAMES.get(ev.kind)
        if kind is not None and ev.version:
            await asyncio.to_thread(self.store.set_served, kind, ev.version)

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
        check_launchable(name, cfg, self.s.launcher)
        job = await asyncio.to_thread(self.jobs.start_job, name, to_dict(cfg), caller().name)
        return trainer_pb2.StartJobResponse(job=_job_proto(job))

    async def GetJob(self, request, context) -> trainer_pb2.GetJobResponse:
        return trainer_pb2.GetJobResponse(job=_job_proto(await asyncio.to_thread(self.jobs.get, request.job_id)))

    async def ListJobs(self, request, context) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=[_job_proto(j) for j in await asyncio.to_thread(self.jobs.list)])

    async def WatchJob(self, request, context):
        await asyncio.to_thread(self.jobs.get, request.job_id)  # NOT_FOUND before the stream starts
        async for ev in self.jobs.watch(request.job_id):
            yield trainer_pb2.WatchJobResponse(job_id=request.job_id, status=STATUS[ev.status], progress=ev.progress,
                                               message=ev.message, metrics=ev.metrics, event_time=ts(ev.time))

    async def CancelJob(self, request, context) -> trainer_pb2.CancelJobResponse:
        who, job = caller(), await asyncio.to_thread(self.jobs.get, request.job_id)
        if not (who.anonymous or who.has(OPERATOR) or job.owner == who.name):
            raise AuthError(f"{who.name} may not cancel job {job.job_id}: it belongs to {job.owner}; "
                            "only its owner or an operator may", denied=True)
        return trainer_pb2.CancelJobResponse(job=_job_proto(await asyncio.to_thread(self.jobs.cancel, request.job_id)))


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> Trainer:
    return Trainer(settings, metrics, bus)
