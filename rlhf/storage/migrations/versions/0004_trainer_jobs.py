"""Durable training jobs: the trainer's job records, their events, and the served versions its
job processes wait on (rlhf.storage.jobs).

Revision ID: 0004
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "trainer_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("published_versions", sa.JSON(), nullable=False),
        sa.Column("checkpoint_dir", sa.Text(), nullable=False),
        sa.Column("launcher", sa.String(16), nullable=False),
        sa.Column("runner", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_trainer_jobs"),
        sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
                           name="ck_trainer_jobs_status"),
    )
    op.create_index("ix_trainer_jobs_status", "trainer_jobs", ["status"])
    op.create_index("ix_trainer_jobs_created_at_id", "trainer_jobs", ["created_at", "id"])

    op.create_table(
        "trainer_job_events",
        sa.Column("id", _BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("time", _TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_trainer_job_events"),
        sa.ForeignKeyConstraint(["job_id"], ["trainer_jobs.id"], name="fk_trainer_job_events_job_id_trainer_jobs",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_trainer_job_events_job_id_id", "trainer_job_events", ["job_id", "id"])

    op.create_table(
        "trainer_served_versions",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("kind", name="pk_trainer_served_versions"),
    )


def downgrade() -> None:
    op.drop_table("trainer_served_versions")
    op.drop_index("ix_trainer_job_events_job_id_id", table_name="trainer_job_events")
    op.drop_table("trainer_job_events")
    op.drop_index("ix_trainer_jobs_created_at_id", table_name="trainer_jobs")
    op.drop_index("ix_trainer_jobs_status", table_name="trainer_jobs")
    op.drop_table("trainer_jobs")
