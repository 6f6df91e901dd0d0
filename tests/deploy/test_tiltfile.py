"""The Tiltfile, evaluated as Starlark with Tilt's builtins recorded (Tilt itself does not install from
the registries here), names only images and resources that the chart renders with its values."""

from __future__ import annotations

import re
import shlex

import pytest
import starlark

from tests.deploy.helpers import ROOT

pytestmark = pytest.mark.deploy

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


class Tilt:
    """Tilt's builtins the Tiltfile may call, recording their arguments."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def stub(self, name: str, returns=None):
        def f(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return returns(*args, **kwargs) if returns else None
        return f

    def of(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]

    def evaluate(self, path) -> None:
        glb = starlark.Globals.standard()
        mod = starlark.Module()
        for name in ("version_settings", "watch_settings", "docker_build", "k8s_yaml", "k8s_resource",
                     "allow_k8s_contexts", "update_settings"):
            mod.add_callable(name, self.stub(name))
        mod.add_callable("helm", self.stub("helm", lambda *a, **k: f"<helm:{len(self.of('helm'))}>"))
        mod.add_callable("sync", self.stub("sync", lambda src, dst: {"sync": [src, dst]}))
        mod.add_callable("run", self.stub("run", lambda cmd, trigger=None: {"run": cmd, "trigger": trigger or []}))
        mod.add_callable("fall_back_on", self.stub("fall_back_on", lambda files: {"fall_back_on": files}))
        starlark.eval(mod, starlark.parse("Tiltfile", path.read_text()), glb)


@pytest.fixture(scope="module")
def tilt() -> Tilt:
    t = Tilt()
    t.evaluate(ROOT / "Tiltfile")  # an unknown builtin or a syntax error fails here
    return t


@pytest.fixture(scope="module")
def rendered(tilt, helm) -> list[dict]:
    [(args, kw)] = tilt.of("helm")
    assert (ROOT / args[0] / "Chart.yaml").exists()
    assert tilt.of("k8s_yaml") == [(("<helm:1>",), {})]
    for v in kw.get("values", []):
        assert (ROOT / v).exists(), v
    return helm.template(*(ROOT / v for v in kw.get("values", [])), sets=tuple(kw.get("set", [])),
                         release=kw.get("name", "chart"), namespace=kw.get("namespace", "default"))


def workloads(manifests: list[dict]) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] in WORKLOAD_KINDS}


def containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"] if workload["kind"] != "Pod" else workload["spec"]
    return spec["containers"]


def test_version_settings_come_first(tilt):
    assert tilt.calls[0][0] == "version_settings"


def test_images_are_built_from_the_dockerfile_and_used_by_the_chart(tilt, rendered):
    builds = tilt.of("docker_build")
    assert builds
    used = {c["image"].rsplit(":", 1)[0] for w in workloads(rendered).values() for c in containers(w)}
    dockerfile_stages = set()
    for args, kw in builds:
        ref, context = args
        dockerfile = (ROOT / context / kw.get("dockerfile", "Dockerfile"))
        text = dockerfile.read_text()
        dockerfile_stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M))
        assert kw.get("target", "cpu") in dockerfile_stages
        assert ref in used, f"the Tiltfile builds {ref}, which no workload of the chart runs ({used})"
        for path in kw.get("only", []):
            assert (ROOT / context / path).exists(), path
    assert {"cpu", "cuda"} <= dockerfile_stages


def test_live_update_falls_back_then_syncs_then_runs(tilt, rendered):
    [(_, kw)] = tilt.of("docker_build")
    steps = kw["live_update"]
    kinds = [next(iter(s)) for s in steps]
    assert kinds[0] == "fall_back_on" and kinds[-1] == "run" and set(kinds[1:-1]) == {"sync"}
    python = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", (ROOT / "services" / "Dockerfile").read_text(), re.M).group(1)
    for s in steps[1:-1]:
        src, dst = s["sync"]
        assert (ROOT / src).is_dir()
        assert dst == f"/opt/rlhf/lib/python{python}/site-packages/{src}", dst
    for f in steps[0]["fall_back_on"]:
        assert (ROOT / f).exists(), f
    # the run step ends the server through the pid file that the chart's dev loop writes, and the
    # dev loop leaves the root file system writable for the syncs
    pid_file = re.search(r"cat (\S+)\)", steps[-1]["run"]).group(1)
    for name, w in workloads(rendered).items():
        if name.endswith(("-kafka", "-postgresql", "-migrate")):
            continue
        c = containers(w)[0]
        assert c["command"] == ["sh", "-c"] and pid_file in c["args"][0], name
        assert c["securityContext"]["readOnlyRootFilesystem"] is False
        assert shlex.split(c["args"][0].split("rlhf serve ")[1])[0] == name.removeprefix("rlhf-")


def test_resources_name_workloads_ports_and_dependencies_the_chart_has(tilt, rendered):
    loads = workloads(rendered)
    resources = {args[0]: kw for args, kw in tilt.of("k8s_resource")}
    assert set(resources) == set(loads), "every workload gets a resource, and no resource names a missing one"
    for name, kw in resources.items():
        ports = {p["containerPort"] for c in containers(loads[name]) for p in c.get("ports", [])}
        for forward in kw.get("port_forwards", []):
            local, remote = (int(x) for x in forward.split(":"))
            assert remote in ports, f"{name}: port forward {forward}, the pods expose {sorted(ports)}"
        assert set(kw.get("resource_deps", [])) <= set(resources), name
        assert kw.get("labels"), name
    forwarded = [f.split(":")[0] for kw in resources.values() for f in kw.get("port_forwards", [])]
    assert len(forwarded) == len(set(forwarded)), "two port forwards share a local port"
    # the APIs, the labeling page and every /metrics
    assert {"8000", "8001", "50052", "9101", "9102", "9103", "9104", "9105"} <= set(forwarded)
