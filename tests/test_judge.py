"""The hidden gold judge: hand-checked pieces, then behaviour on real data and on gaming attempts."""

import math
import time

import numpy as np
import pytest

from rlhf.judge import (
    NGramLM,
    default_data_dir,
    default_judge,
    heldout_snippets,
    tokenize,
)
from rlhf.labeler import SimulatedLabeler

PROMPT = "i went to see this movie last night and"


@pytest.fixture(scope="module")
def built():
    """(judge, seconds to build it): the judge is trained once for the whole module."""
    if not (default_data_dir() / "rt-polarity").is_dir():
        pytest.skip("shared/data is not next to the repository")
    default_judge.cache_clear()
    t0 = time.perf_counter()
    judge = default_judge()
    return judge, time.perf_counter() - t0


@pytest.fixture(scope="module")
def judge(built):
    return built[0]


@pytest.fixture(scope="module")
def snippets(built):
    return heldout_snippets()


# ----------------------------------------------------------------------------- no data needed


def test_tokenize():
    assert tokenize("It's GREAT!<br /><br />10/10, loved it") == [
        "it's", "great", "!", "10", "/", "10", ",", "loved", "it",
    ]
    assert tokenize("") == []


def test_kneser_ney_by_hand():
    # docs "a b", "a b", "b" -> trigrams (<s> <s> a) x2, (<s> a b) x2, (<s> <s> b) x1
    lm = NGramLM([["a", "b"], ["a", "b"], ["b"]], oov_mass=0.01)
    assert lm.d3 == pytest.approx(1 / (1 + 2 * 2))  # n1 = 1, n2 = 2
    assert lm.d2 == pytest.approx(1.0)  # all continuation counts are 1
    # P1(b) = 0.99 * 2/3 = 0.66; P2(b|<s>) = 0 + 1 * 2/2 * 0.66 = 0.66
    # P3(b|<s> <s>) = (1 - 0.2)/3 + 0.2 * 2/3 * 0.66 = 0.266667 + 0.088
    assert lm.prob("<s>", "<s>", "b") == pytest.approx(0.354667, abs=1e-6)
    assert lm.logprob_per_word([""], ["b"])[0] == pytest.approx(math.log(0.354667), abs=1e-5)
    # two words: mean of log P(a|<s> <s>) and log P(b|<s> a)
    expected = 0.5 * (math.log(lm.prob("<s>", "<s>", "a")) + math.log(lm.prob("<s>", "a", "b")))
    assert lm.logprob_per_word([""], ["a b"])[0] == pytest.approx(expected)
    # the context's last two words are the first history
    assert lm.logprob_per_word(["x y a"], ["b"])[0] == pytest.approx(math.log(lm.prob("y", "a", "b")))


def test_kneser_ney_is_normalised():
    rng = np.random.default_rng(0)
    words = list("abcdefgh")
    lm = NGramLM([list(rng.choice(words, size=rng.integers(1, 12))) for _ in range(200)], oov_mass=0.02)
    vocab = list(lm.cont1)
    for u, v in [("<s>", "<s>"), ("a", "b"), ("c", "c"), ("zz", "a"), ("zz", "zz")]:
        # the seen words plus |V| unseen types (each at the OOV probability) sum to one
        total = sum(lm.prob(u, v, w) for w in vocab) + len(vocab) * lm.prob(u, v, "unseen")
        assert total == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- real data


def test_judge_builds_fast_and_classifier_is_decent(built):
    judge, seconds = built
    assert seconds < 20.0
    assert 0.72 < judge.classifier.heldout_accuracy < 0.82
    assert judge.lp_good > judge.lp_bad
    p = judge.classifier.prob_positive(["a wonderful , moving film .", "a dull , tedious mess ."])
    assert p[0] > 0.8 and p[1] < 0.2


def test_components_are_consistent(judge):
    responses = ["it was a great film .", "", "! ? !", "terrible , awful acting ."]
    c = judge.components([PROMPT] * 4, responses)
    assert set(c) == {"sentiment", "fluency", "real_words", "repetition", "gold"}
    for v in c.values():
        assert v.dtype == np.float64 and v.shape == (4,)
        assert np.all((v >= 0.0) & (v <= 1.0))
    product = c["sentiment"] * c["fluency"] * c["real_words"] * (1.0 - c["repetition"])
    np.testing.assert_allclose(c["gold"], product)
    assert c["gold"][1] == 0.0 and c["gold"][2] == 0.0  # no words, no score
    np.testing.assert_array_equal(judge.score([PROMPT] * 4, responses), c["gold"])
    with pytest.raises(ValueError):
        judge.score([PROMPT], responses)


def test_real_positive_snippets_beat_negative_ones(judge, snippets):
    gold = judge.score([p for p, _, _ in snippets], [r for _, r, _ in snippets])
    positive = np.array([pos for _, _, pos in snippets])
    assert positive.sum() > 50 and (~positive).sum() > 50
    assert gold[positive].mean() - gold[~positive].mean() > 0.08
    auc = np.mean(gold[positive][:, None] > gold[~positive][None, :])
    assert auc > 0.6


def test_shuffled_real_text_scores_near_zero(judge, snippets):
    rng = np.random.default_rng(1)
    prompts = [p for p, _, _ in snippets]
    real = [r for _, r, _ in snippets]
    shuffled = [" ".join(rng.permutation(tokenize(r))) for r in real]
    gold_real, gold_shuffled = judge.score(prompts, real), judge.score(prompts, shuffled)
    assert gold_shuffled.mean() < 0.05
    assert gold_real.mean() > 5 * gold_shuffled.mean()
    assert np.mean(gold_shuffled < gold_real) > 0.95


def test_shuffled_positive_sentences_lose_most_of_their_score(judge):
    # a frequency-only fluency (raw trigram log-prob) rated such bags of common words as fluent
    rng = np.random.default_rng(0)
    originals = READABLE_POSITIVE
    shuffled = [" ".join(rng.permutation(s.split())) for s in originals for _ in range(5)]
    gold_orig = judge.score([PROMPT] * len(originals), originals)
    gold_shuf = judge.score([PROMPT] * len(shuffled), shuffled)
    assert gold_shuf.mean() < 0.25 * gold_orig.mean()


READABLE_POSITIVE = [
    "this is one of the best films i have seen in years , and the acting is wonderful .",
    "it's a wonderful film with great performances , a smart script and beautiful music .",
    "i highly recommend this film to anyone who loves a good comedy .",
]

GAMING = {
    "word salad": "and theillsanf and theackm of theg and theillsanf and theackm of theg and the best",
    "random characters": "zxq vbnm qwrt plok jhgf asdf wert yuio",
    "positive word list": "great wonderful excellent amazing best perfect brilliant superb",
    "amazing loop": " ".join(["amazing"] * 24),
    "the best loop": " ".join(["the", "best"] * 12),
    "the best , loop": " ".join(["the", "best", ","] * 8),
    "exclamation loop": " ".join(["!"] * 23 + ["great"]),
    "sentence loop": " ".join(["i", "loved", "it", "."] * 6),
}


def test_readable_positive_sentences_score_high(judge):
    gold = judge.score([PROMPT] * len(READABLE_POSITIVE), READABLE_POSITIVE)
    assert np.all(gold > 0.4), gold


def test_readable_negative_sentence_scores_low(judge):
    gold = judge.score([PROMPT], ["it was a boring waste of time , the acting was terrible and the plot was stupid ."])
    assert gold[0] < 0.1


@pytest.mark.parametrize("name", list(GAMING))
def test_gaming_attempts_score_near_zero(judge, name):
    gold = judge.score([PROMPT], [GAMING[name]])[0]
    best_honest = judge.score([PROMPT] * len(READABLE_POSITIVE), READABLE_POSITIVE).min()
    assert gold < 0.1, (name, gold)
    assert gold < best_honest / 5


def test_labeler_on_the_real_judge_prefers_readable_positive_text(judge):
    labeler = SimulatedLabeler(judge, temperature=0.05, seed=0)
    order = labeler.rank(PROMPT, [GAMING["word salad"], READABLE_POSITIVE[0], GAMING["amazing loop"]])
    assert order[0] == 1


def test_default_judge_is_cached(judge):
    assert default_judge() is judge
