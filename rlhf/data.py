"""Reading and writing the JSONL data files of the RLHF loop.

Every file holds one JSON object per line, UTF-8 encoded; blank lines are skipped. Three kinds
of file are read here (see ``docs/data-formats.md`` for examples):

* prompts -- ``{"prompt": ..., "id": ...}`` -> :class:`Prompt`
* demonstrations -- ``{"prompt": ..., "response": ...}`` -> :class:`Demonstration`
* comparisons -- a full ranking of K responses (ties allowed), a best-of-K choice, or a pair
  (``chosen``/``rejected``, or a tie) -> :class:`Comparison`

Pre-training text for PPO-ptx (:func:`read_texts`) may also be a plain text file.

Bad input raises :class:`~rlhf.errors.DataError` whose message starts with ``<file>:<line>:``
(1-based) and says what is wrong, e.g. ``prefs.jsonl:3: ranking repeats index 2``.

The dataclasses check themselves when built, so a :class:`Comparison` made in code obeys the
same rules as one read from a file (the error then has no file/line prefix).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, TypeVar

from rlhf.errors import DataError

__all__ = [
    "Comparison",
    "ComparisonKind",
    "Demonstration",
    "Prompt",
    "read_comparisons",
    "read_demonstrations",
    "read_jsonl",
    "read_prompts",
    "write_jsonl",
]

ComparisonKind = Literal["ranking", "best_of_k", "pair"]
_KINDS = ("ranking", "best_of_k", "pair")

PathLike = str | os.PathLike[str]
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Field checks shared by the dataclasses (messages carry no location; readers add it)
# --------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_text(value: Any, name: str) -> str:
    """Return ``value`` if it is a non-blank string; otherwise raise DataError."""
    if not isinstance(value, str):
        raise DataError(f"'{name}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise DataError(f"'{name}' is empty")
    return value


def _show(value: Any) -> str:
    """A short JSON rendering of ``value`` for error messages."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_index(value: Any, name: str, k: int) -> int:
    """Return ``value`` if it is an int (not a bool) in ``range(k)``; otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{name} must be an integer, got {_json_type(value)} {_show(value)}")
    if not 0 <= value < k:
        raise DataError(f"{name} {value} is out of range for {k} responses (0..{k - 1})")
    return value


def _normalise_ranking(raw: Any, k: int) -> tuple[tuple[int, ...], ...]:
    """Turn ``[2, [0, 3], 1]`` into ``((2,), (0, 3), (1,))`` after checking it.

    The ranking must be a list whose entries are indices or lists of tied indices, best first,
    using every index in ``range(k)`` exactly once. Indices inside a tied group are sorted.
    """
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"'ranking' must be a list, got {_json_type(raw)}")
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for entry in raw:
        members = entry if isinstance(entry, (list, tuple)) else [entry]
        if not members:
            raise DataError("ranking has an empty tie group")
        for index in members:
            if isinstance(index, (list, tuple)):
                raise DataError("ranking tie groups must hold indices, not lists")
            _check_index(index, "ranking index", k)
            if index in seen:
                raise DataError(f"ranking repeats index {index}")
            seen.add(index)
        groups.append(tuple(sorted(members)))
    missing = sorted(set(range(k)) - seen)
    if missing:
        listed = ", ".join(map(str, missing))
        raise DataError(f"ranking does not cover all {k} responses: missing {listed}")
    return tuple(groups)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample responses for; ``id`` is optional and unique within a file."""

    prompt: str
    id: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.prompt, "prompt")
        if self.id is not None:
            _check_text(self.id, "id")

    def to_record(self) -> dict[str, Any]:
        """The JSON object :func:`read_prompts` reads back as this prompt."""
        record: dict[str, Any] = {"prompt": self.prompt}
        if self.id is not None:
            record["id"] = self.id
        return record


@dataclass(frozen=True)
class Demonstration:
    """A prompt with a human-written response, for supervised fine-tuning."""

    prompt: str
    response: str

    def __post_init__(self) -> None:
        _check_text(self.prompt, "prompt")
        _check_text(self.response, "response")

    def to_record(self) -> dict[str, Any]:
        """The JSON object :func:`read_demonstrations` reads back as this demonstration."""
        return {"prompt": self.prompt, "response": self.response}


@dataclass(frozen=True)
class Comparison:
    """Human preferences among K >= 2 responses to one prompt.

    ``ranking`` is a tuple of tied groups, best first, covering ``range(K)`` exactly once
    (``((2,), (0, 3), (1,))``). It is set for ``kind`` "ranking" and "pair" and is ``None``
    for "best_of_k", where only ``best`` is known. ``best`` is set only for "best_of_k".
    A pair has ``responses == (chosen, rejected)`` and ranking ``((0,), (1,))``, or
    ``((0, 1),)`` when the two were judged a tie.

    Lists given for ``responses`` or ``ranking`` are converted to tuples.
    """

    prompt: str
    responses: tuple[str, ...]
    kind: ComparisonKind
    ranking: tuple[tuple[int, ...], ...] | None = None
    best: int | None = None

    def __post_init__(self) -> None:
        _check_text(self.prompt, "prompt")
        self._check_responses()
        if self.kind not in _KINDS:
            raise DataError(f"kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if self.kind == "best_of_k":
            if self.ranking is not None:
                raise DataError("a best_of_k comparison has no ranking")
            if self.best is None:
                raise DataError("missing 'best'")
            _check_index(self.best, "best", self.K)
            return
        if self.best is not None:
            raise DataError(f"'best' is only for best_of_k comparisons, not {self.kind}")
        if self.ranking is None:
            raise DataError("missing 'ranking'")
        object.__setattr__(self, "ranking", _normalise_ranking(self.ranking, self.K))
        if self.kind == "pair":
            if self.K != 2:
                raise DataError(f"a pair has exactly 2 responses, got {self.K}")
            if self.ranking not in (((0,), (1,)), ((0, 1),)):
                raise DataError("a pair's ranking must be ((0,), (1,)) or the tie ((0, 1),)")

    def _check_responses(self) -> None:
        if not isinstance(self.responses, (list, tuple)):
            raise DataError(f"'responses' must be a list, got {_json_type(self.responses)}")
        for i, text in enumerate(self.responses):
            _check_text(text, f"responses[{i}]")
        if len(self.responses) < 2:
            raise DataError(f"needs at least 2 responses, got {len(self.responses)}")
        object.__setattr__(self, "responses", tuple(self.responses))

    @property
    def K(self) -> int:  # noqa: N802 -- K is the paper's name for it
        """The number of responses compared."""
        return len(self.responses)

    @property
    def is_tie(self) -> bool:
        """True when no response is preferred to any other (every pair tied)."""
        return self.kind != "best_of_k" and len(self.ranking or ()) == 1

    def pairs(self) -> list[tuple[int, int]]:
        """Every (winner, loser) index pair the judgement implies; tied pairs are left out.

        A ranking gives C(K, 2) pairs minus the tied ones, best-of-K gives ``(best, j)`` for
        each other j, and a pair gives ``[(0, 1)]`` (``[]`` for a tie).
        """
        if self.kind == "best_of_k":
            return [(self.best, j) for j in range(self.K) if j != self.best]
        assert self.ranking is not None
        return [
            (winner, loser)
            for better, worse in combinations(self.ranking, 2)
            for winner in better
            for loser in worse
        ]

    def to_record(self) -> dict[str, Any]:
        """The JSON object :func:`read_comparisons` reads back as this comparison."""
        if self.kind == "pair":
            a, b = self.responses
            if self.is_tie:
                return {"prompt": self.prompt, "response_a": a, "response_b": b, "tie": True}
            return {"prompt": self.prompt, "chosen": a, "rejected": b}
        record: dict[str, Any] = {"prompt": self.prompt, "responses": list(self.responses)}
        if self.kind == "best_of_k":
            record["best"] = self.best
        else:
            assert self.ranking is not None
            record["ranking"] = [g[0] if len(g) == 1 else list(g) for g in self.ranking]
        return record


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    """Raised by the JSON object hook when a key appears twice in one object."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _parse_line(raw: bytes, where: str) -> dict[str, Any]:
    """Decode one line into a JSON object; ``where`` is the ``file:line`` prefix."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise DataError(f"{where}: duplicate key '{e.args[0]}'") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(value)}")
    return value


def _lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, raw bytes)`` for each line; missing/unreadable -> DataError."""
    name = os.fspath(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed by the with below
    except FileNotFoundError:
        raise DataError(f"{name}: file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror}") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield lineno, raw


def read_jsonl(path: PathLike, max_records: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL file into ``(line number, object)`` pairs, skipping blank lines.

    Line numbers are 1-based and count blank lines, so they match an editor's. Reading stops
    after ``max_records`` objects (later lines are not looked at). An empty file gives ``[]``;
    the ``read_*`` functions turn that into an error.
    """
    limit = _check_max_records(max_records)
    name = os.fspath(path)
    records: list[tuple[int, dict[str, Any]]] = []
    for lineno, raw in _lines(path):
        if len(records) >= limit:
            break
        if raw.strip():
            records.append((lineno, _parse_line(raw, f"{name}:{lineno}")))
    return records


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` to ``path`` as JSONL, atomically; return how many were written.

    The lines go to a temporary file in the same directory, which then replaces ``path``, so
    a reader never sees half a file and a failure leaves any old file untouched. Missing
    parent directories are created. Text is written as UTF-8 without ASCII escaping.
    A record that is not an object or not JSON-serialisable raises DataError.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    count = 0
    # os.open with 0o666 lets the umask decide the mode, as for an ordinary new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for count, record in enumerate(records, start=1):
                out.write(_dump_record(record, f"{os.fspath(path)}: record {count}") + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _dump_record(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a dict, got {type(record).__name__}")
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: cannot be written as JSON: {e}") from None


def _check_max_records(max_records: int | None) -> int | float:
    if max_records is None:
        return float("inf")
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
        raise ValueError(f"max_records must be a positive integer or None, got {max_records!r}")
    return max_records


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _records(path: PathLike, max_records: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)``; a file with no records is a DataError."""
    rows = read_jsonl(path, max_records)
    if not rows:
        raise DataError(f"{os.fspath(path)}: no records")
    name = os.fspath(path)
    for lineno, record in rows:
        yield f"{name}:{lineno}", record


def _build(where: str, make: Callable[[dict[str, Any]], _T], record: dict[str, Any]) -> _T:
    """Call ``make(record)``, prefixing any DataError with ``where``."""
    try:
        return make(record)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _require(record: dict[str, Any], *keys: str) -> list[Any]:
    """The values of ``keys`` in ``record``; a missing key is a DataError."""
    for key in keys:
        if key not in record:
            raise DataError(f"missing '{key}'")
    return [record[key] for key in keys]


def _require_texts(record: dict[str, Any], *keys: str) -> list[str]:
    """Like :func:`_require`, and each value must be a non-blank string (named in errors)."""
    return [_check_text(value, key) for key, value in zip(keys, _require(record, *keys))]


def _prompt(record: dict[str, Any]) -> Prompt:
    (prompt,) = _require(record, "prompt")
    return Prompt(prompt, record.get("id"))


def _demonstration(record: dict[str, Any]) -> Demonstration:
    return Demonstration(*_require(record, "prompt", "response"))


def read_prompts(path: PathLike, max_records: int | None = None) -> list[Prompt]:
    """Read ``{"prompt": str, "id": str (optional)}`` records; ids must be unique."""
    prompts: list[Prompt] = []
    first_line: dict[str, str] = {}
    for where, record in _records(path, max_records):
        prompt = _build(where, _prompt, record)
        if prompt.id is not None:
            if prompt.id in first_line:
                first = first_line[prompt.id]
                raise DataError(f"{where}: duplicate id '{prompt.id}' (first at {first})")
            first_line[prompt.id] = where
        prompts.append(prompt)
    return prompts


def read_demonstrations(path: PathLike, max_records: int | None = None) -> list[Demonstration]:
    """Read ``{"prompt": str, "response": str}`` records."""
    return [_build(where, _demonstration, record) for where, record in _records(path, max_records)]


def _text(record: dict[str, Any]) -> str:
    if "text" in record:
        (text,) = _require_texts(record, "text")
        return text
    if "prompt" in record or "response" in record:
        prompt, response = _require_texts(record, "prompt", "response")
        return prompt + response
    raise DataError("not pre-training text: expected 'text', or 'prompt' and 'response'")


def read_texts(path: PathLike, max_records: int | None = None) -> list[str]:
    """Pre-training documents (PPO-ptx): a ``.jsonl`` file of ``{"text": str}`` records (or of
    demonstrations, each read as prompt + response), or any other file as UTF-8 text whose
    documents are separated by blank lines."""
    name = os.fspath(path)
    if name.endswith(".jsonl"):
        return [_build(where, _text, record) for where, record in _records(path, max_records)]
    lines: list[str] = []
    for lineno, raw in _lines(path):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
    limit = _check_max_records(max_records)
    docs = [d.strip() for d in re.split(r"\n\s*\n", "\n".join(lines)) if d.strip()]
    docs = docs[: int(limit)] if limit < len(docs) else docs
    if not docs:
        raise DataError(f"{name}: no text")
    return docs


_LIST_KEYS = ("responses", "ranking", "best")
_PAIR_KEYS = ("chosen", "rejected")
_TIE_KEYS = ("response_a", "response_b", "tie")


def _comparison(record: dict[str, Any]) -> Comparison:
    """Detect which of the three shapes ``record`` has and build the Comparison."""
    shapes = {
        "list": [k for k in _LIST_KEYS if k in record],
        "pair": [k for k in _PAIR_KEYS if k in record],
        "tie": [k for k in _TIE_KEYS if k in record],
    }
    present = {shape: keys for shape, keys in shapes.items() if keys}
    if len(present) > 1:
        mixed = ", ".join(f"'{k}'" for keys in present.values() for k in keys)
        raise DataError(f"mixes fields of different comparison shapes: {mixed}")
    if not present:
        raise DataError(
            "not a comparison: expected 'responses' with 'ranking' or 'best', "
            "'chosen' and 'rejected', or 'response_a', 'response_b' and 'tie'"
        )
    (prompt,) = _require(record, "prompt")
    if "pair" in present:
        chosen, rejected = _require_texts(record, *_PAIR_KEYS)
        return Comparison(prompt, (chosen, rejected), "pair", ((0,), (1,)))
    if "tie" in present:
        a, b = _require_texts(record, "response_a", "response_b")
        (tie,) = _require(record, "tie")
        if tie is not True:
            raise DataError(
                f"'tie' must be true, got {_show(tie)} "
                "(a pair with a preference uses 'chosen' and 'rejected')"
            )
        return Comparison(prompt, (a, b), "pair", ((0, 1),))
    (responses,) = _require(record, "responses")
    if "ranking" in record and "best" in record:
        raise DataError("has both 'ranking' and 'best'; give one")
    if "ranking" in record:
        return Comparison(prompt, responses, "ranking", record["ranking"])
    if "best" in record:
        if record["best"] is None:  # the dataclass would call this "missing"
            raise DataError("best must be an integer, got null")
        return Comparison(prompt, responses, "best_of_k", best=record["best"])
    raise DataError("'responses' needs 'ranking' or 'best'")


def read_comparisons(path: PathLike, max_records: int | None = None) -> list[Comparison]:
    """Read comparison records of any of the three shapes (detected per record).

    * ranking: ``{"prompt", "responses": [K], "ranking": [best first; lists for ties]}``
    * best-of-K: ``{"prompt", "responses": [K], "best": i}``
    * pair: ``{"prompt", "chosen", "rejected"}`` or ``{"prompt", "response_a",
      "response_b", "tie": true}``
    """
    return [_build(where, _comparison, record) for where, record in _records(path, max_records)]
