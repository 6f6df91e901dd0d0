"""One job recipe: the same config run by `rlhf train` (files) and by the trainer service (the
feedback-store, the prompt-collector, the reward-scorer, the registry) gives the same manifest and
the same weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from rlhf_client import (common_pb2, feedback_grpc, feedback_pb2, prompts_grpc, prompts_pb2, reward_grpc, reward_pb2,
                         trainer_grpc, trainer_pb2)
from safetensors.torch import load_file

from rlhf.config import apply_overrides, from_dict
from rlhf.data import write_jsonl
from rlhf.train import JOBS, run_local
from tests.services.helpers import PROMPTS, one_thread, submit_demonstrations, tiny_policy_registry, up_on_free_ports

pytestmark = pytest.mark.slow

GOOD = [" wonderful and fun", " a great film", " the best story"]
BAD = [" dull and bad", " so much time", " not good"]

# one config per job kind: the StartJob overrides, and the same fields for `rlhf train`
SFT = {"sft.max_steps": 3, "sft.batch_size": 4, "sft.lr": 1e-3, "sft.warmup_steps": 1, "sft.max_length": 32}
RM = {"rm.batch_size": 4, "rm.epochs": 2, "rm.lr": 1e-3, "rm.max_length": 32, "min_comparisons": 2}
PPO = {"steps": 2, "rollouts": "local", "ppo.batch_size": 4, "ppo.mini_batch_size": 2, "ppo.ppo_epochs": 2,
       "ppo.lr": 1e-3, "ppo.sampling.max_new_tokens": 4, "ppo.kl_coef": 0.2}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    # the CLI and the trainer must round alike (helpers.one_thread)
    with one_thread():
        root = tmp_path_factory.mktemp("recipe")
        reg = tiny_policy_registry(root / "registry")
        close, addrs, _, _ = up_on_free_ports(root)
        try:
            yield {"addrs": addrs, "root": root, "registry": reg, "base": reg.latest("policy")}
        finally:
            close()


def _served_rm_version(stub) -> str | None:
    """The reward-scorer's current version; None while it has loaded none (it answers UNAVAILABLE)."""
    try:
        return stub.GetRewardModelVersion(reward_pb2.GetRewardModelVersionRequest(), timeout=10).reward_model_version
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return None
        raise


def _run_service(addrs, kind, overrides: dict) -> trainer_pb2.Job:
    with grpc.insecure_channel(addrs["trainer"]) as ch:
        stub = trainer_grpc.TrainerServiceStub(ch)
        job = stub.StartJob(trainer_pb2.StartJobRequest(kind=kind, overrides={k: str(v) for k, v in overrides.items()}),
                            timeout=30).job
        list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=600))
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job
    assert job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, job.message
    return job


def _run_cli(stage: str, fields: dict) -> Path:
    torch.set_num_threads(1)
    job = from_dict(JOBS[stage], apply_overrides({}, [f"{k}={v}" for k, v in fields.items()]))
    return Path(run_local(stage, job)["output"])


def _weights(d: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(d / name))


def _same(a: Path, b: Path, files: tuple[str, ...], atol: float) -> None:
    for name in files:
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), f"{name}:{k} differs"


def _manifests(cli_dir: Path, service_dir: Path, job_fields_differing: set[str]) -> tuple[dict, dict]:
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (cli_dir, service_dir))
    assert a.keys() == b.keys()
    assert a["kind"] == b["kind"]
    assert a["metrics"].keys() == b["metrics"].keys()
    ja, jb = a["config"].pop("job"), b["config"].pop("job")
    assert {k for k in ja if ja[k] != jb[k]} <= job_fields_differing
    return a, b


def test_sft_rm_ppo_give_the_same_versions_through_the_cli_and_the_trainer(services, tmp_path):
    addrs, reg = services["addrs"], services["registry"]
    base_version = services["base"]
    base_dir = reg.path("policy", base_version)

    # the same demonstrations in the feedback-store and in a file, in the same order
    demos = [(f"review {i}: the film was", GOOD[i % 3]) for i in range(8)]
    submit_demonstrations(addrs["feedback-store"], demos)
    with grpc.insecure_channel(addrs["feedback-store"]) as ch:
        fb = feedback_grpc.FeedbackServiceStub(ch)
        # comparisons: labeling tasks ranked best-first by the word lists
        tasks = fb.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=[
            feedback_pb2.LabelingTaskInput(prompt=p, prompt_id=f"c{i}", split=common_pb2.SPLIT_TRAIN,
                                           candidates=[BAD[i % 3], GOOD[i % 3], BAD[(i + 1) % 3]])
            for i, (p, _) in enumerate(demos)]), timeout=30).tasks
        for i, t in enumerate(tasks):
            fb.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                idempotency_key=f"r{i}", task_id=t.task_id, labeler_id="ranker",
                ranking=[feedback_pb2.RankGroup(indices=[j]) for j in (1, 0, 2)]), timeout=30)
    write_jsonl(tmp_path / "demos.jsonl", [{"prompt": p, "response": r} for p, r in demos])
    write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": p, "responses": [BAD[i % 3], GOOD[i % 3], BAD[(i + 1) % 3]],
                                          "ranking": [1, 0, 2]} for i, (p, _) in enumerate(demos)])

    # SFT
    job = _run_service(addrs, trainer_pb2.JOB_KIND_SFT, {"model": base_version, **SFT})
    cli = _run_cli("sft", {"model": base_dir, "data": tmp_path / "demos.jsonl", "output": tmp_path / "sft", **SFT})
    service = reg.path("policy", job.published_versions[-1])
    _same(cli, service, ("model.safetensors",), atol=1e-6)
    a, b = _manifests(cli, service, {"model", "data", "output"})
    assert a["config"] == b["config"] == {"add_bos": True}
    assert a["metrics"]["sft_loss"] == pytest.approx(b["metrics"]["sft_loss"], rel=1e-5)
    assert (a["parent_version"], b["parent_version"]) == (str(base_dir), base_version)

    # RM on the base policy's trunk
    job = _run_service(addrs, trainer_pb2.JOB_KIND_RM, {"model": base_version, **RM})
    cli = _run_cli("rm", {"model": base_dir, "data": tmp_path / "cmp.jsonl", "output": tmp_path / "rm", **RM})
    rm_version = job.published_versions[-1]
    service = reg.path("reward", rm_version)
    _same(cli, service, ("model.safetensors", "reward_head.safetensors"), atol=1e-5)
    a, b = _manifests(cli, service, {"model", "data", "output"})
    assert a["metrics"]["rm_loss"] == pytest.approx(b["metrics"]["rm_loss"], rel=1e-4)
    ca, cb = (json.loads((d / "reward_config.json").read_text()) for d in (cli, service))
    assert ca["backbone"] == cb["backbone"] == "causal"
    assert (ca["bias"], ca["gain"]) == pytest.approx((cb["bias"], cb["gain"]), rel=1e-4)

    # PPO from the base policy against that RM (served by the reward-scorer; a file for the CLI),
    # the trainer sampling its own rollouts; the prompts are the prompt-collector's, in its order
    with grpc.insecure_channel(addrs["prompt-collector"]) as ch:
        stub = prompts_grpc.PromptCollectorServiceStub(ch)
        stub.SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
            prompts_pb2.PromptInput(text=p.encode(), user_id="u1", source="test", consent=True) for p in PROMPTS]),
            timeout=30)
        stored = stub.ListPrompts(prompts_pb2.ListPromptsRequest(split=common_pb2.SPLIT_TRAIN, page_size=1000),
                                  timeout=30).prompts
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p.text} for p in stored])
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(addrs["reward-scorer"]) as ch:
        stub = reward_grpc.RewardServiceStub(ch)
        while _served_rm_version(stub) != rm_version:
            assert time.monotonic() < deadline, "the reward-scorer did not load the new reward model"
            time.sleep(0.2)
    job = _run_service(addrs, trainer_pb2.JOB_KIND_PPO, {"policy": base_version, **PPO})
    cli = _run_cli("ppo", {"policy": base_dir, "reward_model": service, "prompts": tmp_path / "prompts.jsonl",
                           "output": tmp_path / "ppo", **PPO})
    service = reg.path("policy", job.published_versions[-1])
    assert len(job.published_versions) == 1  # local rollouts: the trainer publishes the final version only
    _same(cli, service, ("model.safetensors",), atol=1e-5)
    va, vb = torch.load(cli / "value_head.pt"), torch.load(service / "value_head.pt")
    assert all(torch.allclose(va[k], vb[k], atol=1e-5) for k in va)
    a, b = _manifests(cli, service, {"policy", "reward_model", "prompts", "output"})
    assert a["metrics"]["reward"] == pytest.approx(b["metrics"]["reward"], abs=1e-4)
    assert a["data"]["samples"] == b["data"]["samples"] == 8
