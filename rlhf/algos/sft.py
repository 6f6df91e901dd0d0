"""Supervised fine-tuning (SFT) on demonstrations, and plain language-model pre-training.

Seed 001/002 (InstructGPT, step 1): "fine-tune GPT-3 on our labeler demonstrations using
supervised learning" -- maximise log pi(y | x) over demonstration responses y. The loss is on
response tokens only: the prompt is context, not something the policy should learn to write.

Pre-training (the demo's rho, and PPO-ptx batches) is the same loss with every token counted;
:class:`PretrainBlocks` holds the fixed-length blocks PPO-ptx samples from.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F

from rlhf.checkpoint import Checkpointing
from rlhf.config import SEED, UNIT, Range, count
from rlhf.data import Demonstration, read_texts
from rlhf.distributed import World
from rlhf.errors import DataError
from rlhf.models import position_ids_from_mask
from rlhf.runtime.threads import fit_threads


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose *target* token has loss_mask 1.

    logits (B, T, V) predict input_ids shifted by one; loss_mask (B, T) marks target tokens.
    ``n_tokens``: divide the sum by this count instead of the batch's own (a rank's share of a
    global batch divides by the whole batch's tokens, :mod:`rlhf.distributed`).
    """
    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    tgt = input_ids[:, 1:]  # (B, T-1)
    m = loss_mask[:, 1:].to(pred.dtype)  # (B, T-1)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="none").view_as(m)
    return (nll * m).sum() / (m.sum() if n_tokens is None else n_tokens).clamp(min=1.0)


def encode_demonstrations(tokenizer, demos: Sequence[Demonstration], max_length: int):
    """Right-padded ids, attention mask and loss mask (1 on response tokens and the closing EOS)."""
    ids, loss = [], []
    for d in demos:
        p = tokenizer(d.prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(d.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq, lm = (p + r)[:max_length], ([0] * len(p) + [1] * len(r))[:max_length]
        ids.append(seq), loss.append(lm)
    T = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (T - len(s)) for s in ids])
    attn = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in ids])
    loss_mask = torch.tensor([m + [0] * (T - len(m)) for m in loss])
    return input_ids, attn, loss_mask


def pack_texts(tokenizer, texts: Iterable[str], block_size: int) -> torch.Tensor:
    """Concatenate texts separated by EOS and cut into (N, block_size) blocks for pre-training."""
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // block_size
    if n == 0:
        raise DataError(f"not enough text for one block of {block_size} tokens")
    return torch.tensor(stream[: n * block_size]).view(n, block_size)  # (N, block_size)


class PretrainBlocks:
    """A pre-training text source for PPO-ptx (InstructGPT eq. 2, the gamma * E_pretrain[log pi]
    term): the documents, tokenized with the policy's tokenizer, joined by EOS and cut into
    blocks of ``block_size`` tokens; each PPO-ptx gradient step draws a batch of blocks
    uniformly, with replacement.

    ``from_file`` reads a text or JSONL file (:func:`rlhf.data.read_texts`); any other source
    (a dataset version held elsewhere, a stream) plugs in through ``from_texts`` with its
    documents.
    """

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.dtype != torch.long:
            raise DataError("pre-training blocks must be a non-empty (N, block_size) tensor of token ids")
        self.blocks = blocks  # (N, block_size)

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], block_size: int) -> "PretrainBlocks":
        return cls(pack_texts(tokenizer, texts, block_size))

    @classmethod
    def from_file(cls, tokenizer, path: str | Path, block_size: int) -> "PretrainBlocks":
        return cls.from_texts(tokenizer, read_texts(path), block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` blocks drawn uniformly with replacement: (n, block_size)."""
        return self.blocks[torch.randint(0, len(self), (n,), generator=generator)]


@dataclass
class SFTConfig:
    """Language-model training hyper-parameters (AdamW, warm-up then cosine decay)."""

    epochs: float = 1.0  # may be fractional; max_steps wins when set
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 16  # sequences per step, over all processes (each takes its share)
    lr: float = 1e-4  # peak learning rate (AdamW, betas 0.9/0.95)
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on biases and norms)
    max_length: int = 256  # tokens per sequence; longer ones are cut
    bf16: bool = False  # autocast to bfloat16 (fast on CPUs with AVX-512 BF16 or AMX)
    seed: int = 0  # shuffling seed

    LIMITS: ClassVar[dict[str, Range]] = {
        "epochs": Range(0, 10_000, lo_open=True), "max_steps": count(), "batch_size": count(1, 65_536),
        "lr": Range(0, 1), "min_lr_ratio": UNIT, "warmup_steps": count(0), "weight_decay": UNIT,
        "max_length": count(2, 1_000_000), "seed": SEED}

    def total_steps(self, rows: int) -> int:
        """Optimizer steps of a run over ``rows`` training rows: ``max_steps`` when set, else
        ``epochs`` x the steps of one epoch (at least one)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, int(self.epochs * math.ceil(rows / self.batch_size)))
def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``cfg.warmup_steps``, then cosine decay from ``cfg.lr`` to ``cfg.lr * cfg.min_lr_ratio``.
    Shared by SFT and reward-model training (any config with those three fields)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_lm(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
             cfg: SFTConfig, on_step: Callable[[dict], None] | None = None, *, world: World | None = None,
             checkpointing: Checkpointing | None = None) -> list[dict]:
    """Train ``model`` in place on rows of (input_ids, attention_mask, loss_mask).

    ``cfg.batch_size`` rows make a step whatever the number of processes: under torchrun
    ``model`` is wrapped (DDP or FSDP2) and each rank trains on its share of the step's rows
    (:mod:`rlhf.distributed`). ``checkpointing`` resumes from and writes checkpoints
    (:mod:`rlhf.checkpoint`); the data cursor is the epoch, the position in it and the shuffling
    generator's state at the epoch's start.
    """
    world = world or World()
    N = input_ids.shape[0]
    if N == 0:
        raise DataError("no training examples")
    total = cfg.total_steps(N)
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    random.seed(cfg.seed)
    history, step, epoch, start = [], 0, 0, 0
    resumed = checkpointing.restore(model, opt) if checkpointing is not None else None
    if resumed is not None:
        step, epoch, start, history = resumed["step"], resumed["epoch"], resumed["position"], resumed["history"]
        gen.set_state(resumed["epoch_generator"])
    model.train()
    while step < total:
        epoch_generator = gen.get_state()  # the cursor: this state, the epoch and the position in it
        perm = torch.randperm(N, generator=gen)
        for i in range(start, N, cfg.batch_size):
            if step >= total:
                break
            fit_threads()  # as many intra-op threads as other processes leave CPUs free
            t0 = time.perf_counter()
            rows, weight = world.share_or_first(perm[i : i + cfg.batch_size].tolist())
            idx = torch.tensor(rows)
            ids, am, lm = input_ids[idx].to(device), attention_mask[idx].to(device), loss_mask[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            n_tokens = world.sum(lm[:, 1:].sum().to(torch.float32) * weight)  # target tokens of the whole step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
            loss = sft_loss(logits, ids, lm, n_tokens) * (weight * world.size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_value = world.sum(loss.detach() / world.size).item()  # the whole step's mean
            dt = time.perf_counter() - t0
            m = {"step": step, "total_steps": total, "loss": loss_value, "lr": opt.param_groups[0]["lr"],
                 "tokens_per_second": int(world.sum(am.sum() * int(weight))) / dt}
            history.append(m)
            if on_step:
                on_step(m)
            if checkpointing is not None:
                position = i + cfg.batch_size
                checkpointing.after_step(step, model, opt, lambda: (
                    {"epoch": epoch, "position": position, "epoch_generator": epoch_generator, "history": history}, {}))
        start, epoch = 0, epoch + 1
    model.eval()
    return history


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
               batch_size: int = 32) -> float:
    """exp of the mean per-token NLL over loss-masked target tokens."""
    model.eval()
    device = next(model.parameters()).device
    tot, cnt = 0.0, 0.0
    for i in range(0, input_ids.shape[0], batch_size):
        ids, am, lm = (t[i : i + batch_size].to(device) for t in (input_ids, attention_mask, loss_mask))
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
        n = lm[:, 1:].sum().item()
        tot += sft_loss(logits, ids, lm).item() * n
        cnt += n
    return math.exp(tot / max(cnt, 1.0))
