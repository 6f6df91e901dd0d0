"""Engines and migrations: the migrated schema is the SQLAlchemy metadata, on every backend."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, Table, insert, inspect, text
from sqlalchemy.exc import IntegrityError

from rlhf.errors import ConfigError, DataError, UnavailableError
from rlhf.storage.db import (MIGRATIONS_DIR, decode_page_token, encode_page_token, make_engine, migrate, ping,
                             transaction)
from rlhf.storage.feedback import FeedbackStore
from rlhf.storage.prompts import PromptIn, PromptStore
from rlhf.storage.schema import Base, outbox, submissions
from services.feedback_store.messages import announce as announce_feedback
from services.prompt_collector.service import announce


def _diffs(engine, metadata=Base.metadata):
    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(mc, metadata)


def _head() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_migrated_schema_matches_metadata(db_url):
    engine = make_engine(db_url)
    try:
        migrate(engine)
        assert _diffs(engine) == []
        migrate(engine)  # idempotent
        assert _diffs(engine) == []
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == _head() == "0004"
        names = set(inspect(engine).get_table_names())
        assert {"prompts", "labeling_tasks", "submissions", "outbox", "labelers", "task_assignments",
                "trainer_jobs", "trainer_job_events", "trainer_served_versions", "alembic_version"} <= names
    finally:
        engine.dispose()


def test_compare_detects_drift(engine):
    """The check above can fail: a metadata with one more table and without ours gives diffs."""
    other = MetaData()
    Table("not_migrated", other, Column("id", Integer, primary_key=True))
    kinds = {d[0] for d in _diffs(engine, other)}
    assert "add_table" in kinds and "remove_table" in kinds


def test_two_engines_migrate_concurrently(db_url):
    engines = [make_engine(db_url) for _ in range(2)]
    errors = []

    def run(e):
        try:
            migrate(e)
        except Exception as exc:  # noqa: BLE001 - asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert _diffs(engines[0]) == []
    finally:
        for e in engines:
            e.dispose()


def test_sqlite_file_settings(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_foreign_keys_enforced(engine):
    row = dict(id="s" * 32, idempotency_key="k", request_sha256="0" * 64, kind="ranking", task_id="missing",
               labeler_id="a", ranking=[[0], [1]], created_at=datetime.now(timezone.utc))
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(insert(submissions), row)


def test_in_memory_database_is_shared_by_threads():
    engine = make_engine("sqlite://")
    migrate(engine)
    store = PromptStore(engine, announce)
    errors = []

    def work(n):
        try:
            for i in range(10):
                store.submit([PromptIn(f"thread {n} prompt {i}".encode(), f"u{n}", "api", True)])
        except Exception as e:  # noqa: BLE001 - asserted on below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list(0, page_size=1000)[0]) == 40
    engine.dispose()


def test_transactions_roll_back_on_error(engine, count):
    with pytest.raises(RuntimeError):
        with transaction(engine, write=True) as conn:
            conn.execute(insert(outbox), dict(topic="t", message_type="m", payload=b"x", key=None,
                                              created_at=datetime.now(timezone.utc)))
            raise RuntimeError("boom")
    assert count("outbox") == 0


@pytest.mark.parametrize("url,match", [
    ("mysql://u@h/db", "unsupported database"),
    ("postgresql+psycopg2://u@h/db", "psycopg 3"),
    ("not a url", "not a valid SQLAlchemy URL"),
])
def test_make_engine_rejects(url, match):
    with pytest.raises(ConfigError, match=match):
        make_engine(url)


def test_postgresql_url_defaults_to_psycopg():
    engine = make_engine("postgresql://u@localhost:1/db")  # nothing connects until used
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_errors_never_carry_the_bound_parameters(engine):
    """A failing statement's message names the statement, never the values (prompts end up in logs)."""
    secret = "a prompt that must not reach any log 7d1e"
    row = dict(id="s" * 32, idempotency_key=secret, request_sha256="0" * 64, kind="ranking", task_id="missing",
               labeler_id="a", ranking=[[0], [1]], created_at=datetime.now(timezone.utc))
    with pytest.raises(IntegrityError) as e:
        with transaction(engine, write=True) as conn:
            conn.execute(insert(submissions), row)
    assert "INSERT INTO submissions" in str(e.value)
    assert secret not in str(e.value) and "hidden due to hide_parameters" in str(e.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_postgresql_is_unavailable_not_a_driver_error(caplog):
    engine = make_engine(f"postgresql+psycopg://u@127.0.0.1:{_closed_port()}/db")
    with pytest.raises(UnavailableError, match="the database is unavailable; retry later"):
        ping(engine)
    # what the stores do through transaction(): the same error, so a service answers UNAVAILABLE
    with pytest.raises(UnavailableError):
        FeedbackStore(engine, announce_feedback).submit_ranking("k1", "t1", "labeler", [[0], [1]])
    engine.dispose()


def test_postgresql_sessions_get_the_statement_timeout_and_keep_the_urls_options(db_url):
    engine = make_engine(db_url, statement_timeout_s=0.25)
    try:
        with transaction(engine) as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "250ms"
            assert "rlhf_test_" in conn.execute(text("SHOW search_path")).scalar()  # the URL's own options
        with pytest.raises(UnavailableError):
            with transaction(engine) as conn:
                conn.execute(text("SELECT pg_sleep(3)"))
        ping(engine)  # the pool recovers: the next call works
    finally:
        engine.dispose()


test_postgresql_sessions_get_the_statement_timeout_and_keep_the_urls_options.backends = ("postgresql",)


def test_a_negative_statement_timeout_is_refused():
    with pytest.raises(ConfigError, match="statement_timeout_seconds"):
        make_engine("sqlite://", statement_timeout_s=-1)


def test_page_tokens():
    at = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    token = encode_page_token(at, "ab" * 16)
    assert decode_page_token(token) == (at, "ab" * 16)
    assert decode_page_token("") is None
    for bad in ["!!", "x" * 300, encode_page_token(at, "ab")[:-3], "YWJj"]:
        with pytest.raises(DataError, match="page_token: malformed"):
            decode_page_token(bad)


def test_split_numbers_are_the_protos():
    from rlhf_client import common_pb2

    from rlhf.storage import schema

    assert (schema.SPLIT_UNSPECIFIED, schema.SPLIT_TRAIN, schema.SPLIT_VALID, schema.SPLIT_TEST) == \
        (common_pb2.SPLIT_UNSPECIFIED, common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_VALID, common_pb2.SPLIT_TEST)
