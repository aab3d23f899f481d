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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    Update,
    any_,
    bindparam,
    exists,
    literal_column,
    null,
    select,
    union_all,
    update,
)

from dbtasks import queries
from dbtasks.clock import seconds_from_now, utcnow
from dbtasks.queries import (
    QUEUED,
    RUNNING,
    _node_alive,
    array_of,
    in_state,
    row_address,
)
from dbtasks.schema import CompletionState, completions, jobs, nodes


@dataclass(slots=True)
class ClaimedJob:
    """A job this worker now holds under a lease; read-only by convention.

    (Not a frozen dataclass: a busy worker builds thousands a second, and a
    frozen one takes four times as long to build.)

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

# Constants are written into the SQL, not bound: a claim sends only what
# changes from one claim to the next.
_claim_values = {
    "state": literal_column(f"'{RUNNING}'"),
    "attempt": jobs.c.attempt + literal_column("1"),
    "lease_owner": bindparam("node_name"),
    "lease_token": bindparam("token"),
    "lease_expires_at": seconds_from_now(bindparam("lease")),
    "started_at": utcnow(),
}


def _of_tasks(column: Any, tasks: tuple[str, ...]) -> ColumnElement[bool]:
    """`column` names one of `tasks`, written into the SQL as literals.

    A worker's task names never change, so its claim statements carry them
    as text: no array of names is converted and sent with every claim, and
    the server's generic plan knows them (tools/benchmark.py, W3).
    """
    return column.in_([literal_column(_pg_text(name)) for name in tasks])


def _pg_text(value: str) -> str:
    """A PostgreSQL string constant of `value`: the E'' form, which reads
    backslashes the same whatever standard_conforming_strings says. Task
    names hold no control characters (config.name_problem)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@functools.cache
def claim_any_jobs_postgresql(limit: int, tasks: tuple[str, ...]) -> Update:
    """Claim up to `limit` due jobs of `tasks` in one queue (PostgreSQL).

    The due rows are picked, in ix_dbtasks_jobs_due order, by a subquery with
    FOR UPDATE SKIP LOCKED, so concurrent claimers take disjoint rows instead
    of queueing on the same ones; the rows a claimer skips do not count
    against its LIMIT. ARRAY(...) makes the subquery an init plan, run once,
    and the UPDATE then finds its rows by their addresses
    (queries.row_address): a plan that stays right when the server plans
    the prepared statement generically (a join of the subquery, as an IN or
    a CTE gives, turned into a hash join over the whole table; a lookup by
    primary key, into a scan of it while the table was small).

    The LIMIT is written into the statement's text, one statement (and one
    prepared statement) per batch size, so that the generic plan knows it.
    One queue per statement: with `queue = ANY(...)` the planner can no
    longer read the index in order and sorts every queued job instead.
    """
    picked = jobs.alias("picked")
    due = (
        select(row_address(picked))
        .where(
            in_state(picked.c.state, QUEUED),
            picked.c.queue == bindparam("claim_queue"),
            _of_tasks(picked.c.task, tasks),
            picked.c.run_at <= utcnow(),
        )
        .order_by(picked.c.priority, picked.c.run_at, picked.c.id)
        .limit(literal_column(str(int(limit))))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(jobs)
        .where(row_address(jobs) == any_(array_of(due)))
        .values(_claim_values)
        .returning(*_returned)
    )


#: What a row of finish_and_claim_postgresql is: its first column.
FINISHED, CLAIMED, PROMOTED, NOTIFIED = 0, 1, 2, 3


@functools.cache
def finish_and_claim_postgresql(limit: int, tasks: tuple[str, ...]) -> CompoundSelect:
    """Record a batch of successes, move the queue's due scheduled jobs to
    queued, and claim the next batch, in one statement (PostgreSQL).

    Run in autocommit, this is one round trip and one commit per batch of
    jobs, where a transaction of the same statements would take two more
    (BEGIN and COMMIT are trips of their own). The data-modifying CTEs touch
    different rows (running ones are finished, scheduled ones moved, queued
    ones claimed) and each runs exactly once, whether or not rows come back.
    The jobs moved to queued are claimed by the next statement, which sees
    them; idle nodes are notified of them.

    Returns one row per finished job (FINISHED, its id; a job whose lease was
    lost is missing), per claimed job (CLAIMED, the columns of a ClaimedJob)
    and per job moved to queued (PROMOTED, its id), then one NOTIFIED row if
    any was moved.
    """
    finished = queries.finish_succeeded_jobs_postgresql().cte("finished")
    claimed = claim_any_jobs_postgresql(limit, tasks).cte("claimed")
    promoted = queries.promote_scheduled_jobs("postgresql").cte("promoted")
    notified = (
        select(queries.notify_idle_nodes.scalar_subquery())
        .where(exists(select(literal_column("1")).select_from(promoted)))
        .cte("notified")
    )
    blanks = [null()] * (len(_returned) - 1)
    return union_all(
        select(literal_column(str(FINISHED)).label("kind"), finished.c.id, *blanks),
        select(literal_column(str(CLAIMED)),
               *(claimed.c[column.name] for column in _returned)),
        select(literal_column(str(PROMOTED)), promoted.c.id, *blanks),
        # Read, so that it runs: a plain SELECT in a WITH runs only if used.
        select(literal_column(str(NOTIFIED)), null(), *blanks).select_from(notified),
    )


@functools.cache
def claim_any_jobs_sqlite(limit: int) -> Update:
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
            in_state(picked.c.state, QUEUED),
            picked.c.queue == bindparam("claim_queue"),
            picked.c.task.in_(bindparam("tasks", expanding=True)),
            picked.c.run_at <= utcnow(),
        )
        .order_by(picked.c.priority, picked.c.run_at, picked.c.id)
        .limit(literal_column(str(int(limit))))
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
    tasks: Sequence[str],
    queues: list[str],
    limit: int,
    lease: float,
) -> list[ClaimedJob]:
    """Claim up to `limit` due `any` jobs of the given tasks.

    The queues are served in the order given: a queue's due jobs are taken
    before the next queue's; within a queue, best priority first, then
    earliest due.
    """
    if not tasks:
        return []
    values = {"node_name": node, "token": token, "lease": lease}
    if conn.dialect.name == "postgresql":
        named = tuple(tasks)
        statement = functools.partial(claim_any_jobs_postgresql, tasks=named)
    else:
        statement = claim_any_jobs_sqlite
        values["tasks"] = tasks

    claimed: list[ClaimedJob] = []
    for queue in queues:
        wanted = limit - len(claimed)
        if wanted < 1:
            break
        rows = conn.execute(
            statement(wanted), {**values, "claim_queue": queue}
        ).all()
        # RETURNING gives no order; run the most urgent first.
        rows.sort(key=lambda row: (row.priority, row.id))
        claimed += [ClaimedJob(*row, token=token) for row in rows]
    return claimed


def promote_scheduled_jobs(conn: Connection, queues: list[str]) -> int:
    """Move the queues' due scheduled jobs to queued; return how many moved.

    Idle nodes are notified of them: a node that could run them may be asleep
    until a later due time it knew of.
    """
    statement = queries.promote_scheduled_jobs(conn.dialect.name)
    moved = sum(
        len(conn.execute(statement, {"promote_queue": queue}).all())
        for queue in queues
    )
    if moved and conn.dialect.name == "postgresql":
        conn.execute(queries.notify_idle_nodes)
    return moved


# --- all jobs -----------------------------------------------------------------

_due_all_jobs = (
    select(jobs.c.id, jobs.c.task, jobs.c.queue, jobs.c.run_at)
    .where(
        in_state(jobs.c.state, QUEUED),
        jobs.c.queue == bindparam("claim_queue"),
        jobs.c.task.in_(bindparam("tasks", expanding=True)),
        jobs.c.run_at <= utcnow(),
    )
    .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
    .limit(20)
    .with_for_update(skip_locked=True)
)

_start_all_job = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), in_state(jobs.c.state, QUEUED))
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
    due = [
        job
        for queue in queues
        for job in conn.execute(_due_all_jobs, {"tasks": tasks, "claim_queue": queue})
    ]
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
    if expanded and conn.dialect.name == "postgresql":
        conn.execute(queries.notify_idle_nodes)  # the other nodes' runs are due
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
