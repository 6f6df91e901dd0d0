"""The trainer's training jobs as Kubernetes Jobs (launcher: kubernetes), against the real control
plane of scripts/k8s.sh: the trainer service, given the pod template the Helm chart renders, creates
an Indexed Job and a headless Service per run, follows the Job's status into the job's record,
resumes a run that ended without a result, and deletes the Job on CancelJob. kwok's fake nodes
mark pods Running and then Succeeded; nothing runs in them, so a run "completes" without the
job's result, which is what the trainer is then seen to handle."""

from __future__ import annotations

import uuid

import pytest
import yaml
from rlhf_client import trainer_grpc, trainer_pb2

from services.trainer.launchers import JOB_LABEL, OWNER_LABEL, RENDEZVOUS_PORT
from services.trainer.service import Settings
from tests.deploy.helpers import VALUES_DEV, by_kind, registry_volume
from tests.services import scenario
from tests.services.helpers import serve_in_thread, tiny_policy_registry, wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.integration]

TOKEN = f"alice-{uuid.uuid4().hex}"


@pytest.fixture
def namespace(kube):
    """A fresh namespace with the registry's claim (bound to a volume made for it: the cluster has
    no provisioner), as the chart would have made it; deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    ns = f"rlhf-jobs-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    pv = registry_volume(kube, ns)
    core.create_namespaced_persistent_volume_claim(ns, {
        "metadata": {"name": "rlhf-registry"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}, "volumeName": pv,
                 "storageClassName": ""}})
    yield ns
    core.delete_namespace(ns)
    core.delete_persistent_volume(pv)


@pytest.fixture
def trainer(helm, kubeconfig, namespace, tmp_path, monkeypatch):
    """The trainer service with the Kubernetes launcher and the chart's own pod template."""
    pod = by_kind(helm.template(VALUES_DEV, namespace=namespace), "ConfigMap")["rlhf-trainer-job"]["data"]["pod.yaml"]
    (tmp_path / "pod.yaml").write_text(pod)
    (tmp_path / "callers.yaml").write_text(yaml.safe_dump({"callers": [
        {"name": "alice", "roles": ["trainer"], "token": TOKEN}]}))
    tiny_policy_registry(tmp_path / "registry")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = Settings(registry_dir=str(tmp_path / "registry"), launcher="kubernetes", kubernetes_namespace=namespace,
                        kubernetes_pod_template=str(tmp_path / "pod.yaml"), kubernetes_job_ttl_seconds=900,
                        max_running_jobs=4, max_job_restarts=1, credentials_file=str(tmp_path / "callers.yaml"),
                        metrics_port=-1)
    addr, close = serve_in_thread("trainer", settings)
    yield addr
    close()


def _start(addr: str, overrides: dict[str, str]) -> trainer_pb2.Job:
    with scenario.channel(addr, TOKEN) as ch:
        return trainer_grpc.TrainerServiceStub(ch).StartJob(trainer_pb2.StartJobRequest(
            kind=trainer_pb2.JOB_KIND_SFT, overrides=overrides), timeout=30).job


def _job(addr: str, job_id: str) -> trainer_pb2.Job:
    with scenario.channel(addr, TOKEN) as ch:
        return trainer_grpc.TrainerServiceStub(ch).GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=30).job


def _events(addr: str, job_id: str) -> list[str]:
    with scenario.channel(addr, TOKEN) as ch:
        return [e.message for e in trainer_grpc.TrainerServiceStub(ch).WatchJob(
            trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300)]


def _k8s_jobs(kube, ns: str, job_id: str) -> list:
    from kubernetes import client

    return client.BatchV1Api(kube).list_namespaced_job(ns, label_selector=f"{JOB_LABEL}={job_id}").items


def test_a_job_runs_as_an_indexed_job_with_its_rendezvous_service_and_is_followed(trainer, kube, namespace):
    from kubernetes import client

    job = _start(trainer, {"distributed.processes": "2", "distributed.nodes": "2", "sft.max_steps": "5"})
    assert job.owner == "alice"
    [k] = wait_for("the Kubernetes Job", lambda: _k8s_jobs(kube, namespace, job.job_id))
    name = k.metadata.name
    assert k.metadata.labels[JOB_LABEL] == job.job_id and k.metadata.labels[OWNER_LABEL] == "alice"
    assert (k.spec.completion_mode, k.spec.completions, k.spec.parallelism, k.spec.backoff_limit,
            k.spec.ttl_seconds_after_finished) == ("Indexed", 2, 2, 0, 900)
    pod = k.spec.template.spec
    c = pod.containers[0]
    assert c.command == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                         "--node-rank", "$(JOB_COMPLETION_INDEX)", "--master-addr", f"{name}-0.{name}",
                         "--master-port", str(RENDEZVOUS_PORT), "-m", "services.trainer.worker", job.job_id]
    env = {e.name: e for e in c.env}
    assert env["RLHF_TRAINER_DEVICE"].value == "cpu" and "RLHF_TRAINER_LAUNCHER" not in env
    assert env["RLHF_TRAINER_DATABASE_URL"].value_from.secret_key_ref.name == "rlhf-database"
    assert pod.subdomain == name and pod.restart_policy == "Never" and pod.automount_service_account_token is False
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["registry"].persistent_volume_claim.claim_name == "rlhf-registry"
    assert {m.name: m.mount_path for m in c.volume_mounts}["registry"] == env["RLHF_TRAINER_REGISTRY_DIR"].value
    assert "nvidia.com/gpu" not in (c.resources.limits or {})
    svc = client.CoreV1Api(kube).read_namespaced_service(name, namespace)
    assert svc.spec.cluster_ip == "None" and svc.spec.selector == {"batch.kubernetes.io/job-name": name}
    assert [p.port for p in svc.spec.ports] == [RENDEZVOUS_PORT]
    assert svc.metadata.owner_references[0].name == name  # deleted with the Job

    # kwok runs and completes the pods; no job process reported a result: the trainer resumes the
    # job once (max_job_restarts=1) as a second Job, then fails it, saying why
    messages = _events(trainer, job.job_id)
    done = _job(trainer, job.job_id)
    assert done.status == trainer_pb2.JOB_STATUS_FAILED and done.attempts == 2, messages
    assert messages[1].startswith(f"started (Kubernetes Job {namespace}/{name}: 2 pod(s) x 2 process(es), attempt 1)")
    assert any(m.startswith(f"its run ended without a result (Kubernetes Job {name} completed") for m in messages)
    second = [j.metadata.name for j in _k8s_jobs(kube, namespace, job.job_id) if j.metadata.name != name]
    assert len(second) == 1 and any(m.startswith(f"resumed (Kubernetes Job {namespace}/{second[0]}") for m in messages)
    assert "not resumed: it was resumed 1 time(s) already (max_job_restarts=1)" in done.message


def test_cancel_deletes_the_job_and_its_service(trainer, kube, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    job = _start(trainer, {"distributed.processes": "2", "distributed.gpus_per_process": "1"})
    [k] = wait_for("the Kubernetes Job", lambda: _k8s_jobs(kube, namespace, job.job_id))
    name = k.metadata.name
    c = k.spec.template.spec.containers[0]
    assert c.resources.limits["nvidia.com/gpu"] == c.resources.requests["nvidia.com/gpu"] == "2"
    assert {e.name: e.value for e in c.env}["RLHF_TRAINER_DEVICE"] == "cuda"
    # the GPU nodes are tainted and the chart's values give no toleration: the pods wait, Pending
    wait_for("the pods' phase in the job", lambda: "Kubernetes Job" in _job(trainer, job.job_id).message
             and "pending" in _job(trainer, job.job_id).message)
    with scenario.channel(trainer, TOKEN) as ch:
        cancelled = trainer_grpc.TrainerServiceStub(ch).CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id),
                                                                  timeout=30).job
    assert cancelled.status in (trainer_pb2.JOB_STATUS_RUNNING, trainer_pb2.JOB_STATUS_CANCELLED)
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)

    def gone(read) -> bool:
        try:
            read()
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("the Job to be deleted", lambda: gone(lambda: batch.read_namespaced_job(name, namespace)))
    assert gone(lambda: core.read_namespaced_service(name, namespace))
    done = wait_for("the cancelled status", lambda: (j := _job(trainer, job.job_id)).status
                    == trainer_pb2.JOB_STATUS_CANCELLED and j)
    assert done.message.startswith("cancelled") and done.attempts == 1
