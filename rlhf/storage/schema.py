"""The services' tables (SQLAlchemy 2 declarative). The migrations in ``migrations/versions`` build
exactly this schema; ``tests/storage/test_db.py`` checks that they agree.

prompt-collector owns ``prompts``; feedback-store owns ``labeling_tasks``, ``submissions``,
``labelers`` and ``task_assignments``; the trainer owns ``trainer_jobs``, ``trainer_job_events``
and ``trainer_served_versions`` (:mod:`rlhf.storage.jobs`); all three write ``outbox`` (events
waiting to be published on Kafka by :class:`~rlhf.storage.outbox.OutboxRelay`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, SmallInteger, String, Text, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SUBMISSION_KINDS = ("ranking", "best_of_k", "demonstration", "skip")
TASK_MODES = ("ranking", "best_of_k", "demonstration")
# the numbers of rlhf.common.v1.Split (tests/storage/test_db.py checks they agree)
SPLIT_UNSPECIFIED, SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2, 3
# BIGINT on PostgreSQL; INTEGER on SQLite, where only an INTEGER PRIMARY KEY autoincrements.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    text: Mapped[str] = mapped_column(Text, nullable=False)  # scrubbed, stripped, NFC
    text_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    user_hash: Mapped[str] = mapped_column(String(64), nullable=False)  # sha256 of the user id
    split: Mapped[int] = mapped_column(SmallInteger, nullable=False)  # common_pb2.Split
    source: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (Index("ix_prompts_split_created_at_id", "split", "created_at", "id"),)


class LabelingTask(Base):
    __tablename__ = "labeling_tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    prompt_id: Mapped[str] = mapped_column(String(200), nullable=False)
    split: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    candidates: Mapped[list] = mapped_column(JSON, nullable=False)  # list of strings
    k: Mapped[int] = mapped_column(Integer, nullable=False)
    policy_version: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # TASK_MODES (migration 0003; older tasks are rankings)
    mode: Mapped[str] = mapped_column(String(16), nullable=False, server_default="ranking")

    __table_args__ = (Index("ix_labeling_tasks_created_at_id", "created_at", "id"),)


class Submission(Base):
    __tablename__ = "submissions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    # sha256 of the canonical request content: a reused key with other content is a conflict
    request_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    task_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("labeling_tasks.id"), nullable=True)
    labeler_id: Mapped[str] = mapped_column(String(200), nullable=False)
    ranking: Mapped[list | None] = mapped_column(JSON, nullable=True)  # list of lists of ints, best first
    best_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # demonstrations only
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    split: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # migration 0003: per-candidate flags and quality ([{"index", "flags", "quality"}]), the
    # seconds the labeler reported, and a skip's reason and comment
    labels: Mapped[list | None] = mapped_column(JSON, nullable=True)
    seconds_spent: Mapped[float | None] = mapped_column(Float, nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        CheckConstraint("kind IN ('ranking', 'best_of_k', 'demonstration', 'skip')", name="kind"),
        Index("ix_submissions_created_at", "created_at"),
        Index("ix_submissions_task_id_labeler_id", "task_id", "labeler_id"),
        Index("ix_submissions_labeler_id_created_at", "labeler_id", "created_at"),
        # one answer (ranking, best-of-K choice, demonstration of a task, skip) per labeler per task
        # (migration 0002 for rankings and choices, 0003 for every answer to a task)
        Index("uq_submissions_answer", "task_id", "labeler_id", unique=True,
              postgresql_where=text("task_id IS NOT NULL"), sqlite_where=text("task_id IS NOT NULL")),
    )


class Labeler(Base):
    """A registered labeler (or admin) and the SHA-256 of their sign-in token (migration 0003)."""

    __tablename__ = "labelers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin: Mapped[bool] = mapped_column(Boolean, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False)
    token_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    token_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TaskAssignment(Base):
    """A task assigned to a labeler; ``released_at`` once it was reassigned away (migration 0003)."""

    __tablename__ = "task_assignments"

    task_id: Mapped[str] = mapped_column(String(32), ForeignKey("labeling_tasks.id"), primary_key=True)
    labeler_id: Mapped[str] = mapped_column(String(64), ForeignKey("labelers.name"), primary_key=True)
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_task_assignments_labeler_id_released_at", "labeler_id", "released_at"),)


class OutboxMessage(Base):
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    message_type: Mapped[str] = mapped_column(String(200), nullable=False)  # proto full name
    payload: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # serialized proto
    key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_outbox_published_at", "published_at"),)


JOB_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


class TrainerJob(Base):
    """A training job of the trainer: what it is, who started it, where it runs and how far it got."""

    __tablename__ = "trainer_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # sft, rm, ppo, online_loop
    owner: Mapped[str] = mapped_column(String(200), nullable=False)  # the principal that started it
    config: Mapped[dict] = mapped_column(JSON, nullable=False)  # the job's config (rlhf.train / the online loop's)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False)
    published_versions: Mapped[list] = mapped_column(JSON, nullable=False)  # oldest first
    checkpoint_dir: Mapped[str] = mapped_column(Text, nullable=False)  # where its checkpoints are written
    launcher: Mapped[str] = mapped_column(String(16), nullable=False)  # process, kubernetes
    # the run now in charge (a process id and start time, a Kubernetes Job); null: none
    runner: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)  # runs started, resumes included
    restarts: Mapped[int] = mapped_column(Integer, nullable=False)  # resumes after a run ended without a result
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
        Index("ix_trainer_jobs_status", "status"),
        Index("ix_trainer_jobs_created_at_id", "created_at", "id"),
    )


class TrainerJobEvent(Base):
    """Every event of a job, in order (WatchJob replays them)."""

    __tablename__ = "trainer_job_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("trainer_jobs.id", ondelete="CASCADE"), nullable=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False)
    stage: Mapped[str] = mapped_column(String(16), nullable=False)  # SFT, RM, PPO for a training step's event; "" otherwise

    __table_args__ = (Index("ix_trainer_job_events_job_id_id", "job_id", "id"),)


class TrainerServedVersion(Base):
    """The newest version of each kind an instance announced it serves (rlhf.serving.v1); job
    processes wait on it."""

    __tablename__ = "trainer_served_versions"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[str] = mapped_column(String(200), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


prompts = Prompt.__table__
labeling_tasks = LabelingTask.__table__
submissions = Submission.__table__
outbox = OutboxMessage.__table__
labelers = Labeler.__table__
task_assignments = TaskAssignment.__table__
trainer_jobs = TrainerJob.__table__
trainer_job_events = TrainerJobEvent.__table__
trainer_served_versions = TrainerServedVersion.__table__
