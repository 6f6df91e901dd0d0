"""`rlhf up` in one process (SQLite, in-process bus): one online-loop iteration end to end."""

from __future__ import annotations

import asyncio
import math
import threading

import grpc
import pytest
from rlhf_client import (feedback_grpc, feedback_pb2, policy_grpc, policy_pb2, reward_grpc, reward_pb2, trainer_grpc,
                         trainer_pb2)
from sqlalchemy import text

from rlhf.storage.db import make_engine
from tests.services import scenario
from tests.services.helpers import metric_value, scrape, tiny_policy_registry, up_on_free_ports

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("up")
    tiny_policy_registry(root / "registry")
    close, addrs, metrics_base, http_port = up_on_free_ports(root, metrics=True, http=True)
    yield {"addrs": addrs, "root": root, "metrics_base": metrics_base, "http_port": http_port}
    close()  # re-raises what made the services fail, if anything did


class _Hammer:
    """Generate calls in a loop while the online loop publishes new versions: none may fail."""

    def __init__(self, target: str):
        self.target, self.versions, self.errors, self.calls = target, set(), [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = policy_grpc.PolicyServiceStub(ch)
            while not self.stop.is_set():
                try:
                    r = stub.Generate(policy_pb2.GenerateRequest(prompts=["the film", "a movie"], n=2,
                                                                 sampling=policy_pb2.SamplingParams(max_new_tokens=4)),
                                      timeout=60)
                    self.versions.add(r.policy_version)
                    self.calls += 1
                except grpc.RpcError as e:
                    self.errors.append(e.code())
                self.stop.wait(0.05)


@pytest.fixture(scope="module")
def loop_run(embedded):
    hammer = _Hammer(embedded["addrs"]["policy-server"])
    hammer.thread.start()
    try:
        run = scenario.run_online_loop(embedded["addrs"])
    finally:
        hammer.stop.set()
        hammer.thread.join(60)
    return run, hammer


def test_online_loop_iteration_in_one_process(embedded, loop_run):
    run, _ = loop_run
    addrs = embedded["addrs"]
    assert run.job.status == scenario.trainer_pb2.JOB_STATUS_SUCCEEDED, run.job.message
    # a new RM version and new policy versions were published, and the policy-server serves the last
    reg_versions = list((embedded["root"] / "registry" / "reward").iterdir())
    assert [p for p in reg_versions if not p.name.startswith(".")]
    policy_published = [v for v in run.job.published_versions if v.startswith("v")]
    assert len(policy_published) >= 3  # 1 RM + 2 PPO steps
    v, gen_v = scenario.served_version(addrs["policy-server"])
    assert v == gen_v == run.job.published_versions[-1]
    # every ranking stored once
    ids = scenario.export_submission_ids(addrs["feedback-store"])
    assert len(ids) == len(set(ids)) == run.rankings_submitted >= 8
    eng = make_engine(f"sqlite:///{embedded['root'] / 'rlhf.db'}")
    with eng.connect() as c:
        assert c.execute(text("select count(*) from submissions where kind = 'ranking'")).scalar() == len(ids)
        assert c.execute(text("select count(*) from outbox where published_at is null")).scalar() == 0
    eng.dispose()
    # trainer metrics
    metrics = scrape(embedded["metrics_base"] + 4)
    for name in ("rlhf_ppo_kl", "rlhf_ppo_reward", "rlhf_ppo_kl_coef", "rlhf_ppo_samples_total"):
        assert metric_value(metrics, name) is not None, name
    assert metric_value(metrics, "rlhf_ppo_samples_total") >= 8


def test_hot_reload_under_load_drops_no_call(loop_run):
    _, hammer = loop_run
    assert hammer.calls > 0 and not hammer.errors, hammer.errors
    assert len(hammer.versions) >= 2  # calls were answered by more than one version, none failed


def test_two_labelers_agreement_is_reported(embedded, loop_run):
    with grpc.insecure_channel(embedded["addrs"]["feedback-store"]) as ch:
        a = feedback_grpc.FeedbackServiceStub(ch).GetAgreement(feedback_pb2.GetAgreementRequest())
    assert a.tasks >= 4 and a.pairs >= 4 * 6 and 0.0 <= a.pairwise_agreement <= 1.0


def test_streaming_generation_carries_version_and_joins_to_the_text(embedded, loop_run):
    with grpc.insecure_channel(embedded["addrs"]["policy-server"]) as ch:
        stub = policy_grpc.PolicyServiceStub(ch)
        sp = policy_pb2.SamplingParams(max_new_tokens=12, min_new_tokens=12, seed=5)
        parts = list(stub.GenerateStream(policy_pb2.GenerateStreamRequest(prompt="the movie", sampling=sp)))
        whole = stub.Generate(policy_pb2.GenerateRequest(prompts=["the movie"], sampling=sp)).results[0].completions[0]
    assert len(parts) >= 2 and parts[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH
    assert {p.policy_version for p in parts} == {loop_run[0].job.published_versions[-1]}
    assert "".join(p.text_delta for p in parts) == whole.text  # same seed, same version, same sample


def test_reward_scorer_batches_concurrent_callers(embedded, loop_run):
    async def many():
        async with grpc.aio.insecure_channel(embedded["addrs"]["reward-scorer"]) as ch:
            stub = reward_grpc.RewardServiceStub(ch)
            return await asyncio.gather(*(stub.Score(reward_pb2.ScoreRequest(items=[
                reward_pb2.ScoreItem(prompt=f"p{i}", response="good fun")])) for i in range(32)))

    answers = asyncio.run(many())
    assert all(len(a.scores) == 1 for a in answers)
    assert len({a.reward_model_version for a in answers}) == 1
    m = scrape(embedded["metrics_base"] + 2)
    count = metric_value(m, "rlhf_reward_batch_size_count")
    total = metric_value(m, "rlhf_reward_batch_size_sum")
    assert count and total / count > 1.0  # more than one caller per model call on average


def test_reward_scorer_scores_empty_items_and_items_longer_than_the_trunk(embedded, loop_run):
    long_prompt = "User: tell me about the film. " * 400  # far more tokens than the trunk has positions
    with grpc.insecure_channel(embedded["addrs"]["reward-scorer"]) as ch:
        stub = reward_grpc.RewardServiceStub(ch)
        answer = stub.Score(reward_pb2.ScoreRequest(items=[
            reward_pb2.ScoreItem(prompt="", response=""), reward_pb2.ScoreItem(prompt=long_prompt, response="good fun"),
            reward_pb2.ScoreItem(prompt="a film", response="great fun " * 400)]))
    assert len(answer.scores) == 3 and all(math.isfinite(s) for s in answer.scores)


def test_sft_job_from_demonstrations_publishes_a_policy(embedded, loop_run):
    a = embedded["addrs"]
    with grpc.insecure_channel(a["feedback-store"]) as ch:
        fb = feedback_grpc.FeedbackServiceStub(ch)
        for i in range(4):
            fb.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                idempotency_key=f"demo-{i}", prompt=f"review {i}: the film was", prompt_id=str(i), split=1,
                labeler_id="writer", response=" wonderful and fun"))
    with grpc.insecure_channel(a["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_SFT)).job
        list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id)).job
    assert job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, job.message
    assert len(job.published_versions) == 1 and job.metrics["sft_demonstrations"] == 4


def test_a_job_can_be_cancelled_and_bad_requests_are_refused(embedded, loop_run):
    with grpc.insecure_channel(embedded["addrs"]["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides={"ppo.nope": "1"}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.GetJob(trainer_pb2.GetJobRequest(job_id="missing"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides={
            "steps": "500", "ppo.batch_size": "4", "ppo.mini_batch_size": "2", "ppo.ppo_epochs": "1",
            "ppo.sampling.max_new_tokens": "4"})).job
        with pytest.raises(grpc.RpcError) as e:  # one job at a time on this trainer
            stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_SFT))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
            if ev.message.startswith("PPO step 1/"):
                stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id))
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id)).job
    assert job.status == trainer_pb2.JOB_STATUS_CANCELLED
    assert 1 <= len(job.published_versions) < 500


def test_ppo_job_with_prefetched_rollouts(embedded, loop_run):
    """Rollouts asked for ahead of the update: every step publishes, staleness is reported, and the
    policy-server ends up serving the last version."""
    import time

    from rlhf.registry import ModelRegistry

    # start from the version the policy-server serves (earlier tests may have just published one)
    latest = ModelRegistry(embedded["root"] / "registry").latest("policy")
    deadline = time.monotonic() + 120
    while scenario.served_version(embedded["addrs"]["policy-server"])[0] != latest:
        assert time.monotonic() < deadline, "the policy-server did not load the latest version"
        time.sleep(0.2)
    with grpc.insecure_channel(embedded["addrs"]["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides={
            "steps": "3", "prefetch_rollouts": "true", "ppo.batch_size": "4", "ppo.mini_batch_size": "2",
            "ppo.ppo_epochs": "1", "ppo.sampling.max_new_tokens": "4"})).job
        steps = [ev for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300)
                 if ev.message.startswith("PPO step")]
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id)).job
    assert job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, job.message
    assert len(job.published_versions) == 3 and len(steps) == 3
    # step 2's rollouts were asked for before step 1 updated: one version behind; step 3's before
    # step 2 updated, from whichever version the policy-server had loaded by then
    assert steps[0].metrics["rollout_staleness_versions"] == 0
    assert steps[1].metrics["rollout_staleness_versions"] == 1
    assert steps[2].metrics["rollout_staleness_versions"] in (1, 2)
    assert job.metrics["rollout_staleness_max_versions"] >= 1
    assert scenario.served_version(embedded["addrs"]["policy-server"])[0] == job.published_versions[-1]


def _stored_prompts(addr: str) -> list:
    from rlhf_client import common_pb2, prompts_grpc, prompts_pb2

    out = []
    with grpc.insecure_channel(addr) as ch:
        stub = prompts_grpc.PromptCollectorServiceStub(ch)
        for split in (common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_VALID, common_pb2.SPLIT_TEST):
            token = ""
            while True:
                r = stub.ListPrompts(prompts_pb2.ListPromptsRequest(split=split, page_size=1000, page_token=token))
                out += list(r.prompts)
                token = r.next_page_token
                if not token:
                    break
    return out


def test_up_forwards_opted_in_http_prompts_to_the_prompt_collector(embedded):
    """`rlhf up` wires the policy-server's opt-in forwarding to its own prompt-collector."""
    import json
    import time
    import urllib.request

    def complete(prompt: str, headers: dict) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{embedded['http_port']}/v1/completions", method="POST",
            data=json.dumps({"model": "rlhf-policy", "prompt": prompt, "max_tokens": 2, "user": "user-4711"}).encode(),
            headers={"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    assert complete("an opted-in opening 7f3a", {"X-RLHF-Consent": "true"})["choices"]
    assert complete("an opening without consent 9c1e", {})["choices"]
    deadline = time.monotonic() + 30
    while True:
        texts = {p.text: p for p in _stored_prompts(embedded["addrs"]["prompt-collector"])}
        if "an opted-in opening 7f3a" in texts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "an opted-in opening 7f3a" in texts
    assert texts["an opted-in opening 7f3a"].source.startswith("api")
    assert "an opening without consent 9c1e" not in texts


def test_a_waiting_job_counts_the_comparisons_the_feedback_store_holds(embedded):
    """A job waiting for comparisons of its tasks counts what the feedback-store stores, each once
    (an event that was never stored, forged or replayed from elsewhere, counts for nothing)."""
    from rlhf.errors import UnavailableError
    from rlhf.registry import ModelRegistry
    from services.trainer import runs

    a = embedded["addrs"]
    peers = runs.Peers.connect(a, registry=ModelRegistry(embedded["root"] / "registry"), served=lambda kind: "",
                               timeout=30)
    with grpc.insecure_channel(a["feedback-store"]) as ch:
        fb = feedback_grpc.FeedbackServiceStub(ch)
        tasks = fb.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=[
            feedback_pb2.LabelingTaskInput(prompt=f"waiting {i}", candidates=["a", "b"]) for i in range(3)])).tasks
        ids = [x.task_id for x in tasks]
        with pytest.raises(UnavailableError, match="only 0 of 3"):
            peers.wait_comparisons(ids, 3, 1.5, lambda: None)
        for i, tid in enumerate(ids + ids[:1]):  # the first one sent twice: stored once
            fb.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                idempotency_key=f"real-{i % 3}", task_id=tid, labeler_id="l1",
                ranking=[feedback_pb2.RankGroup(indices=[0]), feedback_pb2.RankGroup(indices=[1])]))
    assert peers.wait_comparisons(ids, 3, 30, lambda: None) == 3
    with pytest.raises(UnavailableError, match="only 3 of 4"):
        peers.wait_comparisons(ids, 4, 1.5, lambda: None)


def test_start_job_lists_every_bad_value_and_starts_nothing(embedded):
    with grpc.insecure_channel(embedded["addrs"]["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        before = len(stub.ListJobs(trainer_pb2.ListJobsRequest()).jobs)
        bad = {
            trainer_pb2.JOB_KIND_PPO: ({"steps": "0", "ppo.kl_coef": ".inf", "ppo.adaptive_kl": "false",
                                        "ppo.batch_size": "4", "ppo.mini_batch_size": "2"},
                                       ["steps: must be in", "ppo.kl_coef: must be a finite number"]),
            trainer_pb2.JOB_KIND_RM: ({"since_unix": ".nan", "rm.epochs": "0"},
                                      ["since_unix: must be a finite number", "rm.epochs: must be in [1, 1000]"]),
            trainer_pb2.JOB_KIND_ONLINE_LOOP: ({"k": "1", "iterations": "0"}, ["k: must be in [2, 16]", "iterations"]),
        }
        for kind, (overrides, needles) in bad.items():
            with pytest.raises(grpc.RpcError) as e:
                stub.StartJob(trainer_pb2.StartJobRequest(kind=kind, overrides=overrides))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert all(n in e.value.details() for n in needles), e.value.details()
        for kind, overrides, needle in (  # what the trainer's launcher (local processes here) cannot run
                (trainer_pb2.JOB_KIND_SFT, {"distributed.nodes": "2"}, "several nodes need the Kubernetes launcher"),
                (trainer_pb2.JOB_KIND_ONLINE_LOOP, {"ppo.distributed.processes": "2"}, "the online loop runs in one process")):
            with pytest.raises(grpc.RpcError) as e:
                stub.StartJob(trainer_pb2.StartJobRequest(kind=kind, overrides=overrides))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a file path is the CLI's business, not the trainer's
            stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_SFT, overrides={"data": "/etc/passwd"}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rlhf train" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # an unknown version is named, cut short, before any job starts
            stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides={"reference": "v" * 3000}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "3000 characters" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides={"reference": "v2099-nope"}))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "v2099-nope" in e.value.details()
        for kind, field in ((trainer_pb2.JOB_KIND_PPO, "eval_reward_model"), (trainer_pb2.JOB_KIND_ONLINE_LOOP, "ppo.eval_reward_model")):
            with pytest.raises(grpc.RpcError) as e:  # the evaluation's reward model: a reward version of the registry
                stub.StartJob(trainer_pb2.StartJobRequest(kind=kind, overrides={field: "v2099-judge"}))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "v2099-judge" in e.value.details()
        assert len(stub.ListJobs(trainer_pb2.ListJobsRequest()).jobs) == before


def test_out_of_range_timestamps_and_nul_ids_are_invalid_argument(embedded):
    from google.protobuf.timestamp_pb2 import Timestamp

    with grpc.insecure_channel(embedded["addrs"]["feedback-store"]) as ch:
        fb = feedback_grpc.FeedbackServiceStub(ch)
        for call in (lambda: list(fb.ExportComparisons(feedback_pb2.ExportComparisonsRequest(
                         since=Timestamp(seconds=10**15)))),
                     lambda: fb.GetAgreement(feedback_pb2.GetAgreementRequest(since=Timestamp(seconds=-10**14))),
                     lambda: fb.GetLabelingTask(feedback_pb2.GetLabelingTaskRequest(task_id="a\x00b"))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a huge unknown id is named, cut, not echoed
            fb.GetLabelingTask(feedback_pb2.GetLabelingTaskRequest(task_id="t" * 150))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "(150 characters)" in e.value.details()
