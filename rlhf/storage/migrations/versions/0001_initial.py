"""Initial schema: prompts, labeling_tasks, submissions, outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=False),
        sa.Column("split", sa.SmallInteger(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_prompts"),
        sa.UniqueConstraint("text_sha256", name="uq_prompts_text_sha256"),
    )
    op.create_index("ix_prompts_split_created_at_id", "prompts", ["split", "created_at", "id"])

    op.create_table(
        "labeling_tasks",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("prompt_id", sa.String(200), nullable=False),
        sa.Column("split", sa.SmallInteger(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.String(200), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labeling_tasks"),
    )
    op.create_index("ix_labeling_tasks_created_at_id", "labeling_tasks", ["created_at", "id"])

    op.create_table(
        "submissions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("task_id", sa.String(32), nullable=True),
        sa.Column("labeler_id", sa.String(200), nullable=False),
        sa.Column("ranking", sa.JSON(), nullable=True),
        sa.Column("best_index", sa.Integer(), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("prompt_id", sa.String(200), nullable=True),
        sa.Column("split", sa.SmallInteger(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_submissions"),
        sa.UniqueConstraint("idempotency_key", name="uq_submissions_idempotency_key"),
        sa.ForeignKeyConstraint(["task_id"], ["labeling_tasks.id"], name="fk_submissions_task_id_labeling_tasks"),
        sa.CheckConstraint("kind IN ('ranking', 'best_of_k', 'demonstration')", name="ck_submissions_kind"),
    )
    op.create_index("ix_submissions_created_at", "submissions", ["created_at"])
    op.create_index("ix_submissions_task_id_labeler_id", "submissions", ["task_id", "labeler_id"])

    op.create_table(
        "outbox",
        sa.Column("id", _BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("message_type", sa.String(200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("key", sa.String(200), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("published_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_published_at", "outbox", ["published_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("submissions")
    op.drop_table("labeling_tasks")
    op.drop_table("prompts")
