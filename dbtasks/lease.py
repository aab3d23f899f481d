"""Heartbeats, lease renewal, and the rescue of jobs whose lease expired.

A worker's `Heartbeat` thread renews, every `lease_seconds / 3`, its node's
heartbeat and the lease of every job it runs. It runs on its own thread and
connection, so slow tasks or a busy loop never delay it.

Rescue is done by every worker, at every maintenance tick:

- a running `any` job whose lease expired (its worker died, froze, or lost the
  database for longer than a lease) is queued again at once, its attempt
  spent, or failed if it has no attempts left, so a job that keeps killing
  its worker ends failed rather than looping;
- a node whose heartbeat expired, or that stopped, is dropped from the set of
  every `all` job it had not finished, so a dead node never holds one open;
- on PostgreSQL, every second, a running job whose node's lifeline session is
  gone (lifeline.py) is rescued at once, without waiting for its lease.

A rescued job's old worker, if it wakes, can record nothing: its token no
longer matches (outcomes.record).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dbtasks import queries
from dbtasks.claim import ClaimedJob, _completion_jobs
from dbtasks.outcomes import FAILED, RETRY, Outcome, recording

logger = logging.getLogger(__name__)

#: Jobs rescued per statement; a larger backlog is taken over several ticks.
RESCUE_BATCH = 100

_EXPIRED = "lease expired: the worker running this job died, froze or lost the database"
_ORPHANED = "the worker running this job died: its lifeline connection closed"
_TAKEN_OVER = ("the worker running this job ended: a new worker took over its node "
               "name")


class Heartbeat(threading.Thread):
    """Renews the node's heartbeat and its jobs' leases until stopped.

    `held` returns the lease tokens of the jobs the worker holds; only those
    are renewed.
    """

    def __init__(self, engine: Engine, node: str, lease: float, interval: float,
                 held: Callable[[], list[str]]):
        super().__init__(name="dbtasks-heartbeat", daemon=True)
        self._engine = engine
        self._node = node
        self._lease = lease
        self._interval = interval
        self._held = held
        self._stopped = threading.Event()
        self._failing = False
        #: Set when the node's row was gone or marked stopped at a beat: the
        #: database was recreated or restored, or the row deleted by hand.
        self.node_gone = False

    def run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        params = {"node_name": self._node, "lease": self._lease, "tokens": self._held()}
        try:
            with self._engine.begin() as conn:
                if conn.execute(queries.beat_node, params).rowcount == 0:
                    self.node_gone = True
                if params["tokens"]:
                    conn.execute(queries.renew_job_leases, params)
                    conn.execute(queries.renew_completion_leases, params)
        except Exception as exc:  # noqa: BLE001 - this thread must outlive any error
            # Logged once per outage; the leases run out if it lasts.
            if not self._failing:
                logger.warning(
                    "heartbeat failed, retrying: %s",
                    getattr(exc, "orig", None) or exc,
                    exc_info=not isinstance(exc, DBAPIError),
                    extra={"event": "lease.heartbeat_failed", "node": self._node},
                )
            self._failing = True
            return
        if self._failing:
            logger.info(
                "heartbeat restored",
                extra={"event": "lease.heartbeat_restored", "node": self._node},
            )
        self._failing = False
        logger.debug(
            "heartbeat", extra={"event": "lease.heartbeat", "node": self._node}
        )

    def stop(self) -> None:
        self._stopped.set()


def rescue_expired_jobs(conn: Connection) -> int:
    """Queue again (or fail) running jobs whose lease expired; return how many."""
    rows = conn.execute(queries.expired_jobs, {"limit": RESCUE_BATCH}).all()
    _rescue(conn, rows, _EXPIRED)
    return len(rows)


def any_orphaned_jobs(conn: Connection, rescuer: str) -> bool:
    """Whether some running job of a node other than `rescuer` has lost its
    node's lifeline (PostgreSQL)."""
    found = conn.execute(
        queries.orphaned_jobs_postgresql, {"limit": 1, "rescuer": rescuer}
    ).first()
    return found is not None


def rescue_orphaned_jobs(conn: Connection, rescuer: str) -> int:
    """Rescue running jobs whose node's lifeline is gone (PostgreSQL only).

    Never the rescuer's own: it is alive, whatever its lifeline, and may be
    reconnecting it right now.
    """
    if conn.dialect.name != "postgresql":
        return 0
    rows = conn.execute(
        queries.orphaned_jobs_postgresql, {"limit": RESCUE_BATCH, "rescuer": rescuer}
    ).all()
    _rescue(conn, rows, _ORPHANED)
    return len(rows)


def rescue_jobs_of_node(conn: Connection, node: str) -> int:
    """Rescue every job a dead holder of this node name was running."""
    rows = conn.execute(queries.jobs_owned_by, {"node_name": node}).all()
    _rescue(conn, rows, _TAKEN_OVER)
    drop_node(conn, node)
    return len(rows)


def _rescue(conn: Connection, rows: list[Any], reason: str) -> None:
    """Queue each job again at once, its attempt spent, or fail it if none is left."""
    with recording(conn) as batch:
        for row in rows:
            job = ClaimedJob(
                id=row.id,
                task=row.task,
                queue=row.queue,
                params="",
                attempt=row.attempt,
                max_attempts=row.max_attempts,
                priority=row.priority,
                schedule=row.schedule,
                token=row.lease_token,
            )
            kind = RETRY if job.attempt < job.max_attempts else FAILED
            batch.record(job, Outcome(kind, error=reason))
            logger.warning(
                "rescued job %s (%s) from node %s, %s: %s",
                job.id,
                job.task,
                row.lease_owner,
                "queued again" if kind == RETRY else "no attempts left, failed",
                reason,
                extra={
                    "event": "lease.rescued",
                    "job_id": job.id,
                    "task": job.task,
                    "attempt": job.attempt,
                    "node": row.lease_owner,
                    "reason": reason,
                },
            )


def rescue_expired_completions(conn: Connection) -> int:
    """Retry (or fail) runs of `all` jobs whose lease expired on a live node."""
    rows = conn.execute(queries.expired_completions, {"limit": RESCUE_BATCH}).all()
    if not rows:
        return 0
    details = {
        row.id: row
        for row in conn.execute(_completion_jobs, {"ids": [r.job_id for r in rows]})
    }
    # Job rows are locked in id order by every transaction that takes several.
    rows.sort(key=lambda row: row.job_id)
    with recording(conn) as batch:
        for row in rows:
            parent = details[row.job_id]
            job = ClaimedJob(
                id=row.job_id,
                task=parent.task,
                queue=parent.queue,
                params="",
                attempt=row.attempt,
                max_attempts=parent.max_attempts,
                priority=parent.priority,
                schedule=parent.schedule,
                token=row.lease_token,
                node=row.node,
            )
            kind = RETRY if job.attempt < job.max_attempts else FAILED
            batch.record(job, Outcome(kind, error=_EXPIRED))
            logger.warning(
                "rescued job %s (%s) run by node %s, %s: %s",
                job.id,
                job.task,
                job.node,
                "to run again there" if kind == RETRY else "no attempts left, failed",
                _EXPIRED,
                extra={
                    "event": "lease.rescued",
                    "job_id": job.id,
                    "task": job.task,
                    "attempt": job.attempt,
                    "node": job.node,
                },
            )
    return len(rows)


def drop_dead_nodes(conn: Connection, node_timeout: float) -> int:
    """Drop dead and stopped nodes from open `all` jobs; finish those now done."""
    values = {"node_timeout": node_timeout}
    return _drop(conn, queries.lock_jobs_of_dead_nodes,
                 queries.drop_completions_of_dead_nodes, values)


def drop_node(conn: Connection, node: str) -> None:
    """Drop one node (this one, stopping) from the open `all` jobs."""
    values = {"node_name": node}
    _drop(conn, queries.lock_jobs_of_node, queries.drop_completions_of_node, values)


def _drop(conn: Connection, lock: Any, drop: Any, values: dict[str, Any]) -> int:
    job_ids = conn.execute(lock, values).scalars().all()
    if not job_ids:
        return 0
    dropped = conn.execute(drop, {**values, "job_ids": job_ids}).all()
    _finish_after_drop(conn, dropped)
    return len(dropped)


def _finish_after_drop(conn: Connection, dropped: list) -> None:
    job_ids = sorted({row.job_id for row in dropped})
    _finish_all_jobs(conn, job_ids)
    for job_id in job_ids:
        logger.info(
            "dropped dead or stopped nodes from all job %s",
            job_id,
            extra={"event": "lease.nodes_dropped", "job_id": job_id},
        )


def finish_stranded_all_jobs(conn: Connection) -> int:
    """Finish `all` jobs whose nodes are all done but that were left running."""
    job_ids = sorted(conn.execute(queries.stranded_all_jobs).scalars().all())
    _finish_all_jobs(conn, job_ids)
    return len(job_ids)


def _finish_all_jobs(conn: Connection, job_ids: list[int]) -> None:
    """Finish each `all` job whose set of nodes is done; ids in ascending order."""
    with recording(conn) as batch:
        for job_id in job_ids:
            conn.execute(queries.lock_job, {"job_id": job_id})
            batch.finish_all_job(job_id)
