"""Reward-model training: three losses, one loop, and normalisation.

Seed 001/002 (InstructGPT, Ouyang et al. 2022, eq. 1) -- K-way ranking loss:

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid( r(x, y_w) - r(x, y_l) ) ]

    "all C(K,2) comparisons from each prompt as a single batch element": K forward passes per
    prompt, not 2 per pair (less compute, and no over-fitting from seeing a completion K-1 times).

Seed 002 (Ziegler et al. 2019, eq. 1) -- best-of-K choice b:

    loss(r) = -log( exp r(x, y_b) / sum_i exp r(x, y_i) )

Plain pairwise (one (chosen, rejected) pair per batch element, 2 forward passes per pair) is the
third option. A tie between two responses contributes the Bradley-Terry loss with target 1/2:
-1/2 [log sigmoid(d) + log sigmoid(-d)].

After training the scores are shifted so that reference (SFT) outputs score 0 on average
(InstructGPT, section 3.5), and optionally scaled to unit variance.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import ClassVar, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from rlhf.algos.sft import lr_at
from rlhf.checkpoint import Checkpointing
from rlhf.config import SEED, UNIT, Range, count
from rlhf.data import Comparison
from rlhf.distributed import Strategy, World, unwrap
from rlhf.errors import DataError
from rlhf.models import linear_head
from rlhf.runtime.threads import fit_threads

LossKind = Literal["ranking", "best_of_k", "pairwise"]


# ----------------------------------------------------------------------------------------------
# Pairs implied by a comparison
# ----------------------------------------------------------------------------------------------


def ordered_pairs(c: Comparison) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(strict pairs as (winner, loser), tied pairs) implied by a comparison."""
    if c.kind == "best_of_k":
        return [(c.best, j) for j in range(len(c.responses)) if j != c.best], []
    strict, ties = [], []
    groups = c.ranking
    for gi, g in enumerate(groups):
        for a_pos, a in enumerate(g):
            for b in g[a_pos + 1 :]:
                ties.append((a, b))
        for later in groups[gi + 1 :]:
            for w in g:
                for l in later:
                    strict.append((w, l))
    return strict, ties


def best_index(c: Comparison) -> int | None:
    """The single best response, if the comparison names one."""
    if c.kind == "best_of_k":
        return c.best
    first = c.ranking[0]
    return first[0] if len(first) == 1 else None


# ----------------------------------------------------------------------------------------------
# Losses (pure functions of scores)
# ----------------------------------------------------------------------------------------------


def pair_losses(s_w: torch.Tensor, s_l: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(s_w - s_l) for strict pairs; the target-1/2 Bradley-Terry loss for ties."""
    d = s_w - s_l
    strict = -F.logsigmoid(d)
    tied = -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    return torch.where(tie, tied, strict)


def ranking_loss(scores: torch.Tensor, win: torch.Tensor, lose: torch.Tensor, tie: torch.Tensor,
                 pair_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """InstructGPT's K-way loss: per prompt, the mean over its C(K,2) pairs; then the mean over prompts.

    ``scores`` (N,) holds one score per response of all prompts; ``win``/``lose`` (P,) index into
    it; ``pair_group`` (P,) says which prompt each pair belongs to.
    """
    per_pair = pair_losses(scores[win], scores[lose], tie)  # (P,)
    total = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, pair_group, per_pair)
    count = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(
        0, pair_group, torch.ones_like(per_pair))
    has = count > 0
    return (total[has] / count[has]).mean()


def best_of_k_loss(scores: torch.Tensor, group: torch.Tensor, best: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Ziegler et al.'s loss: cross-entropy of the chosen index over each prompt's K scores.

    ``group`` (N,) gives each response's prompt; ``best`` (G,) is the index *within N* of each
    prompt's chosen response.
    """
    # log-sum-exp per group without padding, shifted by each group's own max for stability
    gmax = torch.full((n_groups,), float("-inf"), dtype=scores.dtype, device=scores.device)
    gmax = gmax.scatter_reduce(0, group, scores.detach(), reduce="amax")
    expd = torch.exp(scores - gmax[group])
    denom = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, group, expd)
    lse = gmax + torch.log(denom)  # (G,)
    return (lse[group[best]] - scores[best]).mean()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Plain pairwise loss: mean over pairs of -log sigmoid(r_chosen - r_rejected)."""
    if tie is None:
        tie = torch.zeros_like(chosen, dtype=torch.bool)
    return pair_losses(chosen, rejected, tie).mean()


# ----------------------------------------------------------------------------------------------
# Batching comparisons
# ----------------------------------------------------------------------------------------------


@dataclass
class RMBatch:
    prompts: list[str]  # (N,) one entry per forward pass
    responses: list[str]  # (N,)
    group: torch.Tensor  # (N,) prompt index of each response
    win: torch.Tensor  # (P,)
    lose: torch.Tensor  # (P,)
    tie: torch.Tensor  # (P,) bool
    pair_group: torch.Tensor  # (P,)
    best: torch.Tensor  # (G',) index into N of each prompt's best response (prompts that have one)
    n_groups: int


def split_into_pairs(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """One two-response comparison per (winner, loser) or tied pair: the unit of the plain pairwise loss."""
    out = []
    for c in comparisons:
        strict, ties = ordered_pairs(c)
        out += [Comparison(prompt=c.prompt, responses=(c.responses[w], c.responses[l]), kind="pair",
                           ranking=((0,), (1,))) for w, l in strict]
        out += [Comparison(prompt=c.prompt, responses=(c.responses[a], c.responses[b]), kind="pair",
                           ranking=((0, 1),)) for a, b in ties]
    return out


def make_batch(comparisons: Sequence[Comparison], loss: LossKind) -> RMBatch:
    """Lay out a batch. ranking/best_of_k: K sequences per prompt; pairwise: 2 per pair."""
    prompts, responses, group, win, lose, tie, pgroup, best = [], [], [], [], [], [], [], []
    g = 0
    for c in comparisons:
        strict, ties = ordered_pairs(c)
        if loss == "pairwise":
            for (a, b), is_tie in [(p, False) for p in strict] + [(p, True) for p in ties]:
                base = len(prompts)
                prompts += [c.prompt, c.prompt]
                responses += [c.responses[a], c.responses[b]]
                group += [g, g]
                win.append(base), lose.append(base + 1), tie.append(is_tie), pgroup.append(g)
                g += 1
            continue
        base = len(prompts)
        prompts += [c.prompt] * len(c.responses)
        responses += list(c.responses)
        group += [g] * len(c.responses)
        for (a, b), is_tie in [(p, False) for p in strict] + [(p, True) for p in ties]:
            win.append(base + a), lose.append(base + b), tie.append(is_tie), pgroup.append(g)
        if loss == "best_of_k":
            b = best_index(c)
            if b is None:
                raise DataError("best_of_k loss needs a single best response per comparison (a tie at the top has none)")
            best.append(base + b)
        g += 1
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)  # noqa: E731
    return RMBatch(prompts, responses, t(group), t(win), t(lose), t(tie, torch.bool), t(pgroup), t(best), g)


def batch_loss(scores: torch.Tensor, b: RMBatch, loss: LossKind) -> torch.Tensor:
    if loss == "ranking":
        return ranking_loss(scores, b.win, b.lose, b.tie, b.pair_group, b.n_groups)
    if loss == "best_of_k":
        return best_of_k_loss(scores, b.group, b.best, b.n_groups)
    if loss == "pairwise":
        return pairwise_loss(scores[b.win], scores[b.lose], b.tie)
    raise ValueError(f"unknown reward loss {loss!r}; choose ranking, best_of_k or pairwise")


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


@dataclass
class RMTrainConfig:
    """Reward-model training hyper-parameters."""

    loss: LossKind = "ranking"  # ranking (InstructGPT), best_of_k (Ziegler et al.), pairwise
    epochs: int = 1  # InstructGPT trains its RM for a single epoch: more over-fits
    batch_size: int = 16  # comparisons (prompts) per step, over all processes; pairwise: pairs per step
    lr: float = 5e-5  # peak AdamW learning rate
    warmup_steps: int = 0  # linear warm-up steps
    min_lr_ratio: float = 1.0  # after warm-up, cosine decay towards lr * min_lr_ratio; 1.0 keeps lr constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_length: int = 128  # tokens of prompt + response; stored with the model, which then scores at this length
    normalize_unit_variance: bool = False  # also scale reference scores to unit variance
    group_by_length: bool = False  # batch comparisons of similar token length (less padding); batches stay in random order
    freeze_embeddings: bool = False  # keep the backbone's input token embeddings fixed (faster; a large share of an encoder's weights)
    seed: int = 0  # shuffling seed
    bf16: bool = False  # autocast to bfloat16 on CPU/GPU

    LIMITS: ClassVar[dict[str, Range]] = {
        "epochs": count(1, 1000), "batch_size": count(1, 65_536), "lr": Range(0, 1), "warmup_steps": count(0),
        "min_lr_ratio": UNIT, "weight_decay": UNIT, "max_length": count(2, 1_000_000), "seed": SEED}


def _scores(rm, prompts, responses, max_length: int | None, bf16: bool) -> torch.Tensor:
    """Raw scores through ``rm``'s forward: ``rm`` is a RewardModel, or one wrapped for several
    processes (DDP, FSDP2), whose hooks run only when the module itself is called."""
    device = next(rm.parameters()).device
    enc = unwrap(rm).encode(prompts, responses, max_length=max_length)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with ctx:
        return rm(enc["input_ids"].to(device), enc["attention_mask"].to(device), raw=True).float()


@torch.no_grad()
def comparison_scores(rm, comparisons: Sequence[Comparison], max_length: int | None = None, batch_size: int = 64,
                      bf16: bool = False, on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Raw (unnormalised) scores of the responses of each comparison: one (K,) tensor per comparison,
    at ``max_length`` tokens (None: the length the RM was trained at). ``on_batch`` is called with
    the number of comparisons of each batch once it is scored."""
    rm.eval()
    out: list[torch.Tensor] = []
    for i in range(0, len(comparisons), batch_size):
        chunk = comparisons[i : i + batch_size]
        b = make_batch(chunk, "ranking")
        s = _scores(rm, b.prompts, b.responses, max_length, bf16)
        out += list(torch.split(s, [len(c.responses) for c in chunk]))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def accuracy_of_scores(comparisons: Sequence[Comparison], scores: Sequence[torch.Tensor]) -> float:
    """Share of strict (winner, loser) pairs that ``scores`` order correctly (ties in score count 1/2)."""
    correct, total = 0.0, 0
    for c, s in zip(comparisons, scores, strict=True):
        strict, _ = ordered_pairs(c)
        v = s.tolist()
        for w, l in strict:
            correct += 1.0 if v[w] > v[l] else 0.5 if v[w] == v[l] else 0.0
        total += len(strict)
    if total == 0:
        raise DataError("no strict comparisons to measure accuracy on")
    return correct / total


def pair_accuracy(rm, comparisons: Sequence[Comparison], max_length: int | None = None, batch_size: int = 64,
                  bf16: bool = False) -> float:
    """Share of strict (winner, loser) pairs the RM orders correctly (ties in score count 1/2), at
    ``max_length`` tokens (None: the length the RM was trained at)."""
    return accuracy_of_scores(comparisons, comparison_scores(rm, comparisons, max_length, batch_size, bf16))


def comparison_lengths(rm, comparisons: Sequence[Comparison], max_length: int, chunk: int = 1024) -> list[int]:
    """Tokens of each comparison's longest (prompt, response) sequence, as the RM encodes it."""
    flat = [(c.prompt, r) for c in comparisons for r in c.responses]
    per_seq: list[int] = []
    for i in range(0, len(flat), chunk):
        ps, rs = zip(*flat[i : i + chunk])
        per_seq += rm.encode(list(ps), list(rs), max_length=max_length)["attention_mask"].sum(1).tolist()
    out, k = [], 0
    for c in comparisons:
        out.append(max(per_seq[k : k + len(c.responses)]))
        k += len(c.responses)
    return out


def epoch_batches(order: list[int], batch_size: int, lengths: Sequence[int] | None,
                  rng: random.Random, group: int = 50) -> list[list[int]]:
    """Cut a shuffled ``order`` into batches. With ``lengths``, each run of ``group`` batches is
    sorted by length first, so a batch pads its sequences to a similar length, and the batches
    are shuffled again; every index is still used exactly once per epoch."""
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * group
    batches = []
    for i in range(0, len(order), span):
        chunk = sorted(order[i : i + span], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_reward_model(rm, train: Sequence[Comparison], cfg: RMTrainConfig,
                       on_step: Callable[[dict], None] | None = None, *, world: World | None = None,
                       strategy: Strategy = "ddp", checkpointing: Checkpointing | None = None) -> list[dict]:
    """Train ``rm`` in place; returns one metrics dict per optimizer step.

    ``cfg.batch_size`` comparisons make a step whatever the number of processes: under torchrun
    each rank scores its share of them and the loss is the whole batch's mean
    (:mod:`rlhf.distributed`). With ``strategy`` fsdp the model stays sharded afterwards: call it
    on every rank alike. ``checkpointing``: :mod:`rlhf.checkpoint`.
    """
    if not train:
        raise DataError("no comparisons to train the reward model on")
    if cfg.loss == "pairwise":  # the unit of a batch is a pair: batch_size counts pairs
        train = split_into_pairs(train)
    rm.config.max_length = cfg.max_length  # saved with the model: it scores at the length it learned
    world = world or World()
    with frozen_embeddings(rm, cfg.freeze_embeddings):
        return _train_epochs(world.wrap(rm, strategy), train, cfg, on_step, world, checkpointing)


@contextlib.contextmanager
def frozen_embeddings(rm, freeze: bool):
    """The backbone's input token embeddings frozen inside the block when ``freeze`` (for this
    training only): their own requires_grad flag comes back afterwards."""
    emb = rm.backbone.get_input_embeddings().weight if freeze else None
    trainable = emb.requires_grad if emb is not None else True
    if emb is not None:
        emb.requires_grad_(False)
    try:
        yield
    finally:
        if emb is not None:
            emb.requires_grad_(trainable)


def loss_units(comparisons: Sequence[Comparison], loss: LossKind) -> int:
    """How many terms the batch's loss averages: pairs (pairwise), or prompts with a pair."""
    if loss == "pairwise":
        return sum(len(s) + len(t) for s, t in map(ordered_pairs, comparisons))
    if loss == "best_of_k":
        return len(comparisons)
    return sum(1 for c in comparisons if any(ordered_pairs(c)))


def _train_epochs(net, train: Sequence[Comparison], cfg: RMTrainConfig, on_step: Callable[[dict], None] | None,
                  world: World, checkpointing: Checkpointing | None) -> list[dict]:
    rm = unwrap(net)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = list(range(len(train)))
    steps_per_epoch = math.ceil(len(order) / cfg.batch_size)
    lengths = comparison_lengths(rm, train, cfg.max_length) if cfg.group_by_length else None
    history = []
    step, first_epoch, start = 0, 0, 0
    resumed = checkpointing.restore(net, opt) if checkpointing is not None else None
    if resumed is not None:  # the cursor: the epoch, its batch, and the order and RNG at its start
        step, first_epoch, start, history = resumed["step"], resumed["epoch"], resumed["position"], resumed["history"]
        order = list(resumed["epoch_order"])
        rng.setstate(resumed["epoch_rng"])
    for epoch in range(first_epoch, cfg.epochs):
        epoch_order, epoch_rng = list(order), rng.getstate()
        rng.shuffle(order)
        batches = epoch_batches(order, cfg.batch_size, lengths, rng)
        for position, batch in enumerate(batches[start:], start + 1):
            rm.train()
            fit_threads()  # as many intra-op threads as other processes leave CPUs free
            t0 = time.perf_counter()
            whole = [train[j] for j in batch]
            mine, weight = world.share_or_first(whole)
            b = make_batch(mine, cfg.loss)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps_per_epoch * cfg.epochs, cfg)
            scores = _scores(net, b.prompts, b.responses, cfg.max_length, cfg.bf16)
            # this rank's share of the whole batch's mean (rlhf.distributed)
            scale = weight * world.size * loss_units(mine, cfg.loss) / max(1, loss_units(whole, cfg.loss))
            loss = batch_loss(scores, b, cfg.loss) * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                strict = ~b.tie
                right = (scores[b.win[strict]] > scores[b.lose[strict]]).float().sum() * weight
                counts = world.sum(torch.stack([right, strict.sum().float() * weight,
                                                torch.tensor(float(b.win.numel()) * weight), loss.detach() / world.size,
                                                torch.tensor(float(len(b.prompts)) * weight)]))
            acc = (counts[0] / counts[1]).item() if counts[1] > 0 else float("nan")
            dt = time.perf_counter() - t0
            m = {"step": step, "epoch": epoch, "loss": counts[3].item(), "accuracy": acc, "lr": opt.param_groups[0]["lr"],
                 "pairs": int(counts[2]), "pairs_per_second": float(counts[2]) / dt,
                 "sequences": int(counts[4]), "total_steps": steps_per_epoch * cfg.epochs}
            history.append(m)
            if on_step:
                on_step(m)
            if checkpointing is not None:
                checkpointing.after_step(step, net, opt, lambda: (
                    {"epoch": epoch, "position": position, "epoch_order": epoch_order, "epoch_rng": epoch_rng,
                     "history": history}, {}))
        start = 0
    return history


# ----------------------------------------------------------------------------------------------
# Labeler metadata: a first training stage for the trunk
# ----------------------------------------------------------------------------------------------


def train_on_metadata(rm, prompts: Sequence[str], responses: Sequence[str], labels: torch.Tensor,
                      asked: torch.Tensor, cfg: RMTrainConfig, on_step: Callable[[dict], None] | None = None
                      ) -> list[dict]:
    """Fine-tune the RM's trunk on labelers' yes/no metadata about single responses, before the
    comparisons: InstructGPT's labelers answer such questions for every output they rank ("follows
    the explicit constraints in the instruction", Ouyang et al. 2022, table 3), and a response
    judged on its own is a denser signal than its place in a ranking.

    ``labels`` (N, Q) holds the answers (0/1) for the N (prompt, response) pairs and ``asked`` (N, Q)
    which of the Q questions apply to each. A fresh linear head over :meth:`RewardModel.pooled`
    learns them (binary cross-entropy over the asked entries) and is dropped afterwards: the trunk
    keeps what it learned, the scalar head is untouched. ``cfg``: batch_size counts responses; its
    loss and normalisation settings do not apply. One process.
    """
    n = len(prompts)
    if n == 0 or len(responses) != n:
        raise DataError(f"metadata needs one response per prompt, got {n} prompts and {len(responses)} responses")
    labels, asked = torch.as_tensor(labels, dtype=torch.float32), torch.as_tensor(asked, dtype=torch.bool)
    if labels.dim() != 2 or labels.shape[0] != n or asked.shape != labels.shape:
        raise DataError(f"labels and asked must both be ({n}, questions), got {tuple(labels.shape)} and "
                        f"{tuple(asked.shape)}")
    if not asked.any():
        raise DataError("no metadata question was asked of any response")
    if not bool(((labels == 0) | (labels == 1))[asked].all()):
        raise DataError("metadata labels must be 0 or 1")
    rm.config.max_length = cfg.max_length
    device = next(rm.parameters()).device
    head = linear_head(rm.backbone, labels.shape[1], cfg.seed).to(device)
    rng = random.Random(cfg.seed)
    lengths = None
    if cfg.group_by_length:
        lengths = rm.encode(list(prompts), list(responses), max_length=cfg.max_length)["attention_mask"].sum(1).tolist()
    total, step, history = math.ceil(n / cfg.batch_size) * cfg.epochs, 0, []
    with frozen_embeddings(rm, cfg.freeze_embeddings):
        params = [p for p in rm.backbone.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        for epoch in range(cfg.epochs):
            order = list(range(n))
            rng.shuffle(order)
            for batch in epoch_batches(order, cfg.batch_size, lengths, rng):
                rm.train()
                fit_threads()
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg)
                enc = rm.encode([prompts[j] for j in batch], [responses[j] for j in batch], max_length=cfg.max_length)
                y, m = labels[batch].to(device), asked[batch].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = head(rm.pooled(enc["input_ids"].to(device), enc["attention_mask"].to(device))).float()
                loss = F.binary_cross_entropy_with_logits(logits[m], y[m])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                with torch.no_grad():
                    acc = ((logits[m] > 0).float() == y[m]).float().mean().item()
                history.append({"step": step, "epoch": epoch, "loss": loss.item(), "accuracy": acc,
                                "lr": opt.param_groups[0]["lr"], "total_steps": total})
                if on_step:
                    on_step(history[-1])
    return history


def set_normalization(rm, reference_raw_scores: torch.Tensor, unit_variance: bool = False) -> tuple[float, float]:
    """Set the RM's (bias, gain) from raw scores of reference outputs: mean 0 (and std 1 if asked)."""
    raw = reference_raw_scores.float().flatten()
    if raw.numel() == 0:
        raise DataError("normalisation needs at least one reference response")
    rm.config.bias = float(raw.mean())
    rm.config.gain = float(1.0 / raw.std().clamp(min=1e-6)) if unit_variance and raw.numel() > 1 else 1.0
    return rm.config.bias, rm.config.gain


@torch.no_grad()
def normalize_reward_model(rm, prompts: Sequence[str], reference_responses: Sequence[str],
                           unit_variance: bool = False, max_length: int | None = None, batch_size: int = 64,
                           bf16: bool = False) -> tuple[float, float]:
    """Set the RM's (bias, gain) so reference outputs score 0 on average (and std 1 if asked)."""
    if not reference_responses:
        raise DataError("normalisation needs at least one reference response")
    rm.eval()
    raw = torch.cat([
        _scores(rm, list(prompts[i : i + batch_size]), list(reference_responses[i : i + batch_size]), max_length, bf16)
        for i in range(0, len(prompts), batch_size)
    ])
    return set_normalization(rm, raw, unit_variance)
