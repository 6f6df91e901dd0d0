"""One full online-loop iteration against running services, as a user would drive it.

Used by the embedded test (all services in one process, SQLite, in-process bus) and by the
integration test (five OS processes, Kafka, PostgreSQL).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
from rlhf_client import (feedback_grpc, feedback_pb2, policy_grpc, policy_pb2, prompts_grpc, prompts_pb2,
                         trainer_grpc, trainer_pb2)

from rlhf.label_client import WordListJudge, run_labeler
from rlhf_client.channel import Credentials, blocking_channel
from rlhf.labeler import SimulatedLabeler
from tests.services.helpers import PROMPTS

LOOP_OVERRIDES = {
    "prompts_per_iteration": "4", "k": "4", "comparisons_needed": "8", "candidate_max_new_tokens": "8",
    "wait_timeout_seconds": "240", "rm.min_comparisons": "2", "rm.rm.batch_size": "4",
    "ppo.steps": "2", "ppo.ppo.batch_size": "4", "ppo.ppo.mini_batch_size": "2", "ppo.ppo.ppo_epochs": "1",
    "ppo.ppo.sampling.max_new_tokens": "8", "ppo.wait_for_serving_seconds": "120",
}


@dataclass
class LoopRun:
    job: trainer_pb2.Job
    events: list = field(default_factory=list)
    rankings_submitted: int = 0
    prompt_ids: list = field(default_factory=list)


def channel(target: str, token: str = "") -> grpc.Channel:
    """A channel that presents ``token`` (none: anonymous, for services without authentication)."""
    return blocking_channel(target, creds=Credentials(token=token))


def submit_prompts(target: str, token: str = "") -> list[str]:
    with channel(target, token) as ch:
        stub = prompts_grpc.PromptCollectorServiceStub(ch)
        r = stub.SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
            prompts_pb2.PromptInput(text=p.encode(), user_id=f"user-{i}", source="test", consent=True)
            for i, p in enumerate(PROMPTS)]), timeout=30)
        return [x.prompt_id for x in r.results]


def run_online_loop(addrs: dict[str, str], timeout: float = 600.0, tokens: dict[str, str] | None = None,
                    overrides: dict[str, str] | None = None, on_event=None) -> LoopRun:
    """``tokens``: the credentials of "operator" (submits prompts, runs the job) and of the labelers
    "sim-0" and "sim-1" when the services authenticate. ``overrides`` change LOOP_OVERRIDES;
    ``on_event(job_id, event)`` sees each of the job's events as it comes."""
    tokens = tokens or {}
    prompt_ids = submit_prompts(addrs["prompt-collector"], tokens.get("operator", ""))
    stop = threading.Event()
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def labeler(name: str, seed: int) -> None:
        try:
            counts[name] = run_labeler(addrs["feedback-store"], SimulatedLabeler(WordListJudge(), 0.05, seed=seed),
                                       name, stop, poll_seconds=0.2, token=tokens.get(name, ""))
        except BaseException as e:  # surfaced by the test below
            errors.append(e)

    threads = [threading.Thread(target=labeler, args=(f"sim-{i}", i), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        with channel(addrs["trainer"], tokens.get("operator", "")) as ch:
            stub = trainer_grpc.TrainerServiceStub(ch)
            job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_ONLINE_LOOP,
                                                            overrides={**LOOP_OVERRIDES, **(overrides or {})}),
                                timeout=30).job
            events = []
            for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=timeout):
                events.append(ev)
                if on_event is not None:
                    on_event(job.job_id, ev)
            job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    return LoopRun(job=job, events=events, rankings_submitted=sum(counts.values()), prompt_ids=prompt_ids)


def served_version(target: str, token: str = "") -> tuple[str, str]:
    """(GetPolicyVersion, the version a Generate answer carries)."""
    with channel(target, token) as ch:
        stub = policy_grpc.PolicyServiceStub(ch)
        v = stub.GetPolicyVersion(policy_pb2.GetPolicyVersionRequest(), timeout=30).policy_version
        g = stub.Generate(policy_pb2.GenerateRequest(prompts=["the film"], sampling=policy_pb2.SamplingParams(
            max_new_tokens=4)), timeout=60)
        return v, g.policy_version


def export_submission_ids(target: str, token: str = "") -> list[str]:
    with channel(target, token) as ch:
        stub = feedback_grpc.FeedbackServiceStub(ch)
        return [m.comparison.submission_id for m in stub.ExportComparisons(feedback_pb2.ExportComparisonsRequest(),
                                                                           timeout=60)]
