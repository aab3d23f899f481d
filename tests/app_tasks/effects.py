"""A task whose effect commits with its job's success (context.transaction)."""

from __future__ import annotations

import time

from sqlalchemy import insert

from dbtasks import task
from dbtasks.clock import utcnow
from tests.runs import record_run, runs


@task(name="effect", max_attempts=3)
def effect(params, context):
    """Record a start at once, sleep, then write the effect with the job's success."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 0))
    with context.transaction() as conn:
        conn.execute(
            insert(runs).values(
                job_id=context.job_id,
                task=context.task,
                node=context.node,
                attempt=context.attempt,
                event="effect",
                at=utcnow(),
            )
        )


def _write(conn, context, event: str) -> None:  # noqa: ANN001
    conn.execute(
        insert(runs).values(
            job_id=context.job_id,
            task=context.task,
            node=context.node,
            attempt=context.attempt,
            event=event,
            at=utcnow(),
        )
    )


@task(name="commits_inside", max_attempts=3)
def commits_inside(params, context):
    """Commit inside the job's transaction, then write again."""
    with context.transaction() as conn:
        _write(conn, context, "before")
        conn.commit()
        _write(conn, context, "after")


@task(name="commits_then_raises", max_attempts=3)
def commits_then_raises(params, context):
    """Commit inside the job's transaction, then fail."""
    with context.transaction() as conn:
        _write(conn, context, "before")
        conn.commit()
        raise RuntimeError("after the commit")


@task(name="transaction_twice", max_attempts=3)
def transaction_twice(params, context):
    """Open the job's transaction a second time."""
    with context.transaction() as conn:
        _write(conn, context, "first")
    with context.transaction() as conn:
        _write(conn, context, "second")
