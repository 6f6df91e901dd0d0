"""prompt-collector's storage: validation, PII scrubbing, de-duplication and the split by user.

A prompt is stored once per distinct scrubbed text; every newly stored prompt gets an outbox row in
the same transaction, built by the ``announce`` function the service hands the store (the
service owns the wire format: a ``PromptCollectedEvent`` on ``rlhf.prompts.v1``). The store
returns rows (:class:`PromptRow`); the service builds the protobuf messages.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Sequence

from sqlalchemy import and_, func, insert, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from rlhf.errors import ConfigError, DataError, NotFoundError
from rlhf.storage.db import check_page_size, decode_page_token, encode_page_token, is_transient, transaction, utcnow
from rlhf.storage.outbox import OutboxEvent
from rlhf.storage.schema import SPLIT_TEST, SPLIT_TRAIN, SPLIT_UNSPECIFIED, SPLIT_VALID, outbox, prompts

MAX_BATCH = 1000
MAX_SAMPLE = 10000
MAX_SOURCE_CHARS = 200
_SPLITS = (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)
_IN_CHUNK = 500  # ids per IN (...) query
_RETRIES = 5  # transactions retried after losing a race on the unique text hash

# -- PII scrubbing --------------------------------------------------------------------------------

EMAIL_PLACEHOLDER = "[EMAIL]"
PHONE_PLACEHOLDER = "[PHONE]"

_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])"  # not in the middle of a longer token
    r"[\w%+-]+(?:\.[\w%+-]+)*"  # local part: dot-separated atoms
    r"@"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+"  # domain labels
    r"[^\W\d_]{2,63}"  # top-level domain: letters only
    r"(?![\w-])"
)

# A run of digit groups: optional leading '+', groups of digits (each possibly in parentheses)
# separated by one of ' ', '.', '-', '/' (or nothing next to a parenthesis). Each group must be
# followed by a separator or a parenthesis before the next one, so a text splits into groups in
# exactly one way (no backtracking blow-up). _is_phone then decides on the groups.
_PHONE_CANDIDATE_RE = re.compile(
    r"(?<![\w+])"
    r"\+?(?:\(\d+\)|\d+)"
    r"(?:(?:[ .\-/]|(?<=\))|(?=\())(?:\(\d+\)|\d+))*"
)
_GROUP_RE = re.compile(r"\d+")
_SEP_RE = re.compile(r"[ .\-/]")


def _is_year(g: str) -> bool:
    return len(g) == 4 and 1800 <= int(g) <= 2199


def _is_date(groups: list[str], seps: set[str]) -> bool:
    if len(groups) != 3 or len(seps) > 1:
        return False
    a, b, c = groups
    if _is_year(a) and len(b) <= 2 and len(c) <= 2:  # 2024-01-15
        return 1 <= int(b) <= 12 and 1 <= int(c) <= 31
    if _is_year(c) and len(a) <= 2 and len(b) <= 2:  # 15.01.2024, 1/15/2024
        x, y = int(a), int(b)
        return 1 <= x <= 31 and 1 <= y <= 31 and (x <= 12 or y <= 12)
    return False


def _is_phone(candidate: str, after: str) -> bool:
    if after and (after.isalnum() or after == "_"):
        return False  # glued to a word: "555-1234abc"
    digits = sum(ch.isdigit() for ch in candidate)
    if not 7 <= digits <= 15:
        return False
    if candidate.startswith("+"):
        return True  # international format: +CC ...
    groups = _GROUP_RE.findall(candidate)
    if len(groups) < 2:
        return False  # national numbers count only with separators (a bare digit run is an id)
    seps = set(_SEP_RE.findall(candidate))
    parens = "(" in candidate
    trunk = groups[0].startswith("0")  # national trunk prefix: "020 ...", "06-...", "030/..."
    if any(len(g) == 1 for g in groups[1:]):
        return False  # "978-3-16-148410-0" (ISBN), version numbers
    if _is_date(groups, seps):
        return False
    if all(_is_year(g) for g in groups):
        return False  # "1999-2004", "2004 2008 2012"
    if len(groups) == 2 and seps == {"."}:
        return False  # a decimal number: "3.1415926"
    if seps == {"."} and len(groups) == 4 and all(len(g) <= 3 and int(g) <= 255 for g in groups):
        return False  # an IPv4 address
    if not parens and not trunk and len(groups[0]) <= 3 and len(groups) >= 3 \
            and all(len(g) == 3 for g in groups[1:]) and (seps == {"."} or (seps == {" "} and len(groups[0]) < 3)):
        return False  # thousands grouping: "1.234.567", "1 234 567"
    if seps == {" "} and not parens and not trunk and not (len(groups) >= 3 and all(len(g) >= 3 for g in groups)):
        return False  # numbers in running text: "in 1999 123 people", "scores 12 15 18 20"
    if "/" in seps and not (trunk or parens):
        return False  # fractions, paths; "030/1234567" is a German number with its trunk 0
    return True


def _scrub_candidate(candidate: str, after: str) -> str:
    seps = set(_SEP_RE.findall(candidate))
    if " " in seps and len(seps) > 1 and not candidate.startswith("+") and "(" not in candidate:
        # Spaces next to other separators without "+" or "(...)": the spaces most likely separate
        # tokens ("1999 555-1234", "555-1234 2024"), so judge each space-separated word alone.
        words = candidate.split(" ")
        return " ".join(_scrub_candidate(w, after if i == len(words) - 1 else " ") for i, w in enumerate(words))
    return PHONE_PLACEHOLDER if _is_phone(candidate, after) else candidate


def _phone_sub(m: re.Match) -> str:
    s = m.string
    return _scrub_candidate(m.group(), s[m.end()] if m.end() < len(s) else "")


def scrub_pii(text: str) -> str:
    """``text`` with e-mail addresses replaced by ``[EMAIL]`` and phone numbers by ``[PHONE]``.

    Phone numbers: the international format (``+`` and 7..15 digits, separators optional) and
    common national formats with separators (``(555) 123-4567``, ``555.123.4567``,
    ``020 7946 0958``, ``030/1234567``, ``555-1234``), 7..15 digits. Years, dates, year ranges,
    decimals, IP addresses, thousands-grouped numbers and bare digit runs are left alone.
    """
    text = _EMAIL_RE.sub(EMAIL_PLACEHOLDER, text)
    return _PHONE_CANDIDATE_RE.sub(_phone_sub, text)


# -- split by user --------------------------------------------------------------------------------

def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise DataError("split_fractions: expected three numbers (train, valid, test)") from None
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise DataError(f"split_fractions: expected three non-negative numbers summing to 1, got {fractions!r}")
    return f  # type: ignore[return-value]


def split_for_user(user_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> int:
    """The split of every prompt of ``user_id``: SPLIT_TRAIN/VALID/TEST, chosen by sha256(user_id)
    with probabilities ``fractions`` = (train, valid, test). Deterministic across processes."""
    train, valid, _ = _check_fractions(fractions)
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < train:
        return SPLIT_TRAIN
    if u < train + valid:
        return SPLIT_VALID
    return SPLIT_TEST


# -- records --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptIn:
    text: bytes  # UTF-8
    user_id: str
    source: str
    consent: bool


@dataclass(frozen=True)
class PromptOut:
    prompt_id: str
    duplicate: bool  # the same scrubbed text was stored before; prompt_id is the earlier one
    split: int


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    text: str
    split: int
    source: str
    created_at: datetime


def _row(r) -> PromptRow:
    return PromptRow(prompt_id=r.id, text=r.text, split=r.split, source=r.source, created_at=r.created_at)


@dataclass(frozen=True)
class _Clean:
    text: str
    sha256: str
    user_hash: str
    split: int
    source: str


def _check_split(split: int) -> int:
    if isinstance(split, bool) or not isinstance(split, int) or split not in (SPLIT_UNSPECIFIED, *_SPLITS):
        raise DataError(f"split: must be one of 0 (every split), 1 (train), 2 (valid), 3 (test), got {split!r}")
    return split


class PromptStore:
    """Stores, lists and samples prompts. Thread-safe; every call is one short transaction.

    ``announce(row)`` builds the outbox event of a newly stored prompt.
    """

    def __init__(self, engine: Engine, announce: Callable[[PromptRow], OutboxEvent], *, max_prompt_chars: int = 4000,
                 split_fractions: Sequence[float] = (0.8, 0.1, 0.1)):
        if isinstance(max_prompt_chars, bool) or not isinstance(max_prompt_chars, int) or max_prompt_chars < 1:
            raise ConfigError(f"max_prompt_chars: must be an integer >= 1, got {max_prompt_chars!r}")
        try:
            self.split_fractions = _check_fractions(split_fractions)
        except DataError as e:
            raise ConfigError(str(e)) from None
        self.engine = engine
        self.announce = announce
        self.max_prompt_chars = max_prompt_chars

    # -- submit -----------------------------------------------------------------------------------
    def _validate(self, items: Sequence[PromptIn]) -> list[_Clean]:
        if not isinstance(items, (list, tuple)):
            raise DataError(f"prompts: expected a list, got {type(items).__name__}")
        if not items:
            raise DataError("prompts: the batch is empty")
        if len(items) > MAX_BATCH:
            raise DataError(f"prompts: at most {MAX_BATCH} per batch, got {len(items)}")
        out = []
        for i, item in enumerate(items):
            where = f"prompts[{i}]"
            raw = item.text
            if isinstance(raw, str):
                try:
                    raw = raw.encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f"{where}: text is not valid UTF-8") from None
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise DataError(f"{where}: text must be bytes, got {type(item.text).__name__}")
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: text is not valid UTF-8") from None
            if not text.strip():
                raise DataError(f"{where}: text is empty")
            if len(text) > self.max_prompt_chars:
                raise DataError(f"{where}: text is {len(text)} characters long, the limit is {self.max_prompt_chars}")
            if "\x00" in text:
                raise DataError(f"{where}: text contains a NUL character")
            if item.consent is not True:
                raise DataError(f"{where}: consent is required")
            if not isinstance(item.user_id, str) or not item.user_id:
                raise DataError(f"{where}: user_id is empty")
            source = item.source or ""
            if not isinstance(source, str):
                raise DataError(f"{where}: source must be a string")
            if len(source) > MAX_SOURCE_CHARS or "\x00" in source:
                raise DataError(f"{where}: source must be at most {MAX_SOURCE_CHARS} characters without NUL")
            clean = scrub_pii(unicodedata.normalize("NFC", text)).strip()
            user_bytes = item.user_id.encode("utf-8", "surrogatepass")
            out.append(_Clean(
                text=clean,
                sha256=hashlib.sha256(clean.encode("utf-8")).hexdigest(),
                user_hash=hashlib.sha256(user_bytes).hexdigest(),
                split=split_for_user(item.user_id, self.split_fractions),
                source=source,
            ))
        return out

    def submit(self, items: list[PromptIn]) -> list[PromptOut]:
        """Validate every item (all or nothing), then store the new ones and announce them.

        Raises DataError naming the first bad item (``prompts[3]: ...``); nothing is stored then.
        """
        clean = self._validate(items)
        for attempt in range(_RETRIES):
            try:
                with transaction(self.engine, write=True) as conn:
                    return self._store(conn, clean)
            except (IntegrityError, OperationalError) as e:
                # A concurrent submit stored one of these texts first (PostgreSQL); the next
                # attempt sees it and answers duplicate.
                if attempt == _RETRIES - 1 or not (isinstance(e, IntegrityError) or is_transient(e)):
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _known(conn, shas: list[str]) -> dict[str, tuple[str, int]]:
        """text hash -> (prompt id, split) of the stored prompts among ``shas``."""
        known = {}
        for i in range(0, len(shas), _IN_CHUNK):
            rows = conn.execute(select(prompts.c.text_sha256, prompts.c.id, prompts.c.split)
                                .where(prompts.c.text_sha256.in_(shas[i:i + _IN_CHUNK])))
            known.update({r.text_sha256: (r.id, r.split) for r in rows})
        return known

    def _store(self, conn, clean: list[_Clean]) -> list[PromptOut]:
        known = self._known(conn, sorted({c.sha256 for c in clean}))
        now = utcnow()
        results, new_prompts, events = [], [], []
        for c in clean:
            if c.sha256 in known:
                pid, split = known[c.sha256]
                results.append(PromptOut(prompt_id=pid, duplicate=True, split=split))
                continue
            pid = uuid.uuid4().hex
            # one microsecond apart, so a batch lists in the order it was submitted
            created = now + timedelta(microseconds=len(new_prompts))
            known[c.sha256] = (pid, c.split)
            new_prompts.append(dict(id=pid, text=c.text, text_sha256=c.sha256, user_hash=c.user_hash, split=c.split,
                                    source=c.source, created_at=created))
            row = PromptRow(prompt_id=pid, text=c.text, split=c.split, source=c.source, created_at=created)
            events.append(self.announce(row).row(created))
            results.append(PromptOut(prompt_id=pid, duplicate=False, split=c.split))
        if new_prompts:
            # in hash order: concurrent batches then lock the unique index in one order (no deadlock)
            conn.execute(insert(prompts), sorted(new_prompts, key=lambda p: p["text_sha256"]))
            conn.execute(insert(outbox), events)
        return results

    # -- read -------------------------------------------------------------------------------------
    def get(self, prompt_id: str) -> PromptRow:
        with transaction(self.engine) as conn:
            r = conn.execute(select(prompts).where(prompts.c.id == prompt_id)).first()
        if r is None:
            raise NotFoundError(f"prompt {prompt_id!r} not found")
        return _row(r)

    def list(self, split: int, page_size: int = 100, page_token: str = "") -> tuple[list[PromptRow], str]:  # noqa: A003
        """One page of a split's prompts, oldest first, and the token of the next page ("" at the end).

        ``split`` 0 (SPLIT_UNSPECIFIED) pages through every split.
        """
        split = _check_split(split)
        size = check_page_size(page_size)
        after = decode_page_token(page_token)
        q = select(prompts)
        if split:
            q = q.where(prompts.c.split == split)
        if after is not None:
            t, pid = after
            q = q.where(or_(prompts.c.created_at > t, and_(prompts.c.created_at == t, prompts.c.id > pid)))
        q = q.order_by(prompts.c.created_at, prompts.c.id).limit(size + 1)
        with transaction(self.engine) as conn:
            rows = [_row(r) for r in conn.execute(q)]
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, encode_page_token(rows[-1].created_at, rows[-1].prompt_id)

    def sample(self, split: int, count: int, seed: int) -> list[PromptRow]:
        """``count`` prompts of ``split`` drawn without replacement (fewer when fewer exist).

        The same seed over the same stored prompts gives the same sample, in the same order: each
        prompt's rank is a keyed hash of (seed, prompt id), and the ``count`` lowest ranks win.
        Memory is O(count), not O(stored prompts).
        """
        split = _check_split(split)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SAMPLE:
            raise DataError(f"count: must be 1..{MAX_SAMPLE}, got {count!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise DataError("seed: must be an integer in 0..2**64-1")
        key = seed.to_bytes(8, "big")

        def rank(pid: str) -> bytes:
            return hashlib.blake2b(pid.encode(), key=key, digest_size=16).digest()

        q = select(prompts.c.id)
        if split:
            q = q.where(prompts.c.split == split)
        with transaction(self.engine) as conn:
            ids = conn.execute(q.execution_options(yield_per=5000)).scalars()
            chosen = heapq.nsmallest(count, ids, key=rank)
            by_id = {}
            for i in range(0, len(chosen), _IN_CHUNK):
                for r in conn.execute(select(prompts).where(prompts.c.id.in_(chosen[i:i + _IN_CHUNK]))):
                    by_id[r.id] = _row(r)
        return [by_id[pid] for pid in chosen if pid in by_id]

    def count(self, split: int = 0) -> int:
        """How many prompts are stored (in ``split``; 0: all)."""
        split = _check_split(split)
        q = select(func.count()).select_from(prompts)
        if split:
            q = q.where(prompts.c.split == split)
        with transaction(self.engine) as conn:
            return int(conn.execute(q).scalar_one())
