"""The chart on a real control plane (scripts/k8s.sh: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok, whose fake nodes mark pods Running; two of the three nodes have 8
nvidia.com/gpu each and the GPU operator's label and taint). Nothing runs in the pods: these tests
check what Kubernetes makes of the chart, not the services."""

from __future__ import annotations

import uuid

import pytest

from tests.deploy.helpers import CHART, SERVICES, VALUES_DEV, VALUES_PRODUCTION, dump, registry_volume
from tests.services.helpers import wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.integration]

GPU_NODES = {"kwok-gpu-0", "kwok-gpu-1"}
TIMEOUT = "180s"


@pytest.fixture
def namespace(kube):
    """A fresh namespace, with a PersistentVolume bound in advance to the registry claim of release
    "rlhf" in it (the cluster has no volume provisioner); both deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    ns = f"rlhf-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    pv = registry_volume(kube, ns)
    yield ns
    core.delete_namespace(ns)
    core.delete_persistent_volume(pv)


def release_pods(kube, ns: str) -> list:
    from kubernetes import client

    return client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector="app.kubernetes.io/instance=rlhf").items


def deployment_replicas(kube, ns: str, name: str) -> int:
    from kubernetes import client

    return client.AppsV1Api(kube).read_namespaced_deployment(name, ns).spec.replicas


def released_objects(kube, ns: str) -> dict[str, list[str]]:
    """Every namespaced object of kinds the chart creates that carries the release's label."""
    from kubernetes import client

    sel = "app.kubernetes.io/instance=rlhf"
    core, apps, net = client.CoreV1Api(kube), client.AppsV1Api(kube), client.NetworkingV1Api(kube)
    policy, rbac, batch = client.PolicyV1Api(kube), client.RbacAuthorizationV1Api(kube), client.BatchV1Api(kube)
    listings = {
        "Deployment": apps.list_namespaced_deployment, "StatefulSet": apps.list_namespaced_stateful_set,
        "Service": core.list_namespaced_service, "ConfigMap": core.list_namespaced_config_map,
        "Secret": core.list_namespaced_secret, "ServiceAccount": core.list_namespaced_service_account,
        "PersistentVolumeClaim": core.list_namespaced_persistent_volume_claim, "Pod": core.list_namespaced_pod,
        "NetworkPolicy": net.list_namespaced_network_policy, "PodDisruptionBudget": policy.list_namespaced_pod_disruption_budget,
        "Role": rbac.list_namespaced_role, "RoleBinding": rbac.list_namespaced_role_binding, "Job": batch.list_namespaced_job,
    }
    found = {kind: [o.metadata.name for o in ls(ns, label_selector=sel).items] for kind, ls in listings.items()}
    return {k: v for k, v in found.items() if v}


def test_install_upgrade_rollback_uninstall_with_the_dev_values(cluster_helm, kube, namespace):
    ns = namespace
    install = cluster_helm.run("install", "rlhf", str(CHART), "-n", ns, "-f", str(VALUES_DEV), "--wait",
                               "--wait-for-jobs", "--timeout", TIMEOUT)
    assert "The RLHF platform is installed" in install.stdout  # NOTES.txt
    assert "kubectl -n %s port-forward svc/rlhf-policy-server 8000:8000" % ns in install.stdout
    assert "port-forward svc/rlhf-feedback-store 8001:8001" in install.stdout and "rlhf-dashboard-" in install.stdout
    pods = release_pods(kube, ns)
    components = {p.metadata.labels["app.kubernetes.io/component"] for p in pods}
    assert set(SERVICES.values()) | {"kafka", "postgresql"} <= components, components
    for p in pods:
        if p.metadata.labels["app.kubernetes.io/component"] == "migrate":
            assert p.status.phase == "Succeeded"  # the post-install hook Job ran to completion
        else:
            assert p.status.phase == "Running" and p.spec.node_name == "kwok-cpu-0", (p.metadata.name, p.status.phase)
    created = released_objects(kube, ns)
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "ServiceAccount", "PersistentVolumeClaim",
            "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding"} <= set(created), dump(created)

    cluster_helm.run("upgrade", "rlhf", str(CHART), "-n", ns, "-f", str(VALUES_DEV),
                     "--set", "feedbackStore.replicaCount=3", "--wait", "--timeout", TIMEOUT)
    assert deployment_replicas(kube, ns, "rlhf-feedback-store") == 3
    wait_for("3 feedback-store pods Running", lambda: sum(
        p.metadata.labels["app.kubernetes.io/component"] == "feedback-store" and p.status.phase == "Running"
        and p.metadata.deletion_timestamp is None for p in release_pods(kube, ns)) == 3)
    history = cluster_helm.run("history", "rlhf", "-n", ns, "-o", "json").stdout
    assert '"revision":2' in history.replace(" ", "")

    cluster_helm.run("rollback", "rlhf", "1", "-n", ns, "--wait", "--timeout", TIMEOUT)
    assert deployment_replicas(kube, ns, "rlhf-feedback-store") == 1

    cluster_helm.run("uninstall", "rlhf", "-n", ns, "--wait", "--timeout", TIMEOUT)
    # the garbage collector removes the pods of the deleted Deployments and StatefulSets
    wait_for("the release's objects to go", lambda: not released_objects(kube, ns))
    assert cluster_helm.run("list", "-n", ns, "-q").stdout.strip() == ""


def test_gpu_services_land_only_on_gpu_nodes(cluster_helm, kube, namespace):
    ns = namespace
    gpu = ["--set", "policyServer.resources.limits.nvidia\\.com/gpu=1",
           "--set-string", "policyServer.nodeSelector.nvidia\\.com/gpu\\.present=true",
           "--set", "policyServer.tolerations[0].key=nvidia.com/gpu",
           "--set", "policyServer.tolerations[0].operator=Exists",
           "--set", "policyServer.tolerations[0].effect=NoSchedule",
           "--set", "policyServer.replicaCount=3"]
    cluster_helm.run("install", "rlhf", str(CHART), "-n", ns, "-f", str(VALUES_DEV), *gpu, "--wait", "--wait-for-jobs",
                     "--timeout", TIMEOUT)
    pods = [p for p in release_pods(kube, ns) if p.status.phase == "Running"]
    by_component: dict[str, set[str]] = {}
    for p in pods:
        by_component.setdefault(p.metadata.labels["app.kubernetes.io/component"], set()).add(p.spec.node_name)
    assert by_component["policy-server"] <= GPU_NODES, by_component
    for component, nodes in by_component.items():
        if component != "policy-server":  # no toleration for the GPU nodes' taint
            assert nodes == {"kwok-cpu-0"}, (component, nodes)
    images = {c.image for p in pods if p.metadata.labels["app.kubernetes.io/component"] == "policy-server"
              for c in p.spec.containers}
    assert images == {"rlhf/rlhf:0.1.0-cuda"}
    cluster_helm.run("uninstall", "rlhf", "-n", ns, "--wait", "--timeout", TIMEOUT)


def _allowed(kube, account: str, verb: str, resource: str, group: str = "", where: str | None = None) -> bool:
    """Whether ServiceAccount "namespace:name" may do this (a SubjectAccessReview, as the API server decides it)."""
    from kubernetes import client

    ns, name = account.split(":")
    review = client.AuthorizationV1Api(kube).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{ns}:{name}",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                 "resourceAttributes": {"namespace": where or ns, "verb": verb, "group": group, "resource": resource}}})
    return review.status.allowed


def test_trainer_may_create_training_jobs_in_its_namespace_and_not_read_secrets(cluster_helm, kube, namespace):
    ns = namespace
    cluster_helm.run("install", "rlhf", str(CHART), "-n", ns, "-f", str(VALUES_DEV), "--wait", "--wait-for-jobs",
                     "--timeout", TIMEOUT)
    trainer = f"{ns}:rlhf-trainer"
    for verb in ("create", "get", "list", "watch", "delete"):
        assert _allowed(kube, trainer, verb, "jobs", "batch"), verb
    assert _allowed(kube, trainer, "create", "services") and _allowed(kube, trainer, "watch", "pods")
    assert not _allowed(kube, trainer, "get", "secrets"), "the trainer must not read the release's Secrets"
    assert not _allowed(kube, trainer, "get", "secrets", where="kube-system")
    assert not _allowed(kube, trainer, "list", "secrets", where="default")
    assert not _allowed(kube, trainer, "create", "jobs", "batch", where="default"), "only in its own namespace"
    assert not _allowed(kube, trainer, "delete", "pods") and not _allowed(kube, trainer, "create", "pods")
    assert not _allowed(kube, trainer, "create", "deployments", "apps")
    # the other services' account may do nothing at all
    other = f"{ns}:rlhf"
    assert not _allowed(kube, other, "create", "jobs", "batch") and not _allowed(kube, other, "get", "secrets")
    cluster_helm.run("uninstall", "rlhf", "-n", ns, "--wait", "--timeout", TIMEOUT)


def test_production_values_pass_the_api_servers_validation(cluster_helm, kube, namespace):
    """Server-side dry run: every object, the ServiceMonitor and PrometheusRule included (against the
    Prometheus Operator's CRDs), is admitted by the API server; nothing is created."""
    r = cluster_helm.run("install", "rlhf", str(CHART), "-n", namespace, "-f", str(VALUES_PRODUCTION),
                         "--dry-run=server")
    assert "kind: ServiceMonitor" in r.stdout and "kind: PrometheusRule" in r.stdout
    assert not released_objects(kube, namespace)
    # the API server does check those kinds against their schemas: a malformed one is refused
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(kube).create_namespaced_custom_object(
            "monitoring.coreos.com", "v1", namespace, "servicemonitors",
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "bad"},
             "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "soon"}]}}, dry_run="All")
    assert e.value.status == 422
