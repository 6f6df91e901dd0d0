"""Where the trainer's jobs run: a local process (torchrun when a job has several processes), or a
Kubernetes Indexed Job with a headless Service for torchrun's rendezvous.

Each launcher starts a run of a job (:mod:`services.trainer.worker`), says whether it still runs,
and stops it; the trainer's :class:`~services.trainer.jobs.JobManager` does the rest.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlhf.errors import ConfigError
from rlhf.storage.jobs import JobRecord

log = logging.getLogger("rlhf.trainer.launchers")

RENDEZVOUS_PORT = 29500  # torchrun's master port on the first pod of a Kubernetes job
JOB_LABEL = "rlhf.dev/job-id"
OWNER_LABEL = "rlhf.dev/owner"


def processes_of(job: JobRecord) -> tuple[int, int]:
    """(processes per node, nodes) of a job (the online loop runs in one process)."""
    d = job.config.get("distributed") or {}
    return int(d.get("processes", 1)), int(d.get("nodes", 1))


def gpus_of(job: JobRecord) -> int:
    return int((job.config.get("distributed") or {}).get("gpus_per_process", 0))


def worker_args(job: JobRecord) -> list[str]:
    return ["-m", "services.trainer.worker", job.job_id]


# -- local processes -------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), to tell it from a later
    process that reused its id. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class ProcessLauncher:
    """A job runs as a process on the trainer's machine: ``python -m services.trainer.worker``, or
    torchrun with ``distributed.processes`` of them. Its output goes to a log file beside its
    checkpoints. A process started by an earlier trainer (one that was killed) is followed again
    while it lives."""

    name = "process"

    def __init__(self, env: dict[str, str], threads: int = 0):
        self.env = env  # the job processes' environment: the trainer's own settings as RLHF_TRAINER_*
        self.threads = threads  # intra-op threads of a job (split among its processes); 0: their default
        self._procs: dict[str, subprocess.Popen] = {}

    def command(self, job: JobRecord) -> list[str]:
        n, nodes = processes_of(job)
        if nodes != 1:
            raise ConfigError("distributed.nodes > 1 needs the Kubernetes launcher (launcher: kubernetes)")
        if n == 1:
            return [sys.executable, *worker_args(job)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                *worker_args(job)]

    def launch(self, job: JobRecord, attempt: int) -> dict:
        cmd = self.command(job)
        n, _ = processes_of(job)
        logs = Path(job.checkpoint_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"attempt-{attempt}.log"
        env = dict(self.env)
        if self.threads:
            env["RLHF_TRAINER_TORCH_THREADS"] = str(max(1, self.threads // n))
        with open(log_file, "ab") as out:
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # its own process group: torchrun and its ranks
        self._procs[job.job_id] = p
        what = f"torchrun with {n} processes, pid {p.pid}" if n > 1 else f"process {p.pid}"
        return {"launcher": self.name, "pid": p.pid, "start_ticks": _start_ticks(p.pid), "host": socket.gethostname(),
                "log": str(log_file), "describe": what}

    def _ours(self, job: JobRecord) -> subprocess.Popen | None:
        p = self._procs.get(job.job_id)
        return p if p is not None and job.runner and p.pid == job.runner.get("pid") else None

    def _alive(self, job: JobRecord) -> bool:
        r = job.runner or {}
        if r.get("host") != socket.gethostname() or r.get("pid") is None:
            return False  # started on another machine (a rescheduled trainer): it did not survive
        return _start_ticks(r["pid"]) == r.get("start_ticks")

    def state(self, job: JobRecord) -> tuple[bool, str]:
        p = self._ours(job)
        if p is not None:
            code = p.poll()
            if code is None:
                return True, "running"
            del self._procs[job.job_id]
            return False, f"its process ended: {_describe_exit(code)}; log: {job.runner.get('log')}"
        # a process an earlier trainer started: followed while it lives
        return (True, "running") if self._alive(job) else (False, "its process is gone")

    def _signal(self, job: JobRecord, sig: int) -> None:
        pid = (job.runner or {}).get("pid")
        if pid is not None and (self._ours(job) is not None or self._alive(job)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass

    def cancel(self, job: JobRecord) -> None:
        """Nothing to do now: the process reads the job's cancellation flag after each step."""

    def kill(self, job: JobRecord) -> None:
        self._signal(job, signal.SIGKILL)

    def stop_all(self, jobs: list[JobRecord], timeout: float) -> None:
        """SIGTERM to every job process (each finishes its step, writes a checkpoint and exits),
        then SIGKILL to those still there after ``timeout`` seconds."""
        mine = [j for j in jobs if j.launcher == self.name]
        for j in mine:
            self._signal(j, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self.state(j)[0] for j in mine):
            time.sleep(0.2)
        for j in mine:
            if self.state(j)[0]:
                log.warning("a job process did not stop within %.0f s; killing it", timeout,
                            extra={"fields": {"job_id": j.job_id}})
                self.kill(j)


# -- Kubernetes ------------------------------------------------------------------------------------


def _dns_label(text: str, limit: int = 63) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "x"


def _label_value(text: str) -> str:
    """A label value: at most 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", s)


class KubernetesLauncher:
    """A job runs as a Kubernetes Indexed Job: one pod per node (``distributed.nodes``), each
    running torchrun with ``distributed.processes`` processes; pod 0 is the rendezvous, found
    through a headless Service. The pods are made from a template the Helm chart renders from the
    trainer's own pod (image, settings, volumes, credentials); the launcher adds the command, the
    GPU requests of the job's config, the labels (job id, owner) and a TTL. The Jobs outlive a
    trainer restart; CancelJob deletes them."""

    name = "kubernetes"

    def __init__(self, namespace: str = "", pod_template: str = "", ttl_seconds: int = 86_400, api_client=None):
        try:
            from kubernetes import client, config
        except ImportError:
            raise ConfigError("launcher kubernetes needs the kubernetes client: pip install 'rlhf-platform[kubernetes]' "
                              "(the image has it)") from None

        if api_client is None:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):  # in a pod: its service account
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:  # outside: $KUBECONFIG, else ~/.kube/config
                api_client = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
        self.batch, self.core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.namespace = namespace or _own_namespace()
        self.template = _read_template(pod_template)
        self.ttl_seconds = ttl_seconds

    def names(self, job: JobRecord, attempt: int) -> str:
        return _dns_label(f"rlhf-train-{job.job_id[:12]}-{attempt}", 52)  # leaves room for pod names

    def job_spec(self, job: JobRecord, attempt: int) -> tuple[dict, dict]:
        """(the Job, its headless Service) as the API takes them."""
        import copy

        name = self.names(job, attempt)
        n, nodes = processes_of(job)
        gpus = gpus_of(job) * n
        labels = {"app.kubernetes.io/name": "rlhf", "app.kubernetes.io/component": "trainer-job",
                  "app.kubernetes.io/managed-by": "rlhf-trainer", JOB_LABEL: job.job_id,
                  OWNER_LABEL: _label_value(job.owner) or "anonymous"}
        pod = copy.deepcopy(self.template)
        meta = pod.setdefault("metadata", {})
        meta["labels"] = {**meta.get("labels", {}), **labels}
        spec = pod.setdefault("spec", {})
        spec["restartPolicy"] = "Never"
        spec["subdomain"] = name  # pod <name>-<index>.<name> resolves through the headless Service
        c = spec["containers"][0]
        c["name"] = "train"
        c["command"] = ["python", "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(n),
                        "--node-rank", "$(JOB_COMPLETION_INDEX)", "--master-addr", f"{name}-0.{name}",
                        "--master-port", str(RENDEZVOUS_PORT), *worker_args(job)]
        c.pop("args", None)
        c["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
        env = [e for e in c.get("env", []) if e.get("name") != "RLHF_TRAINER_DEVICE"]
        c["env"] = env + [{"name": "RLHF_TRAINER_DEVICE", "value": "cuda" if gpus else "cpu"}]
        if gpus:
            res = c.setdefault("resources", {})
            for part in ("requests", "limits"):
                res.setdefault(part, {})["nvidia.com/gpu"] = str(gpus)
        body = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
                "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                         "backoffLimit": 0, "ttlSecondsAfterFinished": self.ttl_seconds, "template": pod}}
        service = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
                   "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                            "selector": {"batch.kubernetes.io/job-name": name},
                            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}]}}
        return body, service

    def launch(self, job: JobRecord, attempt: int) -> dict:
        body, service = self.job_spec(job, attempt)
        name = body["metadata"]["name"]
        created = self.batch.create_namespaced_job(self.namespace, body)
        # the Service belongs to the Job: deleting the Job (or its TTL) takes the Service along
        service["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                   "uid": created.metadata.uid, "blockOwnerDeletion": False}]
        self.core.create_namespaced_service(self.namespace, service)
        n, nodes = processes_of(job)
        return {"launcher": self.name, "namespace": self.namespace, "job": name, "service": name,
                "describe": f"Kubernetes Job {self.namespace}/{name}: {nodes} pod(s) x {n} process(es)"}

    def state(self, job: JobRecord) -> tuple[bool, str]:
        from kubernetes.client.rest import ApiException

        r = job.runner or {}
        try:
            k = self.batch.read_namespaced_job(r["job"], r["namespace"])
        except ApiException as e:
            if e.status == 404:
                return False, f"Kubernetes Job {r.get('job')} is gone"
            raise
        for cond in k.status.conditions or []:
            if cond.status == "True" and cond.type in ("Complete", "Failed"):
                why = f": {cond.reason}" if cond.reason else ""
                return False, f"Kubernetes Job {r['job']} {'completed' if cond.type == 'Complete' else 'failed'}{why}"
        pods = self.core.list_namespaced_pod(r["namespace"], label_selector=f"batch.kubernetes.io/job-name={r['job']}").items
        phases: dict[str, int] = {}
        for p in pods:
            phases[p.status.phase or "Unknown"] = phases.get(p.status.phase or "Unknown", 0) + 1
        seen = ", ".join(f"{v} {k.lower()}" for k, v in sorted(phases.items())) or "no pods yet"
        return True, f"Kubernetes Job {r['job']}: {seen}"

    def _delete(self, job: JobRecord) -> None:
        from kubernetes.client.rest import ApiException

        r = job.runner or {}
        for delete in (lambda: self.batch.delete_namespaced_job(r["job"], r["namespace"], propagation_policy="Background"),
                       lambda: self.core.delete_namespaced_service(r["service"], r["namespace"])):
            try:
                delete()
            except ApiException as e:
                if e.status != 404:
                    raise

    def cancel(self, job: JobRecord) -> None:
        self._delete(job)

    def kill(self, job: JobRecord) -> None:
        self._delete(job)

    def stop_all(self, jobs: list[JobRecord], timeout: float) -> None:
        """Nothing: Kubernetes Jobs outlive the trainer, which follows them again when it starts."""


def _own_namespace() -> str:
    f = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if f.is_file():
        return f.read_text().strip()
    raise ConfigError("kubernetes_namespace is required outside a cluster")


def _read_template(path: str) -> dict:
    if not path:
        raise ConfigError("kubernetes_pod_template is required with launcher: kubernetes (the Helm chart sets it)")
    try:
        t = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kubernetes_pod_template {path}: {e}") from e
    if not isinstance(t, dict) or not (t.get("spec") or {}).get("containers"):
        raise ConfigError(f"kubernetes_pod_template {path}: a pod template (metadata, spec.containers[0]) is expected")
    return t
