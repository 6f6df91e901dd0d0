"""The five services as separate OS processes with a real Kafka broker and PostgreSQL.

Needs the broker and database that scripts/test.sh starts (RLHF_TEST_KAFKA_BOOTSTRAP,
RLHF_TEST_DATABASE_URL); skipped without them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml
from confluent_kafka import Consumer, Producer
from rlhf_client import (TOPIC_FEEDBACK, TOPIC_MODELS, TOPIC_SERVING, common_pb2, feedback_grpc, feedback_pb2,
                         models_pb2, policy_grpc, policy_pb2, prompts_grpc, prompts_pb2, reward_grpc, reward_pb2,
                         trainer_grpc, trainer_pb2)
from sqlalchemy import text

from rlhf.runtime.auth import token_sha256
from rlhf.storage.db import make_engine
from tests.services import scenario
from tests.services.helpers import (fresh_database, free_ports, metric_value, scrape, tiny_policy_registry,
                                   wait_serving)

KAFKA = os.environ.get("RLHF_TEST_KAFKA_BOOTSTRAP")
DB = os.environ.get("RLHF_TEST_DATABASE_URL")
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not (KAFKA and DB), reason="needs RLHF_TEST_KAFKA_BOOTSTRAP and RLHF_TEST_DATABASE_URL "
                                                            "(scripts/test.sh starts Kafka and PostgreSQL)")]
ROOT = Path(__file__).resolve().parents[2]
NAMES = ["prompt-collector", "policy-server", "reward-scorer", "feedback-store", "trainer"]
# the callers of this cluster: the services themselves, an operator (who also runs jobs and
# submits prompts), three labelers; each with a token of its own
CALLERS = {"services": ["service"], "operator": ["operator", "trainer", "product"], "sim-0": ["labeler"],
           "sim-1": ["labeler"], "bad-input-test": ["labeler"]}
TOKENS = {name: f"tok-{name}-{uuid.uuid4().hex}" for name in CALLERS}


def ch(addr: str, who: str = "operator") -> grpc.Channel:
    """A channel presenting ``who``'s token."""
    return scenario.channel(addr, TOKENS[who])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    tiny_policy_registry(root / "registry")
    db_url = fresh_database(DB)
    eng = make_engine(db_url)
    ports = free_ports(10)
    grpc_ports = dict(zip(NAMES, ports[:5]))
    metrics_ports = dict(zip(NAMES, ports[5:]))
    addrs = {n: f"127.0.0.1:{p}" for n, p in grpc_ports.items()}
    # credentials: the file holds only token digests; each service presents the services' token
    (root / "credentials.yaml").write_text(yaml.safe_dump({"callers": [
        {"name": n, "roles": r, "token_sha256": token_sha256(TOKENS[n])} for n, r in CALLERS.items()]}))
    (root / "services.token").write_text(TOKENS["services"] + "\n")
    procs = {}
    logs = {}
    for name in NAMES:
        pre = "RLHF_" + name.upper().replace("-", "_") + "_"
        env = {**os.environ, "OMP_NUM_THREADS": "1",  # this checkout's platform and SDK
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]),
               pre + "PORT": str(grpc_ports[name]), pre + "METRICS_PORT": str(metrics_ports[name]),
               pre + "KAFKA_BOOTSTRAP": KAFKA, pre + "GRACE_SECONDS": "5",
               pre + "CREDENTIALS_FILE": str(root / "credentials.yaml"), pre + "PEER_TOKEN_FILE": str(root / "services.token")}
        if name in ("prompt-collector", "feedback-store"):
            env[pre + "DATABASE_URL"] = db_url
        else:
            env[pre + "REGISTRY_DIR"] = str(root / "registry")
        if name == "trainer":
            for peer in NAMES[:4]:
                env[pre + peer.upper().replace("-", "_") + "_ADDR"] = addrs[peer]
        logs[name] = open(root / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", name], env=env, cwd=ROOT,
                                       stdout=logs[name], stderr=subprocess.STDOUT)
    try:
        for name, a in addrs.items():
            try:
                wait_serving(a, timeout=180)
            except TimeoutError:
                raise AssertionError(f"{name} did not start:\n" + (root / f"{name}.log").read_text()[-3000:])
        yield {"addrs": addrs, "metrics": metrics_ports, "db": eng, "root": root, "procs": procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for n, p in procs.items():
            try:
                codes[n] = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = "killed"
        for f in logs.values():
            f.close()
        eng.dispose()
        bad = {n: c for n, c in codes.items() if c != 0}
        assert not bad, f"services did not exit cleanly on SIGTERM: {bad}"


def _topic_events(topic: str, cls, timeout: float = 20.0) -> list:
    """Every message of the topic from the beginning (a fresh consumer group)."""
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": f"test-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    out, idle_since = [], time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            if out and time.monotonic() - idle_since > 3:
                break
            continue
        idle_since = time.monotonic()
        try:
            out.append(cls.FromString(m.value()))
        except Exception:  # noqa: BLE001 - other tests put malformed messages on purpose
            pass
    c.close()
    return out


def test_online_loop_across_processes_kafka_and_postgres(cluster):
    addrs = cluster["addrs"]
    run = scenario.run_online_loop(addrs, tokens=TOKENS)
    assert run.job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, run.job.message

    # every submitted ranking is in PostgreSQL exactly once ...
    with cluster["db"].connect() as c:
        rows = c.execute(text("select id, idempotency_key from submissions where kind = 'ranking'")).all()
        assert c.execute(text("select count(*) from outbox where published_at is null")).scalar() == 0
    keys = [k for _, k in rows]
    assert len(keys) == len(set(keys)) == run.rankings_submitted >= 8
    # ... and was announced on rlhf.feedback.v1 exactly once
    stored = {sid for sid, _ in rows}
    announced = Counter(e.event_id for e in _topic_events(TOPIC_FEEDBACK, feedback_pb2.FeedbackEvent)
                        if e.event_id in stored)
    assert set(announced) == stored and set(announced.values()) == {1}

    # the RM and the policy each got a new version, announced on rlhf.models.v1
    models = _topic_events(TOPIC_MODELS, models_pb2.ModelVersionPublishedEvent)
    published = {e.version for e in models if e.job_id == run.job.job_id}
    assert set(run.job.published_versions) <= published
    kinds = Counter(e.kind for e in models if e.job_id == run.job.job_id)
    assert kinds[common_pb2.MODEL_KIND_REWARD] >= 1 and kinds[common_pb2.MODEL_KIND_POLICY] >= 2

    # the policy-server now serves the newest version
    v, gen_v = scenario.served_version(addrs["policy-server"], TOKENS["operator"])
    assert v == gen_v == run.job.published_versions[-1]
    with ch(addrs["reward-scorer"]) as c:
        rv = reward_grpc.RewardServiceStub(c).GetRewardModelVersion(reward_pb2.GetRewardModelVersionRequest()).reward_model_version
    assert rv in run.job.published_versions

    m = scrape(cluster["metrics"]["trainer"])
    for name in ("rlhf_ppo_kl", "rlhf_ppo_reward", "rlhf_ppo_kl_coef", "rlhf_ppo_samples_total"):
        assert metric_value(m, name) is not None, name
    assert metric_value(m, "rlhf_ppo_samples_total") >= 8
    assert run.job.metrics["rollout_staleness_max_versions"] >= 0


# -- bad input: a clear status, and nothing stored ---------------------------------------------------


def _count(eng, table: str) -> int:
    with eng.connect() as c:
        return c.execute(text(f"select count(*) from {table}")).scalar()


@pytest.fixture(scope="module")
def task(cluster):
    with ch(cluster["addrs"]["feedback-store"]) as c:
        return feedback_grpc.FeedbackServiceStub(c).CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(
            tasks=[feedback_pb2.LabelingTaskInput(prompt="p", prompt_id="x", split=1, candidates=list("abcd"),
                                                  policy_version="v0")])).tasks[0]


def _ranking(task_id, groups, key=None):
    return feedback_pb2.SubmitRankingRequest(idempotency_key=key or uuid.uuid4().hex, task_id=task_id,
                                             labeler_id="bad-input-test",
                                             ranking=[feedback_pb2.RankGroup(indices=g) for g in groups])


@pytest.mark.parametrize("groups,code,needle", [
    ([[0], [1], [1], [3]], grpc.StatusCode.INVALID_ARGUMENT, "twice"),
    ([[0], [1], [2], [7]], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    ([[0], [1], [2]], grpc.StatusCode.INVALID_ARGUMENT, "K=4"),
])
def test_bad_rankings_are_rejected_and_store_nothing(cluster, task, groups, code, needle):
    before = (_count(cluster["db"], "submissions"), _count(cluster["db"], "outbox"))
    with ch(cluster["addrs"]["feedback-store"], "bad-input-test") as c:
        with pytest.raises(grpc.RpcError) as e:
            feedback_grpc.FeedbackServiceStub(c).SubmitRanking(_ranking(task.task_id, groups))
    assert e.value.code() == code and needle in e.value.details()
    assert (_count(cluster["db"], "submissions"), _count(cluster["db"], "outbox")) == before


def test_ranking_for_unknown_task_is_not_found(cluster):
    before = _count(cluster["db"], "submissions")
    with ch(cluster["addrs"]["feedback-store"], "bad-input-test") as c:
        with pytest.raises(grpc.RpcError) as e:
            feedback_grpc.FeedbackServiceStub(c).SubmitRanking(_ranking("no-such-task", [[0], [1]]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert _count(cluster["db"], "submissions") == before


def test_empty_batches_and_oversized_prompts_are_invalid(cluster):
    a = cluster["addrs"]
    before = _count(cluster["db"], "prompts")
    calls = [
        lambda ch: prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest()),
        lambda ch: prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
            prompts_pb2.PromptInput(text=b"ok", user_id="u", consent=True),
            prompts_pb2.PromptInput(text=b"x" * 100_000, user_id="u", consent=True)])),
        lambda ch: prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
            prompts_pb2.PromptInput(text=b"\xff\xfe", user_id="u", consent=True)])),
    ]
    for call in calls:
        with ch(a["prompt-collector"]) as c:
            with pytest.raises(grpc.RpcError) as e:
                call(c)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert _count(cluster["db"], "prompts") == before
    with ch(a["feedback-store"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            feedback_grpc.FeedbackServiceStub(c).CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with ch(a["policy-server"]) as c:
        stub = policy_grpc.PolicyServiceStub(c)
        for req in (policy_pb2.GenerateRequest(), policy_pb2.GenerateRequest(prompts=["word " * 2000])):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    with ch(a["reward-scorer"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            reward_grpc.RewardServiceStub(c).Score(reward_pb2.ScoreRequest())
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)


def test_same_submission_twice_stores_once(cluster, task):
    key = uuid.uuid4().hex
    with ch(cluster["addrs"]["feedback-store"], "bad-input-test") as c:
        stub = feedback_grpc.FeedbackServiceStub(c)
        a = stub.SubmitRanking(_ranking(task.task_id, [[2], [0, 1], [3]], key))
        b = stub.SubmitRanking(_ranking(task.task_id, [[2], [0, 1], [3]], key))
    assert not a.duplicate and b.duplicate and a.submission_id == b.submission_id
    with cluster["db"].connect() as c:
        assert c.execute(text("select count(*) from submissions where idempotency_key = :k"), {"k": key}).scalar() == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        n = sum(e.event_id == a.submission_id for e in _topic_events(TOPIC_FEEDBACK, feedback_pb2.FeedbackEvent, 10))
        if n:
            break
    assert n == 1


def test_wrong_type_on_a_topic_is_skipped_and_counted(cluster):
    """Malformed events reach the trainer (on the served-version topic it follows): it skips them, and lives on."""
    p = Producer({"bootstrap.servers": KAFKA})
    p.produce(TOPIC_SERVING, value=b"\x08\x96\x01not-a-served-event",
              headers={"rlhf-message-type": "rlhf.prompts.v1.PromptCollectedEvent"})
    p.produce(TOPIC_SERVING, value=b"\xff\xff\xff", headers={"rlhf-message-type": "rlhf.models.v1.ModelVersionServedEvent"})
    p.flush(30)
    port = cluster["metrics"]["trainer"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        v = metric_value(scrape(port), "rlhf_kafka_messages_skipped_total", f'topic="{TOPIC_SERVING}"')
        if v is not None and v >= 2:
            break
        time.sleep(0.5)
    assert v is not None and v >= 2
    assert cluster["procs"]["trainer"].poll() is None
    wait_serving(cluster["addrs"]["trainer"], timeout=10)


# -- authentication: every RPC needs a caller with a role it declares ------------------------------


def test_anonymous_callers_get_unauthenticated_and_start_nothing(cluster):
    """The probe's worst case: an anonymous StartJob(PPO, kl_coef=inf) published a NaN policy."""
    a = cluster["addrs"]
    with grpc.insecure_channel(a["trainer"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            trainer_grpc.TrainerServiceStub(c).StartJob(trainer_pb2.StartJobRequest(
                kind=trainer_pb2.JOB_KIND_PPO, overrides={"steps": "1", "ppo.kl_coef": "inf"}))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
    calls = {
        "policy-server": lambda c: policy_grpc.PolicyServiceStub(c).Generate(policy_pb2.GenerateRequest(prompts=["x"])),
        "feedback-store": lambda c: feedback_grpc.FeedbackServiceStub(c).ExportComparisons(
            feedback_pb2.ExportComparisonsRequest()).next(),
        "prompt-collector": lambda c: prompts_grpc.PromptCollectorServiceStub(c).ListPrompts(prompts_pb2.ListPromptsRequest()),
        "reward-scorer": lambda c: reward_grpc.RewardServiceStub(c).Score(reward_pb2.ScoreRequest()),
    }
    for name, call in calls.items():
        for channel in (grpc.insecure_channel(a[name]), scenario.channel(a[name], "not-a-valid-token-at-all")):
            with channel as c, pytest.raises(grpc.RpcError) as e:
                call(c)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, e.value.details())
    wait_serving(a["trainer"], timeout=5)  # health answers anyone (the orchestrator's probes send no token)


def test_roles_and_labeler_identity_come_from_the_credential(cluster, task):
    a = cluster["addrs"]
    with ch(a["trainer"], "sim-0") as c:  # a labeler may not start jobs
        with pytest.raises(grpc.RpcError) as e:
            trainer_grpc.TrainerServiceStub(c).StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_SFT))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "trainer" in e.value.details()
    with ch(a["feedback-store"], "sim-0") as c:
        stub = feedback_grpc.FeedbackServiceStub(c)
        with pytest.raises(grpc.RpcError) as e:  # ... nor export everyone's comparisons
            stub.ExportComparisons(feedback_pb2.ExportComparisonsRequest()).next()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        before = _count(cluster["db"], "submissions")
        with pytest.raises(grpc.RpcError) as e:  # ... nor rank as somebody else
            stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                idempotency_key=uuid.uuid4().hex, task_id=task.task_id, labeler_id="sim-1",
                ranking=[feedback_pb2.RankGroup(indices=[i]) for i in range(4)]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "credential" in e.value.details()
        assert _count(cluster["db"], "submissions") == before
        # without a labeler_id the credential's is used
        sid = stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
            idempotency_key=uuid.uuid4().hex, task_id=task.task_id,
            ranking=[feedback_pb2.RankGroup(indices=[i]) for i in range(4)])).submission_id
    with cluster["db"].connect() as c:
        assert c.execute(text("select labeler_id from submissions where id = :i"), {"i": sid}).scalar() == "sim-0"
    with ch(a["feedback-store"]) as c:  # an operator does not label under anyone's name
        with pytest.raises(grpc.RpcError) as e:
            feedback_grpc.FeedbackServiceStub(c).SubmitRanking(_ranking(task.task_id, [[0], [1], [2], [3]]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
