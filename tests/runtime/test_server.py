"""rlhf.runtime: settings from the environment, JSON logs, and the gRPC bootstrap every service uses
(health, reflection, metrics, admission control, error mapping, graceful shutdown).

The servicers are test doubles (tests/runtime/echo_service.py): these tests are about the server
plumbing, not about any model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rlhf_client import policy_grpc, policy_pb2, reward_grpc, reward_pb2

from rlhf.errors import ConfigError, UnavailableError
from rlhf.metrics import ServiceMetrics
from rlhf.runtime import grpc_client, server
from rlhf_client import channel as sdk_channel
from rlhf.runtime.logs import configure_logging
from rlhf.runtime.server import BaseServiceSettings, ModelExecutor, serve
from rlhf.runtime.settings import load_settings
from tests.runtime.echo_service import POLICY_SERVICE, REWARD_SERVICE, EchoService

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OK = grpc.StatusCode.OK
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Running:
    target: str
    metrics_port: int
    metrics: ServiceMetrics
    stop: asyncio.Event
    task: asyncio.Task

    def count(self, method: str, code: str) -> float:
        v = self.metrics.registry.get_sample_value(
            "rlhf_grpc_requests_total", {"service": "echo", "method": method, "code": code})
        return v or 0.0


@contextlib.asynccontextmanager
async def running(service: EchoService | None = None, **settings):
    """An in-process server on free ports, stopped (gracefully) on exit."""
    metrics = ServiceMetrics("echo")
    stop = asyncio.Event()
    ports = asyncio.get_running_loop().create_future()
    settings = {"allow_anonymous": True, **settings}
    task = asyncio.create_task(serve(service or EchoService(), BaseServiceSettings(**settings), metrics,
                                     ready=lambda g, m: ports.set_result((g, m)), stop_event=stop))
    done, _ = await asyncio.wait({task, ports}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ports in done, "server did not become ready"
    grpc_port, metrics_port = ports.result()
    try:
        yield Running(f"127.0.0.1:{grpc_port}", metrics_port, metrics, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def score_request(*prompts: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response="r") for p in prompts])


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
        return OK, ""
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()


# -- health, reflection, metrics endpoint ------------------------------------------------------

def test_health_reflection_and_metrics_endpoint():
    async def main():
        async with running() as srv:
            await grpc_client.wait_ready(srv.target, timeout=10)
            async with sdk_channel.channel(srv.target) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", REWARD_SERVICE, POLICY_SERVICE):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert reply.status == SERVING, name
                code, details = await code_of(health.Check(health_pb2.HealthCheckRequest(service="nope.Nope")))
                assert code == grpc.StatusCode.NOT_FOUND

                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                replies = [r async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
                listed = {s.name for s in replies[0].list_services_response.service}
                assert {REWARD_SERVICE, POLICY_SERVICE, "grpc.health.v1.Health"} <= listed

                await reward_grpc.RewardServiceStub(ch).Score(score_request("a", "b"))
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read())
            text = body.decode()
            assert 'rlhf_grpc_requests_total{code="OK",method="Score",service="echo"} 1.0' in text
            assert "rlhf_grpc_request_duration_seconds_bucket" in text
    asyncio.run(main())


def test_health_watch_says_not_serving_during_shutdown_and_ends():
    async def main():
        service = EchoService()
        async with running(service, grace_seconds=20) as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=REWARD_SERVICE))
                assert (await watch.read()).status == SERVING
                slow = asyncio.ensure_future(reward_grpc.RewardServiceStub(ch).Score(score_request("sleep:1")))
                while not srv.metrics.registry.get_sample_value("rlhf_grpc_in_flight_requests", {"service": "echo"}):
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                srv.stop.set()
                assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
                assert service.events == ["start"]  # stop() comes after the drain
                reply = await slow  # the in-flight call finishes
                assert list(reply.scores) == [1.0]
                assert await watch.read() is grpc.aio.EOF
                assert await watch.code() == OK
                await asyncio.wait_for(srv.task, 10)
                # the Watch stream did not hold the shutdown for the 20 s grace period
                assert time.monotonic() - t0 < 10
                assert service.events == ["start", "stop"]
    asyncio.run(main())


# -- error mapping, metrics --------------------------------------------------------------------

ERROR_CASES = [
    ((), grpc.StatusCode.INVALID_ARGUMENT, "empty batch: at least one item is required"),
    (("raise:DataError:line 3 is malformed",), grpc.StatusCode.INVALID_ARGUMENT, "line 3 is malformed"),
    (("raise:ConflictError:key reused for other content",), grpc.StatusCode.INVALID_ARGUMENT,
     "key reused for other content"),
    (("raise:ValueError:oops",), grpc.StatusCode.INTERNAL, "internal error"),  # a bare ValueError is a bug, not bad input
    (("raise:NotFoundError:no task 42",), grpc.StatusCode.NOT_FOUND, "no task 42"),
    (("raise:ModelNotFoundError:no model in models/x",), grpc.StatusCode.NOT_FOUND, "no model in models/x"),
    (("raise:ResourceExhaustedError:queue full",), RESOURCE_EXHAUSTED, "queue full"),
    (("raise:RuntimeError:do not leak this",), grpc.StatusCode.INTERNAL, "internal error"),
]


def test_handler_exceptions_map_to_status_codes_and_are_counted(caplog):
    async def main():
        async with running() as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = reward_grpc.RewardServiceStub(ch)
                for prompts, want_code, want_details in ERROR_CASES:
                    code, details = await code_of(stub.Score(score_request(*prompts)))
                    assert (code, details) == (want_code, want_details), prompts
                code, _ = await code_of(stub.GetRewardModelVersion(reward_pb2.GetRewardModelVersionRequest()))
                assert code == grpc.StatusCode.UNIMPLEMENTED
                for _ in range(3):
                    await stub.Score(score_request("fine"))
            assert srv.count("Score", "OK") == 3
            assert srv.count("Score", "INVALID_ARGUMENT") == 3
            assert srv.count("Score", "NOT_FOUND") == 2
            assert srv.count("Score", "RESOURCE_EXHAUSTED") == 1
            assert srv.count("Score", "INTERNAL") == 2
            assert srv.count("GetRewardModelVersion", "UNIMPLEMENTED") == 1
            hist = srv.metrics.registry.get_sample_value(
                "rlhf_grpc_request_duration_seconds_count", {"service": "echo", "method": "Score"})
            assert hist == 3 + len(ERROR_CASES)

    with caplog.at_level(logging.ERROR, logger="rlhf.runtime.server"):
        asyncio.run(main())
    internal = [r for r in caplog.records if r.getMessage() == "unhandled error in Score"]
    assert len(internal) == 2 and all(r.exc_info is not None for r in internal)  # logged with their tracebacks
    assert [r.fields for r in internal] == [{"method": "Score", "error": "ValueError"},
                                            {"method": "Score", "error": "RuntimeError"}]


def test_streaming_handler_passes_through_the_interceptor():
    async def main():
        async with running() as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = policy_grpc.PolicyServiceStub(ch)
                got = [m async for m in stub.GenerateStream(policy_pb2.GenerateStreamRequest(prompt="hi"))]
                assert [m.text_delta for m in got] == ["hi-0", "hi-1", "hi-2"]
                assert got[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH

                call = stub.GenerateStream(policy_pb2.GenerateStreamRequest(prompt="fail"))
                first = await call.read()
                assert first.text_delta == "fail-0"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call.read()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details() == "generation failed on purpose"
            assert srv.count("GenerateStream", "OK") == 1
            assert srv.count("GenerateStream", "INVALID_ARGUMENT") == 1
            assert srv.metrics.registry.get_sample_value("rlhf_grpc_in_flight_requests", {"service": "echo"}) == 0
    asyncio.run(main())


# -- admission control, load -------------------------------------------------------------------

def test_admission_control_rejects_beyond_concurrency_plus_queue():
    async def main():
        async with running(EchoService(sleep=0.5), max_concurrency=2, max_queue=2) as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = reward_grpc.RewardServiceStub(ch)
                await stub.Score(score_request("sleep:0"))  # connected before the burst
                calls = [asyncio.ensure_future(code_of(stub.Score(score_request("x")))) for _ in range(12)]
                while srv.metrics.registry.get_sample_value("rlhf_grpc_in_flight_requests", {"service": "echo"}) < 4:
                    await asyncio.sleep(0.01)
                # health checks are not subject to admission control
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == SERVING
                results = await asyncio.gather(*calls)
            codes = collections.Counter(code for code, _ in results)
            assert set(codes) == {OK, RESOURCE_EXHAUSTED}, codes
            assert codes[OK] >= 4 and codes[RESOURCE_EXHAUSTED] >= 1
            assert {d for c, d in results if c == RESOURCE_EXHAUSTED} == {
                "server busy: 4 calls in flight, retry later"}
            assert srv.count("Score", "RESOURCE_EXHAUSTED") == codes[RESOURCE_EXHAUSTED]
            assert srv.count("Score", "OK") == codes[OK] + 1
            assert srv.metrics.registry.get_sample_value("rlhf_grpc_in_flight_requests", {"service": "echo"}) == 0
    asyncio.run(main())


def test_5000_calls_at_once_on_one_channel():
    """A naive grpc.aio server ends about half of these with CANCELLED (gRPC core drops calls
    waiting to be taken by the application beyond grpc.server.max_pending_requests; see
    rlhf/runtime/server.py). Ours answers every one OK or RESOURCE_EXHAUSTED."""
    n = 5000

    async def main():
        async with running(EchoService(sleep=0.005), max_concurrency=64, max_queue=256) as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = reward_grpc.RewardServiceStub(ch)
                t0 = time.monotonic()
                results = await asyncio.gather(*[code_of(stub.Score(score_request("x"))) for _ in range(n)])
                elapsed = time.monotonic() - t0
            codes = collections.Counter(code for code, _ in results)
            assert set(codes) <= {OK, RESOURCE_EXHAUSTED}, codes
            assert codes[OK] > 0
            assert srv.count("Score", "OK") + srv.count("Score", "RESOURCE_EXHAUSTED") == n
            assert elapsed < 30, elapsed
    asyncio.run(main())


# -- shutdown --------------------------------------------------------------------------------------

class _Lines:
    """Lines of a subprocess's pipe, read in a thread."""

    def __init__(self, pipe):
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        for line in pipe:
            self.q.put(line)

    async def wait_for(self, pred, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.02)
                continue
            self.seen.append(line)
            if pred(line):
                return line
        raise AssertionError(f"no such line within {timeout} s; seen: {self.seen[-20:]}")


def test_sigterm_drains_in_flight_calls_and_exits_0():
    grace = 6.0
    env = {**os.environ, "RLHF_ECHO_GRACE_SECONDS": str(grace), "RLHF_ECHO_LOG_LEVEL": "info",
           "RLHF_ECHO_ALLOW_ANONYMOUS": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.echo_service"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)

    async def main():
        ports = json.loads(await out.wait_for(lambda line: line.startswith("{"), 60))
        target = f"127.0.0.1:{ports['grpc_port']}"
        await grpc_client.wait_ready(target, timeout=20)
        async with grpc.aio.insecure_channel(target) as ch:
            stub = reward_grpc.RewardServiceStub(ch)
            slow = asyncio.ensure_future(stub.Score(score_request("sleep:2")))

            def in_flight() -> str:
                url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
                return urllib.request.urlopen(url, timeout=5).read().decode()
            while 'rlhf_grpc_in_flight_requests{service="echo"} 1.0' not in await asyncio.to_thread(in_flight):
                await asyncio.sleep(0.05)

            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await err.wait_for(lambda line: '"msg": "draining"' in line, 10)
            code, _ = await code_of(stub.Score(score_request("after"), timeout=5))
            assert code != OK  # no new calls once draining
            reply = await slow  # the in-flight call completes
            assert list(reply.scores) == [1.0]
        rc = await asyncio.to_thread(proc.wait, grace + 10)
        elapsed = time.monotonic() - t0
        assert rc == 0
        assert elapsed < grace, elapsed
        await err.wait_for(lambda line: "service stopped" in line, 5)

    try:
        asyncio.run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_calls_still_running_at_the_grace_deadline_are_cancelled():
    async def main():
        async with running(grace_seconds=0.5) as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = reward_grpc.RewardServiceStub(ch)
                stuck = asyncio.ensure_future(code_of(stub.Score(score_request("sleep:30"))))
                while not srv.metrics.registry.get_sample_value("rlhf_grpc_in_flight_requests", {"service": "echo"}):
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                srv.stop.set()
                await asyncio.wait_for(srv.task, 10)
                assert time.monotonic() - t0 < 5
                code, _ = await asyncio.wait_for(stuck, 5)
                assert code != OK
            assert srv.count("Score", "CANCELLED") == 1
    asyncio.run(main())


class ReadinessService(EchoService):
    """An echo service whose readiness check fails (``down``) or hangs until ``answer`` is set
    (a database that does not answer, then does)."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.answer: asyncio.Event | None = None

    async def check_ready(self) -> None:
        if self.answer is not None:
            await self.answer.wait()
        if self.down:
            raise UnavailableError("the database is unavailable; retry later")


async def _health_until(stub, wanted: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
                    for name in ("", REWARD_SERVICE, POLICY_SERVICE)}
        if set(statuses.values()) == {wanted}:
            return
        assert time.monotonic() < deadline, f"health still {statuses}, expected {wanted}"
        await asyncio.sleep(0.02)


def test_health_follows_the_services_readiness_check(monkeypatch, caplog):
    """NOT_SERVING from the first failed (or hanging) check, SERVING again once one passes; calls
    are still taken meanwhile (the service answers them with its own status)."""
    monkeypatch.setattr(server, "READY_CHECK_INTERVAL_S", 0.02)
    monkeypatch.setattr(server, "READY_CHECK_TIMEOUT_S", 0.2)

    async def main():
        service = ReadinessService()
        async with running(service) as srv:
            async with sdk_channel.channel(srv.target) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                await _health_until(health, SERVING)
                service.down = True
                await _health_until(health, NOT_SERVING)
                service.down = False
                await _health_until(health, SERVING)
                service.answer = asyncio.Event()
                await _health_until(health, NOT_SERVING)
                service.answer.set()  # the hanging check finishes: no second one was started meanwhile
                await _health_until(health, SERVING)
                await reward_grpc.RewardServiceStub(ch).Score(score_request("a"))
    with caplog.at_level(logging.INFO, logger="rlhf.runtime.server"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("not ready: NOT_SERVING") == 2 and messages.count("ready again: SERVING") == 2
    reasons = [r.fields["reason"] for r in caplog.records if r.getMessage() == "not ready: NOT_SERVING"]
    assert reasons == ["the database is unavailable; retry later", "the readiness check did not finish within 0.2 s"]


def test_stop_while_starting_still_stops_the_service():
    async def main():
        service = EchoService(start_delay=30)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(service, BaseServiceSettings(metrics_port=-1, allow_anonymous=True),
                                         ServiceMetrics("echo"),
                                         stop_event=stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert service.events == ["stop"]
    asyncio.run(main())


# -- helpers ---------------------------------------------------------------------------------------

def test_wait_ready_times_out_naming_the_last_answer():
    async def main():
        with pytest.raises(TimeoutError, match="not SERVING"):
            await grpc_client.wait_ready("127.0.0.1:1", timeout=0.5)
    asyncio.run(main())


def test_client_channel_options():
    config = json.loads(dict(sdk_channel.CHANNEL_OPTIONS)["grpc.service_config"])
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 5
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert dict(sdk_channel.CHANNEL_OPTIONS)["grpc.max_receive_message_length"] == 64 * 1024 * 1024


def test_model_executor_runs_off_the_event_loop():
    async def main():
        ex = ModelExecutor("test")
        loop_thread = threading.get_ident()
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())

        def work(x, y=0):
            time.sleep(0.3)  # stands in for a model call that holds the thread
            return threading.get_ident(), x + y

        ident, total = await ex.run(work, 2, y=3)
        ticker.cancel()
        assert total == 5 and ident != loop_thread
        assert ticks >= 5  # the loop kept running meanwhile
        await ex.aclose()
        with pytest.raises(RuntimeError):
            await ex.run(work, 1)
    asyncio.run(main())


# -- settings, logs ----------------------------------------------------------------------------

@dataclass
class ScorerSettings(BaseServiceSettings):
    registry_dir: str = ""  # model registry root (required)
    max_batch_items: int = 128  # pairs per model call
    max_wait_ms: float = 2.0
    pinned: bool = False
    output: Path | None = None
    database_url: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry_dir:
            raise ValueError("registry_dir is required (the model registry root)")


def test_settings_from_environment():
    p = "RLHF_REWARD_SCORER_"
    s = load_settings(ScorerSettings, "reward-scorer", {
        p + "REGISTRY_DIR": "models", p + "PORT": "50051", p + "METRICS_PORT": "-1", p + "MAX_WAIT_MS": "0.5",
        p + "PINNED": "true", p + "OUTPUT": "out/dir", p + "DATABASE_URL": "postgresql://db/x",
        p + "LOG_LEVEL": "debug", p + "KAFKA_BOOTSTRAP": "kafka:9092",
        "RLHF_FEEDBACK_STORE_PORT": "1", "HOME": "/nowhere",  # other services' and unrelated variables
    })
    assert (s.registry_dir, s.port, s.metrics_port, s.max_wait_ms, s.pinned) == ("models", 50051, -1, 0.5, True)
    assert s.output == Path("out/dir") and s.database_url == "postgresql://db/x"
    assert s.log_level == "DEBUG" and s.kafka_bootstrap == "kafka:9092"
    assert (s.max_concurrency, s.max_queue, s.grace_seconds, s.host) == (64, 256, 10.0, "127.0.0.1")
    s = load_settings(ScorerSettings, "reward-scorer", {p + "REGISTRY_DIR": "m", p + "PINNED": "0",
                                                        p + "DATABASE_URL": ""})
    assert s.pinned is False and s.database_url is None and s.output is None


def test_settings_problems_are_listed_together():
    p = "RLHF_REWARD_SCORER_"
    with pytest.raises(ConfigError) as e:
        load_settings(ScorerSettings, "reward-scorer", {
            p + "PORT": "abc", p + "PROT": "50051", p + "PINNED": "maybe", p + "MAX_WAIT_MS": "soon",
            p + "MAX_QUEUE": "-1",
        })
    msg = str(e.value)
    assert "RLHF_REWARD_SCORER_PORT: expected an integer, got 'abc'" in msg
    assert "RLHF_REWARD_SCORER_PROT: unknown variable (did you mean RLHF_REWARD_SCORER_PORT?)" in msg
    assert "RLHF_REWARD_SCORER_PINNED: expected true or false, got 'maybe'" in msg
    assert "RLHF_REWARD_SCORER_MAX_WAIT_MS: expected a number, got 'soon'" in msg
    assert "RLHF_REWARD_SCORER_MAX_QUEUE: must be >= 0, got -1" in msg
    assert "RLHF_REWARD_SCORER_REGISTRY_DIR: registry_dir is required" in msg
    assert "(6 problems)" in msg


def test_kafka_security_settings_are_checked_together(tmp_path):
    p = "RLHF_REWARD_SCORER_"
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError) as e:
        load_settings(ScorerSettings, "reward-scorer", {
            p + "REGISTRY_DIR": "m", p + "KAFKA_SECURITY_PROTOCOL": "sasl_ssl", p + "KAFKA_SASL_MECHANISM": "PLAIN",
            p + "KAFKA_SASL_PASSWORD_FILE": str(empty), p + "KAFKA_SSL_CA_FILE": str(tmp_path / "missing.pem")})
    msg = str(e.value)
    assert f"{p}KAFKA_SASL_MECHANISM: must be one of SCRAM-SHA-256, SCRAM-SHA-512, got 'PLAIN'" in msg
    assert f"{p}KAFKA_SASL_USERNAME: required with kafka_security_protocol SASL_SSL" in msg
    assert f"{p}KAFKA_SASL_PASSWORD_FILE: the file is empty: {empty}" in msg
    assert f"{p}KAFKA_SSL_CA_FILE: no such file: {tmp_path / 'missing.pem'}" in msg
    assert "(4 problems)" in msg

    with pytest.raises(ConfigError) as e:
        load_settings(ScorerSettings, "reward-scorer", {
            p + "REGISTRY_DIR": "m", p + "KAFKA_SECURITY_PROTOCOL": "TLS", p + "KAFKA_SASL_USERNAME": "u"})
    assert f"{p}KAFKA_SECURITY_PROTOCOL: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got 'TLS'" in str(e.value)
    with pytest.raises(ConfigError, match="KAFKA_SASL_USERNAME: set, but kafka_security_protocol PLAINTEXT does not log in"):
        load_settings(ScorerSettings, "reward-scorer", {p + "REGISTRY_DIR": "m", p + "KAFKA_SASL_USERNAME": "u"})

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load_settings(ScorerSettings, "reward-scorer", {
        p + "REGISTRY_DIR": "m", p + "KAFKA_SECURITY_PROTOCOL": "sasl_ssl", p + "KAFKA_SASL_MECHANISM": "scram-sha-256",
        p + "KAFKA_SASL_USERNAME": "rlhf", p + "KAFKA_SASL_PASSWORD_FILE": str(secret), p + "KAFKA_SSL_CA_FILE": str(ca)})
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    assert "s3cret" not in repr(s)  # settings name the file, never hold the password


def test_json_logs_with_fields_and_exceptions(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("reward-scorer", "INFO")
        configure_logging("reward-scorer", "INFO")  # idempotent
        assert sum(getattr(h, "_rlhf_json", False) for h in root.handlers) == 1
        log = logging.getLogger("rlhf.test")
        log.debug("hidden")
        log.info("scored", extra={"fields": {"items": 8, "level": "x"}})
        try:
            raise KeyError("k")
        except KeyError:
            log.exception("failed")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        assert [rec["msg"] for rec in lines] == ["scored", "failed"]
        first = lines[0]
        assert first["service"] == "reward-scorer" and first["logger"] == "rlhf.test" and first["level"] == "INFO"
        assert first["items"] == 8 and first["field_level"] == "x"
        assert first["ts"].endswith("Z") and "T" in first["ts"]
        assert "KeyError" in lines[1]["exc"] and "\n" in lines[1]["exc"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_malformed_bytes_are_invalid_argument_and_huge_messages_are_cut():
    async def main():
        async with running() as srv:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                raw = ch.unary_unary(f"/{REWARD_SERVICE}/Score", request_serializer=None, response_deserializer=None)
                for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11):
                    code, details = await code_of(raw(garbage))
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (garbage, code, details)
                    assert "malformed request: not a valid rlhf.reward.v1.ScoreRequest" in details
                stub = reward_grpc.RewardServiceStub(ch)
                code, details = await code_of(stub.Score(score_request("raise:DataError:" + "id" * 2_500_000)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 2100 and "cut" in details
            assert srv.count("Score", "INVALID_ARGUMENT") == 4
    asyncio.run(main())
