"""Tasks of the fault-injection run (tools/fault_injection.py).

Each task logs its execution at once, in a transaction of its own, then
writes its effect row through `context.transaction()`: the effect commits
with the job's success or not at all. Counting both tells executions apart
from effects.
"""

from __future__ import annotations

import functools
import os
import random
import time
import uuid

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from dbtasks import task


@functools.cache
def _log_engine() -> Engine:
    url = os.environ["DBTASKS_DATABASE_URL"].replace(
        "postgresql://", "postgresql+psycopg://", 1
    )
    return create_engine(url, poolclass=NullPool)


def _log_execution(context, kind: str) -> None:  # noqa: ANN001
    # A lost database here must not fail the run being measured: the effect
    # row decides what counts, this log only explains extra executions. The
    # execution's own key keeps a retried insert whose commit went through
    # from counting twice.
    key = uuid.uuid4().hex
    for _ in range(50):
        try:
            with _log_engine().begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO fi_executions (key, job_id, node, attempt, kind) "
                        "VALUES (:key, :job, :node, :attempt, :kind) "
                        "ON CONFLICT (key) DO NOTHING"
                    ),
                    {"key": key, "job": context.job_id, "node": context.node,
                     "attempt": context.attempt, "kind": kind},
                )
            return
        except Exception:  # noqa: BLE001 - the server may be restarting
            time.sleep(0.2)


def _write_effect(context, kind: str) -> None:  # noqa: ANN001
    with context.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO fi_effects (job_id, node, kind) "
                "VALUES (:job, :node, :kind)"
            ),
            {"job": context.job_id, "node": context.node, "kind": kind},
        )


@task(name="fi_any", max_attempts=25)
def fi_any(params, context):
    """An `any` job: a short piece of work, then its effect."""
    _log_execution(context, "any")
    time.sleep(params.get("sleep", random.uniform(0, 0.4)))
    _write_effect(context, "any")


@task(name="fi_all", scope="all", max_attempts=25)
def fi_all(params, context):
    """An `all` job: every node writes its own effect."""
    _log_execution(context, "all")
    time.sleep(random.uniform(0, 0.2))
    _write_effect(context, "all")


@task(name="fi_tick", frequency=1, max_attempts=25)
def fi_tick(params, context):
    """A periodic task: one effect per due time (one job of the series)."""
    _log_execution(context, "tick")
    time.sleep(random.uniform(0, 0.2))
    _write_effect(context, "tick")
