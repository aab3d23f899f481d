"""The claim: taking due jobs atomically, one function per database.

A claim marks a batch of due `any` jobs `running`, counts an attempt on each
and gives them a lease (owner, token, expiry), all in one statement, so a job
is never claimed twice while its lease holds.

`all` jobs are not claimed. When one falls due, the first worker to see it
*expands* it: it marks the job `running` and writes one `completions` row per
node that was alive when the job became due. Each node then claims its own
completion rows, which no other node can take.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, Connection, Update, any_, bindparam, select, update
from sqlalchemy import String as SqlString

from dbtasks.clock import seconds_from_now, utcnow
from dbtasks.queries import QUEUED, RUNNING, _node_alive
from dbtasks.schema import CompletionState, completions, jobs, nodes


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds under a lease.

    For an `all` job, `node` is set: the claim is of this node's completion.
    """

    id: int
    task: str
    queue: str
    params: str
    attempt: int
    max_attempts: int
    priority: int
    schedule: str | None
    token: str
    node: str | None = None

    @property
    def is_completion(self) -> bool:
        return self.node is not None


_returned = (
    jobs.c.id,
    jobs.c.task,
    jobs.c.queue,
    jobs.c.params,
    jobs.c.attempt,
    jobs.c.max_attempts,
    jobs.c.priority,
    jobs.c.schedule,
)

_claim_values = {
    "state": RUNNING,
    "attempt": jobs.c.attempt + 1,
    "lease_owner": bindparam("node_name"),
    "lease_token": bindparam("token"),
    "lease_expires_at": seconds_from_now(bindparam("lease")),
    "started_at": utcnow(),
}


@functools.cache
def claim_any_jobs_postgresql() -> Update:
    """Claim up to `limit` due jobs of the given tasks and queues (PostgreSQL).

    The due rows are picked in a MATERIALIZED CTE with FOR UPDATE SKIP LOCKED:
    the fence makes the planner run the LIMIT once, so the UPDATE cannot touch
    more rows than were picked (an IN (subquery) may be re-planned as a join
    that does), and SKIP LOCKED lets concurrent claimers take disjoint rows
    instead of queueing on the same ones. Reads ix_dbtasks_jobs_due in order.
    """
    tasks = bindparam("tasks", type_=ARRAY(SqlString))
    queues = bindparam("queues", type_=ARRAY(SqlString))
    due = (
        select(jobs.c.id)
        .where(
            jobs.c.state == QUEUED,
            jobs.c.queue == any_(queues),
            jobs.c.task == any_(tasks),
            jobs.c.run_at <= utcnow(),
        )
        .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED")
    )
    return (
        update(jobs)
        .where(jobs.c.id == due.c.id)
        .values(_claim_values)
        .returning(*_returned)
    )


@functools.cache
def claim_any_jobs_sqlite() -> Update:
    """Claim up to `limit` due jobs of the given tasks and queues (SQLite).

    One UPDATE statement: SQLite runs it under the database's single write
    lock, so no other connection can claim the same rows in between.

    LIMITATION: that lock also means claims from several worker processes take
    turns; fine on one machine, not for a fleet (use PostgreSQL).
    """
    # An alias, so the subquery reads its own rows instead of correlating to
    # the table being updated.
    picked = jobs.alias("picked")
    due = (
        select(picked.c.id)
        .where(
            picked.c.state == QUEUED,
            picked.c.queue.in_(bindparam("queues", expanding=True)),
            picked.c.task.in_(bindparam("tasks", expanding=True)),
            picked.c.run_at <= utcnow(),
        )
        .order_by(picked.c.priority, picked.c.run_at, picked.c.id)
        .limit(bindparam("limit"))
        .scalar_subquery()
    )
    return (
        update(jobs)
        .where(jobs.c.id.in_(due))
        .values(_claim_values)
        .returning(*_returned)
    )


def claim_any_jobs(
    conn: Connection,
    *,
    node: str,
    token: str,
    tasks: list[str],
    queues: list[str],
    limit: int,
    lease: float,
) -> list[ClaimedJob]:
    """Claim due `any` jobs, best priority and earliest due first."""
    if not tasks or limit < 1:
        return []
    if conn.dialect.name == "postgresql":
        statement = claim_any_jobs_postgresql()
    else:
        statement = claim_any_jobs_sqlite()
    rows = conn.execute(
        statement,
        {
            "node_name": node,
            "token": token,
            "tasks": tasks,
            "queues": queues,
            "limit": limit,
            "lease": lease,
        },
    ).all()
    # RETURNING gives no order; run the most urgent first.
    rows.sort(key=lambda row: (row.priority, row.id))
    return [ClaimedJob(*row, token=token) for row in rows]


# --- all jobs -----------------------------------------------------------------

_due_all_jobs = (
    select(jobs.c.id, jobs.c.task, jobs.c.queue, jobs.c.run_at)
    .where(
        jobs.c.state == QUEUED,
        jobs.c.queue.in_(bindparam("queues", expanding=True)),
        jobs.c.task.in_(bindparam("tasks", expanding=True)),
        jobs.c.run_at <= utcnow(),
    )
    .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
    .limit(20)
    .with_for_update(skip_locked=True)
)

_start_all_job = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.state == QUEUED)
    .values(state=RUNNING, attempt=1, started_at=utcnow())
)

_live_nodes = select(
    nodes.c.name, nodes.c.tasks, nodes.c.queues, nodes.c.registered_at
).where(_node_alive(bindparam("node_timeout")))


def expand_all_jobs(
    conn: Connection, *, tasks: list[str], queues: list[str], node_timeout: float
) -> list[int]:
    """Give each due `all` job its set of nodes; return the expanded job ids.

    The set is every live node that runs the task on the job's queue and had
    registered when the job became due. If no such node was alive then, the
    nodes alive now take it, so an `all` job never finishes unrun.
    """
    if not tasks:
        return []
    due = conn.execute(_due_all_jobs, {"tasks": tasks, "queues": queues}).all()
    if not due:
        return []
    alive = conn.execute(_live_nodes, {"node_timeout": node_timeout}).all()

    expanded = []
    for job in due:
        started = conn.execute(_start_all_job, {"job_id": job.id}).rowcount
        if started != 1:
            continue
        members = _node_set(job.task, job.queue, job.run_at, alive)
        conn.execute(
            completions.insert(),
            [
                {"job_id": job.id, "node": name, "state": QUEUED, "run_at": job.run_at}
                for name in members
            ],
        )
        expanded.append(job.id)
    return expanded


def _node_set(task: str, queue: str, due: datetime, alive: list[Any]) -> list[str]:
    runners = [
        node
        for node in alive
        if json.loads(node.tasks).get(task, {}).get("scope") == "all"
        and queue in json.loads(node.queues)
    ]
    early = [node.name for node in runners if node.registered_at <= due]
    return early or [node.name for node in runners]


_due_completions = completions.alias("due")
_claim_completions = (
    update(completions)
    .where(
        completions.c.node == bindparam("node_name"),
        completions.c.job_id.in_(
            select(_due_completions.c.job_id)
            .where(
                _due_completions.c.node == bindparam("node_name"),
                _due_completions.c.state == CompletionState.QUEUED.value,
                _due_completions.c.run_at <= utcnow(),
            )
            .limit(bindparam("limit"))
            .scalar_subquery()
        ),
    )
    .values(
        state=CompletionState.RUNNING.value,
        attempt=completions.c.attempt + 1,
        lease_token=bindparam("token"),
        lease_expires_at=seconds_from_now(bindparam("lease")),
        started_at=utcnow(),
    )
    .returning(completions.c.job_id, completions.c.attempt)
)

_completion_jobs = select(
    jobs.c.id,
    jobs.c.task,
    jobs.c.queue,
    jobs.c.params,
    jobs.c.max_attempts,
    jobs.c.priority,
    jobs.c.schedule,
).where(jobs.c.id.in_(bindparam("ids", expanding=True)))


def claim_completions(
    conn: Connection, *, node: str, token: str, limit: int, lease: float
) -> list[ClaimedJob]:
    """Claim this node's due runs of `all` jobs.

    Only this node claims its own completion rows, so no SKIP LOCKED is needed:
    the row locks only meet the maintenance that drops dead nodes.
    """
    if limit < 1:
        return []
    claimed = conn.execute(
        _claim_completions,
        {"node_name": node, "token": token, "limit": limit, "lease": lease},
    ).all()
    if not claimed:
        return []
    attempts = dict(claimed)
    rows = conn.execute(_completion_jobs, {"ids": list(attempts)}).all()
    return [
        ClaimedJob(
            id=row.id,
            task=row.task,
            queue=row.queue,
            params=row.params,
            attempt=attempts[row.id],
            max_attempts=row.max_attempts,
            priority=row.priority,
            schedule=row.schedule,
            token=token,
            node=node,
        )
        for row in rows
    ]
