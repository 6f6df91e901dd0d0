"""The labeling page's storage: labelers and their token digests, task assignment, task modes
(ranking, best-of-K, demonstration), skips, per-candidate flags and quality ratings, and the
seconds a labeler spent. One answer per labeler per task now covers every answer to a task
(demonstrations of a task and skips too).

The kinds' CHECK constraint that 0001 created is named ``ck_submissions_ck_submissions_kind`` (the
naming convention prefixed a name that already had its prefix); it is replaced by
``ck_submissions_kind``, the schema's name.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_OLD_ANSWERS = sa.text("kind IN ('ranking', 'best_of_k')")
_ANSWERS = sa.text("task_id IS NOT NULL")
_OLD_KINDS = "kind IN ('ranking', 'best_of_k', 'demonstration')"
_KINDS = "kind IN ('ranking', 'best_of_k', 'demonstration', 'skip')"
_OLD_CHECK, _CHECK = "ck_submissions_ck_submissions_kind", "ck_submissions_kind"


def upgrade() -> None:
    op.create_table(
        "labelers",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("token_issued_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_labelers"),
        sa.UniqueConstraint("token_sha256", name="uq_labelers_token_sha256"),
    )
    op.create_table(
        "task_assignments",
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("labeler_id", sa.String(64), nullable=False),
        sa.Column("assigned_at", _TS, nullable=False),
        sa.Column("released_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("task_id", "labeler_id", name="pk_task_assignments"),
        sa.ForeignKeyConstraint(["task_id"], ["labeling_tasks.id"], name="fk_task_assignments_task_id_labeling_tasks"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.name"], name="fk_task_assignments_labeler_id_labelers"),
    )
    op.create_index("ix_task_assignments_labeler_id_released_at", "task_assignments", ["labeler_id", "released_at"])
    op.add_column("labeling_tasks", sa.Column("mode", sa.String(16), nullable=False, server_default="ranking"))

    op.drop_index("uq_submissions_answer", table_name="submissions")
    # SQLite cannot alter a CHECK constraint: batch mode copies the table (the index above is
    # dropped first, as the copy would lose its WHERE clause)
    with op.batch_alter_table("submissions") as b:
        b.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        b.add_column(sa.Column("seconds_spent", sa.Float(), nullable=True))
        b.add_column(sa.Column("skip_reason", sa.String(32), nullable=True))
        b.add_column(sa.Column("comment", sa.Text(), nullable=True))
        b.drop_constraint(op.f(_OLD_CHECK), type_="check")
        b.create_check_constraint(op.f(_CHECK), sa.text(_KINDS))
    op.create_index("uq_submissions_answer", "submissions", ["task_id", "labeler_id"], unique=True,
                    postgresql_where=_ANSWERS, sqlite_where=_ANSWERS)
    op.create_index("ix_submissions_labeler_id_created_at", "submissions", ["labeler_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_submissions_labeler_id_created_at", table_name="submissions")
    op.drop_index("uq_submissions_answer", table_name="submissions")
    op.execute("DELETE FROM submissions WHERE kind = 'skip'")
    with op.batch_alter_table("submissions") as b:
        b.drop_constraint(op.f(_CHECK), type_="check")
        b.create_check_constraint(op.f(_OLD_CHECK), sa.text(_OLD_KINDS))
        for col in ("comment", "skip_reason", "seconds_spent", "labels"):
            b.drop_column(col)
    op.create_index("uq_submissions_answer", "submissions", ["task_id", "labeler_id"], unique=True,
                    postgresql_where=_OLD_ANSWERS, sqlite_where=_OLD_ANSWERS)
    # not a batch copy: the tables that reference labeling_tasks would stop a DROP TABLE on SQLite
    op.execute("ALTER TABLE labeling_tasks DROP COLUMN mode")
    op.drop_index("ix_task_assignments_labeler_id_released_at", table_name="task_assignments")
    op.drop_table("task_assignments")
    op.drop_table("labelers")
