"""`rlhf demo --model smollm2 --quick` end to end on the real model: every stage runs, LoRA PPO
moves the policy, and the summary holds both splits under the small demo's keys; a model whose
answers all score the same is refused with a clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main
from rlhf.constraints import Constraint, Task
from rlhf.instruct_demo import prefers_more_met
from rlhf.model_import import resolve_source
from tests.llama_helpers import llama_dir

pytest.importorskip("peft")


@pytest.mark.slow
def test_a_model_whose_answers_cannot_be_ranked_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    src = llama_dir(tmp_path / "random-llama")  # random weights: byte salad, every answer scores 0
    assert main(["demo", "--model", str(src), "--quick", "--out", str(tmp_path / "run")]) == 2
    assert "the model cannot do the task" in capsys.readouterr().err


@pytest.mark.slow
def test_instruct_demo_quick_on_smollm2(tmp_path, monkeypatch):
    try:
        src = resolve_source("smollm2").path
    except Exception as e:  # noqa: BLE001 - the package is optional
        pytest.skip(str(e))
    # the imported model is cached under RLHF_TEST_MODEL_CACHE when set (else this run's tmp dir)
    monkeypatch.setenv("RLHF_CACHE_DIR", os.environ.get("RLHF_TEST_MODEL_CACHE") or str(tmp_path / "cache"))
    out = tmp_path / "run"
    # with the labelers' metadata stage of the RM (a trial, off by default), so that it runs end to end
    assert main(["demo", "--model", "smollm2", "--quick", "--out", str(out), "--set", "rm_metadata=true"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for name in ("base", "sft", "ppo", "ppo_beta0"):
        for key in ("gold_score", "constraint_rate", "relevance_fluency", "proxy_reward", "distinct2",
                    "perplexity_under_sft"):
            assert f"{key}_{name}" in s and f"{key}_{name}" in s["validation"], (key, name)
    assert s["split_reported"] == "test" and s["eval_prompts"] == {"validation": 4, "test": 4}
    assert s["finetune"] == "lora" and s["ppo_steps"] == 2 and s["ppo_beta0_steps"] == 2
    assert 0 <= s["win_rate_ppo_vs_sft"] <= 1 and s["kl_to_sft_ppo"] != 0.0
    assert set(s["stage_seconds"]) == {"import_and_load", "judge", "sft", "sample_for_labels", "reward_model", "ppo",
                                       "ppo_beta0", "evaluate"}
    # every labeled prompt is a comparison; those whose answers all tie by the gold score order nothing
    # and train nothing, the rest are split into RM training and held-out comparisons
    assert s["rm_comparisons_train"] + s["rm_comparisons_heldout"] + s["rm_comparisons_all_tied"] == s["label_prompts"]
    records = [json.loads(x) for x in (out / "comparisons.jsonl").read_text().splitlines()]
    assert len(records) == s["label_prompts"] and s["rm_pairs_train"] >= s["rm_comparisons_train"]
    # the RM's trunk first learned the labelers' metadata (constraints followed) on every answer
    # outside the held-out comparisons, one mark per constraint of the prompt
    assert s["rm_metadata"] and s["rm_metadata_answers"] == 4 * (s["label_prompts"] - s["rm_comparisons_heldout"])
    assert s["rm_metadata_answers"] <= s["rm_metadata_marks"] <= 2 * s["rm_metadata_answers"]
    for key in ("rm_prefers_more_constraints_met_heldout", "labels_prefer_more_constraints_met"):
        assert s[key] is None or 0 <= s[key] <= 1, key
    # the test split never feeds labels or PPO: its prompts are not among the comparisons
    tasks = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    test_prompts = {t["prompt"] for t in tasks if t["split"] == "test"}
    labeled = {json.loads(x)["prompt"] for x in (out / "comparisons.jsonl").read_text().splitlines()}
    assert labeled and not labeled & test_prompts
    samples = [json.loads(x) for x in (out / "samples_ppo.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(x["prompt"] in test_prompts for x in samples)
    assert (out / "samples_ppo_validation.jsonl").is_file() and (out / "ppo_overview.png").is_file()
    # LoRA PPO changed the weights, and the saved policy is a plain model (adapters folded in)
    ppo = load_file(str(out / "models" / "ppo" / "model.safetensors"))
    base = load_file(str(s["models"]["sft"] + "/model.safetensors"))
    assert not any("lora" in k for k in ppo) and any(not torch.equal(base[k].to(ppo[k].dtype), ppo[k]) for k in base)
    # rho is the SFT policy (the base with the SFT adapters folded in), trained on demonstrations of
    # train prompts only
    assert s["sft"] and s["models"]["sft"] == str(out / "models" / "sft") and s["sft_demonstrations"] >= 4
    assert s["models"]["base"] != s["models"]["sft"] and 0 <= s["win_rate_sft_vs_base"] <= 1
    demos = [json.loads(x) for x in (out / "demonstrations.jsonl").read_text().splitlines()]
    train_chat = {t["prompt"] for t in tasks if t["split"] == "train"}
    assert len(demos) == s["sft_demonstrations"] and all(any(p in d["prompt"] for p in train_chat) for d in demos[:20])
    assert src.suffix == ".gguf" and json.loads((out / "config.json").read_text())["model"] == "smollm2"


def test_prefers_more_met_counts_the_pairs_that_differ_in_constraints_met():
    t = Task("a", "t", "Describe tea.", "", (Constraint("include_word", "leaf"), Constraint("no_commas")))
    answers = ["A leaf.", "A leaf, dried.", "Hot, wet."]  # 2, 1 and 0 constraints met
    # pairs that differ: (0 > 1), (0 > 2), (1 > 2); these scores order the first two right and tie the third
    assert prefers_more_met([t], [answers], [[3.0, 1.0, 1.0]]) == pytest.approx(2.5 / 3)
    assert prefers_more_met([t], [answers], [[0.0, 1.0, 2.0]]) == 0.0
    assert prefers_more_met([t, t], [answers, ["A leaf.", "Leaf."]], [[3, 2, 1], [0, 5]]) == 1.0  # the second: equal
    assert prefers_more_met([t], [["Hot, wet.", "Cold, dry."]], [[1.0, 0.0]]) is None  # no pair differs
    with pytest.raises(ValueError):
        prefers_more_met([t], [answers], [])  # every group needs its scores
