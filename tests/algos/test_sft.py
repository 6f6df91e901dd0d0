"""rlhf.algos.sft: packing pre-training text into blocks and the PPO-ptx text source."""

from __future__ import annotations

import copy
import time

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


def _bos_tokenizer(tok):
    """The same vocabulary with a post-processor that puts BOS before every encoding, as Llama's
    tokenizer does: text joined into one sequence must be encoded without it."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   pad_token=tok.pad_token)


def test_no_special_tokens_inside_packed_or_joined_text(tok):
    bos_tok = _bos_tokenizer(tok)
    plain = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    assert bos_tok(DOCS[0])["input_ids"] == [tok.bos_token_id] + plain  # this tokenizer does add BOS
    assert torch.equal(pack_texts(bos_tok, DOCS, 4), pack_texts(tok, DOCS, 4))
    demos = [Demonstration(d[:8], d[8:]) for d in DOCS]
    for a, b in zip(encode_demonstrations(bos_tok, demos, 32), encode_demonstrations(tok, demos, 32), strict=True):
        assert torch.equal(a, b)


def _adamw_reference(model, rows, order, cfg, steps):
    """``steps`` optimizer steps of SFT, written out: each row run on its own without padding,
    the mean NLL over the batch's loss-masked target tokens, the gradient clipped to norm 1, and
    AdamW (betas 0.9/0.95, eps 1e-8) with decoupled weight decay on matrices only, at a
    constant learning rate (no warm-up, min_lr_ratio 1). Returns the losses."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = 0.9, 0.95
    losses = []
    model.train()
    for k, batch in enumerate(order[:steps], start=1):
        nll, count = 0.0, 0
        for i in batch:
            ids, lm = rows[i]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            for t in range(1, len(ids)):
                if lm[t]:
                    nll = nll - logp[t - 1, ids[t]]
                    count += 1
        loss = nll / count
        model.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        scale = min(1.0, 1.0 / (float(norm) + 1e-6))
        with torch.no_grad():
            for j, p in enumerate(params):
                g = p.grad * scale
                p.mul_(1 - cfg.lr * (cfg.weight_decay if p.dim() >= 2 else 0.0))
                m[j].mul_(b1).add_((1 - b1) * g)
                v[j].mul_(b2).add_((1 - b2) * g * g)
                m_hat, v_hat = m[j] / (1 - b1**k), v[j] / (1 - b2**k)
                p.sub_(cfg.lr * m_hat / (v_hat.sqrt() + 1e-8))
        losses.append(loss.item())
    return losses


def test_train_lm_equals_a_loop_written_adamw_reference(tok):
    """Five rows (one left-padded) in batches of 2 for 4 steps: two epochs, each in the order of a
    permutation drawn from the seed. The weights and losses equal the written-out reference."""
    cfg = SFTConfig(max_steps=4, batch_size=2, lr=2e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1, seed=3)
    pad = tok.pad_token_id
    seqs = [tok(d, add_special_tokens=False)["input_ids"][:9] for d in DOCS] + [[5, 6, 7]]
    masks = [[0, 0] + [1] * (len(s) - 2) for s in seqs]
    T = max(len(s) for s in seqs)
    ids, attn, loss_mask = [], [], []
    for i, (s, lm) in enumerate(zip(seqs, masks)):
        fill = T - len(s)
        left = i == len(seqs) - 1  # the last row is left-padded: positions and attention must follow the mask
        ids.append([pad] * fill + s if left else s + [pad] * fill)
        attn.append([0] * fill + [1] * len(s) if left else [1] * len(s) + [0] * fill)
        loss_mask.append([0] * fill + lm if left else lm + [0] * fill)
    ids, attn, loss_mask = torch.tensor(ids), torch.tensor(attn), torch.tensor(loss_mask)
    assert attn[-1, 0] == 0 and (attn[:-1, -1] == 0).any()  # padding on both sides

    model = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tok)), seed=0)
    reference = copy.deepcopy(model)
    start = copy.deepcopy(model)
    t0 = time.perf_counter()
    hist = train_lm(model, ids, attn, loss_mask, cfg)
    elapsed = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(cfg.seed)
    order = []
    for _ in range(2):
        perm = torch.randperm(5, generator=gen).tolist()
        order += [perm[i : i + 2] for i in range(0, 5, 2)]
    want_losses = _adamw_reference(reference, list(zip(seqs, masks)), order, cfg, 4)

    assert [h["loss"] for h in hist] == pytest.approx(want_losses, rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        if name.endswith("attn.c_attn.bias"):  # the key bias has a gradient of exactly 0 in theory: Adam
            a, b = torch.cat([a[:32], a[64:]]), torch.cat([b[:32], b[64:]])  # makes float noise a full step
        # a few embedding rows see gradients near 0 too (Adam scales them up): 5e-5 leaves room for that,
        # far below what a wrong weight decay (>= 1e-4 here) or betas would change
        assert torch.allclose(a, b, atol=5e-5, rtol=0), f"{name}: {(a - b).abs().max():.2e}"
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 1e-2, "the steps must move the weights for the comparison to mean something"
    assert [set(h) for h in hist] == [{"step", "total_steps", "loss", "lr", "tokens_per_second"}] * 4
    assert [(h["step"], h["total_steps"], h["lr"]) for h in hist] == [(s, 4, 2e-2) for s in range(1, 5)]
    # each step's throughput is its tokens over a time within the whole call (no wall-clock bound)
    tokens = [int(attn[b].sum()) for b in order[:4]]
    assert all(h["tokens_per_second"] >= n / elapsed for h, n in zip(hist, tokens))
