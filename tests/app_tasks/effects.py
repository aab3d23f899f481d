"""Tasks that write through context.transaction(): as meant, and as not."""

from __future__ import annotations

import threading
import time

from dbtasks import task
from tests.runs import record_run, write_run


@task(name="effect", max_attempts=3)
def effect(params, context):
    """Record a start at once, sleep, then write the effect with the job's success."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 0))
    with context.transaction() as conn:
        write_run(conn, context, "effect")


@task(name="commits_inside", max_attempts=3)
def commits_inside(params, context):
    """Commit inside the job's transaction, then write again."""
    with context.transaction() as conn:
        write_run(conn, context, "before")
        conn.commit()
        write_run(conn, context, "after")


@task(name="commits_then_raises", max_attempts=3)
def commits_then_raises(params, context):
    """Commit inside the job's transaction, then fail."""
    with context.transaction() as conn:
        write_run(conn, context, "before")
        conn.commit()
        raise RuntimeError("after the commit")


@task(name="transaction_twice", max_attempts=3)
def transaction_twice(params, context):
    """Open the job's transaction a second time."""
    with context.transaction() as conn:
        write_run(conn, context, "first")
    with context.transaction() as conn:
        write_run(conn, context, "second")


@task(name="transaction_after_return")
def transaction_after_return(params, context):
    """Leave a thread behind that asks for the job's transaction too late."""
    def later() -> None:
        time.sleep(0.5)
        try:
            with context.transaction():
                pass
        except Exception as error:  # noqa: BLE001 - what it says is the point
            record_run(context, "refused", f"{type(error).__name__}: {error}"[:200])

    threading.Thread(target=later).start()
