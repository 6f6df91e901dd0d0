"""Hand-computed checks of the model-free metrics in rlhf.evaluate."""

import numpy as np
import pytest

from rlhf.evaluate import (
    distinct_n,
    mean_length,
    pairwise_accuracy,
    repeated_ngram_share,
    repetition_rate,
    win_rate,
)


def test_distinct_n_is_corpus_level():
    # unigrams: a b a | a c -> 5 total, distinct {a, b, c} = 3
    assert distinct_n([["a", "b", "a"], ["a", "c"]], 1) == pytest.approx(3 / 5)
    # bigrams: ab ba | ac -> 3 total, all distinct
    assert distinct_n([["a", "b", "a"], ["a", "c"]], 2) == pytest.approx(1.0)
    # the same sample twice: every bigram occurs twice
    assert distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)


def test_distinct_n_without_ngrams_is_zero():
    assert distinct_n([[1], [2]], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n([[1, 2]], 0)


def test_repeated_ngram_share_by_hand():
    # bigrams ab bc ca ab bc: the last two repeat earlier ones
    assert repeated_ngram_share("a b c a b c".split(), 2) == pytest.approx(2 / 5)
    # 8 identical tokens: 6 trigrams, 1 distinct
    assert repeated_ngram_share(["x"] * 8, 3) == pytest.approx(5 / 6)
    assert repeated_ngram_share([1, 2], 3) == 0.0


def test_repetition_rate_is_mean_per_sequence():
    seqs = [[7] * 5, [1, 2, 3, 4, 5], [1]]  # shares 2/3, 0, 0 (too short)
    assert repetition_rate(seqs, n=3) == pytest.approx((2 / 3) / 3)
    # distinct_n sees the corpus, repetition_rate does not: two copies of one clean sample
    assert repetition_rate([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.0
    with pytest.raises(ValueError):
        repetition_rate([])


def test_win_rate_counts_ties_as_half():
    assert win_rate([3, 1, 2, 5], [1, 1, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(np.zeros(3), np.zeros(3)) == 0.5


def test_pairwise_accuracy_by_hand():
    assert pairwise_accuracy([0.9, 0.2, 0.5], [0.1, 0.3, 0.5]) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.mark.parametrize("fn", [win_rate, pairwise_accuracy])
def test_paired_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError):
        fn([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        fn([], [])


def test_mean_length():
    assert mean_length([[1, 2, 3], [], ["a"]]) == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        mean_length([])
