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
