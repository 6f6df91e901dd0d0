"""Paths and small helpers of the deployment tests (fixtures: conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rlhf"
VALUES_DEV = ROOT / "deploy" / "values-dev.yaml"
VALUES_PRODUCTION = ROOT / "deploy" / "values-production.yaml"
K8S_VERSION = "1.37.0"  # the schema kubernetes-validate checks against (the cluster runs 1.37.2)
SERVICES = {"promptCollector": "prompt-collector", "policyServer": "policy-server", "rewardScorer": "reward-scorer",
            "feedbackStore": "feedback-store", "trainer": "trainer"}


def by_kind(manifests: list[dict], kind: str) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def container_env(deployment: dict) -> dict[str, dict]:
    """name -> the env entry, of the Deployment's first container."""
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:3000]


def registry_volume(kube, namespace: str, claim: str = "rlhf-registry") -> str:
    """A PersistentVolume bound in advance to claim ``claim`` of ``namespace`` (the cluster has no
    volume provisioner); returns its name (delete it after the namespace)."""
    from kubernetes import client

    pv = f"{namespace}-registry"
    client.CoreV1Api(kube).create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "2Ti"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{pv}"},
                 "claimRef": {"namespace": namespace, "name": claim}}})
    return pv
