"""Alembic migrations of the services' schema, run by :func:`rlhf.storage.db.migrate` (no alembic.ini)."""
