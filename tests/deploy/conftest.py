"""The deployment checks run against real programs: helm, a Kubernetes control plane (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kwok) built from the Go module proxy by
scripts/k8s.sh, and Debian's Prometheus (scripts/prometheus.sh).

scripts/test.sh builds and starts them and exports RLHF_TEST_K8S_BIN / RLHF_TEST_KUBECONFIG. Run
alone, these fixtures do the same (and stop what they started). Tests are skipped only when the
programs are missing and RLHF_TEST_INFRA=none says not to build or install them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import CHART, ROOT


def _infra_none() -> bool:
    return os.environ.get("RLHF_TEST_INFRA") == "none"


def _script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def k8s_bin() -> Path:
    """The directory of helm and the control plane's programs."""
    env = os.environ.get("RLHF_TEST_K8S_BIN")
    if env and (Path(env) / "helm").exists():
        return Path(env)
    found = _script("k8s.sh", "bin-dir", check=False)
    if found.returncode != 0:
        if _infra_none():
            pytest.skip("helm and the Kubernetes control plane are not built (scripts/k8s.sh build) "
                        "and RLHF_TEST_INFRA=none")
        r = subprocess.run([str(ROOT / "scripts" / "k8s.sh"), "build"])  # long the first time: its output shows
        assert r.returncode == 0, "scripts/k8s.sh build failed"
        found = _script("k8s.sh", "bin-dir")
    return Path(found.stdout.strip())


class Helm:
    """The helm client with its own configuration and cache directories."""

    def __init__(self, binary: Path, home: Path, kubeconfig: Path | None = None):
        self.binary = binary
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}
        if kubeconfig is not None:
            self.env["KUBECONFIG"] = str(kubeconfig)
        else:
            self.env.pop("KUBECONFIG", None)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}\n{r.stdout[-2000:]}")
        return r

    def template(self, *values: Path | str, sets: tuple[str, ...] = (), set_strings: tuple[str, ...] = (),
                 release: str = "rlhf", namespace: str = "rlhf") -> list[dict]:
        """Every manifest `helm template` renders (hooks included), as dicts."""
        args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", "v1.37.2"]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        for s in set_strings:
            args += ["--set-string", s]
        return [d for d in yaml.safe_load_all(self.run(*args).stdout) if d]


@pytest.fixture(scope="session")
def helm(k8s_bin, tmp_path_factory) -> Helm:
    return Helm(k8s_bin / "helm", tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def kubeconfig(k8s_bin) -> Path:
    """A running control plane with three fake nodes (kwok-cpu-0, kwok-gpu-0/1 with 8 GPUs each)."""
    env = os.environ.get("RLHF_TEST_KUBECONFIG")
    if env and Path(env).exists():
        yield Path(env)
        return
    state = ROOT / ".cache" / "k8s"
    started = _script("k8s.sh", "status", check=False).returncode != 0
    if started:
        if _infra_none():
            pytest.skip("no Kubernetes control plane running (scripts/k8s.sh start) and RLHF_TEST_INFRA=none")
        r = subprocess.run([str(ROOT / "scripts" / "k8s.sh"), "start"])
        assert r.returncode == 0, "scripts/k8s.sh start failed"
    try:
        yield state / "kubeconfig"
    finally:
        if started:
            _script("k8s.sh", "stop", check=False)


@pytest.fixture(scope="session")
def kube(kubeconfig, k8s_bin):
    """The kubernetes client's ApiClient for the cluster, with the Prometheus Operator's CRDs installed."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = config.new_client_from_config(str(kubeconfig))
    ext = client.ApiextensionsV1Api(api)
    for crd in yaml.safe_load_all((k8s_bin / "prometheus-operator-crds.yaml").read_text()):
        if not crd:
            continue
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise
    return api


@pytest.fixture(scope="session")
def cluster_helm(k8s_bin, kubeconfig, kube, tmp_path_factory) -> Helm:
    return Helm(k8s_bin / "helm", tmp_path_factory.mktemp("helm-cluster"), kubeconfig)


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The directory of prometheus and promtool (Debian's package)."""
    found = _script("prometheus.sh", "bin-dir", check=False)
    if found.returncode != 0:
        if _infra_none():
            pytest.skip("Prometheus is not installed (scripts/prometheus.sh install) and RLHF_TEST_INFRA=none")
        r = subprocess.run([str(ROOT / "scripts" / "prometheus.sh"), "install"])
        assert r.returncode == 0, "scripts/prometheus.sh install failed"
        found = _script("prometheus.sh", "bin-dir")
    return Path(found.stdout.strip())
