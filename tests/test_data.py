"""Tests for rlhf.data: the JSONL readers, the record dataclasses and write_jsonl."""

from __future__ import annotations

import json
import os
from math import comb

import pytest

from rlhf.data import (
    Comparison,
    Demonstration,
    Prompt,
    read_comparisons,
    read_demonstrations,
    read_jsonl,
    read_prompts,
    read_texts,
    write_jsonl,
)
from rlhf.errors import DataError, RLHFError

PROMPT = "Write a one-line review of the film Alien (1979)."
RESPONSES = [
    "A masterclass in dread: every shadow on the Nostromo feels alive.",
    "Slow start, but the last hour is unbearably tense in the best way.",
    "It is a movie about space.",
    "Ripley is one of cinema's great heroines; the creature design still terrifies.",
]


def write_lines(path, lines):
    """Write raw text lines (no JSON encoding) to ``path``; return it."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_records(path, records):
    """Write each record as one JSON line (bypassing write_jsonl); return the path."""
    return write_lines(path, [json.dumps(r) for r in records])


def raises_at(reader, path, line, *fragments):
    """Assert ``reader(path)`` raises DataError at ``path:line`` mentioning ``fragments``."""
    with pytest.raises(DataError) as info:
        reader(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------------------------
# read_jsonl / write_jsonl
# --------------------------------------------------------------------------------------------


def test_data_error_is_value_error_and_rlhf_error():
    assert issubclass(DataError, ValueError)
    assert issubclass(DataError, RLHFError)


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"x": 1}', "", "   ", '{"x": 2}'])
    assert read_jsonl(path) == [(1, {"x": 1}), (4, {"x": 2})]


def test_read_jsonl_handles_crlf_bom_and_no_final_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"x": 1}\r\n\r\n{"x": "\xc3\xa9"}')
    assert read_jsonl(path) == [(1, {"x": 1}), (3, {"x": "é"})]


def test_read_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": "a\u2028b"}\n{"x": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [(1, {"x": "a\u2028b"}), (2, {"x": 2})]


def test_read_jsonl_empty_file_gives_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert read_jsonl(path) == []


def test_read_jsonl_max_records_stops_before_later_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"x": 1}', "", '{"x": 2}', "not json"])
    assert read_jsonl(path, max_records=2) == [(1, {"x": 1}), (3, {"x": 2})]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_read_jsonl_rejects_bad_max_records(tmp_path, bad):
    path = write_lines(tmp_path / "a.jsonl", ['{"x": 1}'])
    with pytest.raises(ValueError, match="max_records"):
        read_jsonl(path, max_records=bad)


def test_read_jsonl_invalid_json(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"x": 1}', "", '{"x": 1,}'])
    raises_at(read_jsonl, path, 3, "not valid JSON", "column")


def test_read_jsonl_two_objects_on_one_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"x": 1} {"x": 2}'])
    raises_at(read_jsonl, path, 1, "not valid JSON")


@pytest.mark.parametrize(
    ("line", "kind"), [("[1, 2]", "list"), ('"hi"', "string"), ("3", "number"), ("null", "null")]
)
def test_read_jsonl_line_not_an_object(tmp_path, line, kind):
    path = write_lines(tmp_path / "bad.jsonl", ['{"x": 1}', line])
    raises_at(read_jsonl, path, 2, "expected a JSON object", kind)


def test_read_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": "\xff"}\n')
    raises_at(read_jsonl, path, 2, "not valid UTF-8")


def test_read_jsonl_duplicate_key(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a", "prompt": "b"}'])
    raises_at(read_jsonl, path, 1, "duplicate key 'prompt'")


@pytest.mark.parametrize(
    "reader", [read_jsonl, read_prompts, read_demonstrations, read_comparisons]
)
def test_missing_file_is_data_error(tmp_path, reader):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: file does not exist"):
        reader(path)


def test_directory_is_data_error(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("reader", [read_prompts, read_demonstrations, read_comparisons])
def test_empty_file_has_no_records(tmp_path, reader):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(info.value) == f"{path}: no records"


def test_write_jsonl_round_trip_and_utf8(tmp_path):
    path = tmp_path / "out.jsonl"
    records = [
        {"prompt": "Amélie — charmant?", "n": 1},
        {"prompt": "x", "nested": {"a": [1, 2]}},
    ]
    assert write_jsonl(path, records) == 2
    assert "Amélie — charmant?" in path.read_text(encoding="utf-8")
    assert [r for _, r in read_jsonl(path)] == records
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_write_jsonl_accepts_generator_and_creates_parents(tmp_path):
    path = tmp_path / "deep" / "er" / "out.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(3))) == 3
    assert read_jsonl(path) == [(1, {"i": 0}), (2, {"i": 1}), (3, {"i": 2})]


def test_write_jsonl_replaces_existing_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"i": 1}, {"i": 2}])
    write_jsonl(path, [{"i": 3}])
    assert read_jsonl(path) == [(1, {"i": 3})]


def test_write_jsonl_empty_writes_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, []) == 0
    assert path.read_bytes() == b""


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (["not a dict"], "expected a dict"),
        ([{"x": {1, 2}}], "cannot be written"),
        ([{"x": float("nan")}], "cannot be written"),
    ],
)
def test_write_jsonl_failure_leaves_old_file_and_no_temp(tmp_path, bad, fragment):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"keep": True}])
    with pytest.raises(DataError, match=fragment) as info:
        write_jsonl(path, [{"ok": 1}, *bad])
    assert "out.jsonl: record 2" in str(info.value)
    assert read_jsonl(path) == [(1, {"keep": True})]
    assert os.listdir(tmp_path) == ["out.jsonl"]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_read_prompts(tmp_path):
    records = [{"prompt": PROMPT, "id": "p1"}, {"prompt": "Review Heat.", "extra": 1}]
    path = write_records(tmp_path / "prompts.jsonl", records)
    assert read_prompts(path) == [Prompt(PROMPT, "p1"), Prompt("Review Heat.")]


def test_prompts_round_trip(tmp_path):
    prompts = [Prompt(PROMPT, "p1"), Prompt("Review Heat (1995) in one line.")]
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, (p.to_record() for p in prompts))
    assert read_prompts(path) == prompts


def test_read_prompts_max_records(tmp_path):
    path = write_records(tmp_path / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    assert [p.prompt for p in read_prompts(path, max_records=2)] == ["p0", "p1"]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"id": "p1"}, "missing 'prompt'"),
        ({"prompt": ""}, "'prompt' is empty"),
        ({"prompt": "  \n"}, "'prompt' is empty"),
        ({"prompt": 3}, "'prompt' must be a string, got number"),
        ({"prompt": None}, "'prompt' must be a string, got null"),
        ({"prompt": "ok", "id": 7}, "'id' must be a string, got number"),
        ({"prompt": "ok", "id": ""}, "'id' is empty"),
    ],
)
def test_read_prompts_errors(tmp_path, record, fragment):
    path = write_records(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, record])
    raises_at(read_prompts, path, 2, fragment)


def test_read_prompts_duplicate_id(tmp_path):
    records = [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}]
    path = write_records(tmp_path / "prompts.jsonl", records)
    message = raises_at(read_prompts, path, 2, "duplicate id 'x'")
    assert f"{path}:1" in message


# --------------------------------------------------------------------------------------------
# Demonstrations
# --------------------------------------------------------------------------------------------


def test_demonstrations_round_trip(tmp_path):
    demos = [
        Demonstration(PROMPT, RESPONSES[0]),
        Demonstration("Review Heat.", "Two titans, one diner scene."),
    ]
    path = tmp_path / "demos.jsonl"
    write_jsonl(path, (d.to_record() for d in demos))
    assert read_demonstrations(path) == demos


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"response": "x"}, "missing 'prompt'"),
        ({"prompt": "x"}, "missing 'response'"),
        ({"prompt": "", "response": "x"}, "'prompt' is empty"),
        ({"prompt": "x", "response": ""}, "'response' is empty"),
        ({"prompt": "x", "response": ["a"]}, "'response' must be a string, got list"),
    ],
)
def test_read_demonstrations_errors(tmp_path, record, fragment):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = write_lines(tmp_path / "demos.jsonl", ["", good, "", json.dumps(record)])
    raises_at(read_demonstrations, path, 4, fragment)


# --------------------------------------------------------------------------------------------
# Comparisons: the three shapes
# --------------------------------------------------------------------------------------------


def read_one(tmp_path, record):
    path = write_records(tmp_path / "prefs.jsonl", [record])
    (comparison,) = read_comparisons(path)
    return comparison


def test_full_ranking(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "responses": RESPONSES, "ranking": [3, 0, 1, 2]})
    assert c.kind == "ranking"
    assert c.K == 4
    assert c.responses == tuple(RESPONSES)
    assert c.ranking == ((3,), (0,), (1,), (2,))
    assert c.best is None
    assert c.pairs() == [(3, 0), (3, 1), (3, 2), (0, 1), (0, 2), (1, 2)]
    assert len(c.pairs()) == comb(4, 2)
    assert not c.is_tie


def test_ranking_with_ties(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "responses": RESPONSES, "ranking": [2, [3, 0], 1]})
    assert c.ranking == ((2,), (0, 3), (1,))  # tied indices are sorted
    assert sorted(c.pairs()) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])
    assert len(c.pairs()) == comb(4, 2) - 1  # the tied pair (0, 3) is left out


def test_ranking_all_tied_has_no_pairs(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "responses": RESPONSES[:3], "ranking": [[0, 1, 2]]})
    assert c.ranking == ((0, 1, 2),)
    assert c.pairs() == []
    assert c.is_tie


def test_ranking_singleton_groups_as_lists(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "responses": RESPONSES[:2], "ranking": [[1], [0]]})
    assert c.ranking == ((1,), (0,))
    assert c.pairs() == [(1, 0)]


def test_best_of_k(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "responses": RESPONSES, "best": 3})
    assert c.kind == "best_of_k"
    assert c.best == 3
    assert c.ranking is None
    assert c.pairs() == [(3, 0), (3, 1), (3, 2)]
    assert not c.is_tie


def test_pair(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "chosen": RESPONSES[0], "rejected": RESPONSES[2]})
    assert c.kind == "pair"
    assert c.responses == (RESPONSES[0], RESPONSES[2])
    assert c.ranking == ((0,), (1,))
    assert c.best is None
    assert c.pairs() == [(0, 1)]
    assert c.K == 2


def test_tied_pair(tmp_path):
    record = {"prompt": PROMPT, "response_a": RESPONSES[0], "response_b": RESPONSES[3], "tie": True}
    c = read_one(tmp_path, record)
    assert c.kind == "pair"
    assert c.ranking == ((0, 1),)
    assert c.pairs() == []
    assert c.is_tie


def test_pair_with_identical_texts_is_allowed(tmp_path):
    c = read_one(tmp_path, {"prompt": PROMPT, "chosen": "Same.", "rejected": "Same."})
    assert c.pairs() == [(0, 1)]


def test_mixed_shapes_in_one_file_and_extra_fields(tmp_path):
    path = write_records(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": PROMPT, "responses": RESPONSES, "ranking": [0, 1, 2, 3], "labeler": "a7"},
            {"prompt": PROMPT, "responses": RESPONSES, "best": 0},
            {"prompt": PROMPT, "chosen": "a", "rejected": "b", "id": "x"},
        ],
    )
    assert [c.kind for c in read_comparisons(path)] == ["ranking", "best_of_k", "pair"]
    assert len(read_comparisons(path, max_records=2)) == 2


def test_comparisons_round_trip(tmp_path):
    comparisons = [
        Comparison(PROMPT, tuple(RESPONSES), "ranking", ((2,), (0, 3), (1,))),
        Comparison(PROMPT, tuple(RESPONSES), "ranking", ((0,), (1,), (2,), (3,))),
        Comparison(PROMPT, tuple(RESPONSES[:3]), "best_of_k", best=1),
        Comparison(PROMPT, (RESPONSES[0], RESPONSES[2]), "pair", ((0,), (1,))),
        Comparison(PROMPT, (RESPONSES[0], RESPONSES[1]), "pair", ((0, 1),)),
    ]
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, (c.to_record() for c in comparisons))
    assert read_comparisons(path) == comparisons


def test_comparison_normalises_lists_and_is_hashable():
    c = Comparison(PROMPT, RESPONSES, "ranking", [1, [2, 0], 3])
    assert c.responses == tuple(RESPONSES)
    assert c.ranking == ((1,), (0, 2), (3,))
    assert hash(c) == hash(Comparison(PROMPT, tuple(RESPONSES), "ranking", ((1,), (0, 2), (3,))))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "listwise", "ranking": ((0,), (1,))}, "kind must be one of"),
        ({"kind": "best_of_k", "best": 0, "ranking": ((0,), (1,))}, "has no ranking"),
        ({"kind": "best_of_k"}, "missing 'best'"),
        ({"kind": "ranking", "ranking": ((0,), (1,)), "best": 0}, "'best' is only for best_of_k"),
        ({"kind": "ranking"}, "missing 'ranking'"),
        ({"kind": "pair", "ranking": ((1,), (0,))}, "a pair's ranking must be"),
    ],
)
def test_comparison_constructor_checks(kwargs, fragment):
    with pytest.raises(DataError, match=fragment):
        Comparison(PROMPT, tuple(RESPONSES[:2]), **kwargs)


def test_comparison_pair_needs_two_responses():
    with pytest.raises(DataError, match="a pair has exactly 2 responses, got 3"):
        Comparison(PROMPT, tuple(RESPONSES[:3]), "pair", ((0,), (1,), (2,)))


# --------------------------------------------------------------------------------------------
# Comparisons: errors
# --------------------------------------------------------------------------------------------

R3 = RESPONSES[:3]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        # prompt
        ({"responses": R3, "best": 0}, "missing 'prompt'"),
        ({"prompt": "", "responses": R3, "best": 0}, "'prompt' is empty"),
        ({"prompt": 1, "chosen": "a", "rejected": "b"}, "'prompt' must be a string, got number"),
        # responses
        ({"prompt": PROMPT, "responses": ["only one"], "best": 0}, "needs at least 2 responses, got 1"),
        ({"prompt": PROMPT, "responses": [], "ranking": []}, "needs at least 2 responses, got 0"),
        ({"prompt": PROMPT, "responses": "abc", "best": 0}, "'responses' must be a list, got string"),
        ({"prompt": PROMPT, "responses": ["a", 2], "best": 0}, "'responses[1]' must be a string, got number"),
        ({"prompt": PROMPT, "responses": ["a", ""], "best": 0}, "'responses[1]' is empty"),
        ({"prompt": PROMPT, "ranking": [0, 1]}, "missing 'responses'"),
        ({"prompt": PROMPT, "responses": R3}, "'responses' needs 'ranking' or 'best'"),
        # ranking
        ({"prompt": PROMPT, "responses": R3, "ranking": [2, 0, 2]}, "ranking repeats index 2"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [2, [0, 2], 1]}, "ranking repeats index 2"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, 1, 3]}, "ranking index 3 is out of range for 3 responses"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, -1, 2]}, "ranking index -1 is out of range"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, 1]}, "ranking does not cover all 3 responses: missing 2"),
        ({"prompt": PROMPT, "responses": R3, "ranking": []}, "missing 0, 1, 2"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, "1", 2]}, "ranking index must be an integer, got string"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, 1.0, 2]}, "ranking index must be an integer, got number"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [True, 0, 2]}, "ranking index must be an integer, got boolean"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, [], 1, 2]}, "empty tie group"),
        ({"prompt": PROMPT, "responses": R3, "ranking": [0, [[1], 2]]}, "tie groups must hold indices"),
        ({"prompt": PROMPT, "responses": R3, "ranking": "0,1,2"}, "'ranking' must be a list, got string"),
        # best
        ({"prompt": PROMPT, "responses": R3, "best": 3}, "best 3 is out of range for 3 responses"),
        ({"prompt": PROMPT, "responses": R3, "best": -1}, "best -1 is out of range"),
        ({"prompt": PROMPT, "responses": R3, "best": True}, "best must be an integer, got boolean true"),
        ({"prompt": PROMPT, "responses": R3, "best": 1.0}, "best must be an integer, got number"),
        ({"prompt": PROMPT, "responses": R3, "best": "0"}, "best must be an integer, got string"),
        ({"prompt": PROMPT, "responses": R3, "best": None}, "best must be an integer, got null"),
        ({"prompt": PROMPT, "responses": R3, "best": 0, "ranking": [0, 1, 2]}, "has both 'ranking' and 'best'"),
        # pairs
        ({"prompt": PROMPT, "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": PROMPT, "rejected": "a"}, "missing 'chosen'"),
        ({"prompt": PROMPT, "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": PROMPT, "chosen": "a", "rejected": 5}, "'rejected' must be a string, got number"),
        ({"prompt": PROMPT, "response_a": "a", "response_b": "b"}, "missing 'tie'"),
        ({"prompt": PROMPT, "response_a": "a", "response_b": "b", "tie": False}, "'tie' must be true, got false"),
        ({"prompt": PROMPT, "response_a": "a", "response_b": "b", "tie": "yes"}, "'tie' must be true"),
        ({"prompt": PROMPT, "response_a": "a", "tie": True}, "missing 'response_b'"),
        ({"prompt": PROMPT, "response_a": "", "response_b": "b", "tie": True}, "'response_a' is empty"),
        # shape detection
        ({"prompt": PROMPT, "chosen": "a", "rejected": "b", "tie": True}, "mixes fields"),
        ({"prompt": PROMPT, "chosen": "a", "rejected": "b", "responses": R3}, "mixes fields"),
        ({"prompt": PROMPT, "response": "a"}, "not a comparison"),
    ],
)
def test_read_comparisons_errors(tmp_path, record, fragment):
    good = {"prompt": PROMPT, "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good), "", json.dumps(record), json.dumps(good)]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    raises_at(read_comparisons, path, 3, fragment)


def test_error_message_format_matches_docs(tmp_path):
    path = write_records(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": PROMPT, "chosen": "a", "rejected": "b"},
            {"prompt": PROMPT, "chosen": "a", "rejected": "b"},
            {"prompt": PROMPT, "responses": R3, "ranking": [2, 0, 2]},
        ],
    )
    with pytest.raises(DataError) as info:
        read_comparisons(path)
    assert str(info.value) == f"{path}:3: ranking repeats index 2"


def test_error_uses_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "prefs.jsonl", [{"prompt": PROMPT, "responses": R3, "best": 9}])
    with pytest.raises(DataError) as info:
        read_comparisons("prefs.jsonl")
    assert str(info.value) == "prefs.jsonl:1: best 9 is out of range for 3 responses (0..2)"


# --------------------------------------------------------------------------------------------
# Pre-training text (PPO-ptx)
# --------------------------------------------------------------------------------------------


def test_read_texts_from_text_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("First document,\non two lines.\n\n\n  Second one.  \n   \nThird.\n", encoding="utf-8")
    assert read_texts(txt) == ["First document,\non two lines.", "Second one.", "Third."]
    assert read_texts(txt, max_records=2) == ["First document,\non two lines.", "Second one."]
    jl = tmp_path / "corpus.jsonl"
    write_jsonl(jl, [{"text": "A review."}, {"prompt": "Q: ", "response": "A."}, {"text": "x", "prompt": "ignored"}])
    assert read_texts(jl) == ["A review.", "Q: A.", "x"]


@pytest.mark.parametrize("content, message", [
    ('{"title": "no text"}\n', "corpus.jsonl:1: not pre-training text"),
    ('{"text": ""}\n', "corpus.jsonl:1: 'text' is empty"),
    ('{"prompt": "only a prompt"}\n', "corpus.jsonl:1: missing 'response'"),
    ("", "corpus.jsonl: no records"),
])
def test_read_texts_errors_name_the_line(tmp_path, content, message):
    f = tmp_path / "corpus.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        read_texts(f)
    assert str(e.value).startswith(str(f) + message[len("corpus.jsonl"):])


def test_read_texts_errors_on_plain_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        read_texts(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nnot \xff utf-8\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        read_texts(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
