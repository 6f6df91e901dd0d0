"""The hidden gold judge of the positive-continuation demo (Ziegler et al. 2019).

In the demo a tiny LM continues the first words of an IMDB review and PPO should make the
continuations *positive*. Real people are replaced by a simulated labeler
(:mod:`rlhf.labeler`) who prefers responses with a higher hidden gold score. That score must
judge the way a person would: a continuation is good when it is positive **and** readable.

Why not just a sentiment classifier? Because the policy finds its holes within a few hundred
PPO steps: stuffing "the best the best", word salad ("and theillsanf and theackm of theg") that
the classifier has no features for, or loops ("amazing amazing amazing ..."). A person would rate
all of these near zero, so the gold score multiplies sentiment by three readability factors::

    gold = sentiment * fluency * real_words * (1 - repetition)        (each factor in [0, 1])

* ``sentiment``  = P(positive | response) from :class:`SentimentClassifier`, a logistic regression
  on binary unigram+bigram features trained on the rt-polarity sentences (Pang & Lee 2005).
* ``fluency``    = clip((lp - lp_bad) / (lp_good - lp_bad), 0, 1), where lp is the response's
  per-word log-probability under :class:`NGramLM` (a Kneser-Ney trigram LM trained on the IMDB
  train split + rt-polarity, its first history the last two words of the prompt) *minus* its
  per-word unigram log-probability. This difference (SLOR, Lau et al. 2015) measures how much
  the word order helps; the raw trigram log-prob mostly measures word frequency and rated
  "film the great a wonderful is acting and the best of" as fluent as real text.
  The two anchors are calibrated in :meth:`GoldJudge.from_data` on held-out review continuations
  (IMDB valid split): lp_good = median lp of the real continuations, lp_bad = median lp of the
  same continuations with their words shuffled. So a typical real continuation has fluency ~1,
  the same words in random order have fluency ~0.
* ``real_words`` = share of the response's word tokens that occur at least twice in the LM's
  training corpus (invented words like "theackm" count against it).
* ``repetition`` = share of the response's token trigrams (punctuation included) that repeat an
  earlier trigram of the same response ("great great great great" -> 1/2).

A response with no word token (empty, only punctuation or digits) scores 0 on every factor.
The product is deliberately harsh: any one failure (negative, unreadable, invented, looping)
is enough to sink the score, which is what makes it hard to game.

The judge is *hidden*: the reward model never sees it, only the labeler's noisy rankings.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf.errors import DataError
from rlhf.evaluate import repeated_ngram_share

log = logging.getLogger(__name__)

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*|[^\sa-z\d]")
_WORD = re.compile(r"[a-z]")
BOS = "<s>"


# ----------------------------------------------------------------------------- text & data


def tokenize(text: str) -> list[str]:
    """Lower-case word tokenizer: words (with one inner apostrophe), numbers, punctuation marks.

    "It's GREAT!<br />10/10" -> ["it's", "great", "!", "10", "/", "10"]. It matches the
    pre-tokenized rt-polarity text, so both corpora share one vocabulary.
    """
    return _TOKEN.findall(_BR.sub(" ", text).lower())


def is_word(token: str) -> bool:
    """True for alphabetic tokens (not numbers or punctuation)."""
    return _WORD.match(token) is not None


def default_data_dir() -> Path:
    """`shared/data` next to the repository root (the repo's parent folder)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_rt_polarity(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """The rt-polarity sentences and their labels (1 = positive), positives first."""
    texts: list[str] = []
    labels: list[int] = []
    for name, label in (("pos", 1), ("neg", 0)):
        path = Path(data_dir) / "rt-polarity" / f"rt-polarity.{name}.txt"
        if not path.is_file():
            raise DataError(f"{path}: rt-polarity file not found")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        texts += lines
        labels += [label] * len(lines)
    return texts, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class Review:
    text: str  # `<br />` tags already replaced by spaces
    positive: bool
    is_valid: bool


def load_imdb(data_dir: Path) -> list[Review]:
    """The imdb-sample reviews (800 train, 200 valid)."""
    path = Path(data_dir) / "imdb-sample" / "texts.csv"
    if not path.is_file():
        raise DataError(f"{path}: imdb-sample file not found")
    reviews = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            if row.get("label") not in ("positive", "negative") or row.get("is_valid") not in ("True", "False"):
                raise DataError(f"{path}:{line_no}: expected label positive/negative and is_valid True/False")
            text = " ".join(_BR.sub(" ", row["text"]).split())
            reviews.append(Review(text, row["label"] == "positive", row["is_valid"] == "True"))
    return reviews


def heldout_snippets(
    data_dir: Path | str | None = None, prompt_words: int = 8, response_words: int = 24
) -> list[tuple[str, str, bool]]:
    """(prompt, continuation, is_positive) cut from the IMDB *valid* reviews, as the demo cuts them.

    Texts are re-joined tokens: the first `prompt_words` tokens, then up to `response_words` more.
    Used to calibrate fluency and to check that the judge ranks real reviews sensibly.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out = []
    for review in load_imdb(data_dir):
        toks = tokenize(review.text)
        if review.is_valid and len(toks) > prompt_words:
            prompt = " ".join(toks[:prompt_words])
            response = " ".join(toks[prompt_words : prompt_words + response_words])
            out.append((prompt, response, review.positive))
    return out


# ----------------------------------------------------------------------------- sentiment


def _ngram_features(tokens: list[str]) -> set[str]:
    """Unigrams and bigrams ("a b") of one text, as a set: the features are binary."""
    return set(tokens) | {f"{a} {b}" for a, b in zip(tokens, tokens[1:])}


class SentimentClassifier:
    """Logistic regression on binary unigram+bigram features (the classic NB-SVM-style baseline).

    Trained full-batch with L-BFGS in numpy on a sparse design matrix: ~10k sentences x ~30k
    features train in about a second on one CPU core.
    """

    def __init__(self, vocab: dict[str, int], weights: np.ndarray, bias: float, heldout_accuracy: float):
        self.vocab = vocab
        self.weights = weights
        self.bias = bias
        self.heldout_accuracy = heldout_accuracy

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        labels: np.ndarray,
        min_count: int = 2,
        l2: float = 3e-4,
        iters: int = 200,
        heldout_frac: float = 0.1,
        seed: int = 0,
    ) -> SentimentClassifier:
        """Fit on a random (1 - heldout_frac) of the data; report accuracy on the rest."""
        labels = np.asarray(labels)
        order = np.random.default_rng(seed).permutation(len(texts))
        n_held = int(round(heldout_frac * len(texts)))
        held, train = order[:n_held], order[n_held:]
        feats = [_ngram_features(tokenize(t)) for t in texts]

        counts = Counter(f for i in train for f in feats[i])
        vocab = {f: j for j, f in enumerate(sorted(f for f, c in counts.items() if c >= min_count))}
        model = cls(vocab, np.zeros(len(vocab)), 0.0, float("nan"))
        rows, cols = model._sparse([feats[i] for i in train])
        w, b = _fit_logreg(rows, cols, len(train), len(vocab), labels[train].astype(np.float64), l2, iters)
        model.weights, model.bias = w, b

        if n_held:
            rows, cols = model._sparse([feats[i] for i in held])
            p = model._predict(rows, cols, n_held)
            model.heldout_accuracy = float(np.mean((p > 0.5) == (labels[held] == 1)))
        return model

    def _sparse(self, feats: list[set[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Row/column indices of the ones of the binary design matrix."""
        rows, cols = [], []
        for i, fs in enumerate(feats):
            js = [self.vocab[f] for f in fs if f in self.vocab]
            rows += [i] * len(js)
            cols += js
        return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)

    def _predict(self, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
        logits = np.bincount(rows, weights=self.weights[cols], minlength=n) + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def prob_positive(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive | text) for each text; texts with no known feature get sigmoid(bias) ~ 0.5."""
        rows, cols = self._sparse([_ngram_features(tokenize(t)) for t in texts])
        return self._predict(rows, cols, len(texts))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product without BLAS: multithreaded BLAS dots crawl on a busy 2-core machine."""
    return float(np.sum(a * b))


def _fit_logreg(
    rows: np.ndarray, cols: np.ndarray, n: int, dim: int, y: np.ndarray, l2: float, iters: int
) -> tuple[np.ndarray, float]:
    """Minimise mean BCE + l2/2 * |w|^2 over (w, b); returns (weights, bias).

    X is the binary matrix with ones at (rows, cols); X @ w and X.T @ r are two np.bincount
    calls, so one loss+gradient costs a few milliseconds and needs no sparse library.
    """

    def loss_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = x[:-1], x[-1]
        logits = np.bincount(rows, weights=w[cols], minlength=n) + b
        loss = np.mean(np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * _dot(w, w)
        r = (1.0 / (1.0 + np.exp(-logits)) - y) / n  # dloss/dlogits
        grad_w = np.bincount(cols, weights=r[rows], minlength=dim) + l2 * w
        return float(loss), np.append(grad_w, r.sum())

    x = _lbfgs(loss_and_grad, np.zeros(dim + 1), iters)
    return x[:-1].copy(), float(x[-1])


def _lbfgs(f, x: np.ndarray, iters: int, memory: int = 10, gtol: float = 1e-7) -> np.ndarray:
    """Plain L-BFGS (two-loop recursion + Armijo backtracking) for a smooth convex f -> (value, grad)."""
    fx, g = f(x)
    S: list[np.ndarray] = []
    Y: list[np.ndarray] = []
    for _ in range(iters):
        q, alphas = g.copy(), []
        for s, yv in zip(reversed(S), reversed(Y)):
            a = _dot(s, q) / _dot(yv, s)
            q -= a * yv
            alphas.append(a)
        if S:
            q *= _dot(S[-1], Y[-1]) / _dot(Y[-1], Y[-1])
        for (s, yv), a in zip(zip(S, Y), reversed(alphas)):
            q += s * (a - _dot(yv, q) / _dot(yv, s))
        d, slope = -q, -_dot(g, q)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            S, Y, d, slope = [], [], -g, -_dot(g, g)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = f(x_new)
            if f_new <= fx + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, yv = x_new - x, g_new - g
        if _dot(s, yv) > 1e-12:
            S, Y = (S + [s])[-memory:], (Y + [yv])[-memory:]
        x, fx, g = x_new, f_new, g_new
        if np.abs(g).max() < gtol:
            break
    return x


# ----------------------------------------------------------------------------- n-gram LM


def _kn_discount(counts: Iterable[int]) -> float:
    """Ney's estimate D = n1 / (n1 + 2 n2) from the counts-of-counts."""
    hist = Counter(c for c in counts if c <= 2)
    n1, n2 = hist[1], hist[2]
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.75


class NGramLM:
    """Word-level trigram LM with interpolated Kneser-Ney smoothing (one discount per order).

    P(w | u v) = max(c(uvw) - D3, 0) / c(uv.) + D3 * T(uv.) / c(uv.) * P2(w | v)
    P2(w | v)  = max(N(.vw) - D2, 0) / N(.v.) + D2 * T2(v) / N(.v.) * P1(w)
    P1(w)      = (1 - oov_mass) * N(.w) / N(..)        for seen w,   oov_mass / |V| for unseen w
    where N(.vw) counts the distinct words seen before "v w" (continuation counts) and T(.) counts
    the distinct words seen after a history. An unseen history skips its order. Unseen words get
    a small probability, as if there were as many unseen word types as seen ones.
    """

    def __init__(self, docs: Iterable[list[str]], oov_mass: float = 0.01):
        c3: Counter[tuple[str, str, str]] = Counter()
        for toks in docs:
            seq = [BOS, BOS, *toks]
            c3.update(zip(seq, seq[1:], seq[2:]))
        self.c3 = c3
        self.ctx3: Counter = Counter()
        self.types3: Counter = Counter()
        for (u, v, _), c in c3.items():
            self.ctx3[(u, v)] += c
            self.types3[(u, v)] += 1
        self.cont2: Counter = Counter((v, w) for (_, v, w) in c3)
        self.ctx2: Counter = Counter()
        self.types2: Counter = Counter()
        for (v, _), c in self.cont2.items():
            self.ctx2[v] += c
            self.types2[v] += 1
        self.cont1: Counter = Counter(w for (_, w) in self.cont2)
        self.total1 = sum(self.cont1.values())
        self.word_counts: Counter = Counter()  # raw corpus counts, for GoldJudge's real_words
        for (_, _, w), c in c3.items():
            self.word_counts[w] += c
        self.d3 = _kn_discount(c3.values())
        self.d2 = _kn_discount(self.cont2.values())
        self.oov_mass = oov_mass
        self.p_oov = oov_mass / max(len(self.cont1), 1)

    def prob(self, u: str, v: str, w: str) -> float:
        """P(w | u v)."""
        c1 = self.cont1.get(w)
        p = (1.0 - self.oov_mass) * c1 / self.total1 if c1 else self.p_oov
        n2 = self.ctx2.get(v)
        if n2:
            p = max(self.cont2.get((v, w), 0) - self.d2, 0.0) / n2 + self.d2 * self.types2[v] / n2 * p
        n3 = self.ctx3.get((u, v))
        if n3:
            p = max(self.c3.get((u, v, w), 0) - self.d3, 0.0) / n3 + self.d3 * self.types3[(u, v)] / n3 * p
        return p

    def unigram_logprob(self, w: str) -> float:
        """log P1(w), the order-1 distribution the model backs off to."""
        c1 = self.cont1.get(w)
        return math.log((1.0 - self.oov_mass) * c1 / self.total1 if c1 else self.p_oov)

    def slor_tokens(self, context: list[str], tokens: list[str]) -> float:
        """Per-word trigram log-prob minus per-word unigram log-prob (NaN when tokens is empty).

        ~0 for words in random order, > 0 when the context makes the words more likely than
        their frequency alone: a readability score that common words cannot inflate.
        """
        if not tokens:
            return float("nan")
        return self.logprob_tokens(context, tokens) - sum(map(self.unigram_logprob, tokens)) / len(tokens)

    def logprob_tokens(self, context: list[str], tokens: list[str]) -> float:
        """Mean natural-log probability of `tokens` after `context` (NaN when tokens is empty)."""
        if not tokens:
            return float("nan")
        u, v = ([BOS, BOS] + context)[-2:]
        total = 0.0
        for w in tokens:
            total += math.log(self.prob(u, v, w))
            u, v = v, w
        return total / len(tokens)

    def logprob_per_word(self, context_texts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Mean log-prob per token of each text given its context (last two context tokens)."""
        if len(context_texts) != len(texts):
            raise ValueError(f"got {len(context_texts)} contexts for {len(texts)} texts")
        return np.array([self.logprob_tokens(tokenize(c), tokenize(t)) for c, t in zip(context_texts, texts)])


# ----------------------------------------------------------------------------- gold judge


@dataclass
class GoldJudge:
    """gold = sentiment * fluency * real_words * (1 - repetition); see the module docstring."""

    classifier: SentimentClassifier
    lm: NGramLM
    lp_good: float  # fluency anchors (SLOR per word), see _calibrate_fluency
    lp_bad: float
    min_word_count: int = 2

    @classmethod
    def from_data(cls, data_dir: Path | str | None = None, seed: int = 0) -> GoldJudge:
        """Train the classifier and the LM and calibrate fluency (a few seconds on one CPU core)."""
        t0 = time.perf_counter()
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        rt_texts, rt_labels = load_rt_polarity(data_dir)
        classifier = SentimentClassifier.train(rt_texts, rt_labels, seed=seed)
        log.info("sentiment classifier: %d features, held-out accuracy %.3f",
                 len(classifier.vocab), classifier.heldout_accuracy)

        train_reviews = [r.text for r in load_imdb(data_dir) if not r.is_valid]
        lm = NGramLM(tokenize(t) for t in [*train_reviews, *rt_texts])

        lp_good, lp_bad = cls._calibrate_fluency(lm, heldout_snippets(data_dir), seed)
        log.info("fluency anchors: lp_good %.3f, lp_bad %.3f; judge built in %.1f s",
                 lp_good, lp_bad, time.perf_counter() - t0)
        return cls(classifier, lm, lp_good, lp_bad)

    @staticmethod
    def _calibrate_fluency(lm: NGramLM, snippets: list[tuple[str, str, bool]], seed: int) -> tuple[float, float]:
        """Median SLOR of real continuations and of the same words shuffled."""
        rng = np.random.default_rng(seed)
        good, bad = [], []
        for prompt, response, _ in snippets:
            ctx, toks = tokenize(prompt), tokenize(response)
            good.append(lm.slor_tokens(ctx, toks))
            bad.append(lm.slor_tokens(ctx, [toks[i] for i in rng.permutation(len(toks))]))
        lp_good, lp_bad = float(np.nanmedian(good)), float(np.nanmedian(bad))
        if not lp_good > lp_bad:
            raise DataError("fluency calibration failed: real text is not more likely than shuffled text")
        return lp_good, lp_bad

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """The four factors and their product `gold`, each a float64 array in [0, 1]."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses")
        n = len(responses)
        fluency, real_words, repetition = np.zeros(n), np.zeros(n), np.zeros(n)
        empty = np.zeros(n, dtype=bool)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            toks = tokenize(response)
            words = [t for t in toks if is_word(t)]
            if not words:
                empty[i] = True  # nothing readable: every factor at its worst
                continue
            lp = self.lm.slor_tokens(tokenize(prompt), toks)
            fluency[i] = (lp - self.lp_bad) / (self.lp_good - self.lp_bad)
            real_words[i] = np.mean([self.lm.word_counts[w] >= self.min_word_count for w in words])
            repetition[i] = repeated_ngram_share(toks, 3)
        sentiment = self.classifier.prob_positive(list(responses))
        sentiment[empty] = 0.0
        repetition[empty] = 1.0
        fluency = np.clip(fluency, 0.0, 1.0)
        gold = sentiment * fluency * real_words * (1.0 - repetition)
        return {"sentiment": sentiment, "fluency": fluency, "real_words": real_words,
                "repetition": repetition, "gold": gold}

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Gold score in [0, 1] for each (prompt, response)."""
        return self.components(prompts, responses)["gold"]


@functools.lru_cache(maxsize=4)
def default_judge(data_dir: Path | str | None = None, seed: int = 0) -> GoldJudge:
    """One shared GoldJudge per data folder (training it again would give the same judge)."""
    return GoldJudge.from_data(data_dir, seed)
