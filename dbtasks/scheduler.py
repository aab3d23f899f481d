"""Periodic tasks: one schedule row per task, and one open job per series.

A periodic task's schedule row holds its frequency and next due time. The jobs
of its series carry the task's name in `jobs.schedule`, and a unique partial
index allows at most one of them queued or running at a time, so two workers
can never both enqueue the same due time, however they race.

- The first job is due when the schedule is created (by the first worker that
  knows the task).
- After each run ends for good (succeeded, failed, cancelled), the next job is
  enqueued at finish time + frequency, in the transaction that records the
  outcome (outcomes.continue_series). Runs of a series therefore never overlap.
- Every maintenance tick, each worker re-enqueues a series whose open job is
  missing (deleted by hand, say), at the schedule's next due time.
- A worker whose code has a new frequency re-times the queued job at start.
- A schedule is retired only when no live node registers its task as periodic,
  so old and new versions of a rolling deploy do not fight over it.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy import Connection

from dbtasks import queries
from dbtasks.tasks import Registry, Task

logger = logging.getLogger(__name__)


def sync_schedules(conn: Connection, registry: Registry) -> None:
    """Create or re-time the schedule of every periodic task this node knows."""
    dialect = conn.dialect.name
    for task in registry.periodic():
        values = {"schedule_task": task.name, "frequency": task.frequency}
        if conn.execute(queries.create_schedule(dialect), values).first():
            logger.info(
                "created schedule of %s, every %gs",
                task.name,
                task.frequency,
                extra={"event": "schedule.created", "task": task.name},
            )
        else:
            _retime(conn, task)
    ensure_series(conn, registry)


def _retime(conn: Connection, task: Task) -> None:
    values = {"schedule_task": task.name}
    old = conn.execute(queries.schedule_frequency, values).scalar()
    if old is None or old == task.frequency:
        return
    shift = task.frequency - old
    values = {"schedule_task": task.name, "frequency": task.frequency, "shift": shift}
    conn.execute(queries.change_frequency, values)
    conn.execute(queries.retime_series_job, values)
    logger.info(
        "frequency of %s changed from %gs to %gs; queued job re-timed",
        task.name,
        old,
        task.frequency,
        extra={"event": "schedule.retimed", "task": task.name},
    )


def ensure_series(conn: Connection, registry: Registry) -> None:
    """Enqueue the open job of each known series that has none.

    A schedule retired while this node looked dead (a long database outage)
    is created again, first due now, so the series resumes.
    """
    dialect = conn.dialect.name
    statement = queries.ensure_series_job(dialect)
    for task in registry.periodic():
        conn.execute(
            queries.create_schedule(dialect),
            {"schedule_task": task.name, "frequency": task.frequency},
        )
        values = {
            "schedule_task": task.name,
            "series_queue": task.queue,
            "series_priority": task.priority,
            "series_max_attempts": task.max_attempts,
        }
        if conn.execute(statement, values).first():
            logger.info(
                "enqueued next job of %s",
                task.name,
                extra={"event": "schedule.enqueued", "task": task.name},
            )


def retire_orphaned_schedules(conn: Connection, node_timeout: float) -> list[str]:
    """Retire schedules no live node registers as periodic; cancel their jobs."""
    wanted: set[str] = set()
    for node in conn.execute(queries.select_live_nodes, {"node_timeout": node_timeout}):
        for name, settings in json.loads(node.tasks).items():
            if settings.get("frequency", 0) > 0:
                wanted.add(name)

    retired = []
    for task in conn.execute(queries.all_schedules).scalars():
        if task in wanted:
            continue
        conn.execute(queries.retire_schedule, {"schedule_task": task})
        conn.execute(queries.cancel_retired_series, {"schedule_task": task})
        retired.append(task)
        logger.info(
            "retired schedule of %s: no live node runs it periodically",
            task,
            extra={"event": "schedule.retired", "task": task},
        )
    return retired
