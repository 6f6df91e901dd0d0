"""Storage of the prompt-collector and feedback-store services (synchronous SQLAlchemy 2).

- :mod:`rlhf.storage.db`: :func:`make_engine`, :func:`migrate` (Alembic, packaged migrations)
- :mod:`rlhf.storage.schema`: the tables
- :mod:`rlhf.storage.prompts`: :class:`PromptStore` (validation, PII scrubbing, de-duplication, splits)
- :mod:`rlhf.storage.feedback`: :class:`FeedbackStore` (tasks and their assignment, labelers,
  idempotent submissions, export, agreement, labeling statistics)
- :mod:`rlhf.storage.outbox`: :class:`OutboxRelay` (publishes the outbox rows written with the data)

The stores return rows (dataclasses); the services build the protobuf messages and hand each store
the function that turns a stored row into its outbox event (:class:`OutboxEvent`).
"""

from rlhf.storage.db import make_engine, migrate
from rlhf.storage.feedback import FeedbackStore, TaskIn, TaskRow
from rlhf.storage.outbox import OutboxEvent, OutboxRelay
from rlhf.storage.prompts import PromptIn, PromptOut, PromptRow, PromptStore, scrub_pii, split_for_user

__all__ = [
    "FeedbackStore", "OutboxEvent", "OutboxRelay", "PromptIn", "PromptOut", "PromptRow", "PromptStore", "TaskIn", "TaskRow",
    "make_engine", "migrate", "scrub_pii", "split_for_user",
]
