"""rlhf.train: the job recipes (the CLI and the trainer run them; tests/services/test_one_recipe.py
compares the two paths)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.data import write_jsonl
from rlhf.errors import DataError
from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
from rlhf.train import LocalIO, PPOJob, batch_prompts, run_ppo
from rlhf.algos.ppo import PPOConfig
from rlhf.generation import SamplingParams

TEXTS = [f"review {i}: the film was good and fun" for i in range(40)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("train")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    save_pretrained(build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)), seed=0), tok, d / "base")
    write_jsonl(d / "prompts.jsonl", [{"prompt": t[:10]} for t in TEXTS])
    return d


class NaNRewards(LocalIO):
    """Rewards that turn NaN at the second step (a reward model gone bad)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def reward_fn(self, job):
        def score(prompts, responses):
            self.calls += 1
            return torch.full((len(prompts),), float("nan") if self.calls > 1 else 0.5)
        return score, lambda: {"reward_model": "test"}


def test_a_job_whose_losses_turn_nan_stops_and_publishes_nothing(files, tmp_path):
    job = PPOJob(policy=str(files / "base"), reward_model="unused", prompts=str(files / "prompts.jsonl"),
                 output=str(tmp_path / "out"), steps=3,
                 ppo=PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, sampling=SamplingParams(max_new_tokens=3)))
    io = NaNRewards()
    with pytest.raises(DataError, match=r"PPO step 2: .*reward = nan.*publishes nothing"):
        run_ppo(job, io)
    assert io.calls == 2 and not (tmp_path / "out").exists()


def test_each_step_draws_its_prompts_from_the_seed_and_the_step_alone():
    prompts = [f"p{i}" for i in range(50)]
    assert batch_prompts(prompts, 3, 7, 8) == batch_prompts(list(prompts), 3, 7, 8)
    assert batch_prompts(prompts, 3, 7, 8) != batch_prompts(prompts, 4, 7, 8)
    assert len(set(batch_prompts(prompts, 0, 0, 50))) == 50
    with pytest.raises(DataError, match="fewer than ppo.batch_size=8"):
        batch_prompts(prompts[:5], 0, 0, 8)


class LengthRewards(LocalIO):
    """Rewards without a reward model: longer responses score higher."""

    def reward_fn(self, job):
        return (lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])), \
            lambda: {"reward_model": "test"}


def test_lora_ppo_job_writes_a_plain_model_and_takes_no_other_reference(files, tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from rlhf.errors import ConfigError

    ppo = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, lr=1e-2, sampling=SamplingParams(max_new_tokens=3),
                    finetune="lora", lora_rank=4, lora_alpha=8.0)
    job = PPOJob(policy=str(files / "base"), reward_model="unused", prompts=str(files / "prompts.jsonl"),
                 output=str(tmp_path / "out"), steps=2, ppo=ppo)
    run_ppo(job, LengthRewards())
    out, base = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(files / "base" / "model.safetensors"))
    assert set(out) == set(base)  # the adapters are folded in: the base model's own tensors, no lora_*
    assert any(not torch.equal(out[k], base[k]) for k in base)
    other = PPOJob(policy=str(files / "base"), reference=str(tmp_path / "out"), reward_model="unused",
                   prompts=str(files / "prompts.jsonl"), output=str(tmp_path / "out2"), steps=1, ppo=ppo)
    with pytest.raises(ConfigError, match="leave reference unset"):
        run_ppo(other, LengthRewards())


class RecordedLengthRewards(LengthRewards):
    """Length rewards that remember every call: (prompts, scores)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[str], list[float]]] = []

    def reward_fn(self, job):
        score, info = super().reward_fn(job)

        def recorded(prompts, responses):
            s = score(prompts, responses)
            self.calls.append((list(prompts), s.tolist()))
            return s
        return recorded, info


def _eval_job(files, out, **kw) -> PPOJob:
    ppo = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, lr=1e-2, sampling=SamplingParams(max_new_tokens=3))
    return PPOJob(policy=str(files / "base"), reward_model="unused", prompts=str(files / "prompts.jsonl"),
                  output=str(out), ppo=ppo, **kw)


def test_a_ppo_job_evaluates_held_out_prompts_every_eval_every_steps_and_at_the_last(files, tmp_path):
    import json

    io = RecordedLengthRewards()
    result = run_ppo(_eval_job(files, tmp_path / "out", steps=5, eval_every=2, eval_prompts=6), io)
    hist = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist if "eval_score" in h] == [2, 4, 5]
    # the training reward model scored each evaluation: one response per held-out prompt, sampled
    # in chunks of a PPO batch (4 + 2) after the step's update; eval_score is their mean
    assert [len(p) for p, _ in io.calls] == [4, 4, 4, 2, 4, 4, 4, 2, 4, 4, 2]
    trained = [io.calls[i] for i in (0, 1, 4, 5, 8)]
    evals = [(io.calls[i][0] + io.calls[i + 1][0], io.calls[i][1] + io.calls[i + 1][1]) for i in (2, 6, 9)]
    held = set(evals[0][0])
    assert len(held) == 6 and all(p == evals[0][0] for p, _ in evals)
    assert not held & {p for ps, _ in trained for p in ps}  # never trained on
    assert [h["eval_score"] for h in hist if "eval_score" in h] == pytest.approx([sum(s) / 6 for _, s in evals])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result["eval_score"] == manifest["metrics"]["eval_score"] == hist[-1]["eval_score"]


def test_an_independent_reward_model_scores_the_evaluation(files, tmp_path):
    from rlhf.models import RewardModel, load_causal_lm, load_tokenizer

    RewardModel.from_causal_lm(load_causal_lm(files / "base"), load_tokenizer(files / "base"), seed=3).save(tmp_path / "judge")
    io = RecordedLengthRewards()
    result = run_ppo(_eval_job(files, tmp_path / "out", steps=2, eval_every=5, eval_prompts=6,
                               eval_reward_model=str(tmp_path / "judge")), io)
    assert [len(p) for p, _ in io.calls] == [4, 4]  # the training reward model scored no evaluation
    assert math.isfinite(result["eval_score"])


def test_too_few_prompts_to_hold_out_the_evaluation_fail_the_job_before_it_trains(files, tmp_path):
    from rlhf.errors import ConfigError

    io = RecordedLengthRewards()
    # 40 distinct prompts: 37 held out leave 3, fewer than ppo.batch_size=4
    with pytest.raises(ConfigError, match="40 distinct prompts cannot hold out eval_prompts=37 .*ppo.batch_size=4"):
        run_ppo(_eval_job(files, tmp_path / "out", steps=2, eval_every=1, eval_prompts=37), io)
    assert io.calls == [] and not (tmp_path / "out").exists()
    run_ppo(_eval_job(files, tmp_path / "out", steps=1, eval_every=1, eval_prompts=36), io)  # 4 left: enough
