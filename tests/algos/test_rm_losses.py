"""Reward-model losses, batching, training and normalisation (rlhf.algos.rm) against explicit
pair enumeration and hand numbers."""

from __future__ import annotations

import math
import random
import statistics
import time
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from rlhf.algos.rm import (
    RMTrainConfig,
    accuracy_of_scores,
    batch_loss,
    best_of_k_loss,
    comparison_lengths,
    comparison_scores,
    epoch_batches,
    make_batch,
    normalize_reward_model,
    ordered_pairs,
    pair_accuracy,
    pairwise_loss,
    ranking_loss,
    set_normalization,
    train_on_metadata,
    train_reward_model,
)
from rlhf.data import Comparison
from rlhf.errors import DataError
from rlhf.models import RewardModel, TinyLMConfig, build_tiny_lm, train_tokenizer

torch.set_num_threads(1)


def log_sigmoid(d: float) -> float:
    return -math.log1p(math.exp(-d)) if d >= 0 else d - math.log1p(math.exp(d))


C4 = Comparison(prompt="p4", responses=("a0", "a1", "a2", "a3"), kind="ranking", ranking=((2,), (0,), (3,), (1,)))
C3 = Comparison(prompt="p3", responses=("b0", "b1", "b2"), kind="ranking", ranking=((1,), (2,), (0,)))


def explicit_ranking_loss(order_scores: list[list[float]]) -> float:
    """order_scores[g]: the scores of prompt g listed best first (no ties)."""
    per_prompt = []
    for s in order_scores:
        K = len(s)
        pairs = list(combinations(range(K), 2))  # (i, j) with i ranked above j
        assert len(pairs) == math.comb(K, 2)
        per_prompt.append(-sum(log_sigmoid(s[i] - s[j]) for i, j in pairs) / math.comb(K, 2))
    return sum(per_prompt) / len(per_prompt)


def test_ranking_loss_equals_explicit_pair_enumeration():
    b = make_batch([C4, C3], "ranking")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, generator=g, dtype=torch.float64) * 2
    s = scores.tolist()
    # prompt 0 occupies rows 0..3, prompt 1 rows 4..6; list each prompt's scores best first
    best_first = [[s[0 + i] for i in (2, 0, 3, 1)], [s[4 + i] for i in (1, 2, 0)]]
    got = ranking_loss(scores, b.win, b.lose, b.tie, b.pair_group, b.n_groups).item()
    assert got == pytest.approx(explicit_ranking_loss(best_first), rel=1e-10)
    assert batch_loss(scores, b, "ranking").item() == pytest.approx(got, rel=1e-12)


def test_ranking_loss_hand_number():
    # K=2, one prompt: -log sigmoid(1) = log(1 + e^-1)
    c = Comparison(prompt="p", responses=("x", "y"), kind="ranking", ranking=((1,), (0,)))
    b = make_batch([c], "ranking")
    got = batch_loss(torch.tensor([0.0, 1.0]), b, "ranking").item()
    assert got == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_ranking_loss_with_ties():
    c = Comparison(prompt="p", responses=("x", "y", "z"), kind="ranking", ranking=((0,), (1, 2)))
    b = make_batch([c], "ranking")
    s = [0.7, -0.4, 1.3]
    loss = batch_loss(torch.tensor(s, dtype=torch.float64), b, "ranking").item()
    strict = -log_sigmoid(s[0] - s[1]) - log_sigmoid(s[0] - s[2])
    d = s[1] - s[2]
    tied = -0.5 * (log_sigmoid(d) + log_sigmoid(-d))
    assert loss == pytest.approx((strict + tied) / 3, rel=1e-10)
    assert b.tie.tolist().count(True) == 1


def test_ordered_pairs_of_a_best_of_k_choice():
    c = Comparison(prompt="q", responses=("c0", "c1", "c2"), kind="best_of_k", best=1)
    assert ordered_pairs(c) == ([(1, 0), (1, 2)], [])  # the chosen one over each other one
    assert accuracy_of_scores([c], [torch.tensor([0.0, 1.0, 2.0])]) == 0.5


def test_ranking_loss_leaves_out_a_prompt_without_pairs():
    # three prompts laid out, pairs only for prompts 0 and 2: the mean is over those two prompts
    scores = torch.tensor([1.0, 0.0, 5.0, 2.0, -1.0], dtype=torch.float64)
    loss = ranking_loss(scores, torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([False, False]),
                        torch.tensor([0, 2]), 3)
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(3.0)) / 2, rel=1e-10)


def test_make_batch_layouts():
    r = make_batch([C4, C3], "ranking")
    assert r.prompts == ["p4"] * 4 + ["p3"] * 3  # K sequences per prompt, not 2 per pair
    assert r.responses == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert r.group.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert r.n_groups == 2
    assert len(r.win) == 6 + 3
    pairs = sorted(zip(r.win.tolist(), r.lose.tolist(), r.pair_group.tolist()))
    order4, order3 = [2, 0, 3, 1], [1, 2, 0]
    expected = [(order4[i], order4[j], 0) for i, j in combinations(range(4), 2)]
    expected += [(4 + order3[i], 4 + order3[j], 1) for i, j in combinations(range(3), 2)]
    assert pairs == sorted(expected)

    p = make_batch([C4, C3], "pairwise")
    assert len(p.prompts) == 2 * (6 + 3)  # 2 sequences per pair
    assert p.n_groups == 9
    assert p.win.tolist() == list(range(0, 18, 2)) and p.lose.tolist() == list(range(1, 18, 2))
    assert p.group.tolist() == [g for g in range(9) for _ in range(2)]  # each pair is its own group
    got = sorted(zip(p.prompts[0::2], p.responses[0::2], p.responses[1::2]))
    want = sorted([("p4", f"a{order4[i]}", f"a{order4[j]}") for i, j in combinations(range(4), 2)]
                  + [("p3", f"b{order3[i]}", f"b{order3[j]}") for i, j in combinations(range(3), 2)])
    assert got == want

    k = make_batch([C4, Comparison(prompt="q", responses=("c0", "c1", "c2"), kind="best_of_k", best=2)], "best_of_k")
    assert len(k.prompts) == 7
    assert k.best.tolist() == [2, 4 + 2]


def test_best_of_k_loss_equals_cross_entropy():
    cs = [C4, C3, Comparison(prompt="q", responses=("c0", "c1", "c2", "c3", "c4"), kind="best_of_k", best=3)]
    b = make_batch(cs, "best_of_k")
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, generator=g, dtype=torch.float64) * 3
    got = best_of_k_loss(scores, b.group, b.best, b.n_groups).item()
    spans, best = [(0, 4), (4, 7), (7, 12)], [2, 1, 3]
    ce = [F.cross_entropy(scores[a:z].unsqueeze(0), torch.tensor([t])).item() for (a, z), t in zip(spans, best)]
    assert got == pytest.approx(sum(ce) / 3, rel=1e-10)
    assert batch_loss(scores, b, "best_of_k").item() == pytest.approx(got, rel=1e-12)


def test_best_of_k_hand_number():
    # scores (0, ln 3) best=1: -log(3 / (1 + 3)) = log(4/3)
    b = make_batch([Comparison(prompt="p", responses=("x", "y"), kind="best_of_k", best=1)], "best_of_k")
    assert best_of_k_loss(torch.tensor([0.0, math.log(3)]), b.group, b.best, b.n_groups).item() == pytest.approx(
        math.log(4 / 3), rel=1e-6)


def test_best_of_k_loss_is_stable_across_prompts_with_different_scales():
    b = make_batch([Comparison(prompt="p", responses=("x", "y"), kind="best_of_k", best=1),
                    Comparison(prompt="q", responses=("x", "y"), kind="best_of_k", best=0)], "best_of_k")
    scores = torch.tensor([0.0, 1.0, -200.0, -201.0])
    expected = (F.cross_entropy(scores[:2].unsqueeze(0), torch.tensor([1]))
                + F.cross_entropy(scores[2:].unsqueeze(0), torch.tensor([0]))).item() / 2
    got = best_of_k_loss(scores, b.group, b.best, b.n_groups).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_pairwise_loss_hand_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132616875 ; -log sigmoid(0) = log 2 = 0.6931471806
    assert pairwise_loss(chosen, rejected).item() == pytest.approx((0.3132616875 + 0.6931471806) / 2, rel=1e-6)
    # a tie with d = 2: -1/2 [log sigmoid(2) + log sigmoid(-2)] = 1/2 [log(1+e^-2) + log(1+e^2)] = 1.1269280110
    tie = pairwise_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([True])).item()
    assert tie == pytest.approx(1.1269280110, rel=1e-6)
    # a tie is symmetric in the two scores
    assert pairwise_loss(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([True])).item() == pytest.approx(tie)


def test_pairwise_batch_loss_uses_ties():
    pair_tie = Comparison(prompt="p", responses=("x", "y"), kind="pair", ranking=((0, 1),))
    pair = Comparison(prompt="p", responses=("x", "y"), kind="pair", ranking=((0,), (1,)))
    b = make_batch([pair, pair_tie], "pairwise")
    assert b.tie.tolist() == [False, True]
    scores = torch.tensor([1.0, -1.0, 1.0, -1.0])
    expected = (-log_sigmoid(2.0) + 1.1269280110) / 2
    assert batch_loss(scores, b, "pairwise").item() == pytest.approx(expected, rel=1e-6)


def test_best_of_k_with_a_tie_at_the_top_raises():
    with pytest.raises(DataError):
        make_batch([Comparison(prompt="p", responses=("x", "y", "z"), kind="ranking", ranking=((0, 1), (2,)))],
                   "best_of_k")
    with pytest.raises(DataError):
        make_batch([Comparison(prompt="p", responses=("x", "y"), kind="pair", ranking=((0, 1),))], "best_of_k")


def test_unknown_loss_kind():
    b = make_batch([C3], "ranking")
    with pytest.raises(ValueError):
        batch_loss(torch.zeros(3), b, "hinge")


# ----------------------------------------------------------------------------------------------
# Training a tiny causal reward model
# ----------------------------------------------------------------------------------------------

SUBJECTS = ["cats", "dogs", "the sea", "rain", "music", "bread", "trains", "winter", "books", "coffee", "apples",
            "the moon"]
ADJS = ["good", "bad", "boring", "odd", "fine", "late"]


def _comparisons(rng: random.Random, n_per_subject: int) -> list[Comparison]:
    out = []
    for s in SUBJECTS:
        for _ in range(n_per_subject):
            adjs = ["good"] + rng.sample(ADJS[1:], 2)
            perm = [0, 1, 2]
            rng.shuffle(perm)
            responses = [f" It is {adjs[i]}." for i in perm]
            good = perm.index(0)
            out.append(Comparison(prompt=f"Tell me about {s}.", responses=responses, kind="ranking",
                                  ranking=((good,), tuple(i for i in range(3) if i != good))))
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"Tell me about {s}. It is {a}." for s in SUBJECTS for a in ADJS], vocab_size=300)


def _rm(tok):
    lm = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)
    torch.manual_seed(0)
    return RewardModel.from_causal_lm(lm, tok)


@pytest.fixture(scope="module")
def trained(tok):
    rm = _rm(tok)
    rng = random.Random(0)
    train, held = _comparisons(rng, 20), _comparisons(rng, 2)
    before = pair_accuracy(rm, held)
    hist = train_reward_model(rm, train, RMTrainConfig(batch_size=8, lr=3e-3, epochs=1, max_length=32))
    return rm, before, hist, held


def test_training_improves_pair_accuracy(trained):
    rm, before, hist, held = trained
    assert len(hist) == 30  # 240 comparisons / 8
    assert {"loss", "accuracy", "pairs", "sequences"} <= set(hist[0])
    assert hist[0]["sequences"] == 8 * 3 and hist[0]["pairs"] == 8 * 3
    after = pair_accuracy(rm, held)
    assert after > 0.8, (before, after)
    assert after > before
    assert statistics.mean(h["loss"] for h in hist[-5:]) < statistics.mean(h["loss"] for h in hist[:5])


def test_rm_learning_rate_schedule(trained, tok):
    _, _, hist, _ = trained
    assert {h["lr"] for h in hist} == {3e-3}  # the default: constant
    rm = _rm(tok)
    train = _comparisons(random.Random(1), 2)[:12]  # 3 steps of 4
    cfg = RMTrainConfig(batch_size=4, lr=1e-3, epochs=2, warmup_steps=2, min_lr_ratio=0.1, max_length=32)
    lrs = [h["lr"] for h in train_reward_model(rm, train, cfg)]
    # 6 steps: warm-up 0.5e-3, 1e-3, then cosine from 1e-3 to 1e-4 over the 4 steps left
    cos = [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * f / 4)) for f in range(4)]
    assert lrs == pytest.approx([0.5e-3, 1e-3, *cos])


def test_normalize_reward_model(trained, tok):
    rm, _, _, held = trained
    prompts = [c.prompt for c in held for _ in c.responses]
    responses = [r for c in held for r in c.responses]
    bias, gain = normalize_reward_model(rm, prompts, responses)
    assert gain == 1.0
    s = rm.score(prompts, responses).tolist()
    assert statistics.mean(s) == pytest.approx(0.0, abs=1e-4)
    _, gain = normalize_reward_model(rm, prompts, responses, unit_variance=True)
    s = rm.score(prompts, responses).tolist()
    assert statistics.mean(s) == pytest.approx(0.0, abs=1e-4)
    assert statistics.stdev(s) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(DataError):
        normalize_reward_model(rm, [], [])


def test_accuracy_of_scores_by_hand():
    # C4 ranks 2 > 0 > 3 > 1: six strict pairs. These scores order 2>0, 2>3, 2>1 and 3>1 right,
    # 0 vs 1 as a tie in score (1/2), and 0 vs 3 wrong: 4.5 / 6
    s4 = torch.tensor([1.0, 1.0, 2.0, 1.5])
    # C3 ranks 1 > 2 > 0: all three right
    s3 = torch.tensor([0.0, 2.0, 1.0])
    assert accuracy_of_scores([C4, C3], [s4, s3]) == pytest.approx((4.5 + 3) / 9)
    tie_only = Comparison(prompt="t", responses=("x", "y"), kind="ranking", ranking=((0, 1),))
    assert accuracy_of_scores([C3, tie_only], [s3, torch.tensor([0.0, 1.0])]) == 1.0  # ties are not counted
    with pytest.raises(DataError):
        accuracy_of_scores([tie_only], [torch.tensor([0.0, 1.0])])


def test_accuracy_of_scores_wrong_orders_count_zero_and_every_comparison_needs_its_scores():
    # C4 ranks 2 > 0 > 3 > 1; these scores order all six pairs wrongly except 3 vs 1, a tie: 0.5 / 6
    s4 = torch.tensor([1.0, 3.0, 0.0, 3.0])
    assert accuracy_of_scores([C4], [s4]) == pytest.approx(0.5 / 6)
    with pytest.raises(ValueError):  # one score tensor short: no silent truncation
        accuracy_of_scores([C4, C3], [s4])


def test_comparison_scores_are_the_raw_scores_and_give_pair_accuracy(trained):
    rm, _, _, held = trained
    seen = []
    scores = comparison_scores(rm, held, batch_size=3, on_batch=seen.append)  # batches that split them unevenly
    assert [len(s) for s in scores] == [len(c.responses) for c in held]
    assert sum(seen) == len(held) and max(seen) == 3
    enc = rm.encode([c.prompt for c in held for _ in c.responses], [r for c in held for r in c.responses])
    with torch.no_grad():
        raw = rm.raw_scores(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(torch.cat(scores), raw, atol=1e-5)
    assert accuracy_of_scores(held, scores) == pytest.approx(pair_accuracy(rm, held))


def test_set_normalization_from_scores(trained):
    rm, _, _, _ = trained
    old = rm.config.bias, rm.config.gain
    try:
        assert set_normalization(rm, torch.tensor([1.0, 2.0, 3.0])) == (2.0, 1.0)
        bias, gain = set_normalization(rm, torch.tensor([1.0, 3.0]), unit_variance=True)
        assert (bias, gain) == pytest.approx((2.0, 1 / math.sqrt(2)))
        with pytest.raises(DataError):
            set_normalization(rm, torch.zeros(0))
    finally:
        rm.config.bias, rm.config.gain = old


def test_reward_model_save_load_round_trip(trained, tmp_path):
    rm, _, _, held = trained
    rm.config.bias, rm.config.gain = 0.25, 2.0
    prompts = [c.prompt for c in held[:4] for _ in c.responses]
    responses = [r for c in held[:4] for r in c.responses]
    before = rm.score(prompts, responses)
    rm.save(tmp_path / "rm", manifest={"kind": "reward-model"})
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.config.backbone == "causal"
    assert (loaded.config.bias, loaded.config.gain) == (0.25, 2.0)
    after = loaded.score(prompts, responses)
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()
    # the normalisation is applied: score = (raw - bias) * gain
    enc = loaded.encode(prompts, responses)
    with torch.no_grad():
        raw = loaded.raw_scores(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(after, (raw - 0.25) * 2.0, atol=1e-6)


def test_set_normalization_defaults_to_the_mean_only_and_scales_a_small_spread(tok):
    rm = _rm(tok)
    assert set_normalization(rm, torch.tensor([0.0, 0.02])) == pytest.approx((0.01, 1.0))
    # std of (0, 0.02) is 0.02 / sqrt(2): unit variance scales it up by about 70
    _, gain = set_normalization(rm, torch.tensor([0.0, 0.02]), unit_variance=True)
    assert gain == pytest.approx(math.sqrt(2) / 0.02, rel=1e-5)
    # one reference score has no spread to scale: the gain stays 1
    assert set_normalization(rm, torch.tensor([0.3]), unit_variance=True) == pytest.approx((0.3, 1.0))


def test_comparison_lengths_are_each_comparisons_longest_sequence_within_the_cap(tok):
    rm = _rm(tok)
    long_prompt = " ".join(f"Tell me about {s}." for s in SUBJECTS)  # longer than the cap on its own
    comps = _comparisons(random.Random(2), 30)  # 360 rankings of K = 3: over 1024 sequences in all
    comps[5] = Comparison(prompt=long_prompt, responses=(" It is odd.", " It is good."), kind="ranking",
                          ranking=((1,), (0,)))
    comps[-1] = Comparison(prompt=long_prompt, responses=(" It is late.", " It is fine."), kind="ranking",
                           ranking=((0,), (1,)))

    def tokens(prompt, response):
        return int(rm.encode([prompt], [response], max_length=16)["attention_mask"].sum())

    want = [max(tokens(c.prompt, r) for r in c.responses) for c in comps]
    assert want[5] == want[-1] == 16 and min(want) < 16 and len(set(want)) > 2
    assert comparison_lengths(rm, comps, 16) == want


def test_train_reward_model_rejects_empty_data(tok):
    with pytest.raises(DataError):
        train_reward_model(_rm(tok), [], RMTrainConfig())


def test_pairwise_batch_size_counts_pairs(tok):
    rm = _rm(tok)
    comps = _comparisons(random.Random(1), 1)[:4]  # 4 rankings of K=3: 12 pairs
    hist = train_reward_model(rm, comps, RMTrainConfig(loss="pairwise", batch_size=2, lr=1e-3, max_length=32))
    assert all(h["pairs"] <= 2 for h in hist), [h["pairs"] for h in hist]
    assert len(hist) == 6


def test_epoch_batches_without_lengths_are_plain_slices():
    order = list(range(10))
    assert epoch_batches(order, 4, None, random.Random(0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_epoch_batches_grouped_by_length_use_every_index_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 60) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    plain = epoch_batches(order, 16, None, random.Random(1))
    grouped = epoch_batches(order, 16, lengths, random.Random(1), group=10)
    assert sorted(j for b in grouped for j in b) == list(range(1000))
    assert len(grouped) == len(plain) == math.ceil(1000 / 16)
    assert sorted(len(b) for b in grouped) == sorted(len(b) for b in plain)
    padded = lambda batches: sum(max(lengths[j] for j in b) * len(b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
    # the batches are shuffled: not in order of length
    maxima = [max(lengths[j] for j in b) for b in grouped]
    assert maxima != sorted(maxima)


def test_training_grouped_by_length_learns_too(tok):
    rm = _rm(tok)
    rng = random.Random(0)
    train, held = _comparisons(rng, 20), _comparisons(rng, 2)
    hist = train_reward_model(rm, train, RMTrainConfig(batch_size=8, lr=3e-3, epochs=1, max_length=32,
                                                       group_by_length=True))
    assert len(hist) == 30 and sum(h["sequences"] for h in hist) == 240 * 3
    assert pair_accuracy(rm, held) > 0.8


def test_freeze_embeddings_keeps_token_embeddings_for_this_training_only(tok):
    rm = _rm(tok)
    emb = rm.backbone.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    train = _comparisons(random.Random(0), 2)
    train_reward_model(rm, train, RMTrainConfig(batch_size=8, lr=3e-3, max_length=32, freeze_embeddings=True))
    emb_name = next(n for n, p in rm.named_parameters() if p is emb)
    assert torch.equal(emb, before[emb_name]), "the token embeddings must not move"
    moved = [n for n, p in rm.named_parameters() if not torch.equal(p, before[n])]
    assert moved and emb_name not in moved
    assert emb.requires_grad, "the embeddings' own requires_grad flag comes back after training"


def test_reward_model_scores_at_the_length_it_was_trained_at(trained, tmp_path):
    rm, _, _, held = trained
    assert rm.config.max_length == 32  # set by train_reward_model from RMTrainConfig.max_length
    rm.save(tmp_path / "rm32")
    loaded = RewardModel.load(tmp_path / "rm32")
    assert loaded.config.max_length == 32
    long_prompt = " ".join(f"Tell me about {s}." for s in SUBJECTS)  # > 32 tokens on its own
    prompts, responses = [long_prompt, "Tell me about rain."], [" It is good.", " It is odd."]
    at_32 = loaded.encode(prompts, responses, max_length=32)
    assert int(at_32["attention_mask"][0].sum()) == 32
    with torch.no_grad():
        want = (loaded.raw_scores(at_32["input_ids"], at_32["attention_mask"]) - loaded.config.bias) * loaded.config.gain
    assert torch.allclose(loaded.score(prompts, responses), want, atol=1e-6)
    at_512 = loaded.encode(prompts, responses, max_length=512)
    assert int(at_512["attention_mask"][0].sum()) > 32  # the old default would have scored more context
    assert pair_accuracy(loaded, held) == pair_accuracy(loaded, held, max_length=32)


def _short_and_long(n: int) -> list[Comparison]:
    """n short pairs (K = 2, one strict pair) and n long rankings (K = 3, three strict pairs)."""
    long_prompt = "Tell me about " + ", ".join(SUBJECTS) + "."
    out = []
    for i in range(n):
        s = SUBJECTS[i]
        out.append(Comparison(prompt=s, responses=(" good.", " odd."), kind="ranking", ranking=((0,), (1,))))
        out.append(Comparison(prompt=long_prompt, responses=(f" {s} is good.", f" {s} is odd.", f" {s} is late."),
                              kind="ranking", ranking=((0,), (1,), (2,))))
    return out


def test_rm_training_history_callback_and_batch_accuracy(tok):
    """At lr 0 the scores stay put: each step's accuracy is that of the frozen scores on the
    batch's strict pairs (the tied pairs left out), and every step is handed to ``on_step``."""
    rm = _rm(tok)
    tied = Comparison(prompt="Tell me about rain.", responses=(" It is odd.", " It is late.", " It is good."),
                      kind="ranking", ranking=((0, 1), (2,)))
    train = _comparisons(random.Random(3), 1)[:5] + [tied]
    scores = comparison_scores(rm, train, max_length=32)
    strict = [(s[w] > s[l]).item() for c, s in zip(train, scores) for w, l in ordered_pairs(c)[0]]
    tied_right = [(s[a] > s[b]).item() for c, s in zip(train, scores) for a, b in ordered_pairs(c)[1]]
    assert sum(strict) / len(strict) != sum(tied_right) / len(tied_right)  # the tie must not be counted
    seen = []
    t0 = time.perf_counter()
    hist = train_reward_model(rm, train, RMTrainConfig(batch_size=6, lr=0.0, epochs=2, max_length=32), seen.append)
    elapsed = time.perf_counter() - t0
    assert seen == hist and len(hist) == 2
    keys = {"step", "epoch", "loss", "accuracy", "lr", "pairs", "pairs_per_second", "sequences", "total_steps"}
    assert all(set(h) == keys for h in hist)
    assert [(h["step"], h["epoch"], h["total_steps"]) for h in hist] == [(1, 0, 2), (2, 1, 2)]
    for h in hist:
        assert h["accuracy"] == pytest.approx(sum(strict) / len(strict))
        assert h["pairs"] == len(strict) + len(tied_right) == 18 and h["sequences"] == 18
        assert h["pairs_per_second"] >= h["pairs"] / elapsed  # each step's time lies within the call


def test_rm_training_is_seeded_and_applies_the_configured_weight_decay(tok):
    train = _comparisons(random.Random(4), 1)  # 12 comparisons: 3 steps of 4, in a seeded order

    def trained_weights(**kw):
        rm = _rm(tok)
        train_reward_model(rm, train, RMTrainConfig(batch_size=4, lr=3e-3, max_length=32, seed=7, **kw))
        return [p.detach().clone() for p in rm.parameters()]

    a, b = trained_weights(), trained_weights()
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed, same data: the same weights"
    decayed = trained_weights(weight_decay=0.01)
    assert any(not torch.equal(x, y) for x, y in zip(a, decayed)), "weight_decay 0 must mean no decay"


def test_rm_training_batches_group_by_length_only_when_asked(tok):
    """Short K=2 pairs and long K=3 rankings: the pairs per step show which comparisons shared a
    batch. Without grouping the batches are slices of the seeded shuffle; with it, of the same
    shuffle sorted by length, so no batch mixes the two kinds."""
    train = _short_and_long(4)
    for grouped in (False, True):
        rm = _rm(tok)
        cfg = RMTrainConfig(batch_size=2, lr=1e-3, max_length=24, seed=1, group_by_length=grouped)
        hist = train_reward_model(rm, train, cfg)
        rng = random.Random(1)
        order = list(range(len(train)))
        rng.shuffle(order)
        lengths = comparison_lengths(rm, train, 24) if grouped else None
        want = [sum(len(ordered_pairs(train[j])[0]) for j in b) for b in epoch_batches(order, 2, lengths, rng)]
        assert [h["pairs"] for h in hist] == want
        if grouped:
            assert set(want) == {2, 6}
        else:
            assert 4 in want, "the plain shuffle mixes the two kinds somewhere, or this test proves nothing"


def test_rm_training_with_the_best_of_k_loss(tok):
    rm = _rm(tok)
    train = [Comparison(prompt=c.prompt, responses=c.responses, kind="best_of_k", best=c.ranking[0][0])
             for c in _comparisons(random.Random(5), 1)[:4]]
    scores = comparison_scores(rm, train, max_length=32)
    want = statistics.mean((torch.logsumexp(s, 0) - s[c.best]).item() for c, s in zip(train, scores))
    hist = train_reward_model(rm, train, RMTrainConfig(loss="best_of_k", batch_size=4, lr=0.0, max_length=32))
    assert hist[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_embeddings_train_unless_frozen_and_keep_their_own_flag(tok):
    train = _comparisons(random.Random(0), 1)[:8]
    rm = _rm(tok)
    emb = rm.backbone.get_input_embeddings().weight
    before = emb.detach().clone()
    train_reward_model(rm, train, RMTrainConfig(batch_size=8, lr=3e-3, max_length=32))
    assert not torch.equal(emb, before), "not frozen: the token embeddings train"
    rm = _rm(tok)
    emb = rm.backbone.get_input_embeddings().weight
    emb.requires_grad_(False)  # frozen by the caller already: training must leave it so
    train_reward_model(rm, train, RMTrainConfig(batch_size=8, lr=3e-3, max_length=32, freeze_embeddings=True))
    assert not emb.requires_grad


def test_pair_accuracy_at_another_length(trained):
    rm, _, _, held = trained
    at_2 = pair_accuracy(rm, held, max_length=2)
    assert at_2 == accuracy_of_scores(held, comparison_scores(rm, held, max_length=2))
    assert at_2 != pair_accuracy(rm, held)  # 2 tokens do not tell the responses apart as 32 do


def test_pair_accuracy_runs_in_float32_unless_asked(tok):
    rm = _rm(tok)
    comps = _comparisons(random.Random(0), 1)
    fp32 = accuracy_of_scores(comps, comparison_scores(rm, comps, max_length=32))
    bf16 = accuracy_of_scores(comps, comparison_scores(rm, comps, max_length=32, bf16=True))
    assert fp32 != bf16  # bf16 rounding reorders some close scores of this untrained model
    assert pair_accuracy(rm, comps, max_length=32) == fp32
    assert pair_accuracy(rm, comps, max_length=32, bf16=True) == bf16


def test_rm_training_accuracy_counts_a_tie_in_score_as_wrong(tok):
    # at 2 tokens every response is cut to " It is" and loses its prompt: all scores tie exactly
    rm = _rm(tok)
    train = _comparisons(random.Random(6), 1)[:4]
    hist = train_reward_model(rm, train, RMTrainConfig(batch_size=4, lr=0.0, max_length=2))
    assert hist[0]["accuracy"] == 0.0


def test_metadata_stage_learns_the_labelers_marks_and_leaves_the_scalar_head_alone(tok):
    # question 0, asked of every response: is it "good"? question 1, asked of half: is it "bad"?
    # the unasked entries hold garbage that must neither count nor be refused
    rng = random.Random(0)
    prompts, responses, labels, asked = [], [], [], []
    for _ in range(160):
        s, a = rng.choice(SUBJECTS), rng.choice(ADJS)
        prompts.append(f"Tell me about {s}.")
        responses.append(f" It is {a}.")
        ask_bad = rng.random() < 0.5
        labels.append([float(a == "good"), float(a == "bad") if ask_bad else 7.0])
        asked.append([True, ask_bad])
    rm = _rm(tok)
    head = {k: v.clone() for k, v in rm.head.state_dict().items()}
    trunk = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    cfg = RMTrainConfig(batch_size=16, lr=3e-3, epochs=3, max_length=32)
    hist = train_on_metadata(rm, prompts, responses, torch.tensor(labels), torch.tensor(asked), cfg)
    assert len(hist) == 30 and hist[-1]["total_steps"] == 30  # 160 / 16 x 3
    assert statistics.mean(h["loss"] for h in hist[-5:]) < 0.5 * statistics.mean(h["loss"] for h in hist[:5])
    assert statistics.mean(h["accuracy"] for h in hist[-5:]) > 0.9
    assert all(torch.equal(v, head[k]) for k, v in rm.head.state_dict().items())  # the scalar head is untouched
    assert any(not torch.equal(v, trunk[k]) for k, v in rm.backbone.state_dict().items())  # the trunk learned
    assert rm.config.max_length == 32
    # frozen embeddings stay as they were, and trainable again afterwards
    emb = rm.backbone.get_input_embeddings().weight
    before = emb.detach().clone()
    cfg = RMTrainConfig(batch_size=16, lr=3e-3, epochs=1, max_length=32, freeze_embeddings=True)
    train_on_metadata(rm, prompts[:32], responses[:32], torch.tensor(labels[:32]), torch.tensor(asked[:32]), cfg)
    assert torch.equal(emb, before) and emb.requires_grad


def test_metadata_stage_refuses_bad_input(tok):
    rm = _rm(tok)
    cfg = RMTrainConfig(batch_size=2, max_length=32)
    ok_labels, ok_asked = torch.tensor([[1.0], [0.0]]), torch.tensor([[True], [True]])
    cases = [
        (["p"], ["a", "b"], ok_labels, ok_asked, "one response per prompt"),
        ([], [], torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool), "one response per prompt"),
        (["p", "q"], ["a", "b"], torch.tensor([1.0, 0.0]), torch.tensor([True, True]), "must both be"),
        (["p", "q"], ["a", "b"], ok_labels, torch.tensor([[True, True], [True, True]]), "must both be"),
        (["p", "q"], ["a", "b"], ok_labels, torch.tensor([[False], [False]]), "no metadata question"),
        (["p", "q"], ["a", "b"], torch.tensor([[0.5], [1.0]]), ok_asked, "0 or 1"),
    ]
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    for prompts, responses, labels, asked, msg in cases:
        with pytest.raises(DataError, match=msg):
            train_on_metadata(rm, prompts, responses, labels, asked, cfg)
    assert all(torch.equal(v, before[k]) for k, v in rm.state_dict().items())  # nothing trained
