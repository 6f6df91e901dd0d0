"""PPO through the services: the ratio is taken against the policy-server's behaviour log-probs
(fresh rollouts start at ratio 1, stale ones show their staleness), and PPO-ptx samples a
pre-training dataset held in the trainer's registry."""

from __future__ import annotations

import grpc
import pytest
from rlhf_client import prompts_grpc, prompts_pb2, trainer_grpc, trainer_pb2

from rlhf.models import RewardModel, load_causal_lm, load_tokenizer
from rlhf.registry import import_texts
from tests.services.helpers import PROMPTS, TEXTS, one_thread, tiny_policy_registry, up_on_free_ports

pytestmark = pytest.mark.slow

PPO = {"steps": 2, "ppo.batch_size": 4, "ppo.mini_batch_size": 2, "ppo.ppo_epochs": 2, "ppo.lr": 1e-2,
       "ppo.sampling.max_new_tokens": 4, "ppo.kl_coef": 0.2, "wait_for_serving_seconds": 120}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with one_thread():  # the trainer's and the server's forward passes round alike
        root = tmp_path_factory.mktemp("ppo")
        reg = tiny_policy_registry(root / "registry")
        base = reg.latest("policy")
        path = reg.path("policy", base)
        rm = RewardModel.from_causal_lm(load_causal_lm(path), load_tokenizer(path), seed=0)
        reg.publish("reward", lambda d: rm.save(d))
        close, addrs, _, _ = up_on_free_ports(root)
        try:
            with grpc.insecure_channel(addrs["prompt-collector"]) as ch:
                prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
                    prompts_pb2.PromptInput(text=p.encode(), user_id="u1", source="test", consent=True)
                    for p in PROMPTS]), timeout=30)
            yield {"addrs": addrs, "root": root, "registry": reg, "base": base}
        finally:
            close()


def _start(addrs, overrides: dict) -> trainer_pb2.Job:
    with grpc.insecure_channel(addrs["trainer"]) as ch:
        return trainer_grpc.TrainerServiceStub(ch).StartJob(trainer_pb2.StartJobRequest(
            kind=trainer_pb2.JOB_KIND_PPO, overrides={k: str(v) for k, v in overrides.items()}), timeout=30).job


def _run(addrs, overrides: dict) -> tuple[trainer_pb2.Job, list[dict]]:
    """Start a PPO job, wait for it; returns the job and each PPO step's metrics, in order."""
    job = _start(addrs, overrides)
    with grpc.insecure_channel(addrs["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        steps = [dict(ev.metrics) for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=600)
                 if "behaviour_approx_kl" in ev.metrics]
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job
    assert job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, job.message
    return job, steps


def _jobs(addrs) -> int:
    with grpc.insecure_channel(addrs["trainer"]) as ch:
        return len(trainer_grpc.TrainerServiceStub(ch).ListJobs(trainer_pb2.ListJobsRequest(), timeout=30).jobs)


def test_the_ratio_is_taken_against_the_servers_behaviour_logprobs(stack):
    # T = 0.7: the server's log-probs must be those of the tempered distribution it sampled from
    # (the model's own T = 1 ones would differ from the trainer's at once). With prefetch, step 1's
    # rollouts are asked for before step 0's update: sampled by the version before the trainer's.
    job, steps = _run(stack["addrs"], {**PPO, "policy": stack["base"], "rollouts": "policy-server",
                                       "prefetch_rollouts": "true", "ppo.sampling.temperature": 0.7})
    assert [s["rollout_staleness_versions"] for s in steps] == [0, 1]
    fresh, stale = steps
    # the server served the trainer's current weights: its behaviour log-probs are the trainer's
    # (to float32 rounding of two different forward passes), so the ratio starts at 1
    assert fresh["behaviour_approx_kl"] < 1e-8
    # one update later the rollouts are a version old: the ratio is pi_current / mu, not 1
    assert stale["behaviour_approx_kl"] > 1e-5
    assert stale["behaviour_approx_kl"] > 1e3 * max(fresh["behaviour_approx_kl"], 1e-12)
    assert len(job.published_versions) == 2


def test_ppo_ptx_samples_a_dataset_of_the_registry_and_bad_sources_are_refused(stack, tmp_path):
    addrs, base = stack["addrs"], stack["base"]
    ptx = {**PPO, "policy": base, "rollouts": "local", "steps": 1, "ppo.ptx_coef": 0.5, "ppo.ptx_batch_size": 2,
           "ppo.ptx_block_size": 16}
    before = _jobs(addrs)
    refused = [({}, grpc.StatusCode.INVALID_ARGUMENT, "ptx_coef > 0 needs pre-training text"),
               ({"ptx_data": tmp_path / "texts.txt"}, grpc.StatusCode.INVALID_ARGUMENT, "ptx_data"),
               ({"ptx_dataset": "latest"}, grpc.StatusCode.NOT_FOUND, "no dataset version yet"),
               ({"ptx_dataset": "v20260101T000000000000-abcdef"}, grpc.StatusCode.NOT_FOUND, "no dataset version")]
    for extra, code, message in refused:
        with pytest.raises(grpc.RpcError) as e:
            _start(addrs, {**ptx, **extra})
        assert e.value.code() == code and message in e.value.details(), extra
    assert _jobs(addrs) == before  # nothing stored

    src = tmp_path / "texts.txt"
    src.write_text("\n\n".join(TEXTS))
    version = import_texts(src, stack["root"] / "registry").version
    for ref in (version, "latest"):
        _, (step,) = _run(addrs, {**ptx, "ptx_dataset": ref})
        assert step["ptx_loss"] > 0  # the pre-training NLL of the dataset's blocks, mixed into the loss
    _, (step,) = _run(addrs, {**ptx, "ppo.ptx_coef": 0.0})
    assert step["ptx_loss"] == 0.0
