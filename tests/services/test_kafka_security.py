"""Kafka with SASL/SCRAM and TLS, configured through the services' settings only.

A broker of the test's own (scripts/infra.sh with RLHF_TEST_KAFKA_SASL=1: SASL_SSL with a CA of its
own, and SASL_PLAINTEXT on a second listener) and a feedback-store process (`rlhf serve`) whose
settings name the protocol, the SCRAM user, the password file and the CA: its outbox publishes a
ranking's event through the TLS listener, and a bus built from settings the same way consumes it
through the other listener with the other SCRAM mechanism. A wrong password, or a CA that did not
sign the broker's certificate, stops a service at start with the reason.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest
from rlhf_client import TOPIC_FEEDBACK, feedback_grpc, feedback_pb2

from rlhf.errors import ConfigError
from rlhf.runtime.bus import KafkaBus, bus_for
from rlhf.runtime.settings import BaseServiceSettings, load_settings
from tests.services.helpers import free_ports, wait_serving
from tests.services.infra import ROOT, Infra, own_servers_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def broker():
    own_servers_or_skip()
    infra = Infra(sasl=True).start("kafka")
    try:
        yield infra.env
    finally:
        infra.stop()


def _security_env(prefix: str, env: dict, *, protocol="SASL_SSL", mechanism="SCRAM-SHA-256",
                  password_file=None, ca=None) -> dict:
    out = {prefix + "KAFKA_SECURITY_PROTOCOL": protocol, prefix + "KAFKA_SASL_MECHANISM": mechanism,
           prefix + "KAFKA_SASL_USERNAME": env["RLHF_TEST_KAFKA_SASL_USERNAME"],
           prefix + "KAFKA_SASL_PASSWORD_FILE": password_file or env["RLHF_TEST_KAFKA_SASL_PASSWORD_FILE"]}
    if protocol.endswith("SSL"):
        out[prefix + "KAFKA_SSL_CA_FILE"] = ca or env["RLHF_TEST_KAFKA_SSL_CA_FILE"]
    return out


def _serve_feedback_store(tmp_path, broker: dict, **security) -> tuple[subprocess.Popen, str, object]:
    pre = "RLHF_FEEDBACK_STORE_"
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]),
                pre + "PORT": str(port), pre + "METRICS_PORT": "-1", pre + "GRACE_SECONDS": "2",
                pre + "ALLOW_ANONYMOUS": "true",  # on loopback: this test is about Kafka's logins, not gRPC's
                pre + "DATABASE_URL": f"sqlite:///{tmp_path / 'feedback.db'}",
                pre + "KAFKA_BOOTSTRAP": broker["RLHF_TEST_KAFKA_BOOTSTRAP"],
                **_security_env(pre, broker, **security)})
    log = open(tmp_path / "feedback-store.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "feedback-store"], env=env, cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT)
    return p, f"127.0.0.1:{port}", log


def test_a_service_publishes_over_sasl_ssl_and_a_bus_consumes_over_sasl_plaintext(broker, tmp_path):
    proc, addr, log = _serve_feedback_store(tmp_path, broker)
    try:
        try:
            wait_serving(addr, timeout=120)
        except TimeoutError:
            raise AssertionError((tmp_path / "feedback-store.log").read_text()[-3000:])
        with grpc.insecure_channel(addr) as ch:
            stub = feedback_grpc.FeedbackServiceStub(ch)
            task = stub.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=[
                feedback_pb2.LabelingTaskInput(prompt="p", candidates=["a", "b"])]), timeout=30).tasks[0]
            sid = stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                idempotency_key="sasl-1", task_id=task.task_id, labeler_id="l",
                ranking=[feedback_pb2.RankGroup(indices=[1]), feedback_pb2.RankGroup(indices=[0])]),
                timeout=30).submission_id

        # the consumer: settings as a service reads them, on the SASL_PLAINTEXT listener, SCRAM-SHA-512
        pre = "RLHF_CONSUMER_"
        settings = load_settings(BaseServiceSettings, "consumer", {
            pre + "KAFKA_BOOTSTRAP": broker["RLHF_TEST_KAFKA_SASL_PLAINTEXT_BOOTSTRAP"],
            **_security_env(pre, broker, protocol="SASL_PLAINTEXT", mechanism="SCRAM-SHA-512")})

        async def consume() -> list[str]:
            bus = bus_for(settings)
            assert isinstance(bus, KafkaBus)
            got: list[str] = []

            async def handler(ev):
                got.append(ev.event_id)

            bus.subscribe(TOPIC_FEEDBACK, feedback_pb2.FeedbackEvent, f"sasl-test-{time.time_ns()}", handler)
            await bus.start()
            try:
                deadline = time.monotonic() + 60
                while sid not in got and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            finally:
                await bus.close()
            return got

        assert sid in asyncio.run(consume())
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, (tmp_path / "feedback-store.log").read_text()[-3000:]
        log.close()


def test_a_wrong_password_stops_the_service_at_start_with_the_reason(broker, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    proc, _, log = _serve_feedback_store(tmp_path, broker, password_file=str(wrong))
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "feedback-store.log").read_text()
    assert code == 2, out[-3000:]
    assert "refused the connection (SASL_SSL)" in out and "Authentication failed" in out, out[-3000:]
    assert "not-the-password" not in out


def test_a_ca_that_did_not_sign_the_brokers_certificate_is_refused(broker, tmp_path):
    """TLS is verified: the system's CAs (no kafka_ssl_ca_file) do not know the test broker's CA."""
    pre = "RLHF_CONSUMER_"
    env = {pre + "KAFKA_BOOTSTRAP": broker["RLHF_TEST_KAFKA_BOOTSTRAP"], **_security_env(pre, broker)}
    del env[pre + "KAFKA_SSL_CA_FILE"]
    bus = bus_for(load_settings(BaseServiceSettings, "consumer", env))

    async def start():
        try:
            await bus.start()
        finally:
            await bus.close()

    with pytest.raises(ConfigError, match=r"refused the connection \(SASL_SSL\).*certificate verify failed"):
        asyncio.run(start())
