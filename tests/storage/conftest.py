"""Engines for the storage tests: SQLite (a fresh file per test) always, PostgreSQL (a fresh schema
per test) when RLHF_TEST_DATABASE_URL is set (``scripts/infra.sh start`` writes it)."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from rlhf.storage.db import make_engine, migrate

PG_ENV = "RLHF_TEST_DATABASE_URL"

# The PostgreSQL variant of every test exists only when the URL is set (no wall of skips).
BACKENDS = [pytest.param("sqlite", id="sqlite")]
if os.environ.get(PG_ENV):
    BACKENDS.append(pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration))


def _pg_schema_url(base: str, schema: str) -> str:
    u = make_url(base)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    options = u.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    return u.update_query_dict({"options": f"{options} -csearch_path={schema}".strip()}) \
        .render_as_string(hide_password=False)


@pytest.fixture
def db_url(request, tmp_path):
    """A URL of an empty database: a new SQLite file, or a new PostgreSQL schema (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rlhf.db'}"
        return
    base = os.environ[PG_ENV]
    schema = f"rlhf_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg_schema_url(base, "public"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield _pg_schema_url(base, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def pytest_generate_tests(metafunc):
    """Every test using ``db_url`` (or ``engine``) runs once per backend; a test function with a
    ``backends`` attribute (e.g. ``("postgresql",)``) only on those."""
    if "db_url" not in metafunc.fixturenames:
        return
    wanted = getattr(metafunc.function, "backends", None)
    params = [p for p in BACKENDS if wanted is None or p.values[0] in wanted]
    if not params:
        params = [pytest.param(wanted[0], id=wanted[0], marks=pytest.mark.skip(reason=f"needs {PG_ENV}"))]
    metafunc.parametrize("db_url", params, indirect=True)


@pytest.fixture
def engine(db_url):
    """A migrated engine on a fresh database."""
    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def count(engine):
    """count("prompts") -> rows in that table (also "labeling_tasks", "submissions", "outbox")."""
    from sqlalchemy import func, select

    from rlhf.storage import schema

    def _count(table: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(getattr(schema, table))).scalar_one())

    return _count
