"""charts/rlhf with the real helm: lint, render, validate every manifest against the Kubernetes 1.37
schema (offline), refuse bad values with the message an operator needs, and wire what the services
read. The same chart on a real control plane: test_cluster.py."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import (CHART, K8S_VERSION, ROOT, SERVICES, VALUES_DEV, VALUES_PRODUCTION, by_kind,
                                  container_env, dump)

pytestmark = pytest.mark.deploy

VALUES = {"default": (), "dev": (VALUES_DEV,), "production": (VALUES_PRODUCTION,)}
# the Prometheus Operator's kinds: no schema in kubernetes-validate; the API server validates them
# against their CRDs in test_cluster.py
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# Settings the chart wires before the services read them (each service rejects unknown
# RLHF_<SERVICE>_* variables, so the chart sets the Kafka ones only for an authenticated Kafka).
# When a service learns one, it leaves this list (the test below says so).
PLANNED: set[str] = set()  # settings the chart wires before any service reads them
PLANNED_PER_SERVICE: dict[str, set[str]] = {}


@pytest.mark.parametrize("values", list(VALUES), ids=list(VALUES))
def test_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART), "--kube-version", "v1.37.2"]
    for f in VALUES[values]:
        args += ["-f", str(f)]
    out = helm.run(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out


@pytest.mark.parametrize("values", list(VALUES), ids=list(VALUES))
def test_every_rendered_manifest_is_valid_kubernetes_1_37(helm, values):
    manifests = helm.template(*VALUES[values])
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Job", "Role"} <= kinds
    problems = []
    for m in manifests:
        if m["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(m, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{m['kind']}/{m['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not problems, "\n".join(problems)


BAD_VALUES = [
    pytest.param({"policyServer": {"replicaCount": "two"}}, ["/policyServer/replicaCount", "got string, want integer"], id="wrong-type"),
    pytest.param({"policyServer": {"replicas": 2}}, ["/policyServer", "additional properties 'replicas' not allowed"],
                 id="misspelled-key"),
    pytest.param({"trainer": {"replicaCount": 2}}, ["/trainer/replicaCount", "got 2, want 1"], id="two-trainers"),
    pytest.param({"kafka": {"bootstrapServers": ""}}, ["kafka.bootstrapServers is required"], id="no-kafka"),
    pytest.param({"database": {"url": ""}}, ["database.url or database.existingSecret is required"], id="no-database"),
    pytest.param({"rewardScorer": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
                 ["rewardScorer.resources asks for 1 nvidia.com/gpu but rewardScorer.nodeSelector is empty"],
                 id="gpu-without-node-selector"),
    pytest.param({"policyServer": {"graceSeconds": 60, "terminationGracePeriodSeconds": 30}},
                 ["policyServer.terminationGracePeriodSeconds (30) must exceed policyServer.graceSeconds (60)"],
                 id="shutdown-shorter-than-drain"),
    pytest.param({"kafka": {"securityProtocol": "SASL_SSL"}}, ["kafka.securityProtocol=SASL_SSL needs"], id="sasl-no-secret"),
    pytest.param({"kafka": {"securityProtocol": "TLS"}}, ["/kafka/securityProtocol", "must be one of 'PLAINTEXT'"],
                 id="unknown-protocol"),
    pytest.param({"tls": {"enabled": True}}, ["tls.enabled=true needs tls.existingSecret"], id="tls-no-secret"),
    pytest.param({"auth": {"credentials": {"existingSecret": ""}}}, ["auth.credentials.existingSecret is required"],
                 id="no-callers-file"),
    pytest.param({"auth": {"peerToken": {"existingSecret": ""}}}, ["auth.peerToken.existingSecret is required"],
                 id="no-peer-token"),
    pytest.param({"registry": {"persistence": {"enabled": False}}}, ["registry.persistence.enabled=false needs registry.volume"],
                 id="no-registry"),
]


@pytest.mark.parametrize("bad, expected", BAD_VALUES)
def test_bad_values_files_are_refused_with_the_message_an_operator_needs(helm, tmp_path, bad, expected):
    f = tmp_path / "bad-values.yaml"
    f.write_text(yaml.safe_dump(bad))
    commands = [["template", "rlhf", str(CHART)]]
    if expected[0].startswith("/"):  # values.schema.json's: helm lint applies it too (a template's
        commands.append(["lint", "--strict", str(CHART)])  # `fail` is only an INFO line to lint)
    for command in commands:
        r = helm.run(*command, "-f", str(f), check=False)
        assert r.returncode != 0, f"helm {command[0]} accepted {bad}"
        message = r.stderr + r.stdout
        for part in expected:
            assert part in message, f"{part!r} not in helm's message:\n{message}"


def test_gpus_with_a_node_selector_are_accepted_and_get_the_cuda_image(helm):
    manifests = helm.template(sets=("rewardScorer.resources.limits.nvidia\\.com/gpu=2",),
                              set_strings=("rewardScorer.nodeSelector.nvidia\\.com/gpu\\.present=true",))
    d = by_kind(manifests, "Deployment")["rlhf-reward-scorer"]
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "rlhf/rlhf:0.1.0-cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container_env(d)["RLHF_REWARD_SCORER_DEVICE"]["value"] == "cuda"
    assert by_kind(manifests, "Deployment")["rlhf-prompt-collector"]["spec"]["template"]["spec"]["containers"][0]["image"] \
        == "rlhf/rlhf:0.1.0"


def _settings_fields(service: str) -> set[str]:
    from services import SERVICES as MODULES

    cls = importlib.import_module(MODULES[service]).Settings
    return {f.name.upper() for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("values", ["dev", "production"])
def test_every_variable_the_chart_sets_is_a_setting_of_its_service(helm, values):
    """Each service refuses unknown RLHF_<SERVICE>_* variables at start: a typo here would stop it."""
    manifests = helm.template(*VALUES[values])
    deployments = by_kind(manifests, "Deployment")
    seen_planned = set()
    for key, service in SERVICES.items():
        d = deployments[f"rlhf-{service}"]
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == ["serve", service]
        prefix = "RLHF_" + service.upper().replace("-", "_") + "_"
        names = {n[len(prefix):] for n in container_env(d) if n.startswith(prefix)}
        assert not {n for n in container_env(d) if n.startswith("RLHF_") and not n.startswith(prefix)} - {"RLHF_CACHE_DIR"}
        fields = _settings_fields(service)
        landed = fields & (PLANNED | PLANNED_PER_SERVICE.get(service, set()))
        assert not landed, f"{service} now reads {sorted(landed)}: take them off PLANNED in {__file__}"
        unknown = names - fields - PLANNED - PLANNED_PER_SERVICE.get(service, set())
        assert not unknown, f"{service}: the chart sets {sorted(unknown)}, which {service} does not read"
        seen_planned |= names & (PLANNED | PLANNED_PER_SERVICE.get(service, set()))
        assert {"HOST", "PORT", "METRICS_PORT", "GRACE_SECONDS", "KAFKA_BOOTSTRAP"} <= names
    if values == "production":  # every planned setting is wired somewhere
        assert seen_planned == PLANNED | set().union(*PLANNED_PER_SERVICE.values())
    for d in deployments.values():  # a callers file, or (dev) anonymous callers: never neither
        env = container_env(d)
        assert any(n.endswith("_CREDENTIALS_FILE") for n in env) != any(n.endswith("_ALLOW_ANONYMOUS") for n in env)


def test_secrets_reach_the_services_as_files_or_secret_references(helm):
    manifests = helm.template(VALUES_PRODUCTION)
    d = by_kind(manifests, "Deployment")["rlhf-feedback-store"]
    env = container_env(d)
    assert env["RLHF_FEEDBACK_STORE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-database",
                                                                                    "key": "database-url"}
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    for var, volume, secret in [("CREDENTIALS_FILE", "credentials", "rlhf-credentials"),
                                ("PEER_TOKEN_FILE", "peer-token", "rlhf-peer-token"),
                                ("KAFKA_SASL_PASSWORD_FILE", "kafka-sasl", "rlhf-kafka"),
                                ("KAFKA_SSL_CA_FILE", "kafka-ca", "rlhf-kafka"),
                                ("TLS_CERT_FILE", "tls", "rlhf-tls"), ("TLS_CLIENT_CA_FILE", "tls", "rlhf-tls"),
                                ("PEER_TLS_CA_FILE", "tls", "rlhf-tls"), ("PEER_TLS_CERT_FILE", "tls", "rlhf-tls")]:
        assert volumes[volume]["secret"]["secretName"] == secret
        assert env[f"RLHF_FEEDBACK_STORE_{var}"]["value"].startswith(mounts[volume] + "/")
    assert not by_kind(manifests, "Secret"), "with existingSecret the chart creates no Secret"
    # values-dev: the chart keeps the URL in a Secret it creates, never in the pod spec
    dev = helm.template(VALUES_DEV)
    assert "database-url" in by_kind(dev, "Secret")["rlhf-database"]["data"]
    assert "postgresql" not in json.dumps(by_kind(dev, "Deployment")["rlhf-prompt-collector"]["spec"]["template"]
                                          ["spec"]["containers"][0]["env"])
    api = container_env(by_kind(manifests, "Deployment")["rlhf-policy-server"])
    assert api["RLHF_POLICY_SERVER_API_KEYS_FILE"]["value"] == "/etc/rlhf/api-keys/api-keys.yaml"


def test_pods_drain_before_they_are_killed_and_run_locked_down(helm):
    for d in by_kind(helm.template(VALUES_PRODUCTION), "Deployment").values():
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        grace = next(float(v) for k, v in env.items() if k.endswith("_GRACE_SECONDS"))
        assert spec["terminationGracePeriodSeconds"] > grace
        assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # tls.enabled in production: kubelet's gRPC probes cannot speak TLS, so the probes check the port
        assert "tcpSocket" in c["readinessProbe"] and "tcpSocket" in c["livenessProbe"]
    for d in by_kind(helm.template(), "Deployment").values():
        c = d["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port}, probe


def test_trainer_role_allows_its_training_jobs_and_nothing_else(helm):
    manifests = helm.template()
    role = by_kind(manifests, "Role")["rlhf-trainer"]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
                     (("",), ("pods",)): {"get", "list", "watch"},
                     (("",), ("services",)): {"create", "get", "list", "watch", "delete"}}
    binding = by_kind(manifests, "RoleBinding")["rlhf-trainer"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rlhf-trainer", "namespace": "rlhf"}]
    deployments = by_kind(manifests, "Deployment")
    assert deployments["rlhf-trainer"]["spec"]["template"]["spec"]["serviceAccountName"] == "rlhf-trainer"
    assert not any(d["spec"]["template"]["spec"]["automountServiceAccountToken"]
                   for n, d in deployments.items() if n != "rlhf-trainer")


def _ingress_sources(policy: dict, port: str) -> list | None:
    """The peers allowed on a named port; None when anyone is."""
    for rule in policy["spec"]["ingress"]:
        if any(p["port"] == port for p in rule["ports"]):
            return [p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") if "podSelector" in p else p
                    for p in rule["from"]] if "from" in rule else None
    return []


def test_network_policies_admit_only_the_callers(helm):
    policies = by_kind(helm.template(), "NetworkPolicy")
    # the trainer's training Jobs' pods call what the trainer calls
    assert _ingress_sources(policies["rlhf-reward-scorer"], "grpc") == ["trainer", "trainer-job"]
    assert _ingress_sources(policies["rlhf-prompt-collector"], "grpc") == ["policy-server", "trainer", "trainer-job"]
    jobs = policies["rlhf-trainer-job"]["spec"]
    assert jobs["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer-job"
    assert [r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in jobs["egress"]
            if "to" in r] == ["trainer-job", "prompt-collector", "policy-server", "reward-scorer", "feedback-store"]
    assert _ingress_sources(policies["rlhf-policy-server"], "http") is None  # the product teams' API
    egress = policies["rlhf-policy-server"]["spec"]["egress"]
    assert [r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in egress if "to" in r] == \
        ["prompt-collector"]
    production = by_kind(helm.template(VALUES_PRODUCTION), "NetworkPolicy")
    sources = _ingress_sources(production["rlhf-policy-server"], "grpc")
    assert sources[0] == {"namespaceSelector": {"matchLabels": {"rlhf.example.com/client": "true"}}}
    assert sources[1:] == ["trainer", "trainer-job"]


def test_dashboards_and_alerts_ship_in_the_chart_as_in_deploy(helm):
    manifests = helm.template(VALUES_PRODUCTION)
    maps = by_kind(manifests, "ConfigMap")
    for name in ("rl-training", "serving", "feedback", "platform"):
        cm = maps[f"rlhf-dashboard-{name}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][f"rlhf-{name}.json"]) == json.loads((ROOT / "deploy" / "grafana" / f"{name}.json").read_text())
    rule = by_kind(manifests, "PrometheusRule")["rlhf"]
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    monitor = by_kind(manifests, "ServiceMonitor")["rlhf"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"  # job = the service's name
    assert not by_kind(helm.template(), "ServiceMonitor") and not by_kind(helm.template(), "PrometheusRule")


def test_policy_server_autoscales_on_its_queue(helm):
    hpa = by_kind(helm.template(VALUES_PRODUCTION), "HorizontalPodAutoscaler")["rlhf-policy-server"]
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "rlhf_policy_queue_depth"},
                                                                "target": {"type": "AverageValue", "averageValue": "64"}}}]
    assert "replicas" not in by_kind(helm.template(VALUES_PRODUCTION), "Deployment")["rlhf-policy-server"]["spec"]


def test_migration_job_is_a_hook_that_runs_before_the_services_need_the_schema(helm):
    job = by_kind(helm.template(VALUES_PRODUCTION), "Job")["rlhf-migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["migrate"] and c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-database"
    # the chart's own Secret (and the dev database) exist only after install: migrate then, and at start
    dev = helm.template(VALUES_DEV)
    assert by_kind(dev, "Job")["rlhf-migrate"]["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    assert container_env(by_kind(dev, "Deployment")["rlhf-feedback-store"])["RLHF_FEEDBACK_STORE_MIGRATE_ON_START"][
        "value"] == "true"


def test_chart_readme_documents_every_value_and_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import chart_readme
    finally:
        sys.path.pop(0)
    values_text = (CHART / "values.yaml").read_text()
    tables = chart_readme.render(values_text)  # raises on an undocumented key
    assert chart_readme.updated_readme((CHART / "README.md").read_text(), tables) == (CHART / "README.md").read_text(), \
        "charts/rlhf/README.md is stale: run python scripts/chart_readme.py"
    with pytest.raises(ValueError, match="without an @param: policyServer.newKey"):
        chart_readme.render(values_text.replace("policyServer:\n", "policyServer:\n  newKey: 1\n", 1))
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in SERVICES:
        assert set(yaml.safe_load(values_text)[key]) <= set(schema["properties"][key]["properties"]), dump(key)
