"""One function per CLI command, each taking a Config: also the Python API.

`cli.py` only parses arguments and calls these, so the command line and the
API cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from dbtasks import migrate as migrations
from dbtasks.config import Config, safe_url
from dbtasks.database import SQLITE_BUSY_TIMEOUT_MS, create_queue_engine
from dbtasks.errors import DatabaseError
from dbtasks.jobs import enqueue as enqueue_job
from dbtasks.tasks import (
    ASYNC_CANCEL_GRACE,
    Registry,
    Task,
    load_tasks,
    run_inline,
    timeout_message,
)
from dbtasks.worker import Worker

logger = logging.getLogger(__name__)


def migrate(config: Config) -> None:
    """Create dbtasks' tables, or upgrade them to this version's revision."""
    engine = create_queue_engine(config)
    try:
        migrations.upgrade(engine, config.schema)
    except DBAPIError as exc:
        raise database_error(config, exc) from exc
    finally:
        engine.dispose()


def worker(config: Config) -> bool:
    """Run a worker on the tasks folder until SIGTERM or SIGINT.

    Returns True if the worker retired because a timed-out task's thread
    would not end: the caller should then start a fresh process.
    """
    registry = load_tasks(config.tasks_path)
    worker = Worker(config, registry)
    try:
        worker.run()
    except DBAPIError as exc:
        raise database_error(config, exc) from exc
    return worker.retired


def enqueue(
    config: Config,
    task: str,
    params: Any = None,
    *,
    run_at: datetime | None = None,
    **options: Any,
) -> int:
    """Enqueue a job in a transaction of its own and return its id."""
    if config.tasks_path.is_dir():
        load_tasks(config.tasks_path)  # for the task's defaults, if it is here
    engine = create_queue_engine(config)
    try:
        migrations.require_current_schema(engine, config.schema)
        with engine.begin() as conn:
            return enqueue_job(
                conn, task, params, run_at=run_at, schema=config.schema, **options
            )
    except DBAPIError as exc:
        raise database_error(config, exc) from exc
    finally:
        engine.dispose()


def run(config: Config, task: str, params: Any = None) -> Any:
    """Run a task inline, now, in this process, and return its result.

    The task's `context.transaction()` is a transaction on the configured
    database; nothing connects to it unless the task asks.
    """
    found = load_task(config, task)
    engine = create_queue_engine(config)
    try:
        return run_task(found, params, engine=engine)
    finally:
        engine.dispose()


def load_task(config: Config, name: str) -> Task:
    """Load the tasks folder and return the task called `name`."""
    return load_tasks(config.tasks_path).get(name)


def run_task(task: Task, params: Any = None, *, engine: Engine | None = None,
             own_process: bool = False) -> Any:
    """Run a loaded task inline and return its result; `engine` is for the
    task's `context.transaction()` (see run_inline).

    With `own_process` (`dbtasks run`, whose process this is), the timeout
    holds for a plain function too, and for a coroutine that will not be
    cancelled: on the main thread a SIGALRM raises TimeoutError inside the
    function, or ends the process after a coroutine.
    """
    if not own_process:
        return run_inline(task, params, engine=engine)
    with _alarm_at_timeout(task):
        return run_inline(task, params, engine=engine)


@contextmanager
def _alarm_at_timeout(task: Task) -> Iterator[None]:
    usable = (
        task.timeout is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    message = timeout_message(task.name, task.timeout)

    def ring(signum: int, frame: Any) -> None:
        if task.is_async:
            # Only a coroutine that blocks its loop is still here: the error,
            # raised into the loop, would be raised inside it. End the
            # process, as a worker retires to end a stuck thread.
            sys.stderr.write(f"TimeoutError: {message}\n")
            sys.stderr.flush()
            os._exit(1)
        raise TimeoutError(message)

    # run_inline cancels a coroutine at its timeout and fails one that
    # swallowed the cancellation a grace later; the alarm, a grace after
    # that, ends one that blocks its loop, where run_inline cannot run.
    grace = 2 * ASYNC_CANCEL_GRACE if task.is_async else 0.0
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, task.timeout + grace)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def list_tasks(config: Config) -> Registry:
    """Load the tasks folder and return its registry."""
    return load_tasks(config.tasks_path)


def database_error(config: Config, exc: DBAPIError) -> DatabaseError:
    """Say what failed without the SQL, and never with the password."""
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    url = config.database_url
    secrets = [url.password]
    for key, values in url.normalized_query.items():
        if "password" in key.lower():
            secrets.extend(values)
    for secret in secrets:
        if secret:
            reason = reason.replace(str(secret), "***")
    hint = next((fix for clues, fix in _FIXES
                 if all(clue in reason for clue in clues)), "")
    return DatabaseError(f"database {safe_url(config.database_url)}: {reason}{hint}")


#: What to do about the commonest failures to reach the database, by
#: phrases of the driver's message (libpq's carries no SQLSTATE before a
#: session exists).
_FIXES = (
    (("Connection refused",), "; is the server running, and listening on that "
     "host and port?"),
    (("database \"", "does not exist"), "; create it (createdb), or fix the name "
     "in the URL"),
    (("password authentication failed",), "; check the user and password in the "
     "URL (percent-encode special characters)"),
    (("could not translate host name",), "; check the host name in the URL"),
    (("database is locked",), f"; another connection held SQLite's write lock "
     f"for all of the {SQLITE_BUSY_TIMEOUT_MS // 1000} s waited (a transaction "
     "left open?): try again once it ends"),
)
