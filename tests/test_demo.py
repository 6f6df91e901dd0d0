"""Smoke test: `rlhf demo --quick` runs every stage and writes what the README promises."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.algos.rm import pair_accuracy
from rlhf.cli import main
from rlhf.data import read_comparisons, read_demonstrations
from rlhf.evaluate import win_rate
from rlhf.judge import GoldJudge, default_data_dir
from rlhf.models import RewardModel

KEYS = ["gold_score_sft", "gold_score_ppo", "win_rate_ppo_vs_sft", "rm_accuracy_heldout", "kl_target", "kl_final",
        "beta_final", "ppo_steps", "wall_seconds", "distinct2_sft", "distinct2_ppo", "gold_score_ppo_beta0",
        "proxy_reward_ppo_beta0", "models"]


@pytest.mark.slow
def test_demo_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for k in KEYS:
        assert k in s, k
    assert s["ppo_steps"] == 4 and s["kl_target"] == 3.0
    # the win rate is the gold judge's verdict on the samples the run saved
    judge = GoldJudge.from_data(default_data_dir(), seed=0)
    sft_s, ppo_s = (read_demonstrations(out / f"samples_{n}.jsonl") for n in ("sft", "ppo"))
    prompts = [d.prompt for d in sft_s]
    assert prompts == [d.prompt for d in ppo_s]
    assert s["win_rate_ppo_vs_sft"] == pytest.approx(win_rate(judge.score(prompts, [d.response for d in ppo_s]),
                                                              judge.score(prompts, [d.response for d in sft_s])))
    # the RM accuracy is what the saved RM gives on the held-out comparisons (the first ones written)
    held = read_comparisons(out / "comparisons.jsonl")[: s["rm_comparisons_heldout"]]
    assert s["rm_accuracy_heldout"] == pytest.approx(pair_accuracy(RewardModel.load(out / "models" / "rm"), held))
    # held-out review text under rho is the perplexity its pre-training measured
    assert s["heldout_text_perplexity_sft"] == pytest.approx(s["rho_valid_perplexity"], rel=1e-4)
    assert s["kl_final"] != 0.0  # a sampled estimate: tiny and of either sign after 4 steps
    sft = load_file(str(out / "models" / "sft" / "model.safetensors"))
    ppo = load_file(str(out / "models" / "ppo" / "model.safetensors"))
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft), "PPO must move the policy away from rho"
    assert s["beta_final"] != 0.1, "the adaptive controller must have moved beta"
    for name in ("sft", "rm", "ppo", "ppo_beta0"):
        assert (tmp_path / s["models"][name] / "config.json").is_file() or (out / "models" / name / "config.json").is_file()
    # the beta = 0 run drops both regularisers: the KL penalty and the entropy bonus
    b0 = json.loads((out / "models" / "ppo_beta0" / "manifest.json").read_text())["config"]
    main_ppo = json.loads((out / "models" / "ppo" / "manifest.json").read_text())["config"]
    assert (b0["kl_coef"], b0["adaptive_kl"], b0["entropy_coef"]) == (0.0, False, 0.0)
    assert main_ppo["entropy_coef"] == 0.01 and main_ppo["adaptive_kl"] is True
    lines = (out / "samples_ppo.jsonl").read_text().splitlines()
    assert len(lines) == s["eval_prompts"] == 16
    assert set(json.loads(lines[0])) == {"prompt", "response"}
    assert len((out / "samples_sft.jsonl").read_text().splitlines()) == 16
    for png in ("ppo_overview.png", "ppo_reward.png", "ppo_gold.png", "ppo_kl.png", "ppo_kl_coef.png"):
        assert (out / png).stat().st_size > 1000
    # a second run reuses the cached reference policy; with PPO-ptx on rho's pre-training text,
    # held-out review text keeps a lower perplexity under the PPO policy
    out2 = tmp_path / "run2"
    assert main(["demo", "--quick", "--out", str(out2), "--set", "ppo.ptx_coef=1.0"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["models"]["rho_cache"] == s["models"]["rho_cache"]
    assert s2["gold_score_sft"] == pytest.approx(s["gold_score_sft"])
    assert json.loads((out2 / "models" / "ppo" / "manifest.json").read_text())["config"]["ptx_coef"] == 1.0
    assert s2["heldout_text_perplexity_ppo"] < s["heldout_text_perplexity_ppo"]


def test_demo_refuses_a_used_run_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("taken")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
