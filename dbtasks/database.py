"""Engines for the queue's own connections: psycopg 3 on PostgreSQL, SQLite pragmas.

A worker opens its own engine; enqueue never does (it joins the caller's
transaction). On SQLite every transaction of ours starts with `BEGIN IMMEDIATE`,
which takes the write lock at once: a deferred `BEGIN` would read first and
fail with "database is locked" when it later tries to write.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from dbtasks.config import Config
from dbtasks.errors import ConfigError

#: Oldest SQLite with RETURNING and the upsert forms the queue relies on.
MIN_SQLITE = (3, 35, 0)

#: How long a SQLite connection waits for another writer before it gives up.
SQLITE_BUSY_TIMEOUT_MS = 5000

#: PostgreSQL errors that end a transaction but may not recur if it is run
#: again: serialization failure and deadlock.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


def set_up_hot_session(dbapi_connection: Any) -> None:
    """Set up a session of a worker's own that runs the hot statements (the
    claim, the finish) in autocommit, for the worker's life.

    Sequential scans are off, for this session only. Every statement it
    runs reads rows by index or by address, the plan PostgreSQL makes once
    it has statistics of the table; before that, while the jobs table is new
    or has grown since autovacuum last analyzed it, the generic plan of the
    prepared claim read the whole table to find the rows it had just locked,
    and kept doing so, however large the table grew, until the next ANALYZE.
    (A scan with no other way, of the small nodes table, then gets a huge
    cost estimate: which is why worker sessions have JIT off.)
    """
    dbapi_connection.autocommit = True
    dbapi_connection.execute("SET enable_seqscan = off")


def raw_connection(engine: Engine) -> Any:
    """Check a connection out of the engine's pool, for a caller that then
    holds it outside SQLAlchemy (the worker's hot path).

    A failure to connect is raised as SQLAlchemy's DBAPIError, as through
    `engine.connect()`: `Engine.raw_connection` lets the driver's own error
    through, which the worker's retry of database outages would not catch.
    """
    driver_error = engine.dialect.loaded_dbapi.Error
    try:
        return engine.raw_connection()
    except driver_error as exc:
        raise DBAPIError.instance(
            None, None, exc, driver_error, hide_parameters=True,
            connection_invalidated=engine.dialect.is_disconnect(exc, None, None),
        ) from exc


def is_transient(error: BaseException) -> bool:
    """Whether running the failed transaction again may well succeed."""
    if not isinstance(error, DBAPIError):
        return False
    return sqlstate(error) in TRANSIENT_SQLSTATES


def sqlstate(error: DBAPIError) -> str | None:
    """PostgreSQL's five-character code for a failed statement, whichever
    driver reported it; None when it has none (SQLite, a lost connection).

    Each driver keeps it elsewhere: psycopg 3 and asyncpg (through
    SQLAlchemy's adapter) as `sqlstate`, psycopg2 as `pgcode`, pg8000 as the
    "C" field of the server's message, its first argument.
    """
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code is None and orig is not None and orig.args:
        fields = orig.args[0]
        if isinstance(fields, dict):
            code = fields.get("C")
    return code if isinstance(code, str) else None


def create_queue_engine(config: Config, pool_size: int = 5) -> Engine:
    """Create the engine a worker or a command uses for its own statements."""
    url = config.database_url
    if config.dialect == "sqlite":
        engine = _create_sqlite_engine(url, pool_size)
    else:
        engine = _create_postgresql_engine(url, pool_size)
    if config.schema:
        engine = engine.execution_options(schema_translate_map={None: config.schema})
    return engine


def check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise ConfigError(
            f"SQLite {sqlite3.sqlite_version} is too old: dbtasks needs 3.35 or newer "
            "(for RETURNING); use a Python built against a newer SQLite"
        )


def _create_sqlite_engine(url: URL, pool_size: int) -> Engine:
    check_sqlite_version()
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ConfigError(
            "dbtasks needs a SQLite file that workers and the application share, "
            f"not {repr(database) if database else 'an in-memory database'}: use "
            "sqlite:///path/to/file"
        )
    folder = Path(database).expanduser().resolve().parent
    if not folder.is_dir():
        raise ConfigError(
            f"the folder of the SQLite database {database!r} does not exist "
            f"({folder}); create it or point --database-url elsewhere"
        )

    # Pooled: opening a connection and setting its pragmas costs more than
    # a worker's whole claim. A pooled connection holds no lock or WAL
    # snapshot between transactions (autocommit mode, BEGIN IMMEDIATE below).
    engine = create_engine(url, poolclass=QueuePool, pool_size=pool_size)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (see _begin_immediate).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    # WAL lets the application read while a worker writes. synchronous stays
    # FULL, its default: a commit survives a power cut.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _create_postgresql_engine(url: URL, pool_size: int) -> Engine:
    connect_args = {
        "application_name": "dbtasks",
        "connect_timeout": 10,
        # Keepalives let the server notice a vanished host within about a
        # minute, instead of the kernel's default two hours.
        "keepalives": 1,
        "keepalives_idle": 20,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        # Statements sent through libpq send their text as UTF-8
        # (statements.RawStatement.execute_prepared).
        "client_encoding": "utf8",
        # Plans made once per session (see the README's decisions), and no
        # JIT: it compiles for hundreds of milliseconds wherever a plan's
        # cost estimate is high, which a short statement on a table with
        # stale statistics can have, and set_up_hot_session makes certain.
        "options": "-c plan_cache_mode=force_generic_plan -c jit=off",
    }
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it would add a round trip to every transaction of the
        # worker's loop. A connection the server dropped fails its statement
        # instead, which invalidates the whole pool, and the worker's loop
        # runs the step again (worker.Worker._guarded).
        pool_pre_ping=False,
        pool_recycle=3600,
        connect_args=connect_args,
    )
