"""One answer per labeler per task: a unique index on (task_id, labeler_id) over rankings and
best-of-K choices. A labeler could rank the same task any number of times with new idempotency
keys, weighting their own preference over everyone else's.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ANSWERS = sa.text("kind IN ('ranking', 'best_of_k')")


def upgrade() -> None:
    op.create_index("uq_submissions_answer", "submissions", ["task_id", "labeler_id"], unique=True,
                    postgresql_where=_ANSWERS, sqlite_where=_ANSWERS)


def downgrade() -> None:
    op.drop_index("uq_submissions_answer", table_name="submissions")
