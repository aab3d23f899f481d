"""Enqueue joins the caller's transaction: a job exists if and only if it commits.

Every check runs before the INSERT, so a refused enqueue writes nothing and
leaves the caller's transaction usable. Params come back exactly as given.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from dbtasks import InvalidParams, JobError, TaskNotFound, enqueue, enqueue_many, task
from dbtasks.clock import utcnow
from dbtasks.params import decode_params
from dbtasks.schema import jobs, nodes
from tests.app_tasks.basic import noop
from tests.app_tasks.reads import read_app_row
from tests.conftest import sql, wait_for
from tests.runs import runs

NASTY_NAMES = [
    "'; DROP TABLE dbtasks_jobs; --",
    'a "quoted" name',
    "back\\slash \\n \\x00 \\\\",
    "percent %s %(name)s ? :name $1",
    "日本語のタスク ✓ 🚀",
]


@task(name="enqueue_defaults", queue="reports", priority=7, max_attempts=9)
def enqueue_defaults(params, context):
    """A task whose defaults an enqueue by name must pick up."""


class Boom(Exception):
    """Raised to roll an application transaction back."""


def app_url(database_url: str, sync_driver: str = "psycopg", aio: bool = False
            ) -> str:
    """The URL an application would use: its own driver, sync or asyncio."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return str(url.set(drivername="sqlite+aiosqlite" if aio else "sqlite"))
    driver = "psycopg" if aio else sync_driver
    return url.set(drivername=f"postgresql+{driver}").render_as_string(False)


@pytest.fixture
def app(database_url: str) -> Iterator[Engine]:
    """The application's own engine: plain SQLAlchemy, none of dbtasks' settings."""
    engine = create_engine(app_url(database_url))
    yield engine
    engine.dispose()


def job_rows(engine: Engine) -> list[tuple[Any, ...]]:
    query = select(
        jobs.c.id, jobs.c.task, jobs.c.params, jobs.c.queue, jobs.c.priority,
        jobs.c.max_attempts, jobs.c.state, jobs.c.attempt, jobs.c.idempotency_key,
    ).order_by(jobs.c.id)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def times(engine: Engine, job_id: int) -> tuple[datetime, datetime]:
    query = select(jobs.c.run_at, jobs.c.created_at).where(jobs.c.id == job_id)
    with engine.connect() as conn:
        return tuple(conn.execute(query).one())


def stored_params(engine: Engine) -> list[Any]:
    return [decode_params(row[2]) for row in job_rows(engine)]


# --- the caller's transaction ------------------------------------------------


@pytest.mark.parametrize("target", ["connection", "session", "scoped"])
def test_a_job_exists_only_if_the_transaction_commits(app, engine, target):
    with pytest.raises(Boom):
        with _transaction(app, target) as conn:
            enqueue(conn, noop, {"n": 1})
            raise Boom
    assert job_rows(engine) == []

    with _transaction(app, target) as conn:
        job_id = enqueue(conn, noop, {"n": 2})

    assert job_rows(engine) == [
        (job_id, "noop", '{"n":2}', "default", 0, 5, "queued", 0, None)
    ]


@contextmanager
def _transaction(app: Engine, target: str) -> Iterator[Any]:
    """A Connection, a Session or a scoped_session (Flask-SQLAlchemy's
    `db.session`) in a transaction that commits at the end."""
    if target == "connection":
        with app.begin() as conn:
            yield conn
        return
    if target == "scoped":
        scoped = scoped_session(sessionmaker(app))
        try:
            with scoped.begin():
                yield scoped
        finally:
            scoped.remove()
        return
    with Session(app) as session, session.begin():
        yield session


@pytest.mark.parametrize("target", ["connection", "session", "scoped"])
def test_asyncio_enqueue_commits_or_rolls_back(database_url, engine, target):
    async def scenario() -> int:
        app = create_async_engine(app_url(database_url, aio=True))
        try:
            with pytest.raises(Boom):
                async with _async_transaction(app, target) as conn:
                    await enqueue(conn, noop, {"n": 1})
                    raise Boom
            async with _async_transaction(app, target) as conn:
                return await enqueue(conn, noop, {"n": 2})
        finally:
            await app.dispose()

    job_id = asyncio.run(scenario())

    assert job_rows(engine) == [
        (job_id, "noop", '{"n":2}', "default", 0, 5, "queued", 0, None)
    ]


@asynccontextmanager
async def _async_transaction(app: Any, target: str) -> AsyncIterator[Any]:
    if target == "connection":
        async with app.begin() as conn:
            yield conn
        return
    if target == "scoped":
        scoped = async_scoped_session(async_sessionmaker(app),
                                      scopefunc=asyncio.current_task)
        try:
            async with scoped.begin():
                yield scoped
        finally:
            await scoped.remove()
        return
    async with AsyncSession(app) as session, session.begin():
        yield session


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000"])
def test_an_application_on_another_postgresql_driver(pg_url, driver):
    # Both drivers are test extras: a missing one fails here, it is not skipped.
    app = create_engine(app_url(pg_url, sync_driver=driver))
    queue = create_engine(app_url(pg_url))
    try:
        with pytest.raises(Boom), app.begin() as conn:
            enqueue(conn, noop, {"driver": driver})
            raise Boom
        with Session(app) as session, session.begin():
            job_id = enqueue(session, "noop", {"driver": driver}, run_at=_in(hours=1))

        rows = job_rows(queue)
        run_at, created_at = times(queue, job_id)
    finally:
        app.dispose()
        queue.dispose()

    assert rows == [
        (job_id, "noop", f'{{"driver":"{driver}"}}', "default", 0, 5, "scheduled",
         0, None)
    ]
    assert timedelta(minutes=59) < run_at - created_at < timedelta(minutes=61)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "pg8000"])
def test_a_bulk_enqueue_through_each_postgresql_driver(pg_url, driver):
    app = create_engine(app_url(pg_url, sync_driver=driver))
    queue = create_engine(app_url(pg_url))
    params = [{"n": n, "quote": "it's", "text": "é\x00", "escapes": "a\\b\"c\\u0000"}
              for n in range(3)]
    try:
        with app.begin() as conn:
            ids = enqueue_many(conn, noop, params)
        with queue.connect() as conn:
            query = text("SELECT id, params FROM dbtasks_jobs")
            stored = dict(conn.execute(query).all())
    finally:
        app.dispose()
        queue.dispose()

    assert [decode_params(stored[job_id]) for job_id in ids] == params


# --- the direct path on psycopg ------------------------------------------------
# On a plain psycopg Connection, enqueue sends its INSERT to the driver itself
# (jobs._plain_psycopg_connection); wherever SQLAlchemy would do more than
# send it, enqueue goes through SQLAlchemy. Both must store the same job.


def test_an_enqueue_outside_a_transaction_begins_one_that_commit_keeps(pg_url):
    app = create_engine(app_url(pg_url))
    queue = create_engine(app_url(pg_url))
    try:
        with app.connect() as conn:
            first = enqueue(conn, noop, {"autobegun": True})  # nothing begun yet
            second = enqueue(conn, noop, {"autobegun": False})  # the same transaction
            conn.commit()
        rows = job_rows(queue)
    finally:
        app.dispose()
        queue.dispose()

    assert [(row[0], row[2], row[6]) for row in rows] == [
        (first, '{"autobegun":true}', "queued"),
        (second, '{"autobegun":false}', "queued"),
    ]


def test_statement_listeners_and_echo_see_the_insert(pg_url, caplog):
    app = create_engine(app_url(pg_url))
    seen: list[str] = []
    event.listen(app, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: seen.append(statement))
    echoing = create_engine(app_url(pg_url), echo=True)
    try:
        with app.begin() as conn:
            traced = enqueue(conn, noop, {"traced": True})
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            with echoing.begin() as conn:
                echoed = enqueue(conn, noop, {"echoed": True})
    finally:
        app.dispose()
        echoing.dispose()

    assert len(seen) == 1
    assert "INSERT INTO dbtasks_jobs" in seen[0]
    assert "INSERT INTO dbtasks_jobs" in caplog.text
    assert (traced, echoed) == (1, 2)


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
def test_a_connection_lost_in_the_insert_is_invalidated_and_replaced(pg_url, first):
    app = create_engine(app_url(pg_url))
    try:
        with app.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            if first:
                conn.commit()  # the INSERT begins the next: BEGIN goes with it
            admin_url = pg_url.replace("+psycopg", "")
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(OperationalError) as lost:  # as SQLAlchemy raises it
                enqueue(conn, noop, {"lost": True})
            assert lost.value.connection_invalidated
            assert conn.invalidated
            conn.rollback()
            with conn.begin():
                job_id = enqueue(conn, noop, {"lost": False})
        rows = job_rows(app)
    finally:
        app.dispose()

    assert [(row[0], row[2]) for row in rows] == [(job_id, '{"lost":false}')]


def test_an_enqueue_waiting_for_a_lock_lets_the_other_threads_run(pg_url):
    # The key's row lock is held by this thread's transaction: an enqueue
    # that kept the GIL while it waited would stop this thread from ever
    # committing (until lock_timeout ends the wait, failing the test).
    app = create_engine(app_url(pg_url),
                        connect_args={"options": "-c lock_timeout=5s"})
    outcome: dict[str, Any] = {}

    def second_enqueue() -> None:
        try:
            with app.begin() as conn:  # the INSERT goes with the BEGIN
                outcome["id"] = enqueue(conn, noop, idempotency_key="held")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            outcome["error"] = exc

    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
               "AND datname = current_database()")
    try:
        with app.connect() as holder, psycopg.connect(
            pg_url.replace("+psycopg", ""), autocommit=True
        ) as observer:
            first = enqueue(holder, noop, idempotency_key="held")
            thread = threading.Thread(target=second_enqueue)
            thread.start()
            longest_pause = 0.0
            last = time.monotonic()
            while observer.execute(waiting).fetchone() == (0,) and thread.is_alive():
                time.sleep(0.01)
                now = time.monotonic()
                longest_pause, last = max(longest_pause, now - last), now
            blocked = thread.is_alive()
            holder.commit()
            thread.join(timeout=30)
    finally:
        app.dispose()

    assert blocked and longest_pause < 1.0
    assert outcome == {"id": first}


def test_a_first_enqueue_keeps_the_isolation_level_and_access_mode(pg_url):
    serializable = create_engine(app_url(pg_url), isolation_level="SERIALIZABLE")
    read_only = create_engine(app_url(pg_url)).execution_options(
        postgresql_readonly=True
    )
    try:
        with serializable.begin() as conn:
            job_id = enqueue(conn, noop, {"isolated": True})
            level = conn.exec_driver_sql("SHOW transaction_isolation").scalar()
        with read_only.connect() as conn, pytest.raises(DBAPIError) as refused:
            enqueue(conn, noop, {"read_only": True})
        rows = job_rows(serializable)
    finally:
        serializable.dispose()
        read_only.dispose()

    assert level == "serializable"
    assert "read-only transaction" in str(refused.value)
    assert [(row[0], row[2]) for row in rows] == [(job_id, '{"isolated":true}')]


def test_prepared_statements_turned_off_are_not_used(pg_url):
    app = create_engine(app_url(pg_url), connect_args={"prepare_threshold": None})
    try:
        with app.connect() as conn:
            for n in range(3):
                with conn.begin():
                    enqueue(conn, noop, {"n": n})
            prepared = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_prepared_statements"
            ).scalar()
        rows = job_rows(app)
    finally:
        app.dispose()

    assert prepared == 0
    assert [row[2] for row in rows] == ['{"n":0}', '{"n":1}', '{"n":2}']


def test_statements_deallocated_by_the_application_are_prepared_again(pg_url):
    app = create_engine(app_url(pg_url))
    try:
        with app.connect() as conn:
            with conn.begin():
                first = enqueue(conn, noop, {"n": 1})
            conn.exec_driver_sql("DEALLOCATE ALL")
            conn.commit()
            # First in its transaction: prepared again, and run, unseen.
            with conn.begin():
                second = enqueue(conn, noop, {"n": 2})
            conn.exec_driver_sql("DEALLOCATE ALL")
            conn.commit()
            # After another statement: the transaction is the caller's, so
            # the missing statement fails it; the next one prepares it again.
            with pytest.raises(DBAPIError, match="does not exist"):
                with conn.begin():
                    conn.exec_driver_sql("SELECT 1")
                    enqueue(conn, noop, {"n": 3})
            with conn.begin():
                conn.exec_driver_sql("SELECT 1")
                fourth = enqueue(conn, noop, {"n": 4})
        rows = job_rows(app)
    finally:
        app.dispose()

    assert [(row[0], row[2]) for row in rows] == [
        (first, '{"n":1}'), (second, '{"n":2}'), (fourth, '{"n":4}')
    ]


def test_an_enqueue_inside_a_psycopg_pipeline_goes_through_it(pg_url):
    app = create_engine(app_url(pg_url))
    try:
        with app.connect() as conn:
            driver = conn.connection.dbapi_connection
            with conn.begin(), driver.pipeline():
                job_id = enqueue(conn, noop, {"pipelined": True})
        rows = job_rows(app)
    finally:
        app.dispose()

    assert [(row[0], row[2]) for row in rows] == [(job_id, '{"pipelined":true}')]


def test_enqueue_refuses_a_target_that_is_not_sqlalchemy(database_url):
    with pytest.raises(TypeError, match="needs a SQLAlchemy Session or Connection"):
        enqueue(object(), noop)


# --- naming the task ---------------------------------------------------------


def test_by_task_object_and_by_name(app, engine):
    with app.begin() as conn:
        by_object = enqueue(conn, noop)
        by_name = enqueue(conn, "noop", [1, 2])

    assert job_rows(engine) == [
        (by_object, "noop", "{}", "default", 0, 5, "queued", 0, None),
        (by_name, "noop", "[1,2]", "default", 0, 5, "queued", 0, None),
    ]
    assert by_name == by_object + 1


def test_by_name_takes_the_task_defaults_unless_overridden(app, engine):
    with app.begin() as conn:
        defaults = enqueue(conn, "enqueue_defaults")
        chosen = enqueue(
            conn, "enqueue_defaults", priority=-3, queue="urgent", max_attempts=1
        )

    assert job_rows(engine) == [
        (defaults, "enqueue_defaults", "{}", "reports", 7, 9, "queued", 0, None),
        (chosen, "enqueue_defaults", "{}", "urgent", -3, 1, "queued", 0, None),
    ]


def test_an_unknown_task_name_is_refused(app, engine):
    with app.begin() as conn:
        with pytest.raises(TaskNotFound) as refused:
            enqueue(conn, "no_such_task_anywhere")
        kept = enqueue(conn, noop)

    message = str(refused.value)
    assert "'no_such_task_anywhere'" in message
    assert "not_yet_deployed=True" in message
    assert [row[:2] for row in job_rows(engine)] == [(kept, "noop")]


def test_an_unknown_task_name_is_accepted_when_not_yet_deployed(app, engine):
    with app.begin() as conn:
        job_id = enqueue(conn, "deployed_tomorrow", {"a": 1}, not_yet_deployed=True)

    assert job_rows(engine) == [
        (job_id, "deployed_tomorrow", '{"a":1}', "default", 0, 5, "queued", 0, None)
    ]


def test_a_name_registered_by_a_worker_node_is_accepted(app, engine):
    with engine.begin() as conn:
        conn.execute(insert(nodes).values(
            name="elsewhere:1:abc", hostname="elsewhere", pid=1,
            tasks='{"only_on_that_node": {"scope": "any", "queue": "reports", '
            '"priority": 7, "max_attempts": 9}}', queues='["reports"]',
            registered_at=utcnow(), heartbeat_at=utcnow(),
        ))

    with app.begin() as conn:
        job_id = enqueue(conn, "only_on_that_node")
        overridden = enqueue(conn, "only_on_that_node", priority=1, queue="other",
                             max_attempts=2)

    # What the caller leaves out comes from the worker's registration.
    assert sql(
        engine, "SELECT id, task, queue, priority, max_attempts FROM dbtasks_jobs "
        "ORDER BY id"
    ) == [
        (job_id, "only_on_that_node", "reports", 7, 9),
        (overridden, "only_on_that_node", "other", 1, 2),
    ]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_task_names_with_sql_metacharacters_round_trip(app, engine, name):
    params = {name: [name, {"nested": name}]}
    with app.begin() as conn:
        job_id = enqueue(conn, name, params, queue=name[:100], not_yet_deployed=True,
                         idempotency_key=name)
        again = enqueue(conn, name, params, idempotency_key=name,
                        not_yet_deployed=True)

    (row,) = job_rows(engine)
    assert again == job_id
    assert row[:2] == (job_id, name)
    assert decode_params(row[2]) == params
    assert row[3] == name[:100]
    assert row[8] == name
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(1,)]


@pytest.mark.parametrize("name", ["x" * 201, "nul\x00inside"])
def test_an_unstorable_task_name_is_refused_before_the_insert(app, engine, name):
    with app.begin() as conn:
        with pytest.raises(JobError, match="task name"):
            enqueue(conn, name, not_yet_deployed=True)

    assert job_rows(engine) == []


# --- idempotency ---------------------------------------------------------------


def test_an_idempotency_key_returns_the_first_job_in_one_transaction(app, engine):
    with app.begin() as conn:
        first = enqueue(conn, noop, {"try": 1}, idempotency_key="order:7")
        second = enqueue(conn, noop, {"try": 2}, idempotency_key="order:7")

    assert second == first
    assert job_rows(engine) == [
        (first, "noop", '{"try":1}', "default", 0, 5, "queued", 0, "order:7")
    ]


def test_an_idempotency_key_returns_the_first_job_across_transactions(app, engine):
    with pytest.raises(Boom), app.begin() as conn:
        enqueue(conn, noop, {"try": 0}, idempotency_key="order:8")
        raise Boom
    with app.begin() as conn:
        first = enqueue(conn, noop, {"try": 1}, idempotency_key="order:8")
    with Session(app) as session, session.begin():
        second = enqueue(session, "noop", {"try": 2}, idempotency_key="order:8")
        other = enqueue(session, noop, {"try": 3}, idempotency_key="order:9")

    assert second == first
    assert job_rows(engine) == [
        (first, "noop", '{"try":1}', "default", 0, 5, "queued", 0, "order:8"),
        (other, "noop", '{"try":3}', "default", 0, 5, "queued", 0, "order:9"),
    ]


def test_an_idempotency_key_of_another_task_is_refused_not_returned(app, engine):
    with app.begin() as conn:
        first = enqueue(conn, noop, {"try": 1}, idempotency_key="user:5")
        with pytest.raises(JobError, match=(
            f"idempotency_key 'user:5' is already job {first}'s, of task 'noop', "
            "not 'read_app_row': give each task keys of its own, such as "
            "'read_app_row:user:5'"
        )):
            enqueue(conn, read_app_row, {}, idempotency_key="user:5")
        # The caller's transaction goes on.
        second = enqueue(conn, read_app_row, {}, idempotency_key="read_app_row:user:5")

    assert [(row[0], row[1], row[8]) for row in job_rows(engine)] == [
        (first, "noop", "user:5"),
        (second, "read_app_row", "read_app_row:user:5"),
    ]


@pytest.mark.parametrize("key", ["", "nul\x00key", "k" * 201, "lone \ud800 half"])
def test_an_unstorable_idempotency_key_is_refused(app, engine, key):
    with app.begin() as conn:
        with pytest.raises(JobError, match="idempotency_key must be a string of 1 "
                           "to 200 characters without NUL or lone surrogates"):
            enqueue(conn, noop, idempotency_key=key)

    assert job_rows(engine) == []


# --- run_at, priority, queue -----------------------------------------------


def _in(**delta: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(**delta)


def test_a_naive_run_at_is_refused(app, engine):
    naive = datetime(2030, 1, 1, 9, 0)
    with app.begin() as conn:
        with pytest.raises(JobError) as refused:
            enqueue(conn, noop, run_at=naive)

    assert "2030-01-01T09:00:00 is naive" in str(refused.value)
    assert "timezone-aware" in str(refused.value)
    assert job_rows(engine) == []


def test_a_past_run_at_means_now(app, engine):
    with app.begin() as conn:
        job_id = enqueue(conn, noop, run_at=_in(days=-3))

    run_at, created_at = times(engine, job_id)
    assert run_at == created_at
    assert abs(created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_a_future_run_at_is_stored_exactly_and_aware(app, engine):
    kolkata = ZoneInfo("Asia/Kolkata")
    wanted = datetime(2031, 7, 4, 18, 30, 15, 123456, tzinfo=kolkata)
    with app.begin() as conn:
        job_id = enqueue(conn, noop, run_at=wanted)

    run_at, _ = times(engine, job_id)
    assert run_at.utcoffset() is not None
    assert run_at == wanted
    assert run_at.astimezone(timezone.utc) == datetime(
        2031, 7, 4, 13, 0, 15, 123456, tzinfo=timezone.utc
    )


def test_a_run_at_more_than_ten_years_ahead_is_refused(app, engine):
    with app.begin() as conn:
        with pytest.raises(JobError, match="more than 10 years ahead"):
            enqueue(conn, noop, run_at=_in(days=366 * 10 + 2))

    assert job_rows(engine) == []


def test_priority_bounds_are_stored_and_beyond_them_refused(app, engine):
    with app.begin() as conn:
        low = enqueue(conn, noop, priority=-100)
        high = enqueue(conn, noop, priority=100)
        for wrong in (101, -101):
            with pytest.raises(JobError, match=f"priority {wrong} is out of range"):
                enqueue(conn, noop, priority=wrong)
        with pytest.raises(JobError, match="priority must be an integer"):
            enqueue(conn, noop, priority=1.5)

    assert [(row[0], row[4]) for row in job_rows(engine)] == [(low, -100), (high, 100)]


def test_the_queue_name_is_stored_and_an_unservable_one_refused(app, engine):
    with app.begin() as conn:
        job_id = enqueue(conn, noop, queue="emails")
        for wrong in ("", "q" * 101):
            with pytest.raises(
                JobError, match="queue name must be a name of 1 to 100 characters"
            ):
                enqueue(conn, noop, queue=wrong)
        with pytest.raises(JobError, match="has a comma, which separates names"):
            enqueue(conn, noop, queue="emails,reports")

    assert [(row[0], row[3]) for row in job_rows(engine)] == [(job_id, "emails")]


def test_max_attempts_beyond_the_column_and_a_schema_not_a_name_are_refused(
    app, engine
):
    with app.begin() as conn:
        with pytest.raises(
            JobError, match="max_attempts must be an integer from 1 to 2,147,483,647"
        ):
            enqueue(conn, noop, max_attempts=2**40)
        for wrong in (5, "bad-name", "x; DROP TABLE t"):
            with pytest.raises(JobError, match="schema must be a plain SQL identifier"):
                enqueue(conn, noop, schema=wrong)
        with pytest.raises(JobError, match="schema must be a plain SQL identifier"):
            enqueue_many(conn, noop, [{}], schema=5)
        # The transaction is still usable: nothing reached the database.
        job_id = enqueue(conn, noop, max_attempts=2**31 - 1)

    assert [(row[0], row[5]) for row in job_rows(engine)] == [(job_id, 2**31 - 1)]


# --- params ----------------------------------------------------------------

EXACT_PARAMS = {
    "nested": {"a": {"b": {"c": [1, [2, [3, {"d": None}]]]}}},
    "lists": [[], [[]], [1, "two", 3.0, True, False, None]],
    "big ints": [2**63, -(2**63) - 1, 2**64 + 1, 10**40, -(10**40), 0],
    "floats": [0.1, 1e308, -1e-308, 5e-324, 1.7976931348623157e308, -0.0, 3.0],
    "unicode": ["日本語", "emoji 🚀👍🏽", "e\u0301", "\u202eRTL", "\ud800 lone"],
    "control": ["NUL \x00 inside", "\t\n\r\x1b\x7f", "\\", '"', "'"],
    "empty": [{}, [], ""],
    "": "an empty key",
    "sql": "'; DROP TABLE dbtasks_jobs; --",
}


@pytest.mark.parametrize(
    "params",
    [EXACT_PARAMS, {}, [], "", 0, [EXACT_PARAMS["big ints"]], "\x00"],
    ids=["everything", "empty-dict", "empty-list", "empty-str", "zero", "list",
         "nul"],
)
def test_params_round_trip_exactly(app, engine, params):
    with app.begin() as conn:
        enqueue(conn, noop, params)

    (stored,) = stored_params(engine)
    # repr tells 1 from 1.0 and True, and 0.0 from -0.0, where == does not.
    assert repr(stored) == repr(params)


REFUSED_PARAMS = [
    ({"x": float("nan")}, "params['x'] is nan, which JSON cannot hold"),
    ({"x": [float("inf")]}, "params['x'][0] is inf, which JSON cannot hold"),
    ({"x": -float("inf")}, "params['x'] is -inf"),
    ({"when": datetime(2030, 1, 1, tzinfo=timezone.utc)}, "isoformat()"),
    ({"amount": Decimal("1.10")}, "pass str(value)"),
    ({"blob": b"\x00\x01"}, "pass base64 text"),
    ({"tags": {"a", "b"}}, "pass a sorted list"),
    ({"pair": (1, 2)}, "it would come back as a list"),
    ({1: "one"}, "has the key 1 of type int"),
    ({"x": "a" * (1024 * 1024)}, "over the limit of 1,048,576"),
    (object(), "params may hold only dicts with str keys"),
    ({"x": 10**5000}, "params['x'] is an integer of 16,610 bits"),
]


@pytest.mark.parametrize(
    "params, message",
    REFUSED_PARAMS,
    ids=["nan", "inf", "-inf", "datetime", "decimal", "bytes", "set", "tuple",
         "int-key", "oversized", "object", "huge-int"],
)
def test_unfit_params_are_refused_before_anything_is_written(
    app, engine, params, message
):
    with app.begin() as conn:
        with pytest.raises(InvalidParams) as refused:
            enqueue(conn, noop, params)
        # The transaction was not touched, so the application can go on with it.
        kept = enqueue(conn, noop, {"ok": True})

    assert message in str(refused.value)
    assert [row[:3] for row in job_rows(engine)] == [(kept, "noop", '{"ok":true}')]


def test_params_just_under_the_limit_are_accepted(app, engine):
    # {"x":"..."} adds 8 characters around the string.
    params = {"x": "a" * (1024 * 1024 - 8)}
    with app.begin() as conn:
        enqueue(conn, noop, params)

    assert stored_params(engine) == [params]


# --- what a worker sees ----------------------------------------------------


def test_a_worker_sees_the_row_committed_with_the_job(
    database_url, app, engine, start_worker
):
    with Session(app) as session, session.begin():
        row_id = session.execute(
            insert(runs).returning(runs.c.id).values(
                task="app", node="app", attempt=0, event="app_row",
                note="order 42", at=utcnow(),
            )
        ).scalar_one()
        job_id = enqueue(session, read_app_row, {"row_id": row_id})
    start_worker(database_url)

    wait_for(
        lambda: sql(engine, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                    id=job_id) == [("succeeded",)],
        message="the job to succeed",
    )
    assert sql(engine, "SELECT job_id, event, note FROM test_runs ORDER BY id") == [
        (None, "app_row", "order 42"),
        (job_id, "read", "saw order 42"),
    ]
