"""Every statement the queue runs, except the claim (see claim.py).

Each is built once, as SQLAlchemy Core with bound parameters, so the compiled
form is cached and no value ever reaches the SQL text. Statements that differ
between PostgreSQL and SQLite take the dialect's name.

Locking conventions, which keep concurrent writers from deadlocking:

- Job rows first, in ascending id order when a transaction locks several: a
  transaction that touches an `all` job's completions locks the job's row
  first (`lock_job`), then the completion rows.
- Schedule rows after job rows, in ascending name order, each before the job
  that continues its series is added (outcomes.Recording does both). The
  transactions that lock a schedule row before touching its jobs (a worker
  re-timing a series as it starts, a schedule being retired) take those jobs
  with SKIP LOCKED, so they never wait for one.
- Completion rows after their job's row.
- Recording an outcome is fenced: the UPDATE names the lease token the worker
  was given, and its row count says whether the worker still owned the job.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    BigInteger,
    Delete,
    Insert,
    Select,
    Update,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dbtasks.clock import add_seconds, later_of, seconds_from_now, utcnow
from dbtasks.schema import (
    FINISHED_STATES,
    CompletionState,
    JobState,
    completions,
    jobs,
    nodes,
    schedules,
)

QUEUED = JobState.QUEUED.value
RUNNING = JobState.RUNNING.value
OPEN_STATES = (QUEUED, RUNNING)
FINISHED = tuple(state.value for state in FINISHED_STATES)
OPEN_COMPLETIONS = (CompletionState.QUEUED.value, CompletionState.RUNNING.value)


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# --- enqueue ---------------------------------------------------------------


@functools.cache
def insert_job(dialect: str, *, with_run_at: bool, idempotent: bool) -> Insert:
    """Insert one job, returning its id (nothing if its idempotency key exists).

    A `run_at` in the past is stored as now, so that an old due time does not
    jump ahead of jobs enqueued before it.
    """
    statement = _new_job(dialect, with_run_at)
    if idempotent:
        statement = statement.on_conflict_do_nothing(
            index_elements=[jobs.c.idempotency_key]
        )
    return statement.returning(jobs.c.id)


def _new_job(dialect: str, with_run_at: bool) -> Insert:
    run_at = (
        later_of(bindparam("run_at", type_=jobs.c.run_at.type), utcnow())
        if with_run_at
        else utcnow()
    )
    return _insert(dialect)(jobs).values(
        task=bindparam("task"),
        queue=bindparam("queue"),
        params=bindparam("params"),
        priority=bindparam("priority"),
        max_attempts=bindparam("max_attempts"),
        idempotency_key=bindparam("idempotency_key"),
        run_at=run_at,
        created_at=utcnow(),
    )


@functools.cache
def insert_jobs(dialect: str, *, with_run_at: bool) -> Insert:
    """Insert many jobs in one execution, returning their ids in the rows' order.

    Executed with a list of rows, SQLAlchemy sends multi-row INSERTs in pages
    small enough for PostgreSQL's limit on bound values ("insertmanyvalues").
    """
    return _new_job(dialect, with_run_at).returning(
        jobs.c.id, sort_by_parameter_order=True
    )


job_id_by_idempotency_key: Select[Any] = select(jobs.c.id).where(
    jobs.c.idempotency_key == bindparam("idempotency_key")
)

#: Every node's task list, newest registration first: to accept a task name
#: no local module defines, with the settings its newest worker declared.
registered_tasks: Select[Any] = select(nodes.c.tasks).order_by(
    nodes.c.registered_at.desc()
)


# --- nodes -----------------------------------------------------------------


def _node_alive(node_timeout: Any) -> Any:
    return and_(
        nodes.c.stopped_at.is_(None),
        nodes.c.heartbeat_at > seconds_from_now(-node_timeout),
    )


@functools.cache
def register_node(dialect: str) -> Insert:
    """Add this node's row; returns no row if the name is taken (see take_over).

    Inserts that may do nothing return what they added: an INSERT's rowcount
    is not reliable across drivers (-1 with psycopg under SQLAlchemy 2.1)."""
    return (
        _insert(dialect)(nodes)
        .values(
            name=bindparam("node_name"),
            hostname=bindparam("hostname"),
            pid=bindparam("pid"),
            tasks=bindparam("tasks"),
            queues=bindparam("queues"),
            lifeline_key=bindparam("lifeline_key"),
            registered_at=utcnow(),
            heartbeat_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[nodes.c.name])
        .returning(nodes.c.name)
    )


take_over_node: Update = (
    update(nodes)
    .where(
        nodes.c.name == bindparam("node_name"),
        or_(
            nodes.c.stopped_at.is_not(None),
            nodes.c.heartbeat_at <= seconds_from_now(-bindparam("node_timeout")),
        ),
    )
    .values(
        hostname=bindparam("hostname"),
        pid=bindparam("pid"),
        tasks=bindparam("tasks"),
        queues=bindparam("queues"),
        lifeline_key=bindparam("lifeline_key"),
        registered_at=utcnow(),
        heartbeat_at=utcnow(),
        stopped_at=None,
    )
)
"""Reuse the row of a dead or stopped node of the same name; row count decides."""

node_holder: Select[Any] = select(nodes.c.hostname, nodes.c.pid).where(
    nodes.c.name == bindparam("node_name")
)

beat_node: Update = (
    update(nodes)
    .where(nodes.c.name == bindparam("node_name"), nodes.c.stopped_at.is_(None))
    .values(heartbeat_at=utcnow())
)

set_lifeline_key: Update = (
    update(nodes)
    .where(nodes.c.name == bindparam("node_name"))
    .values(lifeline_key=bindparam("lifeline_key"))
)
"""Record the lock key a node took again after its lifeline reconnected."""

stop_node: Update = (
    update(nodes).where(nodes.c.name == bindparam("node_name")).values(stopped_at=utcnow())
)


def live_nodes(node_timeout_param: str = "node_timeout") -> Select[Any]:
    """Nodes that have not stopped and whose heartbeat is recent."""
    return select(
        nodes.c.name, nodes.c.tasks, nodes.c.queues, nodes.c.registered_at
    ).where(_node_alive(bindparam(node_timeout_param)))


select_live_nodes = live_nodes()

prune_nodes: Delete = delete(nodes).where(
    nodes.c.heartbeat_at < seconds_from_now(-bindparam("retention"))
)
"""Forget nodes silent for longer than the retention period."""


# --- leases ----------------------------------------------------------------

renew_job_leases: Update = (
    update(jobs)
    .where(jobs.c.lease_owner == bindparam("node_name"), jobs.c.state == RUNNING)
    .values(lease_expires_at=seconds_from_now(bindparam("lease")))
)
"""Extend the lease of every job this node runs.

Safe by owner: a job rescued from this node has another owner or none, and a
node name is only reused once its old holder is dead (take_over_node, which
rescues that holder's jobs first).
"""

renew_completion_leases: Update = (
    update(completions)
    .where(
        completions.c.node == bindparam("node_name"),
        completions.c.state == CompletionState.RUNNING.value,
    )
    .values(lease_expires_at=seconds_from_now(bindparam("lease")))
)

_rescued = (
    jobs.c.id,
    jobs.c.task,
    jobs.c.queue,
    jobs.c.attempt,
    jobs.c.max_attempts,
    jobs.c.priority,
    jobs.c.schedule,
    jobs.c.lease_token,
    jobs.c.lease_owner,
)

expired_jobs: Select[Any] = (
    select(*_rescued)
    .where(jobs.c.state == RUNNING, jobs.c.lease_expires_at < utcnow())
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
"""Running jobs whose lease ran out: their worker died, froze or lost the
database. Uses ix_dbtasks_jobs_lease; SKIP LOCKED lets several workers rescue
at once without waiting on each other."""

#: The first key of every dbtasks advisory lock ("dbts"), apart from the
#: application's own advisory locks, which rarely use the two-key form.
LIFELINE_LOCK_CLASS = 0x64627473

_pg_locks = table(
    "pg_locks",
    column("locktype"),
    column("database"),
    column("classid"),
    column("objid"),
    column("objsubid"),
    column("granted"),
    schema="pg_catalog",
)
_pg_database = table("pg_database", column("oid"), column("datname"), schema="pg_catalog")

_lifeline_held = (
    select(literal(1))
    .select_from(_pg_locks)
    .where(
        _pg_locks.c.locktype == "advisory",
        _pg_locks.c.database
        == select(_pg_database.c.oid)
        .where(_pg_database.c.datname == func.current_database())
        .scalar_subquery(),
        cast(_pg_locks.c.classid, BigInteger) == LIFELINE_LOCK_CLASS,
        cast(_pg_locks.c.objid, BigInteger) == nodes.c.lifeline_key,
        _pg_locks.c.objsubid == 2,
        _pg_locks.c.granted,
    )
)

#: Seconds after a server (re)start before a missing lifeline means a dead
#: worker: a restart drops every lifeline, and live workers need a moment to
#: take theirs again.
LIFELINE_GRACE = 10.0

orphaned_jobs_postgresql: Select[Any] = (
    select(*_rescued)
    .join(nodes, nodes.c.name == jobs.c.lease_owner)
    .where(
        jobs.c.state == RUNNING,
        nodes.c.lifeline_key.is_not(None),
        func.pg_postmaster_start_time() < seconds_from_now(-LIFELINE_GRACE),
        ~exists(_lifeline_held),
    )
    .limit(bindparam("limit"))
    .with_for_update(of=jobs, skip_locked=True)
)
"""Running jobs whose node's lifeline connection is gone (PostgreSQL).

The server drops a session's advisory locks the moment its connection closes,
so a worker that died shows up here at once, long before its leases expire.
pg_locks is read fresh by every statement; the rows it lists are few."""

jobs_owned_by: Select[Any] = (
    select(*_rescued)
    .where(jobs.c.state == RUNNING, jobs.c.lease_owner == bindparam("node_name"))
    .with_for_update()
)

expired_completions: Select[Any] = (
    select(
        completions.c.job_id,
        completions.c.node,
        completions.c.attempt,
        completions.c.lease_token,
    )
    .where(
        completions.c.state == CompletionState.RUNNING.value,
        completions.c.lease_expires_at < utcnow(),
    )
    .limit(bindparam("limit"))
)

def _dead_or_stopped(completion: Any) -> Any:
    return completion.c.node.not_in(
        select(nodes.c.name).where(_node_alive(bindparam("node_timeout")))
    )


def _of_this_node(completion: Any) -> Any:
    return completion.c.node == bindparam("node_name")


def _open_completions_of(which: Any) -> Select[Any]:
    """Lock, in id order, the jobs that have open completions of these nodes."""
    completion = completions.alias("open_completion")
    owners = select(completion.c.job_id).where(
        completion.c.state.in_(OPEN_COMPLETIONS), which(completion)
    )
    return (
        select(jobs.c.id)
        .where(jobs.c.id.in_(owners))
        .order_by(jobs.c.id)
        .with_for_update()
    )


def _drop_completions(which: Any, reason: str) -> Update:
    return (
        update(completions)
        .where(
            completions.c.job_id.in_(bindparam("job_ids", expanding=True)),
            completions.c.state.in_(OPEN_COMPLETIONS),
            which(completions),
        )
        .values(
            state=CompletionState.DROPPED.value,
            finished_at=utcnow(),
            lease_token=None,
            lease_expires_at=None,
            last_error=reason,
        )
        .returning(completions.c.job_id, completions.c.node)
    )


lock_jobs_of_dead_nodes = _open_completions_of(_dead_or_stopped)
drop_completions_of_dead_nodes = _drop_completions(
    _dead_or_stopped, "node dropped: it stopped or its heartbeat expired"
)
"""A dead or stopped node no longer holds `all` jobs open. The jobs' rows are
locked first (lock_jobs_of_dead_nodes), as the locking conventions say."""

lock_jobs_of_node = _open_completions_of(_of_this_node)
drop_completions_of_node = _drop_completions(
    _of_this_node, "node dropped: it stopped before running the job"
)


# --- recording outcomes -----------------------------------------------------

lock_job: Select[Any] = (
    select(jobs.c.id, jobs.c.state).where(jobs.c.id == bindparam("job_id")).with_for_update()
)
"""Lock a job's row. Taken first by every transaction that changes an `all`
job's completions, so that the last one to finish sees all the others (a
separate statement: under READ COMMITTED, a later statement sees what the
lock holder committed)."""

_fence = and_(
    jobs.c.id == bindparam("job_id"),
    jobs.c.lease_token == bindparam("token"),
    jobs.c.state == RUNNING,
)

_release_lease = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}

finish_job: Update = (
    update(jobs)
    .where(_fence)
    .values(
        state=bindparam("state"),
        finished_at=utcnow(),
        last_error=bindparam("error"),
        **_release_lease,
    )
    .returning(jobs.c.schedule)
)
"""Record a final outcome, fenced by the lease token; no row: the lease is lost."""

retry_job: Update = (
    update(jobs)
    .where(_fence)
    .values(
        state=QUEUED,
        run_at=seconds_from_now(bindparam("delay")),
        last_error=bindparam("error"),
        **_release_lease,
    )
    .returning(jobs.c.id)
)

hand_back_job: Update = (
    update(jobs)
    .where(_fence)
    .values(
        state=QUEUED,
        attempt=jobs.c.attempt - 1,
        run_at=utcnow(),
        **_release_lease,
    )
    .returning(jobs.c.id)
)
"""Return an unfinished job at shutdown, with its attempt given back."""

_completion_fence = and_(
    completions.c.job_id == bindparam("completion_job"),
    completions.c.node == bindparam("node_name"),
    completions.c.lease_token == bindparam("token"),
    completions.c.state == CompletionState.RUNNING.value,
)

_release_completion_lease = {"lease_token": None, "lease_expires_at": None}

finish_completion: Update = (
    update(completions)
    .where(_completion_fence)
    .values(
        state=bindparam("state"),
        finished_at=utcnow(),
        last_error=bindparam("error"),
        **_release_completion_lease,
    )
    .returning(completions.c.job_id)
)

retry_completion: Update = (
    update(completions)
    .where(_completion_fence)
    .values(
        state=CompletionState.QUEUED.value,
        run_at=seconds_from_now(bindparam("delay")),
        last_error=bindparam("error"),
        **_release_completion_lease,
    )
    .returning(completions.c.job_id)
)

hand_back_completion: Update = (
    update(completions)
    .where(_completion_fence)
    .values(
        state=CompletionState.QUEUED.value,
        attempt=completions.c.attempt - 1,
        **_release_completion_lease,
    )
    .returning(completions.c.job_id)
)

_open_completions = (
    select(literal(1))
    .select_from(completions)
    .where(
        completions.c.job_id == jobs.c.id,
        completions.c.state.in_(OPEN_COMPLETIONS),
    )
)
_failed_completions = (
    select(literal(1))
    .select_from(completions)
    .where(
        completions.c.job_id == jobs.c.id,
        completions.c.state == CompletionState.FAILED.value,
    )
)

finish_all_job: Update = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job_id"),
        jobs.c.state == RUNNING,
        jobs.c.lease_expires_at.is_(None),
        ~exists(_open_completions),
    )
    .values(
        state=case(
            (exists(_failed_completions), JobState.FAILED.value),
            else_=JobState.SUCCEEDED.value,
        ),
        finished_at=utcnow(),
    )
    .returning(jobs.c.schedule)
)
"""Finish an `all` job once no node in its set has a run still open.

Failed if any node's run failed for good; succeeded otherwise (dropped nodes
do not count against it)."""

stranded_all_jobs: Select[Any] = (
    select(jobs.c.id)
    .where(
        jobs.c.state == RUNNING,
        jobs.c.lease_expires_at.is_(None),
        ~exists(_open_completions),
    )
    .limit(100)
)
"""`all` jobs whose every node is done but that were not finished (a backstop
for a worker that died between its last completion and the job's finish)."""


# --- periodic series ----------------------------------------------------------

#: The predicate of uq_dbtasks_jobs_series, for ON CONFLICT to name the index.
#: Literal SQL on purpose: with bound values, PostgreSQL can match the index
#: only while it plans with the values known; once psycopg prepares the
#: statement and the server switches to a generic plan (from about the tenth
#: execution on a connection) the INSERT fails with "no unique or exclusion
#: constraint matching the ON CONFLICT specification".
_SERIES_INDEX_WHERE = text(
    "state IN (" + ", ".join(f"'{state}'" for state in OPEN_STATES) + ")"
)


@functools.cache
def enqueue_next_in_series(dialect: str) -> Insert:
    """Enqueue the next job of a series at now + its schedule's frequency.

    Copies the finished job's task settings, so a worker that does not know the
    task (a rescuer) can continue the series. Does nothing when the schedule
    was retired, or when a job of the series is already queued or running.
    """
    finished = jobs.alias("finished")
    source = select(
        finished.c.task,
        finished.c.queue,
        finished.c.params,
        finished.c.priority,
        finished.c.max_attempts,
        finished.c.schedule,
        seconds_from_now(schedules.c.frequency),
        utcnow(),
    ).where(
        finished.c.id == bindparam("job_id"),
        schedules.c.task == finished.c.schedule,
    )
    columns = ["task", "queue", "params", "priority", "max_attempts", "schedule"]
    return (
        _insert(dialect)(jobs)
        .from_select([*columns, "run_at", "created_at"], source)
        .on_conflict_do_nothing(
            index_elements=[jobs.c.schedule],
            index_where=_SERIES_INDEX_WHERE,
        )
        .returning(jobs.c.id)
    )


mark_schedule_run: Update = (
    update(schedules)
    .where(schedules.c.task == bindparam("schedule_task"))
    .values(
        next_run_at=seconds_from_now(schedules.c.frequency),
        updated_at=utcnow(),
    )
)


@functools.cache
def create_schedule(dialect: str) -> Insert:
    """Create a periodic task's schedule, first due now; nothing if it exists."""
    return (
        _insert(dialect)(schedules)
        .values(
            task=bindparam("schedule_task"),
            frequency=bindparam("frequency"),
            next_run_at=utcnow(),
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[schedules.c.task])
        .returning(schedules.c.task)
    )


schedule_frequency: Select[Any] = (
    select(schedules.c.frequency)
    .where(schedules.c.task == bindparam("schedule_task"))
    .with_for_update()
)

change_frequency: Update = (
    update(schedules)
    .where(schedules.c.task == bindparam("schedule_task"))
    .values(
        frequency=bindparam("frequency"),
        next_run_at=add_seconds(schedules.c.next_run_at, bindparam("shift")),
        updated_at=utcnow(),
    )
)

def _queued_in_series(*conditions: Any) -> Any:
    """Ids of the series' queued jobs that no one has locked.

    For the two statements that change a series' jobs while holding its
    schedule row: they must never wait for a job row, since a finishing
    worker holds its job row while it waits for the schedule row. A locked
    queued job is being claimed, so it is no longer theirs to change.
    """
    queued = jobs.alias("queued")
    return (
        select(queued.c.id)
        .where(
            queued.c.schedule == bindparam("schedule_task"),
            queued.c.state == QUEUED,
            *(condition(queued) for condition in conditions),
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


retime_series_job: Update = (
    update(jobs)
    .where(jobs.c.id.in_(_queued_in_series(lambda queued: queued.c.attempt == 0)))
    .values(run_at=add_seconds(jobs.c.run_at, bindparam("shift")))
)
"""Move a queued series job by the change in frequency (its first attempt only;
a retry keeps its backoff)."""


@functools.cache
def ensure_series_job(dialect: str) -> Insert:
    """Enqueue a series job at its schedule's due time if none is open.

    The NOT EXISTS reads the snapshot and waits for no one. Without it, the
    unique index would check the open job a finishing worker is updating
    and wait for that worker, which may itself be waiting for the schedule
    row this transaction holds: a deadlock. ON CONFLICT still decides when
    two of these race for a series that has no open job.
    """
    series = jobs.alias("series")
    open_job = select(literal(1)).where(
        series.c.schedule == schedules.c.task,
        or_(*(series.c.state == state for state in OPEN_STATES)),
    )
    source = select(
        schedules.c.task,
        bindparam("series_queue"),
        literal("{}"),
        bindparam("series_priority"),
        bindparam("series_max_attempts"),
        schedules.c.task,
        schedules.c.next_run_at,
        utcnow(),
    ).where(schedules.c.task == bindparam("schedule_task"), ~exists(open_job))
    columns = ["task", "queue", "params", "priority", "max_attempts", "schedule"]
    return (
        _insert(dialect)(jobs)
        .from_select([*columns, "run_at", "created_at"], source)
        .on_conflict_do_nothing(
            index_elements=[jobs.c.schedule],
            index_where=_SERIES_INDEX_WHERE,
        )
        .returning(jobs.c.id)
    )


all_schedules: Select[Any] = select(schedules.c.task)

retire_schedule: Delete = delete(schedules).where(
    schedules.c.task == bindparam("schedule_task")
)

cancel_retired_series: Update = (
    update(jobs)
    .where(jobs.c.id.in_(_queued_in_series()))
    .values(
        state=JobState.CANCELLED.value,
        finished_at=utcnow(),
        last_error="schedule retired: no live node registers this periodic task",
    )
)


# --- idle sleep and retention --------------------------------------------------


def next_due(task_param: str = "tasks") -> Select[Any]:
    """The earliest due time among queued jobs this node could run."""
    return select(func.min(jobs.c.run_at)).where(
        jobs.c.state == QUEUED,
        jobs.c.queue.in_(bindparam("queues", expanding=True)),
        jobs.c.task.in_(bindparam(task_param, expanding=True)),
    )


next_due_job = next_due()

next_due_completion: Select[Any] = select(func.min(completions.c.run_at)).where(
    completions.c.node == bindparam("node_name"),
    completions.c.state == CompletionState.QUEUED.value,
)

_old = jobs.alias("old")
prune_jobs: Delete = delete(jobs).where(
    jobs.c.id.in_(
        select(_old.c.id)
        .where(
            _old.c.state.in_(FINISHED),
            _old.c.finished_at < seconds_from_now(-bindparam("retention")),
        )
        .limit(bindparam("limit"))
        .scalar_subquery()
    )
)
"""Delete a batch of jobs finished before the retention period (completions
go with them, ON DELETE CASCADE). Batched so no transaction holds many locks."""
