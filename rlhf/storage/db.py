"""Engines, transactions and migrations for the services' database.

One database holds the tables of every service (each service owns its own tables). SQLite is the
embedded default (``sqlite:///rlhf.db``, or ``sqlite://`` in memory); PostgreSQL
(``postgresql+psycopg://user@host/db``) in production. Everything here is synchronous: services
call it from a worker thread (``asyncio.to_thread``).

Every engine hides bound parameters from its error messages (``hide_parameters``): they carry
prompts and responses, and error messages end up in logs. On PostgreSQL a statement that runs
longer than the statement timeout is cancelled, and a database that cannot be reached (refused or
lost connections, a server shutting down or recovering, a cancelled statement) surfaces as
:class:`~rlhf.errors.UnavailableError` from :func:`transaction` -- UNAVAILABLE to a service's
callers, which the platform's channels retry -- not as a driver error. :func:`ping` is the
services' readiness check.

SQLite notes: the sqlite3 driver's own transaction handling is switched off and SQLAlchemy emits
``BEGIN`` itself, so reads and writes of one transaction see one snapshot; writing transactions
start with ``BEGIN IMMEDIATE`` (see :func:`transaction`) so that concurrent writers queue on the
busy timeout instead of failing with "database is locked" when they upgrade a read lock.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import StaticPool

from rlhf.errors import ConfigError, DataError, UnavailableError

log = logging.getLogger("rlhf.storage")

BUSY_TIMEOUT_S = 30.0
STATEMENT_TIMEOUT_S = 30.0  # PostgreSQL cancels a statement running longer (the caller gets UNAVAILABLE)
CONNECT_TIMEOUT_S = 10  # seconds to establish a PostgreSQL connection
MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# pg_advisory_xact_lock key held while migrating, so two services starting at once migrate one
# after the other (the second finds the schema at head).
_MIGRATION_LOCK_KEY = 0x726C6866_0001

# In-memory SQLite engines share one connection between threads (StaticPool); their
# transactions are serialised by a lock per engine.
_ENGINE_LOCKS: "weakref.WeakKeyDictionary[Engine, threading.RLock]" = weakref.WeakKeyDictionary()


def make_engine(url: str, *, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> Engine:
    """An engine for ``url``: ``sqlite:///path``, ``sqlite://`` (in memory) or ``postgresql+psycopg://...``.

    SQLite files get WAL, foreign keys and a busy timeout; an in-memory database is shared by all
    threads of the process. PostgreSQL gets ``pool_pre_ping``, a connect timeout and a
    ``statement_timeout`` of ``statement_timeout_s`` (0: none). ``postgresql://`` means psycopg 3.
    """
    if not statement_timeout_s >= 0:
        raise ConfigError(f"statement_timeout_seconds: must be >= 0, got {statement_timeout_s}")
    try:
        u = make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises ArgumentError and friends
        raise ConfigError(f"database_url: not a valid SQLAlchemy URL ({type(e).__name__})") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(u)
    if backend == "postgresql":
        if u.drivername in ("postgresql", "postgres"):
            u = u.set(drivername="postgresql+psycopg")
        if u.get_driver_name() != "psycopg":
            raise ConfigError(f"database_url: PostgreSQL is supported through psycopg 3 "
                              f"(postgresql+psycopg://...), not {u.drivername!r}")
        return create_engine(u, pool_pre_ping=True, hide_parameters=True,
                             connect_args=_pg_connect_args(u, statement_timeout_s))
    raise ConfigError(f"database_url: unsupported database {backend!r} (use sqlite or postgresql+psycopg)")


def _pg_connect_args(u, statement_timeout_s: float) -> dict:
    """libpq's connect timeout (unless the URL sets one) and the statement timeout, added to the
    URL's own ``options`` (connect_args replace the URL's query values of the same name)."""
    args: dict = {}
    if "connect_timeout" not in u.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    options = u.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    args["options"] = f"{options} -c statement_timeout={int(statement_timeout_s * 1000)}".strip()
    return args


def _sqlite_engine(u) -> Engine:
    database = u.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in str(u)
    connect_args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
    if in_memory:
        engine = create_engine(u, poolclass=StaticPool, connect_args=connect_args, hide_parameters=True)
        _ENGINE_LOCKS[engine] = threading.RLock()
    else:
        engine = create_engine(u, connect_args=connect_args, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no branch - trivial
        # Take transaction control away from the sqlite3 driver; SQLAlchemy emits BEGIN below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                _set_wal(cur)
                cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("rlhf_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _set_wal(cur) -> None:
    """Switch a SQLite file to WAL once. Changing the journal mode needs the database to itself and
    does not wait on the busy timeout: while another connection writes (e.g. migrates) it fails at
    once with "database is locked". A file in WAL already is left alone (reading the mode takes no
    lock); otherwise the switch is retried until the busy timeout."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def transaction(engine: Engine, *, write: bool = False) -> Iterator[Connection]:
    """A connection inside one transaction, committed on success and rolled back on error.

    ``write=True`` marks a transaction that will write: on SQLite it starts with
    ``BEGIN IMMEDIATE`` (takes the write lock up front, waiting up to the busy timeout).
    """
    lock = _ENGINE_LOCKS.get(engine)
    with lock if lock is not None else nullcontext():
        try:
            with engine.connect() as conn:
                if write:
                    conn.execution_options(rlhf_write=True)
                with conn.begin():
                    yield conn
        except DBAPIError as e:
            if not is_unavailable(engine, e):
                raise
            raise UnavailableError("the database is unavailable; retry later") from _logged_unavailable(e)
        except PoolTimeout as e:  # every pooled connection busy for pool_timeout seconds
            raise UnavailableError("the database is busy (no free connection); retry later") from e


def ping(engine: Engine) -> None:
    """Raises UnavailableError unless the database answers a trivial query (the readiness check)."""
    with transaction(engine) as conn:
        conn.execute(text("SELECT 1"))


# SQLSTATE classes of a server that cannot serve now: connection exception, insufficient resources
# (too many connections), operator intervention (shutdown, starting up, statement timeout), system
# error (I/O)
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
_last_unavailable_log = 0.0


def is_unavailable(engine: Engine, exc: BaseException) -> bool:
    """Whether a database error means "cannot be reached or cannot serve now" rather than a bad
    statement: on PostgreSQL a lost or refused connection, or a SQLSTATE of the classes above.
    Deadlocks and serialization failures are not: the stores retry those (:func:`is_transient`)."""
    if not is_postgresql(engine) or not isinstance(exc, DBAPIError) or is_transient(exc):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or sqlstate[:2] in _UNAVAILABLE_CLASSES


def _logged_unavailable(exc: DBAPIError) -> DBAPIError:
    """Log why the database is unavailable (the driver's first line; no parameters), at most every
    5 s per process so that an outage does not flood the log; returns ``exc``."""
    global _last_unavailable_log
    now = time.monotonic()
    if now - _last_unavailable_log >= 5.0:
        _last_unavailable_log = now
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        log.warning("database unavailable: %s: %s", type(exc.orig).__name__, reason)
    return exc


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying the whole transaction for: a deadlock or serialization
    failure (PostgreSQL), or a lock wait that ran out (SQLite's "database is locked")."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):
        return True
    return "database is locked" in str(orig or "")


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (idempotent; safe on SQLite and PostgreSQL)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with transaction(engine, write=True) as conn:
        if is_postgresql(engine):
            conn.execute(text("SET LOCAL statement_timeout = 0"))  # a migration may take long
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


# -- helpers shared by the stores ----------------------------------------------------------------

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None, field: str) -> datetime | None:
    """``value`` as an aware UTC datetime (naive values are taken as UTC); None stays None."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise DataError(f"{field}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def check_page_size(page_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise DataError(f"page_size: expected an integer, got {type(page_size).__name__}")
    if page_size == 0:
        return 100
    if not 1 <= page_size <= 1000:
        raise DataError(f"page_size: must be 1..1000 (0 means 100), got {page_size}")
    return page_size


def encode_page_token(created_at: datetime, row_id: str) -> str:
    """An opaque token for keyset pagination on (created_at, id): the position after this row."""
    raw = f"{as_utc(created_at, 'created_at').isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str] | None:
    """The position a page token stands for; None for the empty token (first page)."""
    if not token:
        return None
    if not isinstance(token, str) or len(token) > 200:
        raise DataError("page_token: malformed")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        stamp, row_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(stamp)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise DataError("page_token: malformed") from None
    if created_at.tzinfo is None or not row_id or len(row_id) > 64 or not row_id.isalnum():
        raise DataError("page_token: malformed")
    return created_at.astimezone(timezone.utc), row_id
