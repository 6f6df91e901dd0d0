"""A simulated labeler: the demo's stand-in for the people who rank responses.

NOT A PERSON. InstructGPT-style pipelines collect rankings of K responses per prompt from
human labelers. The demo has no people, so this class plays one: it looks up each response's
hidden gold score g (from :class:`rlhf.judge.GoldJudge`, or anything with a
``score(prompts, responses)`` method) and ranks the responses by noisy utilities::

    u_i = g_i / T + Gumbel(0, 1)        ranking = argsort(u, descending)

Sorting Gumbel-perturbed utilities samples a Plackett-Luce ranking (the top choice is
softmax(g / T)), and every pair's marginal is exactly the Bradley-Terry model the reward
model assumes, because the difference of two Gumbel(0, 1) draws is Logistic(0, 1)::

    P(i ranked above j) = sigmoid((g_i - g_j) / T)

The temperature T sets how noisy "people" are. Real labelers agree with each other on about
73% of pairs (InstructGPT, Ouyang et al. 2022), so :meth:`SimulatedLabeler.calibrate_temperature`
picks the T at which two independent simulated labelers agree that often on a given spread of
gold scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Scorer(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray: ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _pair_diffs(gold_groups: Sequence[np.ndarray]) -> np.ndarray:
    """|g_i - g_j| for every pair i < j inside each group (pairs never cross groups)."""
    diffs = []
    for g in gold_groups:
        g = np.asarray(g, dtype=np.float64).ravel()
        if not np.all(np.isfinite(g)):
            raise ValueError("gold scores must be finite")
        i, j = np.triu_indices(len(g), k=1)
        diffs.append(np.abs(g[i] - g[j]))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size == 0:
        raise ValueError("no within-group pairs: every group needs at least two gold scores")
    return d


def _agreement(d: np.ndarray, temperature: float) -> float:
    p = _sigmoid(d / temperature)
    return float(np.mean(p * p + (1.0 - p) * (1.0 - p)))


class SimulatedLabeler:
    """Ranks responses like a noisy person with a hidden taste (see the module docstring)."""

    def __init__(self, judge: Scorer, temperature: float, seed: int = 0):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.judge = judge
        self.temperature = float(temperature)
        self.rng = np.random.default_rng(seed)

    def gold(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """The hidden gold scores (float64). Only evaluation code should look at these."""
        g = np.asarray(self.judge.score(list(prompts), list(responses)), dtype=np.float64)
        if g.shape != (len(responses),) or not np.all(np.isfinite(g)):
            raise ValueError("the judge must return one finite score per response")
        return g

    def rank_gold(self, gold: np.ndarray) -> np.ndarray:
        """Noisy rankings of the rows of a (groups, K) gold array; -inf marks padding (ranked last)."""
        gold = np.atleast_2d(np.asarray(gold, dtype=np.float64))
        utility = gold / self.temperature + self.rng.gumbel(size=gold.shape)
        return np.argsort(-utility, axis=1, kind="stable")

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """Indices of `responses`, best first."""
        return self.rank_many([prompt], [responses])[0]

    def _flat_gold(self, prompts: Sequence[str], response_lists: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[int]]:
        """The gold scores of every response of every prompt (one judge call; none for no prompts),
        and the group sizes."""
        if len(prompts) != len(response_lists):
            raise ValueError(f"got {len(prompts)} prompts for {len(response_lists)} response lists")
        if not prompts:
            return np.zeros(0), []
        sizes = [len(rs) for rs in response_lists]
        flat = self.gold([p for p, k in zip(prompts, sizes) for _ in range(k)], [r for rs in response_lists for r in rs])
        return flat, sizes

    def rank_many(self, prompts: Sequence[str], response_lists: Sequence[Sequence[str]]) -> list[list[int]]:
        """One ranking (indices, best first) per prompt; one judge call for all responses."""
        flat, sizes = self._flat_gold(prompts, response_lists)
        if not sizes:
            return []
        padded = np.full((len(sizes), max(sizes)), -np.inf)
        padded[np.arange(max(sizes)) < np.asarray(sizes)[:, None]] = flat
        order = self.rank_gold(padded)
        return [[int(i) for i in row if i < k] for row, k in zip(order, sizes)]

    def rank_gold_tied(self, gold: Sequence[float]) -> tuple[tuple[int, ...], ...]:
        """A noisy ranking of one group in which answers of exactly equal gold score are tied.

        Each distinct gold value draws one Gumbel utility, so answers whose scores differ are
        ordered with the same sigmoid((g_i - g_j) / T) marginals as :meth:`rank_gold`, and answers
        the hidden taste cannot tell apart (e.g. two that meet no constraint and score 0) form one
        tie group instead of a coin flip that a reward model would learn as signal.
        """
        g = np.asarray(gold, dtype=np.float64).ravel()
        if not np.all(np.isfinite(g)):
            raise ValueError("gold scores must be finite")
        values, inverse = np.unique(g, return_inverse=True)
        utility = values / self.temperature + self.rng.gumbel(size=values.shape)
        return tuple(tuple(int(i) for i in np.flatnonzero(inverse == v)) for v in np.argsort(-utility, kind="stable"))

    def rank_many_tied(self, prompts: Sequence[str],
                       response_lists: Sequence[Sequence[str]]) -> list[tuple[tuple[int, ...], ...]]:
        """One ranking per prompt as tie groups, best first (:meth:`rank_gold_tied`); one judge call."""
        flat, sizes = self._flat_gold(prompts, response_lists)
        return [self.rank_gold_tied(g) for g in np.split(flat, np.cumsum(sizes)[:-1])] if sizes else []

    def best_of(self, prompt: str, responses: Sequence[str]) -> int:
        """Index of the response the labeler picks as best (P = softmax(g / T))."""
        return self.rank(prompt, responses)[0]

    def compare(self, prompt: str, a: str, b: str) -> int:
        """0 if the labeler prefers `a`, 1 if `b` (P(a) = sigmoid((g_a - g_b) / T))."""
        return self.rank(prompt, [a, b])[0]

    # ------------------------------------------------------------------ calibration

    @staticmethod
    def expected_agreement(gold_groups: Sequence[np.ndarray], temperature: float) -> float:
        """Expected share of within-group pairs on which two independent labelers agree.

        For a pair with gold difference d both pick the same order with probability
        p^2 + (1 - p)^2, p = sigmoid(d / T). Falls from 1 (T -> 0, no ties) to 0.5 (T -> inf).
        """
        return _agreement(_pair_diffs(gold_groups), temperature)

    @staticmethod
    def oracle_agreement(gold_groups: Sequence[np.ndarray], temperature: float) -> float:
        """Expected share of pairs on which one labeler agrees with the gold order: mean max(p, 1 - p).

        This is the ceiling for a reward model trained on this labeler's data. When every pair
        has the same gold gap and labelers agree on 0.73, it is 0.84; a spread of gaps lowers it
        (~0.80 for realistic gold scores), since easy pairs are agreed on anyway. Ties count 0.5.
        """
        p = _sigmoid(_pair_diffs(gold_groups) / temperature)
        return float(np.mean(np.maximum(p, 1.0 - p)))

    @staticmethod
    def calibrate_temperature(gold_groups: Sequence[np.ndarray], target_agreement: float = 0.73,
                              ignore_ties: bool = False) -> float:
        """The T at which two independent labelers agree on `target_agreement` of the pairs.

        Bisection in log T (agreement is monotone in T). Raises ValueError when no T reaches the
        target: agreement lies strictly between 0.5 and the T -> 0 limit, which is below 1 when
        some pairs tie (a tied pair agrees half the time at any T). With ``ignore_ties`` the
        target is the agreement on the pairs whose gold scores differ (for a gold score with many
        exact ties, e.g. a share of constraints met times a term that is often 0).
        """
        d = _pair_diffs(gold_groups)
        if ignore_ties:
            d = d[d > 0]
            if d.size == 0:
                raise ValueError("target agreement is unreachable: every pair of gold scores ties")
        ceiling = float(np.mean(np.where(d > 0, 1.0, 0.5)))
        if not 0.5 < target_agreement < ceiling:
            raise ValueError(
                f"target agreement {target_agreement} is unreachable: with these gold scores agreement "
                f"lies in (0.5, {ceiling:.4f}) ({np.mean(d == 0):.1%} of {d.size} pairs are ties)"
            )
        lo = hi = np.log(d.max())
        while _agreement(d, np.exp(lo)) <= target_agreement:
            lo -= 2.0  # smaller T -> more agreement
        while _agreement(d, np.exp(hi)) >= target_agreement:
            hi += 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if _agreement(d, np.exp(mid)) > target_agreement:
                lo = mid
            else:
                hi = mid
        return float(np.exp(0.5 * (lo + hi)))
