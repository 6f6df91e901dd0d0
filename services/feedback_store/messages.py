"""The feedback-store's wire format: protobuf messages from the store's rows and back, and the
outbox event of a stored submission (``rlhf.feedback.v1``'s FeedbackEvent).

Enum values travel as the store's names: ``RESPONSE_FLAG_HALLUCINATION`` <-> ``"hallucination"``,
``SKIP_REASON_UNCLEAR_PROMPT`` <-> ``"unclear_prompt"``, ``TASK_MODE_BEST_OF_K`` <-> ``"best_of_k"``.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from rlhf_client import TOPIC_FEEDBACK, feedback_pb2

from rlhf.errors import DataError
from rlhf.storage.feedback import (FLAGS, SKIP_REASONS, CandidateLabel, ComparisonRow, DemonstrationRow, LabelerStats,
                                   SkipRow, Submission, TaskIn, TaskRow)
from rlhf.storage.outbox import OutboxEvent
from rlhf.storage.schema import TASK_MODES

EVENT_TYPE = feedback_pb2.FeedbackEvent.DESCRIPTOR.full_name  # rlhf.feedback.v1.FeedbackEvent
_KIND_PROTO = {"ranking": feedback_pb2.COMPARISON_KIND_RANKING, "best_of_k": feedback_pb2.COMPARISON_KIND_BEST_OF_K}


def _names(enum, prefix: str, names: tuple[str, ...]) -> tuple[dict[int, str], dict[str, int]]:
    to_name = {enum.Value(prefix + n.upper()): n for n in names}
    return to_name, {n: v for v, n in to_name.items()}


FLAG_NAME, FLAG_ENUM = _names(feedback_pb2.ResponseFlag, "RESPONSE_FLAG_", FLAGS)
REASON_NAME, REASON_ENUM = _names(feedback_pb2.SkipReason, "SKIP_REASON_", SKIP_REASONS)
MODE_NAME, MODE_ENUM = _names(feedback_pb2.TaskMode, "TASK_MODE_", TASK_MODES)


def ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


# -- requests -> the store's inputs ---------------------------------------------------------------

def task_in(t: feedback_pb2.LabelingTaskInput, where: str) -> TaskIn:
    if t.mode and t.mode not in MODE_NAME:
        raise DataError(f"{where}.mode: unknown task mode {t.mode}")
    return TaskIn(prompt=t.prompt, prompt_id=t.prompt_id, split=t.split, candidates=list(t.candidates),
                  policy_version=t.policy_version, mode=MODE_NAME.get(t.mode, "ranking"))


def labels_in(labels) -> list[CandidateLabel]:
    """CandidateLabel messages as the store's labels; an unknown or unspecified flag is an error."""
    out = []
    for i, lab in enumerate(labels):
        bad = [f for f in lab.flags if f not in FLAG_NAME]
        if bad:
            raise DataError(f"labels[{i}].flags: unknown flag {bad[0]}")
        out.append(CandidateLabel(lab.index, tuple(FLAG_NAME[f] for f in lab.flags), lab.quality))
    return out


def skip_reason(reason: int) -> str:
    if reason not in REASON_NAME:
        raise DataError("reason: required, one of " + ", ".join(f"SKIP_REASON_{n.upper()}" for n in SKIP_REASONS))
    return REASON_NAME[reason]


# -- rows -> messages -----------------------------------------------------------------------------

def task_proto(row: TaskRow, show_assignees: bool = True) -> feedback_pb2.LabelingTask:
    return feedback_pb2.LabelingTask(task_id=row.task_id, prompt=row.prompt, prompt_id=row.prompt_id, split=row.split,
                                     candidates=row.candidates, policy_version=row.policy_version,
                                     create_time=ts(row.created_at), mode=MODE_ENUM[row.mode],
                                     assigned_to=row.assigned_to if show_assignees else ())


def _labels_proto(labels: tuple[CandidateLabel, ...]) -> list[feedback_pb2.CandidateLabel]:
    return [feedback_pb2.CandidateLabel(index=x.index, flags=[FLAG_ENUM[f] for f in x.flags], quality=x.quality)
            for x in labels]


def comparison_proto(row: ComparisonRow) -> feedback_pb2.Comparison:
    t = row.task
    return feedback_pb2.Comparison(
        submission_id=row.submission_id, task_id=t.task_id, prompt=t.prompt, prompt_id=t.prompt_id, split=t.split,
        candidates=t.candidates, policy_version=t.policy_version, labeler_id=row.labeler_id,
        kind=_KIND_PROTO[row.kind], ranking=[feedback_pb2.RankGroup(indices=g) for g in row.ranking],
        best_index=row.best_index, create_time=ts(row.created_at), labels=_labels_proto(row.labels),
        seconds_spent=row.seconds_spent)


def demonstration_proto(row: DemonstrationRow) -> feedback_pb2.Demonstration:
    return feedback_pb2.Demonstration(submission_id=row.submission_id, prompt=row.prompt, prompt_id=row.prompt_id,
                                      split=row.split, labeler_id=row.labeler_id, response=row.response,
                                      create_time=ts(row.created_at), task_id=row.task_id,
                                      seconds_spent=row.seconds_spent)


def skip_proto(row: SkipRow) -> feedback_pb2.Skip:
    return feedback_pb2.Skip(submission_id=row.submission_id, task_id=row.task_id, labeler_id=row.labeler_id,
                             reason=REASON_ENUM[row.reason], comment=row.comment, seconds_spent=row.seconds_spent,
                             create_time=ts(row.created_at))


def labeler_proto(st: LabelerStats) -> feedback_pb2.Labeler:
    c = st.counts
    return feedback_pb2.Labeler(
        name=st.name, admin=st.admin, active=st.active, registered=st.registered,
        create_time=ts(st.created_at) if st.created_at else None, rankings=c.get("ranking", 0),
        best_of_k=c.get("best_of_k", 0), demonstrations=c.get("demonstration", 0), skips=c.get("skip", 0),
        open_tasks=st.open_tasks, median_seconds_per_task=st.median_seconds, skips_by_reason=st.skips_by_reason)


def feedback_event(row: Submission) -> feedback_pb2.FeedbackEvent:
    ev = feedback_pb2.FeedbackEvent(event_id=row.submission_id, event_time=ts(row.created_at))
    if isinstance(row, ComparisonRow):
        ev.comparison.CopyFrom(comparison_proto(row))
    elif isinstance(row, DemonstrationRow):
        ev.demonstration.CopyFrom(demonstration_proto(row))
    else:
        ev.skip.CopyFrom(skip_proto(row))
    return ev


def announce(row: Submission) -> OutboxEvent:
    """The outbox event of a stored submission: its FeedbackEvent on rlhf.feedback.v1, keyed by
    the task (a free-standing demonstration: by its prompt id, else its own id)."""
    key = row.task.task_id if isinstance(row, ComparisonRow) else row.task_id
    if not key and isinstance(row, DemonstrationRow):
        key = row.prompt_id or row.submission_id
    return OutboxEvent(TOPIC_FEEDBACK, EVENT_TYPE, feedback_event(row).SerializeToString(), key)
