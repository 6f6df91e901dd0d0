"""The simulated labeler: Bradley-Terry marginals, inter-labeler agreement, calibration."""

import math

import numpy as np
import pytest

from rlhf.labeler import SimulatedLabeler


class FloatJudge:
    """A stand-in gold judge: each response is its own gold score written as text."""

    def score(self, prompts, responses):
        return np.array([float(r) for r in responses])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def realistic_gold(n_groups: int, k: int, seed: int) -> np.ndarray:
    """K samples per prompt: a third are unreadable/gamed (gold ~0), the rest spread over (0, 1)."""
    rng = np.random.default_rng(seed)
    gold = rng.beta(2.0, 2.0, size=(n_groups, k))
    gamed = rng.random((n_groups, k)) < 1 / 3
    return np.where(gamed, rng.uniform(0.0, 0.05, size=(n_groups, k)), gold)


def pair_orders(rankings: list[list[int]], k: int) -> np.ndarray:
    """For each group and each pair i < j: True when i is ranked above j."""
    pos = np.argsort(np.asarray(rankings), axis=1)  # pos[g, i] = place of response i
    i, j = np.triu_indices(k, k=1)
    return pos[:, i] < pos[:, j]


def test_two_labelers_agree_on_73_percent_of_pairs():
    k = 4
    gold = realistic_gold(6000, k, seed=0)  # 36,000 pairs
    groups = list(gold)
    T = SimulatedLabeler.calibrate_temperature(groups, target_agreement=0.73)
    responses = [[repr(float(g)) for g in row] for row in gold]
    prompts = ["p"] * len(responses)
    a = SimulatedLabeler(FloatJudge(), T, seed=1).rank_many(prompts, responses)
    b = SimulatedLabeler(FloatJudge(), T, seed=2).rank_many(prompts, responses)
    agreement = np.mean(pair_orders(a, k) == pair_orders(b, k))
    assert agreement == pytest.approx(0.73, abs=0.02)
    assert agreement == pytest.approx(SimulatedLabeler.expected_agreement(groups, T), abs=0.01)
    # a labeler agrees with the gold order more often than with another labeler
    gold_order = gold[:, np.triu_indices(k, k=1)[0]] > gold[:, np.triu_indices(k, k=1)[1]]
    to_gold = np.mean(pair_orders(a, k) == gold_order)
    assert to_gold == pytest.approx(SimulatedLabeler.oracle_agreement(groups, T), abs=0.01)
    assert to_gold > agreement + 0.05


def test_rank_pair_frequencies_follow_bradley_terry():
    gold = np.array([0.1, 0.3, 0.35, 0.8])
    T, n = 0.2, 20_000
    labeler = SimulatedLabeler(FloatJudge(), T, seed=3)
    rankings = labeler.rank_many(["p"] * n, [[repr(float(g)) for g in gold]] * n)
    above = pair_orders(rankings, 4).mean(axis=0)
    i, j = np.triu_indices(4, k=1)
    expected = sigmoid((gold[i] - gold[j]) / T)
    # by hand: sigmoid(-3.5) = 0.0293 (0.1 vs 0.8), sigmoid(-0.25) = 0.4378 (0.3 vs 0.35)
    assert expected[2] == pytest.approx(0.02931, abs=1e-4)
    assert expected[3] == pytest.approx(0.43782, abs=1e-4)
    np.testing.assert_allclose(above, expected, atol=0.015)
    # Plackett-Luce: the top choice is softmax(g / T)
    top = np.bincount([r[0] for r in rankings], minlength=4) / n
    softmax = np.exp(gold / T) / np.exp(gold / T).sum()
    np.testing.assert_allclose(top, softmax, atol=0.015)


def test_calibrate_temperature_round_trips():
    groups = list(realistic_gold(500, 4, seed=1))
    for T0 in (0.03, 0.15, 1.0):
        target = SimulatedLabeler.expected_agreement(groups, T0)
        assert SimulatedLabeler.calibrate_temperature(groups, target) == pytest.approx(T0, rel=1e-6)


def test_oracle_agreement_is_084_when_labelers_agree_073():
    groups = [np.array([0.0, 1.0])] * 50  # every pair differs by exactly 1
    # by hand: p = 0.84 gives p^2 + (1 - p)^2 = 0.7056 + 0.0256 = 0.7312
    T84 = 1.0 / math.log(0.84 / 0.16)
    assert SimulatedLabeler.expected_agreement(groups, T84) == pytest.approx(0.7312, abs=1e-9)
    assert SimulatedLabeler.oracle_agreement(groups, T84) == pytest.approx(0.84, abs=1e-9)
    # 2p^2 - 2p + 1 = 0.73  ->  p = (1 + sqrt(0.46)) / 2 = 0.83912
    T = SimulatedLabeler.calibrate_temperature(groups, 0.73)
    assert sigmoid(1.0 / T) == pytest.approx(0.83912, abs=1e-5)
    assert SimulatedLabeler.oracle_agreement(groups, T) == pytest.approx(0.83912, abs=1e-5)


@pytest.mark.parametrize(
    "groups, target",
    [
        ([np.array([0.5, 0.5, 0.5])] * 3, 0.73),  # all ties: agreement is 0.5 at every T
        ([np.array([0.0, 1.0]), np.array([0.3, 0.3])], 0.8),  # half the pairs tie: ceiling 0.75
        ([np.array([0.0, 1.0])], 0.5),  # 0.5 needs T = infinity
        ([np.array([0.0, 1.0])], 1.0),  # 1.0 needs T = 0
        ([np.array([0.2]), np.array([0.4])], 0.73),  # no within-group pairs
    ],
)
def test_calibrate_temperature_rejects_impossible_targets(groups, target):
    with pytest.raises(ValueError):
        SimulatedLabeler.calibrate_temperature(groups, target)


def test_compare_best_of_and_rank_with_tiny_noise():
    labeler = SimulatedLabeler(FloatJudge(), temperature=1e-4, seed=0)
    assert labeler.compare("p", "0.9", "0.1") == 0
    assert labeler.compare("p", "0.1", "0.9") == 1
    assert labeler.best_of("p", ["0.2", "0.7", "0.4"]) == 1
    assert labeler.rank("p", ["0.2", "0.7", "0.4"]) == [1, 2, 0]


def test_rank_many_handles_ragged_groups_and_is_seeded():
    responses = [["0.5"], ["0.1", "0.2", "0.3"], ["0.9", "0.8"]]
    prompts = ["a", "b", "c"]
    out = SimulatedLabeler(FloatJudge(), 0.5, seed=7).rank_many(prompts, responses)
    assert [sorted(r) for r in out] == [[0], [0, 1, 2], [0, 1]]
    many = [["0.1", "0.2", "0.3", "0.4"]] * 50
    first = SimulatedLabeler(FloatJudge(), 0.5, seed=7).rank_many(["p"] * 50, many)
    again = SimulatedLabeler(FloatJudge(), 0.5, seed=7).rank_many(["p"] * 50, many)
    other = SimulatedLabeler(FloatJudge(), 0.5, seed=8).rank_many(["p"] * 50, many)
    assert first == again
    assert first != other


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        SimulatedLabeler(FloatJudge(), temperature=0.0)
    with pytest.raises(ValueError):
        SimulatedLabeler(FloatJudge(), 1.0).rank_many(["p"], [])


def test_calibration_can_ignore_tied_pairs():
    from rlhf.labeler import SimulatedLabeler

    groups = [np.array([0.0, 0.0, 0.0, 0.4, 0.0]), np.array([0.0, 0.0, 0.2, 0.0, 0.0])]  # 12 of 20 pairs tie
    with pytest.raises(ValueError, match="unreachable"):
        SimulatedLabeler.calibrate_temperature(groups, 0.73)
    t = SimulatedLabeler.calibrate_temperature(groups, 0.73, ignore_ties=True)
    untied = [np.array([0.0, 0.4]), np.array([0.0, 0.2])] * 3
    assert SimulatedLabeler.expected_agreement(untied, t) == pytest.approx(0.73, abs=1e-6)
    with pytest.raises(ValueError, match="every pair"):
        SimulatedLabeler.calibrate_temperature([np.zeros(4)], 0.73, ignore_ties=True)


def test_tied_rankings_group_equal_gold_and_keep_bradley_terry_between_groups():
    gold = ["0.0", "0.6", "0.0", "0.2", "0.0"]  # three answers the taste cannot tell apart
    T, n = 0.3, 20_000
    labeler = SimulatedLabeler(FloatJudge(), T, seed=4)
    rankings = labeler.rank_many_tied(["p"] * n, [gold] * n)
    for r in rankings[:50]:
        assert sorted(i for g in r for i in g) == [0, 1, 2, 3, 4]  # every answer exactly once
        assert (0, 2, 4) in r  # the three zeros always form one tie group
        assert len(r) == 3
    place = np.array([[next(k for k, g in enumerate(r) if i in g) for i in range(5)] for r in rankings])
    # between distinct values the marginals are the untied labeler's: P(a above b) = sigmoid(d / T)
    assert np.mean(place[:, 1] < place[:, 3]) == pytest.approx(sigmoid(0.4 / T), abs=0.015)
    assert np.mean(place[:, 3] < place[:, 0]) == pytest.approx(sigmoid(0.2 / T), abs=0.015)
    assert np.mean(place[:, 1] < place[:, 0]) == pytest.approx(sigmoid(0.6 / T), abs=0.015)
    # a Comparison takes the groups as they are, and the tied pairs are not strict pairs
    from rlhf.data import Comparison

    c = Comparison(prompt="p", responses=tuple(f"a{i}" for i in range(5)), kind="ranking", ranking=rankings[0])
    assert len(c.pairs()) == 3 + 3 + 1  # 10 pairs less the 3 tied ones


def test_tied_rankings_are_seeded_and_check_their_input():
    groups = [["0.1", "0.1"], ["0.3", "0.5", "0.3"], ["0.7"]]
    first = SimulatedLabeler(FloatJudge(), 0.5, seed=9).rank_many_tied(["a", "b", "c"], groups)
    assert first[0] == ((0, 1),) and first[2] == ((0,),)
    assert first == SimulatedLabeler(FloatJudge(), 0.5, seed=9).rank_many_tied(["a", "b", "c"], groups)
    with pytest.raises(ValueError, match="prompts"):
        SimulatedLabeler(FloatJudge(), 0.5).rank_many_tied(["a"], groups)
    with pytest.raises(ValueError, match="finite"):
        SimulatedLabeler(FloatJudge(), 0.5).rank_gold_tied([0.1, float("nan")])
