"""Model-free evaluation metrics for generated text and reward models.

Every function here is pure: it takes token sequences (lists of ints or of strings) or score
arrays and returns a float. They are the numbers the demo reports next to the gold score:

* diversity: :func:`distinct_n` (are all samples the same?) and :func:`repetition_rate`
  (does each sample loop on itself?), the two classic symptoms of reward hacking / mode collapse;
* head-to-head comparison of two policies under one scorer: :func:`win_rate`;
* reward-model quality on held-out comparisons: :func:`pairwise_accuracy`;
* :func:`mean_length`, because length drift is the cheapest way to move many rewards.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

TokenSeqs = Sequence[Sequence[Hashable]]


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def repeated_ngram_share(seq: Sequence[Hashable], n: int = 3) -> float:
    """Share of the n-grams of one sequence that repeat an earlier n-gram of the same sequence.

    "a b c a b c" with n=2 has n-grams ab bc ca ab bc: the last two repeat, so 2/5 = 0.4.
    A sequence with no n-grams (shorter than n) repeats nothing and gets 0.0.
    """
    _check_n(n)
    grams = _ngrams(seq, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(token_seqs: TokenSeqs, n: int) -> float:
    """Corpus-level diversity: distinct n-grams over all samples / total n-grams over all samples.

    1.0 means no n-gram occurs twice anywhere; a policy that collapsed onto one output drives it
    towards 0. Returns 0.0 when the sequences hold no n-grams at all (all shorter than n).
    """
    _check_n(n)
    grams = [g for seq in token_seqs for g in _ngrams(seq, n)]
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def repetition_rate(token_seqs: TokenSeqs, n: int = 3) -> float:
    """Mean over sequences of the share of n-grams that repeat earlier within the same sequence.

    Unlike :func:`distinct_n` this ignores whether different samples resemble each other; it only
    measures degenerate loops ("great great great ..."). Sequences shorter than n count as 0.0.
    """
    _check_n(n)
    if len(token_seqs) == 0:
        raise ValueError("repetition_rate needs at least one sequence")
    return float(np.mean([repeated_ngram_share(seq, n) for seq in token_seqs]))


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, what: str):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{what}: got {a.size} and {b.size} scores; they must be paired")
    if a.size == 0:
        raise ValueError(f"{what}: needs at least one pair of scores")
    return a, b


def win_rate(scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray) -> float:
    """How often system A beats system B on the same prompts (ties count as half a win).

    scores_a[i] and scores_b[i] must score the two systems' answers to the same prompt i.
    0.5 means the systems are indistinguishable under this scorer.
    """
    a, b = _paired(scores_a, scores_b, "win_rate")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def pairwise_accuracy(
    chosen_scores: Sequence[float] | np.ndarray, rejected_scores: Sequence[float] | np.ndarray
) -> float:
    """Share of comparisons where a reward model scores the chosen response above the rejected one.

    Ties count as half right, so a constant reward model scores exactly 0.5 (chance) rather
    than 0 or 1. This is the held-out metric of reward-model training.
    """
    c, r = _paired(chosen_scores, rejected_scores, "pairwise_accuracy")
    return float(np.mean((c > r) + 0.5 * (c == r)))


def mean_length(token_seqs: TokenSeqs) -> float:
    """Mean number of tokens per sequence (watch it: longer outputs can inflate many rewards)."""
    if len(token_seqs) == 0:
        raise ValueError("mean_length needs at least one sequence")
    return float(np.mean([len(seq) for seq in token_seqs]))
