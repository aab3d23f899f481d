"""Enqueue: adding a job inside the application's own transaction.

`enqueue` runs one INSERT on the caller's SQLAlchemy Session or Connection (or
their asyncio versions) and opens no transaction of its own, so the job exists
if and only if the caller commits. It works with whatever driver the caller's
engine uses, on PostgreSQL and SQLite.

Everything is checked before the INSERT: params (see params.py), the task
name, `run_at`, priority and queue. A bad value raises, and nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, overload

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session

from dbtasks import queries
from dbtasks.clock import MAX_SECONDS
from dbtasks.config import (
    DEFAULT_QUEUE,
    MAX_TASK_NAME,
    SQL_IDENTIFIER,
    name_problem,
    queue_name_problem,
)
from dbtasks.database import sqlstate
from dbtasks.errors import JobError, SchemaError, TaskNotFound
from dbtasks.params import (
    checked_params,
    encode_checked,
    encode_params,
    encode_params_array,
    in_list,
)
from dbtasks.statements import RawStatement, libpq
from dbtasks.tasks import (
    DEFAULT_MAX_ATTEMPTS,
    PRIORITY_RANGE,
    Task,
    attempts_problem,
    declared_tasks,
)

#: How far ahead a job may be scheduled: the bound every duration has.
MAX_RUN_AT_AHEAD = timedelta(seconds=MAX_SECONDS)

_UNSET: Any = object()


@overload
def enqueue(target: Session | Connection, task: Task | str, params: Any = ...,
            **options: Any) -> int: ...
@overload
def enqueue(target: Any, task: Task | str, params: Any = ...,
            **options: Any) -> Awaitable[int]: ...


def enqueue(
    target: Any,
    task: Task | str,
    params: Any = None,
    *,
    run_at: datetime | None = None,
    priority: int | None = None,
    queue: str | None = None,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
    not_yet_deployed: bool = False,
    schema: str | None = _UNSET,
) -> Any:
    """Enqueue a job in the caller's transaction and return its id.

    `target` is a Session or Connection (or a scoped_session); an
    AsyncSession or AsyncConnection (or an async_scoped_session) gives an
    awaitable instead (`job_id = await enqueue(session, ...)`).

    `run_at` must be timezone-aware; a past time means now. `priority` runs
    from -100 to 100, lower first. A second enqueue with the same
    `idempotency_key` returns the first job's id and adds nothing, so an
    enqueue whose commit outcome is unknown can be retried; a key held by a
    job of another task is refused (JobError). A task name that
    neither this process nor any registered worker knows is refused, unless
    `not_yet_deployed=True`. `schema` defaults to `DBTASKS_SCHEMA`.
    """
    job = _prepare(
        task,
        params,
        run_at=run_at,
        priority=priority,
        queue=queue,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        not_yet_deployed=not_yet_deployed,
    )
    if schema is _UNSET:
        schema = os.environ.get("DBTASKS_SCHEMA") or None
    schema = _check_schema(schema)

    target = _unscoped(target)
    if hasattr(target, "run_sync"):
        return _run_async(target, _insert, job, schema)
    return _run(target, _insert, job, schema)


def enqueue_many(
    target: Any,
    task: Task | str,
    params_list: Iterable[Any],
    *,
    run_at: datetime | None = None,
    priority: int | None = None,
    queue: str | None = None,
    max_attempts: int | None = None,
    not_yet_deployed: bool = False,
    schema: str | None = _UNSET,
) -> Any:
    """Enqueue one job per params value in the caller's transaction; return the ids.

    The bulk form of `enqueue`, for thousands of jobs at once: every params
    value is checked first, then the rows go in one INSERT that takes all
    the params texts as one value (queries.insert_jobs: no limit of bound
    values to split the batch at), and the ids come back in the order of
    `params_list`. The other options apply to every job; idempotency keys
    are for one job at a time (use `enqueue`).
    """
    template = _prepare(
        task,
        None,
        run_at=run_at,
        priority=priority,
        queue=queue,
        idempotency_key=None,
        max_attempts=max_attempts,
        not_yet_deployed=not_yet_deployed,
    )
    if isinstance(params_list, (str, bytes, bytearray, memoryview, Mapping)) or (
        not isinstance(params_list, Iterable)
    ):
        raise JobError(
            "enqueue_many takes a list of params values, one per job, got "
            f"{type(params_list).__name__}; for one job, use enqueue"
        )
    checked = [in_list(position, checked_params, value)
               for position, value in enumerate(params_list)]
    if schema is _UNSET:
        schema = os.environ.get("DBTASKS_SCHEMA") or None
    arguments = (_insert_many, template, checked, _check_schema(schema))

    target = _unscoped(target)
    if hasattr(target, "run_sync"):
        return _run_async(target, *arguments)
    return _run(target, *arguments)


def _unscoped(target: Any) -> Any:
    """The session a scoped_session (Flask-SQLAlchemy's `db.session`) or an
    async_scoped_session stands for in this thread or task; else `target`."""
    if isinstance(target, scoped_session):
        return target()
    asyncio_extension = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_extension is not None and isinstance(
        target, asyncio_extension.async_scoped_session
    ):
        return target()
    return target


def _run(target: Any, function: Any, *arguments: Any) -> Any:
    if isinstance(target, Session):
        target = target.connection()
    if not isinstance(target, Connection):
        raise TypeError(
            "enqueue() needs a SQLAlchemy Session or Connection (or their asyncio "
            f"versions), got {type(target).__name__}"
        )
    return function(target, *arguments)


async def _run_async(target: Any, function: Any, *arguments: Any) -> Any:
    from sqlalchemy.ext.asyncio import AsyncSession

    if isinstance(target, AsyncSession):
        target = await target.connection()
    return await target.run_sync(function, *arguments)


def _prepare(
    task: Task | str,
    params: Any,
    *,
    run_at: datetime | None,
    priority: int | None,
    queue: str | None,
    idempotency_key: str | None,
    max_attempts: int | None,
    not_yet_deployed: bool,
) -> dict[str, Any]:
    """Check every argument and return the INSERT's parameters."""
    known = _resolve(task)
    name = task.name if isinstance(task, Task) else task
    if not isinstance(name, str) or not name:
        raise JobError(f"the task must be a Task or a task name, got {task!r}")
    if known is None:
        problem = name_problem(name, MAX_TASK_NAME)
        if problem is not None:
            raise JobError(f"the task name {problem}")

    # What the caller leaves out comes from the task: from its definition if
    # this process loaded it (checked there, by @task), else from a worker's
    # registration (_insert_job).
    return {
        "task": name,
        "params": encode_params(params),
        "run_at": _check_run_at(run_at),
        "priority": _given_or_default(
            priority, _check_priority, getattr(known, "priority", None)
        ),
        "queue": _given_or_default(queue, _check_queue, getattr(known, "queue", None)),
        "idempotency_key": _check_key(idempotency_key),
        "max_attempts": _given_or_default(
            max_attempts, _check_attempts, getattr(known, "max_attempts", None)
        ),
        "_look_up": known is None,
        "_must_be_registered": known is None and not not_yet_deployed,
    }


def _given_or_default(value: Any, check: Callable[[Any], Any], default: Any) -> Any:
    """`value` checked, or, where the caller left it out, `default`."""
    return default if value is None else check(value)


def _resolve(task: Task | str) -> Task | None:
    if isinstance(task, Task):
        return task
    return declared_tasks.get(task) if isinstance(task, str) else None


def _check_run_at(run_at: datetime | None) -> datetime | None:
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise JobError(f"run_at must be a datetime, got {type(run_at).__name__}")
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise JobError(
            f"run_at {run_at.isoformat()} is naive; pass a timezone-aware datetime, "
            "for example datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    if run_at - datetime.now(run_at.tzinfo) > MAX_RUN_AT_AHEAD:
        # A sanity bound against unit mistakes; the database clock decides the
        # actual due time, so a local clock is good enough here.
        raise JobError(
            f"run_at {run_at.isoformat()} is more than 10 years ahead; check the "
            "units of the delay"
        )
    return run_at


def _check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise JobError(f"priority must be an integer, got {priority!r}")
    if priority not in PRIORITY_RANGE:
        raise JobError(
            f"priority {priority} is out of range: use -100 to 100 (lower runs first)"
        )
    return priority


def _check_queue(queue: Any) -> str:
    problem = queue_name_problem(queue)
    if problem is not None:
        raise JobError(f"the queue name {problem}")
    return queue


def _check_key(key: Any) -> str | None:
    if key is None:
        return None
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= 200
        or "\x00" in key
        or not _encodable(key)
    ):
        raise JobError(
            "idempotency_key must be a string of 1 to 200 characters without NUL "
            f"or lone surrogates (which no database can store), got {key!r:.80}"
        )
    return key


def _encodable(text: str) -> bool:
    """Whether `text` has no lone surrogate, so that it can be sent as UTF-8."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_attempts(value: Any) -> int:
    problem = attempts_problem(value)
    if problem is not None:
        raise JobError(problem)
    return value


def _check_schema(schema: Any) -> str | None:
    if schema is None or schema == "":
        return None
    if not isinstance(schema, str) or not SQL_IDENTIFIER.match(schema):
        raise JobError(
            f"schema must be a plain SQL identifier (letters, digits and "
            f"underscores, starting with a letter) or None, got {schema!r:.80}"
        )
    return schema


def _insert(conn: Connection, job: dict[str, Any], schema: str | None) -> int:
    with _schema_errors():
        return _insert_job(conn, job, _schema_options(conn, schema))


def _insert_many(
    conn: Connection, template: dict[str, Any], checked: list[Any], schema: str | None
) -> list[int]:
    if not checked:
        return []
    with _schema_errors():
        options = _schema_options(conn, schema)
        if template["_look_up"]:
            template = _with_registered_defaults(conn, template, options)
        dialect = conn.dialect.name
        with_run_at = template["run_at"] is not None
        values = {key: value for key, value in template.items()
                  if not key.startswith("_") and value is not None}
        # On PostgreSQL the params go as one JSON array, each job's its
        # element's text; on SQLite as an array of JSON strings
        # (queries.insert_jobs).
        values["params_json"] = (
            encode_params_array(checked) if dialect == "postgresql"
            else json.dumps([in_list(position, encode_checked, value)
                             for position, value in enumerate(checked)])
        )
        driver_connection = _plain_psycopg_connection(conn)
        if driver_connection is not None:
            # Ten thousand ids cost SQLAlchemy's result more than the
            # statement costs psycopg. On the kept cursor, not prepared: a
            # statement of one run per transaction, whose one big value
            # psycopg sends as it is.
            statement = _raw_statement(conn, options, "many", with_run_at)
            ids = [row[0] for row in _run_raw(conn, driver_connection, statement,
                                              values)]
        else:
            insert = queries.insert_jobs(dialect, with_run_at=with_run_at)
            rows = conn.execute(insert, values, execution_options=options)
            ids = rows.scalars().all()
        if len(ids) != len(checked):
            raise JobError(f"enqueued {len(ids)} jobs of {len(checked)}")
        return sorted(ids)


def _schema_options(conn: Connection, schema: str | None) -> dict[str, Any]:
    """Execution options that put dbtasks' tables in `schema`, given to each
    of enqueue's statements.

    Never set on the caller's Connection: SQLAlchemy 2 sets execution
    options in place, so the application's own tables would move to
    `schema` for the rest of its transaction.
    """
    if not schema:
        return {}
    translate = dict(conn.get_execution_options().get("schema_translate_map") or {})
    translate[None] = schema
    return {"schema_translate_map": translate}


@contextmanager
def _schema_errors() -> Iterator[None]:
    """Turn "no such table" into an error that says to run `dbtasks migrate`."""
    try:
        yield
    except DBAPIError as exc:
        if _is_missing_table(exc):
            raise SchemaError(
                "the database has no dbtasks tables: run `dbtasks migrate` with "
                "this database's URL (and --schema, if you use one)"
            ) from exc
        raise


def _insert_job(conn: Connection, job: dict[str, Any], options: dict[str, Any]
                ) -> int:
    if job["_look_up"]:
        job = _with_registered_defaults(conn, job, options)

    variant = (job["run_at"] is not None, job["idempotency_key"] is not None)
    values = {key: value for key, value in job.items()
              if not key.startswith("_") and value is not None}
    driver_connection = _plain_psycopg_connection(conn)
    if driver_connection is not None:
        statement = _raw_statement(conn, options, "one", *variant)
        rows = _run_raw(conn, driver_connection, statement, values,
                        _session_statements(conn, driver_connection))
        job_id = rows[0][0] if rows else None
    else:
        insert = queries.insert_job(
            conn.dialect.name, with_run_at=variant[0], idempotent=variant[1]
        )
        job_id = conn.execute(insert, values, execution_options=options).scalar()
    if job_id is None:
        # The idempotency key exists: return that job, if it is of this task.
        key = job["idempotency_key"]
        job_id, task = conn.execute(
            queries.job_by_idempotency_key, {"idempotency_key": key},
            execution_options=options,
        ).one()
        if task != job["task"]:
            # Keys are one namespace for every task: returning another task's
            # job would drop this one without a word.
            raise JobError(
                f"idempotency_key {key!r:.80} is already job {job_id}'s, of task "
                f"{task!r}, not {job['task']!r}: give each task keys of its own, "
                f"such as {job['task'] + ':' + key!r:.80}"
            )
    return int(job_id)


#: What enqueue keeps with a pooled psycopg connection, in the connection's
#: `info`, which SQLAlchemy empties when it replaces the connection: so it
#: lives exactly as long as the server session. The names of the statements
#: enqueue prepared in the session; a cursor of the connection.
_PREPARED_KEY = "dbtasks.prepared"
_CURSOR_KEY = "dbtasks.enqueue_cursor"


def _session_statements(
    conn: Connection, driver_connection: Any
) -> tuple[set[bytes], bool] | None:
    """The statements enqueue prepared in this session, and whether the
    transaction is yet to begin, where the INSERT may go straight through
    libpq (statements.RawStatement.execute_prepared); None where it goes
    through a psycopg cursor instead.

    That is a pooled connection in a transaction, or about to begin one with
    a plain BEGIN (then sent with the INSERT, as psycopg would send it),
    where the application allows prepared statements (psycopg's
    prepare_threshold; None behind PgBouncer in transaction mode) and no
    pipeline is open. Not where gevent or eventlet made sockets
    cooperative: libpq's calls wait for the server without letting other
    green threads run.
    """
    pooled = conn.connection
    if (
        pooled.is_detached
        or driver_connection.prepare_threshold is None
        or driver_connection.autocommit
        or driver_connection.info.encoding != "utf-8"
        or _green_sockets()
    ):
        return None
    pq = libpq()
    pgconn = driver_connection.pgconn
    if pgconn.pipeline_status != pq.PipelineStatus.OFF:
        return None
    status = pgconn.transaction_status
    begin = status == pq.TransactionStatus.IDLE
    if begin:
        # psycopg begins a transaction at its first statement. It would send
        # a plain BEGIN unless an isolation level or access mode is set;
        # then it is left to psycopg.
        if (
            driver_connection.isolation_level is not None
            or driver_connection.read_only is not None
            or driver_connection.deferrable is not None
        ):
            return None
    elif status != pq.TransactionStatus.INTRANS:
        return None
    return pooled.info.setdefault(_PREPARED_KEY, set()), begin


def _green_sockets() -> bool:
    for module, patched in (("gevent.monkey", "is_module_patched"),
                            ("eventlet.patcher", "is_monkey_patched")):
        patcher = sys.modules.get(module)
        if patcher is not None and getattr(patcher, patched)("socket"):
            return True
    return False


def _kept_cursor(conn: Connection, driver_connection: Any) -> Any | None:
    """A cursor of `driver_connection` that enqueue keeps from one job to the
    next (a new psycopg cursor costs as much as the rest of the execution);
    None for a connection outside the pool, whose cursor is not kept."""
    pooled = conn.connection
    if pooled.is_detached:
        return None
    cursor = pooled.info.get(_CURSOR_KEY)
    if cursor is None or cursor.closed or cursor.connection is not driver_connection:
        cursor = driver_connection.cursor()
        pooled.info[_CURSOR_KEY] = cursor
    return cursor


def _plain_psycopg_connection(conn: Connection) -> Any | None:
    """The psycopg connection under `conn`, where sending the INSERT to it
    directly is exactly what `conn.execute` would do; else None.

    That is the application's own psycopg 3 connection, in an active
    transaction, with no event listeners or echo that would expect to see
    the statement (tracing, query logging). Skipping SQLAlchemy's execution
    machinery there takes a fifth off a one-job transaction
    (tools/benchmark.py, W1). SQLAlchemy keeps the flags this reads private;
    where one is missing, the answer is the safe one, SQLAlchemy's path.
    """
    dialect = conn.dialect
    if dialect.driver != "psycopg" or dialect.is_async or (
        dialect.paramstyle != "pyformat"
    ):
        return None
    if (
        getattr(conn, "_has_events", True)
        or getattr(conn.engine, "_has_events", True)
        or getattr(dialect, "_has_events", True)
        or getattr(conn, "_echo", True)
    ):
        return None
    if conn.invalidated:
        return None
    # Outside a transaction SQLAlchemy begins one (autobegin), and in a
    # failed one it refuses to go on: both are left to it.
    transaction = conn.get_nested_transaction() or conn.get_transaction()
    if transaction is None or not transaction.is_active:
        return None
    return conn.connection.dbapi_connection


def _run_raw(conn: Connection, driver_connection: Any, statement: RawStatement,
             values: dict[str, Any],
             session: tuple[set[bytes], bool] | None = None) -> list[Any]:
    """Run one of enqueue's INSERTs on the driver's connection: prepared
    through libpq where `session` (_session_statements) allows, else on the
    cursor enqueue keeps. Return its rows."""
    try:
        if session is not None:
            prepared, begin = session
            return statement.execute_prepared(driver_connection, values, prepared,
                                              begin)
        return statement.execute(
            driver_connection, values, _kept_cursor(conn, driver_connection)
        )
    except DBAPIError as exc:
        if exc.connection_invalidated:
            conn.invalidate(exc.orig)  # as SQLAlchemy does on a lost connection
        raise


#: Compiled INSERTs by dialect, then by (schema map, "one" or "many", and
#: the variant's flags).
_raw_inserts: weakref.WeakKeyDictionary[Any, dict[Any, RawStatement]] = (
    weakref.WeakKeyDictionary()
)


def _raw_statement(conn: Connection, options: dict[str, Any], kind: str,
                   with_run_at: bool, idempotent: bool = False) -> RawStatement:
    """enqueue's INSERT (`kind` "one") or enqueue_many's ("many"), compiled
    for the connection's dialect and schema."""
    translate = options.get("schema_translate_map") or conn.get_execution_options(
    ).get("schema_translate_map")
    key = (tuple(sorted(translate.items(), key=str)) if translate else None,
           kind, with_run_at, idempotent)
    compiled = _raw_inserts.setdefault(conn.dialect, {})
    statement = compiled.get(key)
    if statement is None:
        insert = (
            queries.insert_job("postgresql", with_run_at=with_run_at,
                               idempotent=idempotent)
            if kind == "one"
            else queries.insert_jobs("postgresql", with_run_at=with_run_at)
        )
        statement = RawStatement(insert, conn.dialect, translate)
        compiled[key] = statement
    return statement


def _is_missing_table(exc: DBAPIError) -> bool:
    # PostgreSQL: undefined_table; SQLite has no codes, only the message.
    return sqlstate(exc) == "42P01" or "no such table" in str(exc.orig)


def _with_registered_defaults(
    conn: Connection, job: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """Fill what the caller left out from a worker's registration of the task.

    A name no worker registered is refused, unless the caller said the task is
    yet to be deployed; then dbtasks' defaults apply.
    """
    registered: dict[str, Any] | None = None
    for (tasks,) in conn.execute(queries.registered_tasks, execution_options=options):
        registered = json.loads(tasks).get(job["task"])
        if registered is not None:
            break
    if registered is None and job["_must_be_registered"]:
        raise TaskNotFound(
            f"no task named {job['task']!r} is loaded in this process or registered "
            "by any worker; check the name, import the module that defines it, or "
            "pass not_yet_deployed=True (--not-yet-deployed from the shell) if a "
            "worker with it is still to be deployed"
        )
    if not isinstance(registered, dict):
        registered = {}  # a registration without settings: dbtasks' defaults
    job = dict(job)
    for key, default in (
        ("priority", 0),
        ("queue", DEFAULT_QUEUE),
        ("max_attempts", DEFAULT_MAX_ATTEMPTS),
    ):
        if job[key] is None:
            job[key] = registered.get(key, default)
    return job


__all__ = ["enqueue", "enqueue_many", "DEFAULT_QUEUE", "DEFAULT_MAX_ATTEMPTS"]
