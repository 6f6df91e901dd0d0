"""rlhf.algos.sft: packing pre-training text into blocks and the PPO-ptx text source."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos.sft import PretrainBlocks, pack_texts
from rlhf.data import write_jsonl
from rlhf.errors import DataError
from rlhf.models import train_tokenizer

DOCS = ["the cat sat on the mat", "a dog ran in the park", "rain fell all day long", "the sea was calm"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=280)


def test_pack_texts_joins_documents_with_eos_and_cuts_blocks(tok):
    stream = []
    for d in DOCS:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = pack_texts(tok, DOCS, 5)
    assert blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # the tail shorter than a block is dropped
    with pytest.raises(DataError, match="one block"):
        pack_texts(tok, ["cat"], 64)


def test_pretrain_blocks_from_a_file_and_from_any_texts(tok, tmp_path):
    f = tmp_path / "pretrain.txt"
    f.write_text("\n\n".join(DOCS) + "\n")
    from_file = PretrainBlocks.from_file(tok, f, 4)
    assert torch.equal(from_file.blocks, pack_texts(tok, DOCS, 4))
    jl = tmp_path / "pretrain.jsonl"
    write_jsonl(jl, [{"text": d} for d in DOCS])
    assert torch.equal(PretrainBlocks.from_file(tok, jl, 4).blocks, from_file.blocks)
    # any other source (e.g. a dataset held elsewhere) hands over its documents
    assert torch.equal(PretrainBlocks.from_texts(tok, iter(DOCS), 4).blocks, from_file.blocks)
    assert len(from_file) == from_file.blocks.shape[0]


def test_pretrain_blocks_sample_uniformly_with_replacement(tok):
    blocks = PretrainBlocks(torch.arange(12).view(4, 3))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([blocks.sample(50, g) for _ in range(80)])  # (4000, 3)
    assert draws.shape == (4000, 3)
    first = draws[:, 0]
    assert set(first.tolist()) == {0, 3, 6, 9} and torch.equal(draws[:, 1], first + 1)  # whole rows
    counts = torch.bincount(first // 3, minlength=4).float() / len(first)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.03)
    a, b = (blocks.sample(8, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    for bad in (torch.zeros(0, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(2, 3)):
        with pytest.raises(DataError):
            PretrainBlocks(bad)


# ----------------------------------------------------------------------------------------------
# The SFT / pre-training loss, demonstrations, the training loop and perplexity
# ----------------------------------------------------------------------------------------------

import math  # noqa: E402

from rlhf.algos.sft import SFTConfig, encode_demonstrations, lr_at, perplexity, sft_loss, train_lm  # noqa: E402
from rlhf.data import Demonstration  # noqa: E402
from rlhf.models import TinyLMConfig, build_tiny_lm  # noqa: E402


def test_sft_loss_by_hand():
    # one row, 3 positions, V = 2; position t predicts token t+1; the mask marks target tokens
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    ids = torch.tensor([[0, 1, 0]])
    both = sft_loss(logits, ids, torch.tensor([[0, 1, 1]]))  # targets 1 (p 0.5) and 0 (p 0.9)
    assert both.item() == pytest.approx(-(math.log(0.5) + math.log(0.9)) / 2, rel=1e-6)
    last = sft_loss(logits, ids, torch.tensor([[1, 0, 1]]))  # only the target at position 2
    assert last.item() == pytest.approx(-math.log(0.9), rel=1e-6)
    assert sft_loss(logits, ids, torch.zeros(1, 3, dtype=torch.long)).item() == 0.0  # nothing to learn


def test_encode_demonstrations_masks_the_prompt_and_keeps_the_eos(tok):
    demos = [Demonstration("the cat", " sat on the mat"), Demonstration("rain", " fell")]
    ids, attn, loss = encode_demonstrations(tok, demos, max_length=64)
    for i, d in enumerate(demos):
        p = tok(d.prompt, add_special_tokens=False)["input_ids"]
        r = tok(d.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(r)
        assert ids[i, :n].tolist() == p + r and (ids[i, n:] == tok.pad_token_id).all()
        assert attn[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        assert loss[i].tolist() == [0] * len(p) + [1] * len(r) + [0] * (ids.shape[1] - n)
    short_ids, _, short_loss = encode_demonstrations(tok, demos, max_length=3)
    assert short_ids.shape == (2, 3) and short_ids[0].tolist() == ids[0, :3].tolist()
    assert short_loss[0].tolist() == loss[0, :3].tolist()


def test_lr_schedule_by_hand():
    cfg = SFTConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, 6, cfg) for s in range(2)] == [0.5, 1.0]  # linear warm-up
    # cosine from 1.0 to 0.1 over the 4 steps after warm-up
    assert [lr_at(s, 6, cfg) for s in range(2, 6)] == pytest.approx(
        [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f / 4)) for f in range(4)])
    assert lr_at(50, 6, cfg) == pytest.approx(0.1)  # past the end: the floor


def test_train_lm_learns_and_perplexity_is_exp_mean_nll(tok):
    torch.manual_seed(0)
    model = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tok)), seed=0)
    ids, attn, loss = encode_demonstrations(tok, [Demonstration(d[:8], d[8:]) for d in DOCS], max_length=32)
    before = perplexity(model, ids, attn, loss)
    cfg = SFTConfig(max_steps=30, batch_size=2, lr=1e-2, warmup_steps=3, weight_decay=0.0)
    seen = []
    hist = train_lm(model, ids, attn, loss, cfg, seen.append)
    assert len(hist) == 30 and seen == hist and [h["step"] for h in hist] == list(range(1, 31))
    assert hist[0]["lr"] == pytest.approx(lr_at(0, 30, cfg)) and hist[-1]["lr"] == pytest.approx(lr_at(29, 30, cfg))
    assert not model.training  # left in eval mode
    after = perplexity(model, ids, attn, loss, batch_size=3)
    assert after < before / 4, (before, after)
    # perplexity = exp of the mean NLL over every target token, whatever the batching
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = loss[:, 1:].bool()
    assert after == pytest.approx(math.exp(-lp[m].mean().item()), rel=1e-4)
    assert perplexity(model, ids, attn, loss, batch_size=1) == pytest.approx(after, rel=1e-5)
    with pytest.raises(DataError, match="no training examples"):
        train_lm(model, ids[:0], attn[:0], loss[:0], cfg)


def test_train_lm_epochs_set_the_number_of_steps(tok):
    model = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tok)), seed=0)
    ids, attn, loss = encode_demonstrations(tok, [Demonstration(d[:8], d[8:]) for d in DOCS], max_length=32)
    assert len(train_lm(model, ids, attn, loss, SFTConfig(epochs=2.0, batch_size=3))) == 4  # 2 x ceil(4 / 3)
    assert len(train_lm(model, ids, attn, loss, SFTConfig(epochs=0.1, batch_size=3))) == 1  # at least one
