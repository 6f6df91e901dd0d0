"""The alert rules with promtool (check, and unit tests that show each alert firing and staying
silent), and every Grafana panel query against a real Prometheus that scrapes the five services
while `rlhf demo-loop --quick` runs, so that no panel shows a metric that does not exist."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from tests.deploy.helpers import ROOT

pytestmark = pytest.mark.deploy

RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
# Grafana's variables, as Grafana would fill them for a short range; long enough that the two PPO
# steps of the quick demo fall into one rate() window
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "${datasource}": ""}


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_rules_pass_promtool_check(prometheus_bin):
    r = subprocess.run([str(prometheus_bin / "promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_every_alert_is_shown_firing_and_silent_by_promtool_unit_tests(prometheus_bin):
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires, silent = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown staying silent"
    r = subprocess.run([str(prometheus_bin / "promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_runbook_in_the_operators_guide():
    guide = (ROOT / "docs" / "operations.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^#+\s+(.*)$", guide, flags=re.M)}  # GitHub's anchors
    for a in alerts():
        path, anchor = a["annotations"]["runbook"].split("#")
        assert path == "docs/operations.md" and anchor in headings, f"{a['alert']}: no section {anchor}"
        assert a["alert"] in guide, f"docs/operations.md does not name {a['alert']}"


# -- the dashboards against the running services ---------------------------------------------------

def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables filled in) of every panel target."""
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"{path.name} / {p['title']}: unknown variable in {t['expr']}"
                out.append((path.stem, p["title"], expr))
    return out


def test_dashboards_are_grafana_json_with_the_panels_of_the_issue():
    titles = {p.stem: {x["title"] for x in json.loads(p.read_text())["panels"]} for p in DASHBOARDS}
    assert set(titles) == {"rl-training", "serving", "feedback", "platform"}
    assert {"KL to the reference and its target", "KL coefficient beta", "Mean reward and its spread",
            "PPO step time by phase", "Rollout staleness", "Throughput", "Reward and held-out eval score"} <= titles["rl-training"]
    assert {"Time to first token by API", "Queue depth and batch size", "gRPC errors by code",
            "Served model versions"} <= titles["serving"]
    assert {"Open labeling tasks", "Comparisons per hour", "Labeler agreement (last 24 h)"} <= titles["feedback"]
    assert {"Services up", "Kafka consumer lag", "Outbox backlog", "Database errors"} <= titles["platform"]
    for p in DASHBOARDS:
        d = json.loads(p.read_text())
        assert d["uid"].startswith("rlhf-") and d["schemaVersion"] >= 36
        assert len({x["id"] for x in d["panels"]}) == len(d["panels"])


def _consecutive_free_ports(n: int) -> int:
    """The first of n consecutive ports that are free now."""
    for base in range(21000 + os.getpid() % 2000 * 10, 60000, 10):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(s["value"][1])) for s in result)


def _http(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _product_traffic(http_port: int, grpc_port: int) -> None:
    """What product teams send besides the loop: HTTP generations (OpenAI and TGI) and mistakes."""
    from rlhf_client import policy_grpc, policy_pb2

    base = f"http://127.0.0.1:{http_port}"
    assert _http(f"{base}/v1/completions", {"model": "rlhf-policy", "prompt": "The movie was", "max_tokens": 4}) == 200
    assert _http(f"{base}/generate", {"inputs": "The film", "parameters": {"max_new_tokens": 4}}) == 200
    assert _http(f"{base}/v1/completions", {"model": "rlhf-policy", "max_tokens": 4}) == 400  # no prompt
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            policy_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(
                prompts=["x"], sampling=policy_pb2.SamplingParams(max_new_tokens=100000)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_every_dashboard_query_returns_data_while_the_loop_runs(prometheus_bin, tmp_path):
    from services.launch import PORT_OFFSET

    queries = sorted({q for _, _, q in panel_queries()})
    titles = {q: f'{d} / {t}' for d, t, q in panel_queries()}
    grpc_base = _consecutive_free_ports(10)
    metrics_base = grpc_base + 5
    http_port, prom_port = _free_port(), _free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{metrics_base + off}"]}]}
                                 for name, off in PORT_OFFSET.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen([str(prometheus_bin / "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "demo-loop", "--quick", "--out", str(tmp_path / "loop"),
                             "--base-port", str(grpc_base), "--base-metrics-port", str(metrics_base),
                             "--http-port", str(http_port), "--linger", "180",
                             # the next step's rollouts are asked for during this step's update
                             "--set", "ppo.prefetch_rollouts=true"],
                            stdout=open(tmp_path / "demo.out", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    prom_url = f"http://127.0.0.1:{prom_port}"
    answered: set[str] = set()
    sent_traffic = False
    try:
        # the loop itself takes seconds; then the demo keeps the services up (--linger) until SIGINT
        while demo.poll() is None and "[done] online loop" not in (tmp_path / "demo.out").read_text():
            time.sleep(1)
        deadline = time.monotonic() + 120
        while demo.poll() is None and time.monotonic() < deadline and len(answered) < len(queries):
            time.sleep(2)
            try:
                up = _query(prom_url, 'sum(up{job=~"prompt-collector|policy-server|reward-scorer|feedback-store|trainer"})')
            except (urllib.error.URLError, ConnectionError):
                continue  # Prometheus still starting
            if not up or float(up[0]["value"][1]) < 5:
                continue
            if not sent_traffic:
                _product_traffic(http_port, grpc_base + PORT_OFFSET["policy-server"])
                sent_traffic = True
                continue  # the next scrape sees it
            answered |= {q for q in queries if q not in answered and _has_data(_query(prom_url, q))}
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # ends the linger: the demo stops the services and finishes
            demo.wait(300)
        out = (tmp_path / "demo.out").read_text()
        assert demo.returncode == 0, f"rlhf demo-loop --quick failed:\n{out[-4000:]}"
        history = json.loads((tmp_path / "loop" / "summary.json").read_text())["ppo_history"]
        # prefetched rollouts: the first step's come from the served version, later ones may be one behind
        assert history and history[0]["rollout_staleness_versions"] == 0
        assert all(h["rollout_staleness_versions"] in (0, 1) and "behaviour_approx_kl" in h for h in history)
    finally:
        for p in (demo, prom):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert sent_traffic, "the five services were never all up in Prometheus:\n" + (tmp_path / "prometheus.log").read_text()[-3000:]
    missing = [f"{titles[q]}: {q}" for q in queries if q not in answered]
    assert not missing, "panel queries that never returned data:\n" + "\n".join(missing)
