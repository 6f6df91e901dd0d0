"""feedback-store's storage: labeling tasks, idempotent submissions, export and labeler agreement.

Every stored submission (ranking, best-of-K choice, demonstration) gets one outbox row, a
``FeedbackEvent`` for topic ``rlhf.feedback.v1``, in the same transaction. Submissions carry a
client-chosen idempotency key: the same key with the same content answers with the first
submission (``duplicate=True``, nothing stored or announced); with other content it is a
:class:`~rlhf.errors.ConflictError`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from rlhf_client import TOPIC_FEEDBACK, common_pb2, feedback_pb2
from sqlalchemy import and_, exists, func, insert, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from rlhf.errors import ConflictError, DataError, NotFoundError
from rlhf.storage.db import (as_utc, check_page_size, decode_page_token, encode_page_token, is_transient,
                             transaction, utcnow)
from rlhf.storage.schema import labeling_tasks, outbox, submissions

TOPIC = TOPIC_FEEDBACK
EVENT_TYPE = feedback_pb2.FeedbackEvent.DESCRIPTOR.full_name  # rlhf.feedback.v1.FeedbackEvent
MAX_BATCH = 1000
MIN_K, MAX_K = 2, 16
MAX_TEXT_CHARS = 100_000  # prompt, each candidate, a demonstration's response
MAX_ID_CHARS = 200  # idempotency keys, labeler ids, prompt ids, policy versions
_EXPORT_CHUNK = 500  # rows per query while exporting
_RETRIES = 5
COMPARISON_KINDS = ("ranking", "best_of_k")
_KIND_PROTO = {"ranking": feedback_pb2.COMPARISON_KIND_RANKING, "best_of_k": feedback_pb2.COMPARISON_KIND_BEST_OF_K}
_SPLITS = (common_pb2.SPLIT_UNSPECIFIED, common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_VALID, common_pb2.SPLIT_TEST)


# -- records --------------------------------------------------------------------------------------

def _ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


@dataclass(frozen=True)
class TaskIn:
    prompt: str
    prompt_id: str
    split: int
    candidates: list[str]
    policy_version: str


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    prompt: str
    prompt_id: str
    split: int
    candidates: list[str] = field(hash=False)
    policy_version: str
    created_at: datetime

    @property
    def k(self) -> int:
        return len(self.candidates)

    def to_proto(self) -> feedback_pb2.LabelingTask:
        return feedback_pb2.LabelingTask(task_id=self.task_id, prompt=self.prompt, prompt_id=self.prompt_id,
                                         split=self.split, candidates=self.candidates,
                                         policy_version=self.policy_version, create_time=_ts(self.created_at))


def task_to_proto(row: TaskRow) -> feedback_pb2.LabelingTask:
    return row.to_proto()


def _task_row(r) -> TaskRow:
    return TaskRow(task_id=r.id, prompt=r.prompt, prompt_id=r.prompt_id, split=r.split,
                   candidates=list(r.candidates), policy_version=r.policy_version, created_at=r.created_at)


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


def _content_sha(content: dict) -> str:
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


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
    """Labeling tasks and submissions. Thread-safe; every call is one short transaction
    (exports: one per chunk)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # -- tasks ------------------------------------------------------------------------------------
    def create_tasks(self, items: list[TaskIn]) -> list[TaskRow]:
        """Store a batch of tasks (all or nothing). DataError names the first bad one (``tasks[2]: ...``)."""
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
            if not isinstance(t.candidates, (list, tuple)):
                raise DataError(f"{where}.candidates: expected a list of strings")
            k = len(t.candidates)
            if k < MIN_K:
                raise DataError(f"{where}: needs at least {MIN_K} candidates, got K={k}")
            if k > MAX_K:
                raise DataError(f"{where}: at most {MAX_K} candidates, got K={k}")
            for j, c in enumerate(t.candidates):
                _check_str(c, f"{where}.candidates[{j}]", max_chars=MAX_TEXT_CHARS, required=True, blank_ok=True)
        now = utcnow()
        rows = [dict(id=uuid.uuid4().hex, prompt=t.prompt, prompt_id=t.prompt_id or "", split=t.split,
                     candidates=list(t.candidates), k=len(t.candidates), policy_version=t.policy_version or "",
                     created_at=now + timedelta(microseconds=i))  # listed in the order given
                for i, t in enumerate(items)]
        with transaction(self.engine, write=True) as conn:
            conn.execute(insert(labeling_tasks), rows)
        return [TaskRow(task_id=r["id"], prompt=r["prompt"], prompt_id=r["prompt_id"], split=r["split"],
                        candidates=r["candidates"], policy_version=r["policy_version"], created_at=r["created_at"])
                for r in rows]

    def get_task(self, task_id: str) -> TaskRow:
        task_id = _check_str(task_id, "task_id", max_chars=MAX_ID_CHARS, required=True)
        with transaction(self.engine) as conn:
            r = conn.execute(select(labeling_tasks).where(labeling_tasks.c.id == task_id)).first()
        if r is None:
            raise NotFoundError(f"labeling task {_short(task_id)} not found")
        return _task_row(r)

    def list_tasks(self, labeler_id: str = "", page_size: int = 100,
                   page_token: str = "") -> tuple[list[TaskRow], str]:
        """One page of tasks, oldest first, leaving out those ``labeler_id`` has ranked or chosen
        the best of (empty labeler_id: every task); and the next page's token ("" at the end)."""
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        size = check_page_size(page_size)
        after = decode_page_token(page_token)
        t = labeling_tasks
        q = select(t)
        if labeler_id:
            s = submissions
            q = q.where(~exists().where(s.c.task_id == t.c.id, s.c.labeler_id == labeler_id,
                                        s.c.kind.in_(COMPARISON_KINDS)))
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

    # -- submissions ------------------------------------------------------------------------------
    def submit_ranking(self, key: str, task_id: str, labeler_id: str,
                       ranking: list[list[int]]) -> tuple[str, bool]:
        """Store a ranking of a task's candidates (best group first; a group holds tied candidates).

        Returns (submission_id, duplicate). DataError for a malformed ranking, NotFoundError for an
        unknown task, ConflictError when ``key`` was used before for other content.
        """
        key = _check_key(key)
        task_id = _check_str(task_id, "task_id", max_chars=MAX_ID_CHARS, required=True)
        labeler_id = _check_labeler(labeler_id)
        groups = _check_ranking_shape(ranking)
        content = {"kind": "ranking", "task_id": task_id, "labeler_id": labeler_id, "ranking": groups}

        def prepare(conn, sid: str, now: datetime):
            task = self._task_for_submission(conn, task_id, labeler_id)
            _check_ranking_against(groups, task.k)
            row = dict(kind="ranking", task_id=task_id, labeler_id=labeler_id, ranking=groups)
            comparison = self._comparison(task, sid, labeler_id, "ranking", groups, 0, now)
            return row, feedback_pb2.FeedbackEvent(event_id=sid, comparison=comparison, event_time=_ts(now)), task_id

        return self._submit(key, content, prepare)

    def submit_best_of_k(self, key: str, task_id: str, labeler_id: str, best_index: int) -> tuple[str, bool]:
        """Store the labeler's choice of the best candidate of a task. Returns (submission_id, duplicate)."""
        key = _check_key(key)
        task_id = _check_str(task_id, "task_id", max_chars=MAX_ID_CHARS, required=True)
        labeler_id = _check_labeler(labeler_id)
        if isinstance(best_index, bool) or not isinstance(best_index, int):
            raise DataError(f"best_index: expected an integer, got {type(best_index).__name__}")
        content = {"kind": "best_of_k", "task_id": task_id, "labeler_id": labeler_id, "best_index": best_index}

        def prepare(conn, sid: str, now: datetime):
            task = self._task_for_submission(conn, task_id, labeler_id)
            if not 0 <= best_index < task.k:
                raise DataError(f"best_index: {best_index} out of range for K={task.k}")
            row = dict(kind="best_of_k", task_id=task_id, labeler_id=labeler_id, best_index=best_index)
            comparison = self._comparison(task, sid, labeler_id, "best_of_k", None, best_index, now)
            return row, feedback_pb2.FeedbackEvent(event_id=sid, comparison=comparison, event_time=_ts(now)), task_id

        return self._submit(key, content, prepare)

    def submit_demonstration(self, key: str, prompt: str, prompt_id: str, split: int, labeler_id: str,
                             response: str) -> tuple[str, bool]:
        """Store a labeler-written response to a prompt. Returns (submission_id, duplicate)."""
        key = _check_key(key)
        prompt = _check_str(prompt, "prompt", max_chars=MAX_TEXT_CHARS, required=True)
        prompt_id = _check_str(prompt_id, "prompt_id", max_chars=MAX_ID_CHARS, required=False)
        split = _check_split(split)
        labeler_id = _check_labeler(labeler_id)
        response = _check_str(response, "response", max_chars=MAX_TEXT_CHARS, required=True)
        content = {"kind": "demonstration", "prompt": prompt, "prompt_id": prompt_id, "split": split,
                   "labeler_id": labeler_id, "response": response}

        def prepare(conn, sid: str, now: datetime):
            row = dict(kind="demonstration", labeler_id=labeler_id, prompt=prompt, prompt_id=prompt_id, split=split,
                       response=response)
            demo = feedback_pb2.Demonstration(submission_id=sid, prompt=prompt, prompt_id=prompt_id, split=split,
                                              labeler_id=labeler_id, response=response, create_time=_ts(now))
            return row, feedback_pb2.FeedbackEvent(event_id=sid, demonstration=demo, event_time=_ts(now)), \
                prompt_id or sid

        return self._submit(key, content, prepare)

    @staticmethod
    def _task_for_submission(conn, task_id: str, labeler_id: str | None = None) -> TaskRow:
        """The task an answer is for; with ``labeler_id``, ConflictError when they answered it already."""
        r = conn.execute(select(labeling_tasks).where(labeling_tasks.c.id == task_id)).first()
        if r is None:
            raise NotFoundError(f"labeling task {_short(task_id)} not found")
        if labeler_id is not None:
            s = submissions
            done = conn.execute(select(s.c.id).where(s.c.task_id == task_id, s.c.labeler_id == labeler_id,
                                                     s.c.kind.in_(COMPARISON_KINDS))).first()
            if done is not None:
                raise ConflictError(f"labeler {_short(labeler_id)} already answered task {task_id}: one answer "
                                    f"per labeler per task")
        return _task_row(r)

    @staticmethod
    def _comparison(task: TaskRow, sid: str, labeler_id: str, kind: str, groups: list[list[int]] | None,
                    best_index: int | None, created_at: datetime) -> feedback_pb2.Comparison:
        return feedback_pb2.Comparison(
            submission_id=sid, task_id=task.task_id, prompt=task.prompt, prompt_id=task.prompt_id, split=task.split,
            candidates=task.candidates, policy_version=task.policy_version, labeler_id=labeler_id,
            kind=_KIND_PROTO[kind], ranking=[feedback_pb2.RankGroup(indices=g) for g in groups or ()],
            best_index=best_index or 0, create_time=_ts(created_at))

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
                        row, event, bus_key = prepare(conn, sid, now)
                    except ConflictError:
                        # the answer prepare() found may be this very key, committed meanwhile
                        found = self._existing(conn, key)
                        if found is not None:
                            return self._answer_existing(found, sha)
                        raise
                    conn.execute(insert(submissions), dict(row, id=sid, idempotency_key=key, request_sha256=sha,
                                                           created_at=now))
                    conn.execute(insert(outbox), dict(topic=TOPIC, message_type=EVENT_TYPE,
                                                      payload=event.SerializeToString(), key=bus_key,
                                                      created_at=now, published_at=None))
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
                           task_ids: Sequence[str] = ()) -> Iterator[feedback_pb2.Comparison]:
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
        q = (select(s.c.id, s.c.task_id, s.c.labeler_id, s.c.kind, s.c.ranking, s.c.best_index, s.c.created_at,
                    t.c.prompt.label("task_prompt"), t.c.prompt_id.label("task_prompt_id"),
                    t.c.split.label("task_split"), t.c.candidates, t.c.policy_version)
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

        def convert(r) -> feedback_pb2.Comparison:
            return feedback_pb2.Comparison(
                submission_id=r.id, task_id=r.task_id, prompt=r.task_prompt, prompt_id=r.task_prompt_id,
                split=r.task_split, candidates=list(r.candidates), policy_version=r.policy_version,
                labeler_id=r.labeler_id, kind=_KIND_PROTO[r.kind],
                ranking=[feedback_pb2.RankGroup(indices=g) for g in (r.ranking or ())],
                best_index=r.best_index or 0, create_time=_ts(r.created_at))

        return self._chunks(q, s.c.created_at, s.c.id, convert)

    def export_demonstrations(self, since: datetime | None = None, split: int = 0,
                              labeler_id: str = "") -> Iterator[feedback_pb2.Demonstration]:
        """Stored demonstrations, oldest first, streamed in chunks; filters as in :meth:`export_comparisons`."""
        since = as_utc(since, "since")
        split = _check_split(split)
        labeler_id = _check_str(labeler_id, "labeler_id", max_chars=MAX_ID_CHARS, required=False)
        s = submissions
        q = select(s.c.id, s.c.prompt, s.c.prompt_id, s.c.split, s.c.labeler_id, s.c.response, s.c.created_at) \
            .where(s.c.kind == "demonstration")
        if since is not None:
            q = q.where(s.c.created_at >= since)
        if split:
            q = q.where(s.c.split == split)
        if labeler_id:
            q = q.where(s.c.labeler_id == labeler_id)

        def convert(r) -> feedback_pb2.Demonstration:
            return feedback_pb2.Demonstration(submission_id=r.id, prompt=r.prompt, prompt_id=r.prompt_id or "",
                                              split=r.split or 0, labeler_id=r.labeler_id, response=r.response,
                                              create_time=_ts(r.created_at))

        return self._chunks(q, s.c.created_at, s.c.id, convert)

    def count_comparisons(self, since: datetime | None = None) -> int:
        """How many rankings and best-of-K choices are stored (at or after ``since``)."""
        since = as_utc(since, "since")
        q = select(func.count()).select_from(submissions).where(submissions.c.kind.in_(COMPARISON_KINDS))
        if since is not None:
            q = q.where(submissions.c.created_at >= since)
        with transaction(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    def count_open_tasks(self) -> int:
        """Labeling tasks that no labeler has ranked or chosen the best of yet."""
        t, s = labeling_tasks, submissions
        q = select(func.count()).select_from(t).where(
            ~exists().where(s.c.task_id == t.c.id, s.c.kind.in_(COMPARISON_KINDS)))
        with transaction(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    def agreement(self, since: datetime | None = None) -> tuple[float, int, int]:
        """(pairwise_agreement, tasks, pairs) over the rankings stored at or after ``since``.

        Tasks with rankings from at least two labelers count (each labeler's latest ranking of the
        task); a pair is (task, two labelers, two candidates i < j), and the two labelers agree on
        it when both rank i above j, both j above i, or both tie them. 0.0 when there are no pairs.
        """
        since = as_utc(since, "since")
        s = submissions
        q = select(s.c.task_id, s.c.labeler_id, s.c.ranking).where(s.c.kind == "ranking")
        if since is not None:
            q = q.where(s.c.created_at >= since)
        # Latest last within (task, labeler), so a dict keeps each labeler's latest ranking.
        q = q.order_by(s.c.task_id, s.c.labeler_id, s.c.created_at, s.c.id)
        agree = pairs = tasks = 0
        with transaction(self.engine) as conn:
            rows = conn.execute(q.execution_options(yield_per=1000))
            for _, task_rows in itertools.groupby(rows, key=lambda r: r.task_id):
                latest = {r.labeler_id: r.ranking for r in task_rows}
                if len(latest) < 2:
                    continue
                a, p = pair_agreement(list(latest.values()))
                tasks += 1
                agree += a
                pairs += p
        return (agree / pairs if pairs else 0.0), tasks, pairs
