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
