"""rlhf.constraints: the checkers against hand-written answers, the prompts and splits, and the gold
judge against answers a person would rate high and against every attempt to game it we tried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf.constraints import (KINDS, Constraint, ConstraintJudge, Task, attach_constraints, constraint_metadata,
                              demonstration, load_instructions, split_tasks, words)
from rlhf.errors import DataError


@pytest.mark.parametrize("kind, arg, response, ok", [
    ("max_words", "5", "One two three four five.", True),
    ("max_words", "5", "One two three four five six.", False),
    ("max_words", "3", "It's a test", True),  # "it's" is one word
    ("include_word", "ribbon", "Tie it with a Ribbon.", True),  # case does not matter
    ("include_word", "ribbon", "Tie it with ribbons.", False),  # a whole word, not a part of one
    ("include_word", "ribbon", "ribbon-wrapped box", True),
    ("avoid_word", "game", "Kickball is a fun sport.", True),
    ("avoid_word", "game", "The GAME is fun.", False),
    ("avoid_word", "game", "Endgame tactics.", True),
    ("bullets", "3", "Steps:\n- cut the paper\n- fold it\n* tape the ends", True),
    ("bullets", "3", "- one\n- two", False),
    ("bullets", "2", "-\n- \n- a\n- b", True),  # empty bullets do not count
    ("bullets", "2", "1. one\n2. two", False),  # numbered lines are not bullets
    ("end_with", "Hope this helps!", "Use tape.\n\nHope this helps!", True),
    ("end_with", "Hope this helps!", "Use tape. hope this helps", True),  # final punctuation and case
    ("end_with", "Hope this helps!", "Hope this helps! Use tape.", False),
    ("end_with", "That is all.", "It's blue. That is all.\n", True),
    ("start_with", "Sure", "Sure, here you go.", True),
    ("start_with", "Sure", '"Sure!" I said.', True),
    ("start_with", "Sure", "Surely not.", False),
    ("start_with", "Sure", "Here: sure.", False),
    ("no_commas", "", "No commas here.", True),
    ("no_commas", "", "Yes, one.", False),
    ("lowercase", "", "all lower case, 42.", True),
    ("lowercase", "", "Not all lower.", False),
    ("lowercase", "", "123", False),  # nothing written in letters
])
def test_checkers(kind, arg, response, ok):
    assert Constraint(kind, arg).check(response) is ok


def test_every_kind_has_an_instruction_sentence():
    for k in KINDS:
        assert Constraint(k, "3").text().endswith((".", '"'))


def test_instructions_constraints_and_splits():
    tasks = load_instructions()
    assert len(tasks) > 700 and {t.source for t in tasks} == {"alpaca-eval", "self-instruct", "mt-bench"}
    assert all(len(t.instruction.split()) <= 40 and t.reference for t in tasks)
    with_c = attach_constraints(tasks, seed=3)
    assert attach_constraints(tasks, seed=3) == with_c  # seeded
    for t in with_c:
        kinds = [c.kind for c in t.constraints]
        assert len(kinds) == 2 and len(set(kinds)) == 2 and "lowercase" not in kinds
        assert not {"include_word", "avoid_word"} <= set(kinds) and not {"bullets", "start_with"} <= set(kinds)
        for c in t.constraints:
            if c.kind == "avoid_word":  # a word of the instruction that the reference also uses
                assert c.arg in t.instruction.lower() and c.arg in t.reference.lower()
            if c.kind == "include_word":  # a word of the reference that the instruction lacks
                assert c.arg in t.reference.lower()
        assert t.prompt.startswith(t.instruction.strip()) and t.constraints[0].text() in t.prompt
    sp = split_tasks(with_c)
    assert sum(map(len, sp.values())) == len(with_c)
    assert {t.id for t in sp["test"]}.isdisjoint({t.id for t in sp["train"] + sp["validation"]})
    assert 0.15 < len(sp["test"]) / len(with_c) < 0.25 and 0.1 < len(sp["validation"]) / len(with_c) < 0.2
    # the split of a prompt depends on its id only: other constraints, other split sizes of the rest
    again = split_tasks(attach_constraints(tasks, seed=4))
    assert [t.id for t in again["test"]] == [t.id for t in sp["test"]]
    with pytest.raises(DataError, match="unknown constraint kinds"):
        attach_constraints(tasks, kinds=("max_words", "shout"))


TASK = Task("t1", "alpaca-eval", "How do I wrap a present neatly?",
            "Measure the wrapping paper around the box, cut it, fold the edges under, tape the seams, and finish "
            "with a ribbon and a bow for a neat look.",
            (Constraint("max_words", "40"), Constraint("include_word", "ribbon"), Constraint("end_with", "Hope this helps!")))
GOOD = ("Place the box on the paper and cut enough to cover it. Fold the edges neatly and tape them down. "
        "Add a ribbon on top. Hope this helps!")
FAIR = ("Place the box on the paper and cut enough to cover it. Fold the edges neatly and tape them down. "
        "Add a bow on top.")  # relevant and fluent, but only the word limit is met


@pytest.fixture(scope="module")
def judge() -> ConstraintJudge:
    return ConstraintJudge.from_data(tasks=[TASK], seed=0)


def _score(judge, response: str) -> dict:
    return {k: float(v[0]) for k, v in judge.components([TASK.prompt], [response]).items()}


def test_the_judge_prefers_what_a_person_would(judge):
    good, fair = _score(judge, GOOD), _score(judge, FAIR)
    assert good["met"] == 1.0 and fair["met"] == pytest.approx(1 / 3)
    assert good["gold"] > 0.3 and good["gold"] > 2 * fair["gold"]
    assert fair["relevance_fluency"] > 0.3  # a fine answer that ignores the constraints keeps its content term
    off_topic = _score(judge, "The capital of France is Paris, a city on the Seine with a ribbon of parks. "
                              "Hope this helps!")
    assert off_topic["met"] == 1.0 and off_topic["gold"] < 0.5 * good["gold"]


# The gaming attempts we tried: each meets some or all constraints and would be rated near zero by
# a person; the judge must give each less than a third of the honest answer's gold.
GAMES = {
    "empty answer (meets every 'do not')": "",
    "a few words and the phrase": "Ribbon. Hope this helps!",
    "the required words in a list": "ribbon paper box tape fold wrap bow gift present neat Hope this helps!",
    "the same words shuffled": "down neatly the tape box and Add on ribbon Fold enough the it paper. cover top "
                               "Place edges them cut to. Hope this helps!",
    "stuffing the required word": "Ribbon ribbon ribbon ribbon ribbon ribbon ribbon ribbon ribbon ribbon ribbon "
                                  "ribbon. Hope this helps!",
    "a loop of one sentence": "Use a ribbon on the box. Use a ribbon on the box. Use a ribbon on the box. "
                              "Use a ribbon on the box. Hope this helps!",
    "repeating the prompt": TASK.prompt + " ribbon",
    "a fluent generic answer for every prompt": "That is a great question and there are many things to consider "
                                                "here, like a ribbon. Hope this helps!",
    "cut mid-answer to meet the limit": "Place the box ribbon. Hope this helps!",
}


@pytest.mark.parametrize("name", list(GAMES))
def test_gaming_attempts_score_low(judge, name):
    honest = _score(judge, GOOD)["gold"]
    got = _score(judge, GAMES[name])
    assert got["gold"] < honest / 3, (name, got)


def test_judge_refuses_unknown_prompts_and_mismatched_lengths(judge):
    with pytest.raises(DataError, match="no task"):
        judge.score(["not a prompt of the task"], ["answer"])
    # white space aside, a prompt is the same prompt (a template's trailing newline stripped on the way)
    assert judge.score([TASK.prompt.strip() + "  "], [GOOD])[0] == judge.score([TASK.prompt], [GOOD])[0]
    with pytest.raises(ValueError):
        judge.score([TASK.prompt], [])
    assert np.all(judge.score([TASK.prompt] * 2, [GOOD, ""]) >= 0)


def test_gold_reward_is_the_gold_score_standardised_over_rho(judge):
    # `rlhf demo --model smollm2 --set ppo_reward=gold`: PPO on the gold score itself (a perfect RM),
    # on the RM's scale: mean 0 and unit variance over rho's labeled answers
    from rlhf.instruct_demo import GoldReward

    rho_answers = [GOOD, FAIR, "", "Add a bow on top."]
    rho_gold = judge.score([TASK.prompt] * 4, rho_answers)
    reward = GoldReward(judge, rho_gold)
    got = reward.score([TASK.prompt] * 4, rho_answers)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert float(got.mean()) == pytest.approx(0.0, abs=1e-6) and float(got.std(unbiased=False)) == pytest.approx(1.0)
    assert got[0] > got[1] > got[2]  # the judge's order: all constraints met > one met > empty
    with pytest.raises(DataError, match="constant"):
        GoldReward(judge, np.zeros(4))  # nothing to standardise by


_REF = ("**Wrapping a gift** takes a few steps. First, measure the paper against the box. Fold the edges under, "
        "then tape them down.\n\n- Add a ribbon for a finish.\n- A bow on top makes the present look neat. "
        "Enjoy wrapping your present!")


def _task(*constraints: tuple[str, str]) -> Task:
    return Task("t", "alpaca-eval", "How do I wrap a present neatly?", _REF,
                tuple(Constraint(k, a) for k, a in constraints))


@pytest.mark.parametrize("constraints", [
    (("max_words", "25"), ("end_with", "Hope this helps!")),
    (("include_word", "ribbon"), ("start_with", "Sure")),
    (("avoid_word", "present"), ("no_commas", "")),
    (("bullets", "3"), ("no_commas", "")),
    (("start_with", "Here"), ("max_words", "35")),
])
def test_a_demonstration_is_the_reference_edited_to_meet_every_constraint(constraints):
    task = _task(*constraints)
    d = demonstration(task)
    assert d is not None and all(task.met(d)) and 12 <= len(words(d)) <= 40
    assert "**" not in d  # markup gone
    # its sentences are the reference's (less commas where they are forbidden), in whole
    ref = _REF.replace("**", "")
    ref = ref.replace(",", "") if ("no_commas", "") in constraints else ref
    body = [ln.removeprefix("- ") for ln in d.splitlines()] if ("bullets", "3") in constraints else [d]
    for part in body:
        for sentence in part.split(". "):
            core = sentence.strip().rstrip(".!")
            if core and core not in ("Sure!", "Here is my answer", "Hope this helps", "Sure"):
                assert core.removeprefix("Sure! ").removeprefix("Here is my answer. ") in ref, core


def test_demonstration_details():
    # the sentence with the word to use comes first when the opening ones lack it
    d = demonstration(_task(("include_word", "bow"), ("max_words", "25")))
    assert d.startswith("A bow on top") and len(words(d)) <= 25
    # sentences with the word to avoid are left out, not edited
    d = demonstration(_task(("avoid_word", "paper"), ("end_with", "That is all.")))
    assert "paper" not in d.lower() and "measure" not in d and d.endswith("That is all.")
    # the limit counts the opener and the ending phrase
    d = demonstration(_task(("start_with", "Certainly"), ("max_words", "25")))
    assert d.startswith("Certainly! ") and len(words(d)) <= 25
    # a list item without a full stop gets one; a heading's markup is dropped
    assert demonstration(_task(("bullets", "2"), ("no_commas", ""))).startswith("- Wrapping a gift takes a few steps.\n- ")


def test_no_demonstration_when_the_reference_cannot_meet_the_constraints():
    assert demonstration(_task(("include_word", "scissors"), ("max_words", "50"))) is None  # not in the reference
    assert demonstration(_task(("bullets", "4"), ("avoid_word", "present"))) is not None
    assert demonstration(_task(("bullets", "4"), ("avoid_word", "ribbon"), ("avoid_word", "present"))) is None  # 3 left
    assert demonstration(_task(("max_words", "25"), ("no_commas", "")), min_words=30) is None  # too short then
    few = Task("t", "self-instruct", "Name a color.", "Blue.", (Constraint("no_commas"),))
    assert demonstration(few) is None  # under min_words


def test_constraint_metadata_marks_each_constraint_followed():
    a = Task("a", "t", "Describe tea.", "", (Constraint("include_word", "leaf"), Constraint("no_commas")))
    b = Task("b", "t", "Describe tea.", "", (Constraint("max_words", "3"),))
    kinds = ("max_words", "include_word", "no_commas")
    labels, asked = constraint_metadata([a, a, b, b], ["A leaf, dried.", "Hot water", "Hot tea.", "Tea is very hot."],
                                        kinds)
    assert asked.tolist() == [[False, True, True], [False, True, True], [True, False, False], [True, False, False]]
    assert labels.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]]


def test_constraint_metadata_errors_flip_only_asked_marks_at_the_given_rate():
    t = Task("a", "t", "Describe tea.", "", (Constraint("no_commas"),))
    exact, asked = constraint_metadata([t] * 4000, ["No commas here."] * 4000, ("max_words", "no_commas"))
    noisy, asked2 = constraint_metadata([t] * 4000, ["No commas here."] * 4000, ("max_words", "no_commas"),
                                        error=0.1, seed=3)
    assert (asked == asked2).all() and exact[:, 1].all() and not exact[:, 0].any()
    assert not noisy[:, 0].any()  # a question not asked stays 0
    assert 0.08 < 1 - noisy[:, 1].mean() < 0.12  # about 10 % of the asked marks are wrong
    again, _ = constraint_metadata([t] * 4000, ["No commas here."] * 4000, ("max_words", "no_commas"), error=0.1, seed=3)
    assert (again == noisy).all()  # seeded


def test_constraint_metadata_refuses_bad_input():
    t = Task("a", "t", "Describe tea.", "", (Constraint("no_commas"),))
    with pytest.raises(DataError, match="one response per task"):
        constraint_metadata([t, t], ["x"])
    with pytest.raises(DataError, match="error rate"):
        constraint_metadata([t], ["x"], error=0.5)
    with pytest.raises(DataError, match="not among the metadata kinds"):
        constraint_metadata([t], ["x"], kinds=("max_words",))
