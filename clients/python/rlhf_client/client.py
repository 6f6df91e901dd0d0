"""Thin typed clients, one per service: keyword arguments in, protobuf messages out.

Each client holds one channel (:func:`rlhf_client.channel.blocking_channel`: the platform's retry
policy and your credentials) and puts a deadline on every call (``timeout`` seconds, per call or
for the client). Errors are ``grpc.RpcError`` with the server's status code and message::

    from rlhf_client.client import PolicyClient
    from rlhf_client.channel import Credentials

    with PolicyClient("127.0.0.1:50052", Credentials(token="sk-...")) as policy:
        r = policy.generate(["The movie was"], n=2, max_new_tokens=24, temperature=0.7)
        print(r.policy_version, [c.text for c in r.results[0].completions])

Submissions take an idempotency key; when you leave it out one is made per call, so the
channel's own retries of that call never store twice (retry a failed *call* with the same key).
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable, Iterator, Sequence

import grpc

from rlhf_client.channel import Credentials, blocking_channel
from rlhf_client.gen.rlhf.feedback.v1 import feedback_store_pb2 as feedback_pb2
from rlhf_client.gen.rlhf.feedback.v1 import feedback_store_pb2_grpc as feedback_grpc
from rlhf_client.gen.rlhf.policy.v1 import policy_server_pb2 as policy_pb2
from rlhf_client.gen.rlhf.policy.v1 import policy_server_pb2_grpc as policy_grpc
from rlhf_client.gen.rlhf.prompts.v1 import prompt_collector_pb2 as prompts_pb2
from rlhf_client.gen.rlhf.prompts.v1 import prompt_collector_pb2_grpc as prompts_grpc
from rlhf_client.gen.rlhf.reward.v1 import reward_scorer_pb2 as reward_pb2
from rlhf_client.gen.rlhf.reward.v1 import reward_scorer_pb2_grpc as reward_grpc
from rlhf_client.gen.rlhf.trainer.v1 import trainer_pb2
from rlhf_client.gen.rlhf.trainer.v1 import trainer_pb2_grpc as trainer_grpc

__all__ = ["FeedbackClient", "PolicyClient", "PromptClient", "RewardClient", "TrainerClient"]


class _Client:
    stub_class: Any = None

    def __init__(self, target: str, credentials: Credentials | None = None, timeout: float = 60.0,
                 channel: grpc.Channel | None = None):
        self._own = channel is None
        self.channel = channel if channel is not None else blocking_channel(target, creds=credentials)
        self.stub = self.stub_class(self.channel)
        self.timeout = timeout

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(key: str | None) -> str:
    return key or uuid.uuid4().hex


class PolicyClient(_Client):
    """The policy-server: generation, streaming, the served version."""

    stub_class = policy_grpc.PolicyServiceStub

    def generate(self, prompts: Sequence[str], n: int = 1, return_logprobs: bool = False,
                 timeout: float | None = None, **sampling) -> policy_pb2.GenerateResponse:
        """``sampling``: the fields of ``SamplingParams`` (max_new_tokens, temperature, top_p,
        top_k, min_new_tokens, stop, seed, ...). ``logprobs_of=policy_pb2.LOGPROBS_OF_SAMPLING``
        (or ``"LOGPROBS_OF_SAMPLING"``) with ``return_logprobs``: the log-probs of the distribution
        each token was drawn from (behaviour log-probs, for PPO), not the model's own."""
        return self.stub.Generate(policy_pb2.GenerateRequest(
            prompts=list(prompts), n=n, return_logprobs=return_logprobs,
            sampling=policy_pb2.SamplingParams(**sampling)), timeout=self._t(timeout))

    def generate_stream(self, prompt: str, timeout: float | None = None,
                        **sampling) -> Iterator[policy_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(policy_pb2.GenerateStreamRequest(
            prompt=prompt, sampling=policy_pb2.SamplingParams(**sampling)), timeout=self._t(timeout))

    def policy_version(self, timeout: float | None = None) -> str:
        return self.stub.GetPolicyVersion(policy_pb2.GetPolicyVersionRequest(), timeout=self._t(timeout)).policy_version


class PromptClient(_Client):
    """The prompt-collector: submit prompts (with the user's consent), list and sample them."""

    stub_class = prompts_grpc.PromptCollectorServiceStub

    def submit(self, prompts: Iterable[prompts_pb2.PromptInput | dict],
               timeout: float | None = None) -> prompts_pb2.SubmitPromptsResponse:
        """Each prompt a ``PromptInput`` or a dict of its fields (text may be str or bytes)."""
        items = []
        for p in prompts:
            if isinstance(p, dict):
                p = dict(p)
                if isinstance(p.get("text"), str):
                    p["text"] = p["text"].encode()
                p = prompts_pb2.PromptInput(**p)
            items.append(p)
        return self.stub.SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=items), timeout=self._t(timeout))

    def list(self, split: int = 0, page_size: int = 1000, timeout: float | None = None) -> Iterator[prompts_pb2.Prompt]:
        """Every stored prompt of ``split`` (0: every split), page after page."""
        token = ""
        while True:
            r = self.stub.ListPrompts(prompts_pb2.ListPromptsRequest(split=split, page_size=page_size,
                                                                     page_token=token), timeout=self._t(timeout))
            yield from r.prompts
            token = r.next_page_token
            if not token:
                return

    def sample(self, count: int, split: int = 0, seed: int = 0, timeout: float | None = None) -> list[prompts_pb2.Prompt]:
        return list(self.stub.SamplePrompts(prompts_pb2.SamplePromptsRequest(split=split, count=count, seed=seed),
                                            timeout=self._t(timeout)).prompts)


class RewardClient(_Client):
    """The reward-scorer: reward-model scores of (prompt, response) pairs."""

    stub_class = reward_grpc.RewardServiceStub

    def score(self, pairs: Iterable[tuple[str, str]], timeout: float | None = None) -> reward_pb2.ScoreResponse:
        return self.stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r)
                                                              for p, r in pairs]), timeout=self._t(timeout))

    def reward_model_version(self, timeout: float | None = None) -> str:
        return self.stub.GetRewardModelVersion(reward_pb2.GetRewardModelVersionRequest(),
                                               timeout=self._t(timeout)).reward_model_version


def _labels(labels: Iterable[feedback_pb2.CandidateLabel | dict]) -> list[feedback_pb2.CandidateLabel]:
    return [feedback_pb2.CandidateLabel(**x) if isinstance(x, dict) else x for x in labels]


class FeedbackClient(_Client):
    """The feedback-store: labeling tasks, rankings, best-of-K choices, demonstrations, skips,
    exports, and (operators) labeler accounts.

    ``labels``: per-candidate flags and 1-7 quality, ``CandidateLabel`` messages or dicts such as
    ``{"index": 2, "flags": [feedback_pb2.RESPONSE_FLAG_HALLUCINATION], "quality": 3}``.
    """

    stub_class = feedback_grpc.FeedbackServiceStub

    def create_tasks(self, tasks: Iterable[feedback_pb2.LabelingTaskInput | dict],
                     timeout: float | None = None) -> list[feedback_pb2.LabelingTask]:
        items = [feedback_pb2.LabelingTaskInput(**t) if isinstance(t, dict) else t for t in tasks]
        return list(self.stub.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=items),
                                                  timeout=self._t(timeout)).tasks)

    def get_task(self, task_id: str, timeout: float | None = None) -> feedback_pb2.LabelingTask:
        return self.stub.GetLabelingTask(feedback_pb2.GetLabelingTaskRequest(task_id=task_id),
                                         timeout=self._t(timeout)).task

    def pending_tasks(self, labeler_id: str = "", page_size: int = 100,
                      timeout: float | None = None) -> Iterator[feedback_pb2.LabelingTask]:
        """The tasks the labeler has not answered yet, oldest first (with authentication on, the
        labeler is the caller: ``labeler_id`` may be left out)."""
        token = ""
        while True:
            r = self.stub.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest(
                labeler_id=labeler_id, page_size=page_size, page_token=token), timeout=self._t(timeout))
            yield from r.tasks
            token = r.next_page_token
            if not token:
                return

    def submit_ranking(self, task_id: str, ranking: Sequence[Sequence[int]], labeler_id: str = "",
                       idempotency_key: str | None = None, labels: Iterable = (), seconds_spent: float = 0.0,
                       timeout: float | None = None) -> feedback_pb2.SubmitRankingResponse:
        """``ranking``: groups of candidate indices, best first; a group of several is a tie."""
        return self.stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
            idempotency_key=_key(idempotency_key), task_id=task_id, labeler_id=labeler_id,
            ranking=[feedback_pb2.RankGroup(indices=list(g)) for g in ranking], labels=_labels(labels),
            seconds_spent=seconds_spent), timeout=self._t(timeout))

    def submit_best_of_k(self, task_id: str, best_index: int, labeler_id: str = "",
                         idempotency_key: str | None = None, labels: Iterable = (), seconds_spent: float = 0.0,
                         timeout: float | None = None) -> feedback_pb2.SubmitBestOfKResponse:
        return self.stub.SubmitBestOfK(feedback_pb2.SubmitBestOfKRequest(
            idempotency_key=_key(idempotency_key), task_id=task_id, labeler_id=labeler_id, best_index=best_index,
            labels=_labels(labels), seconds_spent=seconds_spent), timeout=self._t(timeout))

    def submit_demonstration(self, prompt: str, response: str, prompt_id: str = "", split: int = 0,
                             labeler_id: str = "", idempotency_key: str | None = None, task_id: str = "",
                             seconds_spent: float = 0.0,
                             timeout: float | None = None) -> feedback_pb2.SubmitDemonstrationResponse:
        """A free-standing demonstration, or (``task_id``) the answer to a demonstration task,
        whose prompt is then the task's (leave ``prompt`` empty)."""
        return self.stub.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
            idempotency_key=_key(idempotency_key), prompt=prompt, prompt_id=prompt_id, split=split,
            labeler_id=labeler_id, response=response, task_id=task_id, seconds_spent=seconds_spent),
            timeout=self._t(timeout))

    def skip_task(self, task_id: str, reason: int, comment: str = "", labeler_id: str = "",
                  idempotency_key: str | None = None, seconds_spent: float = 0.0,
                  timeout: float | None = None) -> feedback_pb2.SkipLabelingTaskResponse:
        """``reason``: a ``feedback_pb2.SKIP_REASON_*`` value."""
        return self.stub.SkipLabelingTask(feedback_pb2.SkipLabelingTaskRequest(
            idempotency_key=_key(idempotency_key), task_id=task_id, labeler_id=labeler_id, reason=reason,
            comment=comment, seconds_spent=seconds_spent), timeout=self._t(timeout))

    # -- labeler accounts (operators) ----------------------------------------------------------
    def create_labeler(self, name: str, admin: bool = False,
                       timeout: float | None = None) -> feedback_pb2.CreateLabelerResponse:
        """Register a labeler (``admin``: an account for the labeling page's admin view); the
        answer holds their sign-in token, which is not shown again."""
        return self.stub.CreateLabeler(feedback_pb2.CreateLabelerRequest(name=name, admin=admin),
                                       timeout=self._t(timeout))

    def issue_labeler_token(self, name: str, timeout: float | None = None) -> str:
        return self.stub.IssueLabelerToken(feedback_pb2.IssueLabelerTokenRequest(name=name),
                                           timeout=self._t(timeout)).token

    def revoke_labeler(self, name: str, timeout: float | None = None) -> int:
        """Disable a labeler; returns how many of their open tasks moved to other labelers."""
        return self.stub.RevokeLabeler(feedback_pb2.RevokeLabelerRequest(name=name),
                                       timeout=self._t(timeout)).tasks_reassigned

    def reassign_labeler_tasks(self, name: str, timeout: float | None = None) -> int:
        return self.stub.ReassignLabelerTasks(feedback_pb2.ReassignLabelerTasksRequest(name=name),
                                              timeout=self._t(timeout)).tasks_reassigned

    def labelers(self, timeout: float | None = None, **filters) -> list[feedback_pb2.Labeler]:
        """Every labeler with their counts (``since``: only submissions from then on)."""
        return list(self.stub.ListLabelers(feedback_pb2.ListLabelersRequest(**filters),
                                           timeout=self._t(timeout)).labelers)

    def export_comparisons(self, timeout: float | None = None, **filters) -> Iterator[feedback_pb2.Comparison]:
        """``filters``: the fields of ``ExportComparisonsRequest`` (since, split, labeler_id, task_ids)."""
        for m in self.stub.ExportComparisons(feedback_pb2.ExportComparisonsRequest(**filters), timeout=self._t(timeout)):
            yield m.comparison

    def export_demonstrations(self, timeout: float | None = None,
                              **filters) -> Iterator[feedback_pb2.Demonstration]:
        for m in self.stub.ExportDemonstrations(feedback_pb2.ExportDemonstrationsRequest(**filters),
                                                timeout=self._t(timeout)):
            yield m.demonstration

    def agreement(self, timeout: float | None = None, **filters) -> feedback_pb2.GetAgreementResponse:
        return self.stub.GetAgreement(feedback_pb2.GetAgreementRequest(**filters), timeout=self._t(timeout))


class TrainerClient(_Client):
    """The trainer: start, watch and cancel SFT, RM, PPO and online-loop jobs."""

    stub_class = trainer_grpc.TrainerServiceStub
    KINDS = {"sft": trainer_pb2.JOB_KIND_SFT, "rm": trainer_pb2.JOB_KIND_RM, "ppo": trainer_pb2.JOB_KIND_PPO,
             "online_loop": trainer_pb2.JOB_KIND_ONLINE_LOOP}
    FINAL = (trainer_pb2.JOB_STATUS_SUCCEEDED, trainer_pb2.JOB_STATUS_FAILED, trainer_pb2.JOB_STATUS_CANCELLED)

    def start_job(self, kind: str, overrides: dict[str, Any] | None = None,
                  timeout: float | None = None) -> trainer_pb2.Job:
        """``kind``: sft, rm, ppo or online_loop; ``overrides``: ``{"ppo.lr": 1e-5, ...}`` (values
        are sent as text and parsed as YAML, exactly like ``rlhf train --set``)."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        return self.stub.StartJob(trainer_pb2.StartJobRequest(
            kind=self.KINDS[kind], overrides={k: str(v) for k, v in (overrides or {}).items()}),
            timeout=self._t(timeout)).job

    def get_job(self, job_id: str, timeout: float | None = None) -> trainer_pb2.Job:
        return self.stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=self._t(timeout)).job

    def list_jobs(self, timeout: float | None = None) -> list[trainer_pb2.Job]:
        return list(self.stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=self._t(timeout)).jobs)

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[trainer_pb2.WatchJobResponse]:
        """The job's events from its start, then live ones until it ends (``timeout``: the whole watch)."""
        return self.stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=self._t(timeout))

    def cancel_job(self, job_id: str, timeout: float | None = None) -> trainer_pb2.Job:
        return self.stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job_id), timeout=self._t(timeout)).job

    def wait(self, job_id: str, timeout: float = 3600.0) -> trainer_pb2.Job:
        """Block until the job ends (watching its events); returns its final record."""
        for _ in self.watch_job(job_id, timeout=timeout):
            pass
        return self.get_job(job_id)
