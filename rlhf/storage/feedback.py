"""feedback-store's storage: labeling tasks and their assignment, labeler accounts, idempotent
submissions (rankings, best-of-K choices, demonstrations, skips), export, agreement and the
labeling statistics of the admin view.

The store returns rows (the dataclasses below); the service builds the protobuf messages. Every
stored submission gets one outbox row in the same transaction, built by the ``announce`` function
the service hands the store (:class:`~rlhf.storage.outbox.OutboxEvent`: the service owns the
wire format of ``rlhf.feedback.v1``). Submissions carry a client-chosen idempotency key: the same
key with the same content answers with the first submission (``duplicate=True``, nothing stored
or announced); with other content it is a :class:`~rlhf.errors.ConflictError`. One answer per
labeler per task (a ranking, a best-of-K choice, a demonstration of a demonstration task, or a
skip).

Assignment. While no labeler is registered (:meth:`FeedbackStore.create_labeler`), tasks are
assigned to nobody and every labeler may answer every task. Once one is, each new task is
assigned to the active labeler with the fewest open tasks, and a share of the tasks
(``overlap_share``, chosen by a hash of the task id) to the two least loaded, so that agreement
can be measured. A task with an active assignment is open only to its assignees (to anyone else:
:class:`~rlhf.errors.PermissionDeniedError`; to a labeler it was taken from: a ConflictError
saying it was reassigned); a task without one (created before any labeler was registered, or
whose assignees were revoked with nobody to take it over) is open to every labeler.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import secrets
import statistics
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import and_, exists, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from rlhf.errors import ConflictError, DataError, NotFoundError, PermissionDeniedError
from rlhf.storage.db import (as_utc, check_page_size, decode_page_token, encode_page_token, is_transient,
                             transaction, utcnow)
from rlhf.storage.outbox import OutboxEvent
from rlhf.storage.schema import (SPLIT_TEST, SPLIT_TRAIN, SPLIT_UNSPECIFIED, SPLIT_VALID, TASK_MODES, labelers,
                                 labeling_tasks, outbox, submissions, task_assignments)

MAX_BATCH = 1000
MIN_K, MAX_K = 2, 16
MAX_TEXT_CHARS = 100_000  # prompt, each candidate, a demonstration's response
MAX_ID_CHARS = 200  # idempotency keys, labeler ids, prompt ids, policy versions
MAX_COMMENT_CHARS = 1000  # a skip's comment
MAX_SECONDS = 86_400.0  # seconds_spent a labeler may report for one task
_EXPORT_CHUNK = 500  # rows per query while exporting
_RETRIES = 5
COMPARISON_KINDS = ("ranking", "best_of_k")
_SPLITS = (SPLIT_UNSPECIFIED, SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)
# InstructGPT's metadata on a response (Ouyang et al., 2022); rlhf.feedback.v1.ResponseFlag
FLAGS = ("fails_instruction", "hallucination", "inappropriate_for_assistant", "sexual_or_violent",
         "expresses_opinion", "harmful_advice")
QUALITY_MIN, QUALITY_MAX = 1, 7  # InstructGPT's Likert scale of overall quality; 0: not rated
SKIP_REASONS = ("unclear_prompt", "needs_expertise", "offensive_content", "broken_candidates", "other")
LABELER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOKEN_PREFIX = "rlhfl_"  # sign-in tokens are recognisable (secret scanners, logs)


# -- records --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskIn:
    prompt: str
    prompt_id: str
    split: int
    candidates: list[str]
    policy_version: str
    mode: str = "ranking"  # TASK_MODES; demonstration tasks have no candidates


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    prompt: str
    prompt_id: str
    split: int
    candidates: list[str] = field(hash=False)
    policy_version: str
    created_at: datetime
    mode: str = "ranking"
    assigned_to: tuple[str, ...] = ()  # active assignees (filled by create_tasks and get_task)

    @property
    def k(self) -> int:
        return len(self.candidates)


@dataclass(frozen=True)
class CandidateLabel:
    """A labeler's flags (names of :data:`FLAGS`) and 1-7 quality rating (0: none) of one candidate."""

    index: int
    flags: tuple[str, ...] = ()
    quality: int = 0


@dataclass(frozen=True)
class ComparisonRow:
    """A stored ranking (``kind="ranking"``, ``ranking`` best group first) or best-of-K choice."""

    submission_id: str
    task: TaskRow
    labeler_id: str
    kind: str
    ranking: list[list[int]] = field(hash=False)
    best_index: int
    labels: tuple[CandidateLabel, ...]
    seconds_spent: float
    created_at: datetime


@dataclass(frozen=True)
class DemonstrationRow:
    submission_id: str
    prompt: str
    prompt_id: str
    split: int
    labeler_id: str
    response: str
    task_id: str  # "" for a free-standing demonstration
    seconds_spent: float
    created_at: datetime


@dataclass(frozen=True)
class SkipRow:
    submission_id: str
    task_id: str
    labeler_id: str
    reason: str  # SKIP_REASONS
    comment: str
    seconds_spent: float
    created_at: datetime


Submission = ComparisonRow | DemonstrationRow | SkipRow


@dataclass(frozen=True)
class LabelerRow:
    name: str
    admin: bool
    active: bool
    created_at: datetime


@dataclass
class LabelerStats:
    """One labeler's line in the admin view: counts by kind (since a time), open tasks, median
    seconds per task, skips by reason. ``registered`` is False for someone known only from their
    submissions (a labeler of the credentials file, say)."""

    name: str
    admin: bool = False
    active: bool = True
    registered: bool = False
    created_at: datetime | None = None
    counts: dict[str, int] = field(default_factory=dict)
    open_tasks: int = 0
    median_seconds: float = 0.0
    skips_by_reason: dict[str, int] = field(default_factory=dict)


def _task_row(r, assigned_to: Sequence[str] = ()) -> TaskRow:
    return TaskRow(task_id=r.id, prompt=r.prompt, prompt_id=r.prompt_id, split=r.split,
                   candidates=list(r.candidates), policy_version=r.policy_version, created_at=r.created_at,
                   mode=r.mode, assigned_to=tuple(sorted(assigned_to)))


def _labels_of(stored: Any) -> tuple[CandidateLabel, ...]:
    return tuple(CandidateLabel(int(x["index"]), tuple(x.get("flags", ())), int(x.get("quality", 0)))
                 for x in stored or ())


# -- validation helpers ---------------------------------------------------------------------------

def _short(value: str) -> str:
    """An id as a message quotes it (a huge one is cut: messages travel in gRPC metadata)."""
    return repr(value) if len(value) <= 80 else f"{value[:40]!r}... ({len(value)} characters)"


def _check_str(value: Any, where: str, *, max_chars: int, required: bool, blank_ok: bool = False) -> str:
    """A string field: type, emptiness, length, no NUL (PostgreSQL text cannot hold one)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__}")
    if required and (not value if blank_ok else not value.strip()):
        raise DataError(f"{where} is empty")
    if len(value) > max_chars:
        raise DataError(f"{where} is {len(value)} characters long, the limit is {max_chars}")
    if "\x00" in value:
        raise DataError(f"{where} contains a NUL character")
    return value


def _check_split(split: Any, where: str = "split") -> int:
    if isinstance(split, bool) or not isinstance(split, int) or split not in _SPLITS:
        raise DataError(f"{where}: must be 0 (unspecified), 1 (train), 2 (valid) or 3 (test), got {split!r}")
    return split


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_ID_CHARS:
        n = len(key) if isinstance(key, str) else type(key).__name__
        raise DataError(f"idempotency_key: must be 1..{MAX_ID_CHARS} characters, got {n}")
    if "\x00" in key:
        raise DataError("idempotency_key contains a NUL character")
    return key


def _check_labeler(labeler_id: Any) -> str:
    return _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=True)


def _check_task_id(task_id: Any) -> str:
    return _check_str(task_id, "task_id", max_chars=MAX_ID_CHARS, required=True)


def _check_seconds(seconds: Any) -> float | None:
    """A reported time on task: None when not reported (0)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise DataError(f"seconds_spent: expected a number, got {type(seconds).__name__}")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        raise DataError(f"seconds_spent: must be 0..{MAX_SECONDS:.0f}, got {seconds!r}")
    return float(seconds) or None


def check_labeler_name(name: Any) -> str:
    if not isinstance(name, str) or not LABELER_NAME.fullmatch(name):
        shown = _short(name) if isinstance(name, str) else type(name).__name__
        raise DataError(f"labeler name {shown}: 1..64 letters, digits, '.', '_', '-' or '@', starting with a "
                        f"letter or digit")
    return name


def _check_ranking_shape(ranking: Any) -> list[list[int]]:
    """The ranking's groups with each group's indices sorted (ties have no order)."""
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise DataError("ranking is empty")
    groups = []
    for gi, group in enumerate(ranking):
        if not isinstance(group, (list, tuple)):
            raise DataError(f"ranking[{gi}]: expected a list of candidate indices")
        if not group:
            raise DataError(f"ranking[{gi}]: the group is empty")
        for x in group:
            if isinstance(x, bool) or not isinstance(x, int):
                raise DataError(f"ranking[{gi}]: candidate indices must be integers, got {type(x).__name__}")
        groups.append(sorted(int(x) for x in group))
    return groups


def _check_ranking_against(groups: list[list[int]], k: int) -> None:
    seen: set[int] = set()
    for group in groups:
        for x in group:
            if not 0 <= x < k:
                raise DataError(f"ranking: index {x} out of range for K={k}")
            if x in seen:
                raise DataError(f"ranking: index {x} appears twice")
            seen.add(x)
    if len(seen) < k:
        raise DataError(f"ranking covers {len(seen)} of K={k} candidates")
    if len(groups) == 1:
        raise DataError(f"ranking: one group ties all K={k} candidates, which states no preference")


def _check_labels(labels: Any) -> list[dict]:
    """Labels as stored: sorted by index, flags in FLAGS order, labels with nothing in them dropped
    (so a page that sends an empty label per candidate and a client that sends none store alike)."""
    if labels is None:
        return []
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"labels: expected a list, got {type(labels).__name__}")
    out, seen = [], set()
    for i, lab in enumerate(labels):
        where = f"labels[{i}]"
        if not isinstance(lab, CandidateLabel):
            raise DataError(f"{where}: expected a candidate label")
        if isinstance(lab.index, bool) or not isinstance(lab.index, int) or lab.index < 0:
            raise DataError(f"{where}.index: expected a candidate index >= 0, got {lab.index!r}")
        if lab.index in seen:
            raise DataError(f"{where}: candidate {lab.index} is labelled twice")
        seen.add(lab.index)
        flags = tuple(lab.flags)
        unknown = [f for f in flags if f not in FLAGS]
        if unknown:
            raise DataError(f"{where}.flags: unknown flag {_short(str(unknown[0]))}; one of {', '.join(FLAGS)}")
        if len(set(flags)) != len(flags):
            raise DataError(f"{where}.flags: a flag appears twice")
        q = lab.quality
        if isinstance(q, bool) or not isinstance(q, int) or not (q == 0 or QUALITY_MIN <= q <= QUALITY_MAX):
            raise DataError(f"{where}.quality: must be {QUALITY_MIN}..{QUALITY_MAX} (0: not rated), got {q!r}")
        if flags or q:
            out.append({"index": lab.index, "flags": [f for f in FLAGS if f in flags], "quality": q})
    return sorted(out, key=lambda x: x["index"])


def _check_labels_against(labels: list[dict], k: int) -> None:
    for x in labels:
        if x["index"] >= k:
            raise DataError(f"labels: candidate index {x['index']} out of range for K={k}")


def _content_sha(content: dict) -> str:
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _doubly_assigned(task_id: str, share: float) -> bool:
    """Whether a task goes to two labelers: a hash of its id below ``share`` (stable, and the
    share holds over many tasks)."""
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) / 2**32 < share


_MODE_ASKS = {"ranking": "a ranking of its candidates", "best_of_k": "the best of its candidates",
              "demonstration": "a demonstration (a written response)"}


# -- agreement ------------------------------------------------------------------------------------

def _positions(ranking: Sequence[Sequence[int]]) -> dict[int, int]:
    return {idx: pos for pos, group in enumerate(ranking) for idx in group}


def pair_agreement(rankings: Sequence[Sequence[Sequence[int]]]) -> tuple[int, int]:
    """(agreements, pairs) over one task's rankings, one per labeler: for every pair of labelers and
    every pair of candidates i < j, they agree when both rank i above j, both j above i, or both tie them."""
    pos = [_positions(r) for r in rankings]
    agree = pairs = 0
    for a, b in itertools.combinations(pos, 2):
        common = sorted(set(a) & set(b))
        for i, j in itertools.combinations(common, 2):
            sa = (a[i] > a[j]) - (a[i] < a[j])
            sb = (b[i] > b[j]) - (b[i] < b[j])
            pairs += 1
            agree += sa == sb
    return agree, pairs


# -- the store ------------------------------------------------------------------------------------

class FeedbackStore:
    """Labeling tasks, labelers and submissions. Thread-safe; every call is one short transaction
    (exports: one per chunk).

    ``announce(row)`` builds the outbox event of a stored submission (a :data:`Submission` row);
    ``overlap_share`` is the share of new tasks assigned to two labelers once labelers are registered.
    """

    def __init__(self, engine: Engine, announce: Callable[[Submission], OutboxEvent], overlap_share: float = 0.1):
        if isinstance(overlap_share, bool) or not isinstance(overlap_share, (int, float)) \
                or not 0.0 <= overlap_share <= 1.0:
            raise DataError(f"overlap_share: must be 0..1, got {overlap_share!r}")
        self.engine = engine
        self.announce = announce
        self.overlap_share = float(overlap_share)

    # -- tasks ------------------------------------------------------------------------------------
    def create_tasks(self, items: list[TaskIn]) -> list[TaskRow]:
        """Store a batch of tasks (all or nothing) and assign them (see the module docstring).
        DataError names the first bad one (``tasks[2]: ...``)."""
        if not isinstance(items, (list, tuple)):
            raise DataError(f"tasks: expected a list, got {type(items).__name__}")
        if not items:
            raise DataError("tasks: the batch is empty")
        if len(items) > MAX_BATCH:
            raise DataError(f"tasks: at most {MAX_BATCH} per batch, got {len(items)}")
        for i, t in enumerate(items):
            where = f"tasks[{i}]"
            _check_str(t.prompt, f"{where}.prompt", max_chars=MAX_TEXT_CHARS, required=True)
            _check_str(t.prompt_id, f"{where}.prompt_id", max_chars=MAX_ID_CHARS, required=False)
            _check_split(t.split, f"{where}.split")
            _check_str(t.policy_version, f"{where}.policy_version", max_chars=MAX_ID_CHARS, required=False)
            if t.mode not in TASK_MODES:
                raise DataError(f"{where}.mode: must be one of {', '.join(TASK_MODES)}, got {_short(str(t.mode))}")
            if not isinstance(t.candidates, (list, tuple)):
                raise DataError(f"{where}.candidates: expected a list of strings")
            k = len(t.candidates)
            if t.mode == "demonstration":
                if k:
                    raise DataError(f"{where}: a demonstration task has no candidates, got K={k}")
                continue
            if k < MIN_K:
                raise DataError(f"{where}: needs at least {MIN_K} candidates, got K={k}")
            if k > MAX_K:
                raise DataError(f"{where}: at most {MAX_K} candidates, got K={k}")
            for j, c in enumerate(t.candidates):
                _check_str(c, f"{where}.candidates[{j}]", max_chars=MAX_TEXT_CHARS, required=True, blank_ok=True)
        now = utcnow()
        rows = [dict(id=uuid.uuid4().hex, prompt=t.prompt, prompt_id=t.prompt_id or "", split=t.split,
                     candidates=list(t.candidates), k=len(t.candidates), policy_version=t.policy_version or "",
                     mode=t.mode, created_at=now + timedelta(microseconds=i))  # listed in the order given
                for i, t in enumerate(items)]
        with transaction(self.engine, write=True) as conn:
            conn.execute(insert(labeling_tasks), rows)
            assigned = self._assign(conn, [r["id"] for r in rows], now)
        return [TaskRow(task_id=r["id"], prompt=r["prompt"], prompt_id=r["prompt_id"], split=r["split"],
                        candidates=r["candidates"], policy_version=r["policy_version"], created_at=r["created_at"],
                        mode=r["mode"], assigned_to=tuple(sorted(assigned.get(r["id"], ()))))
                for r in rows]

    @staticmethod
    def _open_load(conn) -> dict[str, int]:
        """Active, registered labelers (not admins) -> how many tasks they may answer and have not."""
        a, s, lab = task_assignments, submissions, labelers
        names = conn.execute(select(lab.c.name).where(lab.c.active.is_(True), lab.c.admin.is_(False))).scalars()
        load = {n: 0 for n in names}
        if load:
            q = (select(a.c.labeler_id, func.count())
                 .where(a.c.released_at.is_(None),
                        ~exists().where(s.c.task_id == a.c.task_id, s.c.labeler_id == a.c.labeler_id))
                 .group_by(a.c.labeler_id))
            for name, n in conn.execute(q):
                if name in load:
                    load[name] = int(n)
        return load

    @staticmethod
    def _least_loaded(load: dict[str, int], n: int, task_id: str, exclude: set[str] = frozenset()) -> list[str]:
        """The ``n`` labelers with the fewest open tasks (ties broken by a hash of task and name)."""
        def key(name: str):
            return load[name], hashlib.sha256(f"{task_id}/{name}".encode()).digest()

        return sorted((x for x in load if x not in exclude), key=key)[:n]

    def _assign(self, conn, task_ids: list[str], now: datetime) -> dict[str, list[str]]:
        load = self._open_load(conn)
        if not load:
            return {}
        out, rows = {}, []
        for tid in task_ids:
            chosen = self._least_loaded(load, 2 if _doubly_assigned(tid, self.overlap_share) else 1, tid)
            for name in chosen:
                load[name] += 1
                rows.append(dict(task_id=tid, labeler_id=name, assigned_at=now, released_at=None))
            out[tid] = chosen
        conn.execute(insert(task_assignments), rows)
        return out

    @staticmethod
    def _check_access(conn, task_id: str, labeler_id: str) -> None:
        """PermissionDeniedError unless the task is open to this labeler; ConflictError when it
        was theirs and was reassigned."""
        a = task_assignments
        rows = conn.execute(select(a.c.labeler_id, a.c.released_at).where(a.c.task_id == task_id)).all()
        active = {r.labeler_id for r in rows if r.released_at is None}
        if not active or labeler_id in active:
            return
        if any(r.labeler_id == labeler_id for r in rows):
            raise ConflictError(f"labeling task {task_id} was reassigned to another labeler")
        raise PermissionDeniedError(f"labeling task {_short(task_id)} is not assigned to labeler {_short(labeler_id)}")

    def get_task(self, task_id: str, labeler_id: str = "") -> TaskRow:
        """A task; with ``labeler_id``, only when it is open to that labeler (PermissionDeniedError)."""
        task_id = _check_task_id(task_id)
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        a = task_assignments
        with transaction(self.engine) as conn:
            r = conn.execute(select(labeling_tasks).where(labeling_tasks.c.id == task_id)).first()
            if r is None:
                raise NotFoundError(f"labeling task {_short(task_id)} not found")
            if labeler_id:
                self._check_access(conn, task_id, labeler_id)
            assigned = conn.execute(select(a.c.labeler_id).where(a.c.task_id == task_id,
                                                                a.c.released_at.is_(None))).scalars().all()
        return _task_row(r, assigned)

    @staticmethod
    def _open_to(labeler_id: str):
        """The condition on ``labeling_tasks`` of the tasks this labeler may answer and has not."""
        t, s, a = labeling_tasks, submissions, task_assignments
        mine = exists().where(a.c.task_id == t.c.id, a.c.labeler_id == labeler_id, a.c.released_at.is_(None))
        anyone = ~exists().where(a.c.task_id == t.c.id, a.c.released_at.is_(None))
        answered = exists().where(s.c.task_id == t.c.id, s.c.labeler_id == labeler_id)
        return and_(or_(mine, anyone), ~answered)

    def list_tasks(self, labeler_id: str = "", page_size: int = 100,
                   page_token: str = "") -> tuple[list[TaskRow], str]:
        """One page of the tasks ``labeler_id`` may answer and has not, oldest first (empty
        labeler_id: every task); and the next page's token ("" at the end)."""
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        size = check_page_size(page_size)
        after = decode_page_token(page_token)
        t = labeling_tasks
        q = select(t)
        if labeler_id:
            q = q.where(self._open_to(labeler_id))
        if after is not None:
            at, tid = after
            q = q.where(or_(t.c.created_at > at, and_(t.c.created_at == at, t.c.id > tid)))
        q = q.order_by(t.c.created_at, t.c.id).limit(size + 1)
        with transaction(self.engine) as conn:
            rows = [_task_row(r) for r in conn.execute(q)]
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, encode_page_token(rows[-1].created_at, rows[-1].task_id)

    def count_open_tasks(self, labeler_id: str = "") -> int:
        """Tasks ``labeler_id`` may answer and has not; without one, the tasks waiting for an answer
        (assigned: an assignee has not answered; unassigned: nobody has)."""
        t, s, a = labeling_tasks, submissions, task_assignments
        if labeler_id:
            cond = self._open_to(_check_labeler(labeler_id))
        else:
            waiting = exists().where(a.c.task_id == t.c.id, a.c.released_at.is_(None),
                                     ~exists().where(s.c.task_id == a.c.task_id, s.c.labeler_id == a.c.labeler_id))
            unassigned = and_(~exists().where(a.c.task_id == t.c.id, a.c.released_at.is_(None)),
                              ~exists().where(s.c.task_id == t.c.id))
            cond = or_(waiting, unassigned)
        with transaction(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(t).where(cond)).scalar_one())

    # -- submissions ------------------------------------------------------------------------------
    def submit_ranking(self, key: str, task_id: str, labeler_id: str, ranking: list[list[int]],
                       labels: Sequence[CandidateLabel] = (), seconds_spent: float = 0.0) -> tuple[str, bool]:
        """Store a ranking of a task's candidates (best group first; a group holds tied candidates),
        with optional per-candidate labels.

        Returns (submission_id, duplicate). DataError for a malformed ranking, NotFoundError for an
        unknown task, PermissionDeniedError for a task not open to the labeler, ConflictError when
        ``key`` was used before for other content or the labeler answered the task already.
        """
        key = _check_key(key)
        task_id = _check_task_id(task_id)
        labeler_id = _check_labeler(labeler_id)
        groups = _check_ranking_shape(ranking)
        labs = _check_labels(labels)
        seconds = _check_seconds(seconds_spent)
        content = {"kind": "ranking", "task_id": task_id, "labeler_id": labeler_id, "ranking": groups}
        if labs:
            content["labels"] = labs

        def prepare(conn, sid: str, now: datetime):
            task = self._task_for_answer(conn, task_id, labeler_id, ("ranking",))
            _check_ranking_against(groups, task.k)
            _check_labels_against(labs, task.k)
            row = dict(kind="ranking", task_id=task_id, labeler_id=labeler_id, ranking=groups, labels=labs or None,
                       seconds_spent=seconds)
            return row, ComparisonRow(sid, task, labeler_id, "ranking", groups, 0, _labels_of(labs), seconds or 0.0, now)

        return self._submit(key, content, prepare)

    def submit_best_of_k(self, key: str, task_id: str, labeler_id: str, best_index: int,
                         labels: Sequence[CandidateLabel] = (), seconds_spent: float = 0.0) -> tuple[str, bool]:
        """Store the labeler's choice of the best candidate of a task (a ranking or best-of-K task).
        Returns (submission_id, duplicate)."""
        key = _check_key(key)
        task_id = _check_task_id(task_id)
        labeler_id = _check_labeler(labeler_id)
        if isinstance(best_index, bool) or not isinstance(best_index, int):
            raise DataError(f"best_index: expected an integer, got {type(best_index).__name__}")
        labs = _check_labels(labels)
        seconds = _check_seconds(seconds_spent)
        content = {"kind": "best_of_k", "task_id": task_id, "labeler_id": labeler_id, "best_index": best_index}
        if labs:
            content["labels"] = labs

        def prepare(conn, sid: str, now: datetime):
            task = self._task_for_answer(conn, task_id, labeler_id, ("ranking", "best_of_k"))
            if not 0 <= best_index < task.k:
                raise DataError(f"best_index: {best_index} out of range for K={task.k}")
            _check_labels_against(labs, task.k)
            row = dict(kind="best_of_k", task_id=task_id, labeler_id=labeler_id, best_index=best_index,
                       labels=labs or None, seconds_spent=seconds)
            return row, ComparisonRow(sid, task, labeler_id, "best_of_k", [], best_index, _labels_of(labs),
                                      seconds or 0.0, now)

        return self._submit(key, content, prepare)

    def submit_demonstration(self, key: str, prompt: str, prompt_id: str, split: int, labeler_id: str,
                             response: str, task_id: str = "", seconds_spent: float = 0.0) -> tuple[str, bool]:
        """Store a labeler-written response to a prompt: free-standing, or the answer to a
        demonstration task (``task_id``; the prompt, prompt_id and split then come from the task and
        may be left empty). Returns (submission_id, duplicate)."""
        key = _check_key(key)
        task_id = _check_str(task_id, "task_id", max_chars=MAX_ID_CHARS, required=False)
        prompt = _check_str(prompt, "prompt", max_chars=MAX_TEXT_CHARS, required=not task_id)
        prompt_id = _check_str(prompt_id, "prompt_id", max_chars=MAX_ID_CHARS, required=False)
        split = _check_split(split)
        labeler_id = _check_labeler(labeler_id)
        response = _check_str(response, "response", max_chars=MAX_TEXT_CHARS, required=True)
        seconds = _check_seconds(seconds_spent)
        content = {"kind": "demonstration", "prompt": prompt, "prompt_id": prompt_id, "split": split,
                   "labeler_id": labeler_id, "response": response}
        if task_id:
            content["task_id"] = task_id

        def prepare(conn, sid: str, now: datetime):
            p, pid, sp = prompt, prompt_id, split
            if task_id:
                task = self._task_for_answer(conn, task_id, labeler_id, ("demonstration",))
                for name, given, own in (("prompt", p, task.prompt), ("prompt_id", pid, task.prompt_id),
                                         ("split", sp, task.split)):
                    if given and given != own:
                        raise DataError(f"{name}: differs from the task's; leave it empty to use the task's")
                p, pid, sp = task.prompt, task.prompt_id, task.split
            row = dict(kind="demonstration", task_id=task_id or None, labeler_id=labeler_id, prompt=p,
                       prompt_id=pid, split=sp, response=response, seconds_spent=seconds)
            return row, DemonstrationRow(sid, p, pid, sp, labeler_id, response, task_id, seconds or 0.0, now)

        return self._submit(key, content, prepare)

    def skip_task(self, key: str, task_id: str, labeler_id: str, reason: str, comment: str = "",
                  seconds_spent: float = 0.0) -> tuple[str, bool]:
        """Decline a task, with one of :data:`SKIP_REASONS` and an optional comment; the task leaves
        the labeler's list. Returns (submission_id, duplicate)."""
        key = _check_key(key)
        task_id = _check_task_id(task_id)
        labeler_id = _check_labeler(labeler_id)
        if reason not in SKIP_REASONS:
            raise DataError(f"reason: must be one of {', '.join(SKIP_REASONS)}, got {_short(str(reason))}")
        comment = _check_str(comment, "comment", max_chars=MAX_COMMENT_CHARS, required=False)
        seconds = _check_seconds(seconds_spent)
        content = {"kind": "skip", "task_id": task_id, "labeler_id": labeler_id, "reason": reason,
                   "comment": comment}

        def prepare(conn, sid: str, now: datetime):
            self._task_for_answer(conn, task_id, labeler_id, TASK_MODES)
            row = dict(kind="skip", task_id=task_id, labeler_id=labeler_id, skip_reason=reason,
                       comment=comment or None, seconds_spent=seconds)
            return row, SkipRow(sid, task_id, labeler_id, reason, comment, seconds or 0.0, now)

        return self._submit(key, content, prepare)

    def _task_for_answer(self, conn, task_id: str, labeler_id: str, modes: Sequence[str]) -> TaskRow:
        """The task an answer is for: it exists, the labeler has not answered it, it is open to
        them, and it asks for this kind of answer."""
        r = conn.execute(select(labeling_tasks).where(labeling_tasks.c.id == task_id)).first()
        if r is None:
            raise NotFoundError(f"labeling task {_short(task_id)} not found")
        s = submissions
        done = conn.execute(select(s.c.kind).where(s.c.task_id == task_id, s.c.labeler_id == labeler_id)).first()
        if done is not None:
            raise ConflictError(f"labeler {_short(labeler_id)} already answered task {task_id}"
                                f"{' (skipped it)' if done.kind == 'skip' else ''}: one answer per labeler per task")
        self._check_access(conn, task_id, labeler_id)
        task = _task_row(r)
        if task.mode not in modes:
            raise DataError(f"labeling task {task_id} asks for {_MODE_ASKS[task.mode]}")
        return task

    @staticmethod
    def _existing(conn, key: str):
        return conn.execute(select(submissions.c.id, submissions.c.request_sha256)
                            .where(submissions.c.idempotency_key == key)).first()

    @staticmethod
    def _answer_existing(found, sha: str) -> tuple[str, bool]:
        if found.request_sha256 != sha:
            raise ConflictError("idempotency_key: already used for a different submission")
        return found.id, True

    def _submit(self, key: str, content: dict, prepare: Callable) -> tuple[str, bool]:
        """The idempotent write: answer from an earlier submission with this key, or validate
        against the database (``prepare``), insert the submission and its outbox row together."""
        sha = _content_sha(content)
        for attempt in range(_RETRIES):
            last = attempt == _RETRIES - 1
            try:
                with transaction(self.engine, write=True) as conn:
                    found = self._existing(conn, key)
                    if found is not None:
                        return self._answer_existing(found, sha)
                    sid, now = uuid.uuid4().hex, utcnow()
                    try:
                        row, record = prepare(conn, sid, now)
                    except ConflictError:
                        # the answer prepare() found may be this very key, committed meanwhile
                        found = self._existing(conn, key)
                        if found is not None:
                            return self._answer_existing(found, sha)
                        raise
                    conn.execute(insert(submissions), dict(row, id=sid, idempotency_key=key, request_sha256=sha,
                                                           created_at=now))
                    conn.execute(insert(outbox), self.announce(record).row(now))
                    return sid, False
            except IntegrityError:
                # A concurrent submission with this key committed first (PostgreSQL): answer from it.
                # (A concurrent other answer of the same labeler to the task: the retry's check says so.)
                with transaction(self.engine) as conn:
                    found = self._existing(conn, key)
                if found is not None:
                    return self._answer_existing(found, sha)
                if last:
                    raise
            except OperationalError as e:
                if last or not is_transient(e):
                    raise
        raise AssertionError("unreachable")

    # -- labelers ---------------------------------------------------------------------------------
    @staticmethod
    def _new_token() -> tuple[str, str]:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        return token, hashlib.sha256(token.encode()).hexdigest()

    def create_labeler(self, name: str, admin: bool = False) -> tuple[LabelerRow, str]:
        """Register a labeler (or, with ``admin``, an account for the admin view that labels nothing)
        and issue their sign-in token. Returns the row and the token (only its SHA-256 is stored)."""
        name = check_labeler_name(name)
        if not isinstance(admin, bool):
            raise DataError(f"admin: expected true or false, got {type(admin).__name__}")
        token, digest = self._new_token()
        now = utcnow()
        try:
            with transaction(self.engine, write=True) as conn:
                if conn.execute(select(labelers.c.name).where(labelers.c.name == name)).first() is not None:
                    raise ConflictError(f"labeler {name!r} exists; issue them a new token instead")
                conn.execute(insert(labelers), dict(name=name, admin=admin, active=True, token_sha256=digest,
                                                    created_at=now, token_issued_at=now))
        except IntegrityError:
            raise ConflictError(f"labeler {name!r} exists; issue them a new token instead") from None
        return LabelerRow(name, admin, True, now), token

    def issue_token(self, name: str) -> str:
        """A new sign-in token for ``name`` (their previous one stops working; a revoked labeler is
        active again)."""
        name = check_labeler_name(name)
        token, digest = self._new_token()
        with transaction(self.engine, write=True) as conn:
            n = conn.execute(update(labelers).where(labelers.c.name == name)
                             .values(token_sha256=digest, token_issued_at=utcnow(), active=True)).rowcount
        if not n:
            raise NotFoundError(f"labeler {name!r} not found")
        return token

    def revoke_labeler(self, name: str) -> int:
        """Disable ``name`` (their token stops working) and move their open tasks to other labelers
        (tasks nobody can take are open to everyone). Returns how many tasks were moved."""
        name = check_labeler_name(name)
        with transaction(self.engine, write=True) as conn:
            n = conn.execute(update(labelers).where(labelers.c.name == name)
                             .values(active=False, token_sha256=None)).rowcount
            if not n:
                raise NotFoundError(f"labeler {name!r} not found")
            return self._reassign(conn, name, release_unmoved=True)

    def reassign_tasks(self, name: str) -> int:
        """Move ``name``'s open tasks to other active labelers (those nobody can take stay).
        Returns how many were moved."""
        name = check_labeler_name(name)
        with transaction(self.engine, write=True) as conn:
            if conn.execute(select(labelers.c.name).where(labelers.c.name == name)).first() is None:
                raise NotFoundError(f"labeler {name!r} not found")
            return self._reassign(conn, name, release_unmoved=False)

    def _reassign(self, conn, name: str, release_unmoved: bool) -> int:
        a, s = task_assignments, submissions
        open_ids = conn.execute(
            select(a.c.task_id).where(a.c.labeler_id == name, a.c.released_at.is_(None),
                                      ~exists().where(s.c.task_id == a.c.task_id, s.c.labeler_id == name))
            .order_by(a.c.assigned_at, a.c.task_id)).scalars().all()
        load = self._open_load(conn)
        load.pop(name, None)
        now, moved = utcnow(), 0
        for tid in open_ids:
            taken = set(conn.execute(select(a.c.labeler_id).where(a.c.task_id == tid)).scalars())
            taken |= set(conn.execute(select(s.c.labeler_id).where(s.c.task_id == tid)).scalars())
            chosen = self._least_loaded(load, 1, tid, exclude=taken)
            if not chosen and not release_unmoved:
                continue
            conn.execute(update(a).where(a.c.task_id == tid, a.c.labeler_id == name).values(released_at=now))
            if chosen:
                conn.execute(insert(a), dict(task_id=tid, labeler_id=chosen[0], assigned_at=now, released_at=None))
                load[chosen[0]] += 1
                moved += 1
        return moved

    def active_token_digests(self) -> dict[str, LabelerRow]:
        """SHA-256 of each active labeler's token -> the labeler (the service's token resolver)."""
        lab = labelers
        with transaction(self.engine) as conn:
            rows = conn.execute(select(lab).where(lab.c.active.is_(True), lab.c.token_sha256.is_not(None))).all()
        return {r.token_sha256: LabelerRow(r.name, r.admin, r.active, r.created_at) for r in rows}

    def list_labelers(self) -> list[LabelerRow]:
        with transaction(self.engine) as conn:
            rows = conn.execute(select(labelers).order_by(labelers.c.name)).all()
        return [LabelerRow(r.name, r.admin, r.active, r.created_at) for r in rows]

    def has_labelers(self) -> bool:
        """Whether tasks are being assigned: an active, registered labeler exists."""
        lab = labelers
        with transaction(self.engine) as conn:
            return conn.execute(select(lab.c.name).where(lab.c.active.is_(True), lab.c.admin.is_(False))
                                .limit(1)).first() is not None

    # -- progress and statistics ------------------------------------------------------------------
    def progress(self, labeler_id: str, since: datetime) -> tuple[int, int]:
        """(answers ``labeler_id`` stored at or after ``since``, tasks open to them)."""
        labeler_id = _check_labeler(labeler_id)
        since = as_utc(since, "since")
        s = submissions
        with transaction(self.engine) as conn:
            done = conn.execute(select(func.count()).select_from(s).where(s.c.labeler_id == labeler_id,
                                                                          s.c.created_at >= since)).scalar_one()
        return int(done), self.count_open_tasks(labeler_id)

    def labeler_stats(self, since: datetime | None = None) -> list[LabelerStats]:
        """Every registered labeler and everyone who submitted: counts by kind and skips by reason
        (of submissions at or after ``since``), open tasks, median reported seconds per task."""
        since = as_utc(since, "since")
        s = submissions
        out: dict[str, LabelerStats] = {}
        with transaction(self.engine) as conn:
            for r in conn.execute(select(labelers).order_by(labelers.c.name)):
                out[r.name] = LabelerStats(r.name, r.admin, r.active, True, r.created_at)
            q = select(s.c.labeler_id, s.c.kind, s.c.skip_reason, func.count()).group_by(
                s.c.labeler_id, s.c.kind, s.c.skip_reason)
            if since is not None:
                q = q.where(s.c.created_at >= since)
            for name, kind, reason, n in conn.execute(q):
                st = out.setdefault(name, LabelerStats(name))
                st.counts[kind] = st.counts.get(kind, 0) + int(n)
                if kind == "skip":
                    st.skips_by_reason[reason] = st.skips_by_reason.get(reason, 0) + int(n)
            q = select(s.c.labeler_id, s.c.seconds_spent).where(s.c.seconds_spent.is_not(None))
            if since is not None:
                q = q.where(s.c.created_at >= since)
            seconds: dict[str, list[float]] = {}
            for name, sec in conn.execute(q):
                seconds.setdefault(name, []).append(float(sec))
        for name, st in out.items():
            if name in seconds:
                st.median_seconds = float(statistics.median(seconds[name]))
            if not st.admin and st.active:
                st.open_tasks = self.count_open_tasks(name)
        return sorted(out.values(), key=lambda x: x.name)

    # -- export -----------------------------------------------------------------------------------
    def _chunks(self, query, created_col, id_col, convert) -> Iterator[Any]:
        """Rows of ``query`` oldest first, fetched _EXPORT_CHUNK at a time (one short transaction each)."""
        after = None
        while True:
            q = query
            if after is not None:
                at, aid = after
                q = q.where(or_(created_col > at, and_(created_col == at, id_col > aid)))
            q = q.order_by(created_col, id_col).limit(_EXPORT_CHUNK)
            with transaction(self.engine) as conn:
                rows = conn.execute(q).all()
            for r in rows:
                yield convert(r)
            if len(rows) < _EXPORT_CHUNK:
                return
            after = (rows[-1].created_at, rows[-1].id)

    def export_comparisons(self, since: datetime | None = None, split: int = 0, labeler_id: str = "",
                           task_ids: Sequence[str] = ()) -> Iterator[ComparisonRow]:
        """Stored rankings and best-of-K choices, oldest first, streamed in chunks; only those stored
        at or after ``since``, of tasks in ``split`` (0: every split), by ``labeler_id`` (empty: all),
        of the tasks ``task_ids`` (empty: all; at most MAX_BATCH)."""
        since = as_utc(since, "since")
        split = _check_split(split)
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        if len(task_ids) > MAX_BATCH:
            raise DataError(f"task_ids: at most {MAX_BATCH}, got {len(task_ids)}")
        task_ids = [_check_str(t, f"task_ids[{i}]", max_chars=MAX_ID_CHARS, required=True) for i, t in enumerate(task_ids)]
        s, t = submissions, labeling_tasks
        q = (select(s.c.id, s.c.task_id, s.c.labeler_id, s.c.kind, s.c.ranking, s.c.best_index, s.c.labels,
                    s.c.seconds_spent, s.c.created_at, t.c.prompt.label("task_prompt"),
                    t.c.prompt_id.label("task_prompt_id"), t.c.split.label("task_split"), t.c.candidates,
                    t.c.policy_version, t.c.mode, t.c.created_at.label("task_created_at"))
             .join(t, t.c.id == s.c.task_id)
             .where(s.c.kind.in_(COMPARISON_KINDS)))
        if since is not None:
            q = q.where(s.c.created_at >= since)
        if split:
            q = q.where(t.c.split == split)
        if labeler_id:
            q = q.where(s.c.labeler_id == labeler_id)
        if task_ids:
            q = q.where(s.c.task_id.in_(task_ids))

        def convert(r) -> ComparisonRow:
            task = TaskRow(task_id=r.task_id, prompt=r.task_prompt, prompt_id=r.task_prompt_id, split=r.task_split,
                           candidates=list(r.candidates), policy_version=r.policy_version,
                           created_at=r.task_created_at, mode=r.mode)
            return ComparisonRow(r.id, task, r.labeler_id, r.kind, [list(g) for g in r.ranking or ()],
                                 r.best_index or 0, _labels_of(r.labels), r.seconds_spent or 0.0, r.created_at)

        return self._chunks(q, s.c.created_at, s.c.id, convert)

    def export_demonstrations(self, since: datetime | None = None, split: int = 0,
                              labeler_id: str = "") -> Iterator[DemonstrationRow]:
        """Stored demonstrations, oldest first, streamed in chunks; filters as in :meth:`export_comparisons`."""
        since = as_utc(since, "since")
        split = _check_split(split)
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        s = submissions
        q = select(s.c.id, s.c.prompt, s.c.prompt_id, s.c.split, s.c.labeler_id, s.c.response, s.c.task_id,
                   s.c.seconds_spent, s.c.created_at).where(s.c.kind == "demonstration")
        if since is not None:
            q = q.where(s.c.created_at >= since)
        if split:
            q = q.where(s.c.split == split)
        if labeler_id:
            q = q.where(s.c.labeler_id == labeler_id)

        def convert(r) -> DemonstrationRow:
            return DemonstrationRow(r.id, r.prompt, r.prompt_id or "", r.split or 0, r.labeler_id, r.response,
                                    r.task_id or "", r.seconds_spent or 0.0, r.created_at)

        return self._chunks(q, s.c.created_at, s.c.id, convert)

    def count_comparisons(self, since: datetime | None = None) -> int:
        """How many rankings and best-of-K choices are stored (at or after ``since``)."""
        since = as_utc(since, "since")
        q = select(func.count()).select_from(submissions).where(submissions.c.kind.in_(COMPARISON_KINDS))
        if since is not None:
            q = q.where(submissions.c.created_at >= since)
        with transaction(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    # -- agreement --------------------------------------------------------------------------------
    def _rankings_by_task(self, since: datetime | None) -> Iterator[dict[str, list]]:
        """Per task with rankings from at least two labelers: labeler -> their latest ranking."""
        since = as_utc(since, "since")
        s = submissions
        q = select(s.c.task_id, s.c.labeler_id, s.c.ranking).where(s.c.kind == "ranking")
        if since is not None:
            q = q.where(s.c.created_at >= since)
        # Latest last within (task, labeler), so a dict keeps each labeler's latest ranking.
        q = q.order_by(s.c.task_id, s.c.labeler_id, s.c.created_at, s.c.id)
        with transaction(self.engine) as conn:
            rows = conn.execute(q.execution_options(yield_per=1000))
            for _, task_rows in itertools.groupby(rows, key=lambda r: r.task_id):
                latest = {r.labeler_id: r.ranking for r in task_rows}
                if len(latest) >= 2:
                    yield latest

    def agreement(self, since: datetime | None = None) -> tuple[float, int, int]:
        """(pairwise_agreement, tasks, pairs) over the rankings stored at or after ``since``.

        Tasks with rankings from at least two labelers count (each labeler's latest ranking of the
        task); a pair is (task, two labelers, two candidates i < j), and the two labelers agree on
        it when both rank i above j, both j above i, or both tie them. 0.0 when there are no pairs.
        """
        agree = pairs = tasks = 0
        for latest in self._rankings_by_task(since):
            a, p = pair_agreement(list(latest.values()))
            tasks += 1
            agree += a
            pairs += p
        return (agree / pairs if pairs else 0.0), tasks, pairs

    def agreement_by_labeler_pair(self, since: datetime | None = None) -> dict[tuple[str, str], tuple[int, int, int]]:
        """The same pairs as :meth:`agreement`, per two labelers (names in order):
        (labeler_a, labeler_b) -> (tasks, agreements, pairs)."""
        out: dict[tuple[str, str], tuple[int, int, int]] = {}
        for latest in self._rankings_by_task(since):
            for (la, ra), (lb, rb) in itertools.combinations(sorted(latest.items()), 2):
                a, p = pair_agreement([ra, rb])
                t0, a0, p0 = out.get((la, lb), (0, 0, 0))
                out[(la, lb)] = (t0 + 1, a0 + a, p0 + p)
        return out
