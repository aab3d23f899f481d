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
    ARRAY,
    JSON,
    BigInteger,
    Delete,
    Insert,
    Select,
    String,
    Text,
    Update,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    table,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement, Grouping
from sqlalchemy.sql.expression import FunctionElement

from dbtasks.clock import add_seconds, later_of, seconds_from_now, utcnow
from dbtasks.schema import (
    FINISHED_STATES,
    KEYED,
    NOTIFY_CHANNEL,
    OPEN_IN_SERIES,
    CompletionState,
    JobState,
    completions,
    jobs,
    nodes,
    schedules,
)

SCHEDULED = JobState.SCHEDULED.value
QUEUED = JobState.QUEUED.value
RUNNING = JobState.RUNNING.value
WAITING_STATES = (SCHEDULED, QUEUED)
OPEN_STATES = (SCHEDULED, QUEUED, RUNNING)
FINISHED = tuple(state.value for state in FINISHED_STATES)
OPEN_COMPLETIONS = (CompletionState.QUEUED.value, CompletionState.RUNNING.value)


class array_of(FunctionElement[Any]):  # noqa: N801 - reads as SQL
    """PostgreSQL's ARRAY(subquery): the subquery's rows as one array value."""

    inherit_cache = True


@compiles(array_of, "postgresql")
def _array_of_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    (subquery,) = element.clauses
    return f"ARRAY({compiler.process(subquery.element, **kw)})"


def row_address(table: Any) -> ColumnElement[Any]:
    """The physical address of a row of `table` (PostgreSQL's ctid).

    The claim and the promotion pick their rows, and lock them, in a
    subquery, then update them by address: a TID scan, the one plan that
    needs no statistics. By primary key, the server's generic plan for a
    table that was small or empty when the worker first ran the statement
    was a scan of the whole table, kept until the next ANALYZE, however
    large the table grew meanwhile. A row locked by the subquery keeps its
    address until this statement updates it; one that another transaction
    updated after this statement's snapshot is locked at its newest
    address, which the update then does not see: it stays queued, for the
    next claim (its lock goes with this statement's commit).
    """
    return column("ctid", _selectable=table)


def in_state(column: Any, *states: str) -> ColumnElement[bool]:
    """`column` holds one of `states`, with the states written into the SQL.

    Every partial index on the jobs table is on its state. PostgreSQL uses
    one only when it can prove the index's WHERE from the query's, which it
    cannot with a bound value once it plans a prepared statement generically:
    it would then plan the statement afresh at every run to use the index.
    """
    written = [literal_column(f"'{state}'") for state in states]
    if len(written) == 1:
        return column == written[0]
    return column.in_(written)


def state_for(run_at: Any) -> Any:
    """The state of a job waiting to run at `run_at`: scheduled until then,
    queued (due) from then on."""
    return case(
        (run_at > utcnow(), literal_column(f"'{SCHEDULED}'")),
        else_=literal_column(f"'{QUEUED}'"),
    )


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# --- enqueue ---------------------------------------------------------------


#: A NOTIFY that wakes idle nodes, and whether there are any to wake.
_wake_nodes = func.pg_notify(
    literal_column(f"'{NOTIFY_CHANNEL}'"), literal_column("''")
)
_idle_nodes = exists(select(literal_column("1")).where(nodes.c.idle))


def with_wakeup(dialect: str, insert: Insert) -> Any:
    """`insert`, which returns the ids of the jobs it adds, and on PostgreSQL
    a NOTIFY to idle nodes if it added any, in the same statement.

    The look at the nodes table is an uncorrelated subquery of the result:
    the server runs it once, and only when a first row comes out, so that
    a statement that adds nothing (an idempotency key that exists already)
    notifies no one. While no node is idle, nothing is sent: a NOTIFY takes
    a lock, server-wide, that every notifying commit waits for in turn, so a
    busy fleet's enqueues must not pay it. In the statement rather than in a
    trigger, which cost an enqueue several times as much (migration 0002).
    """
    if dialect != "postgresql":
        return insert
    added = insert.cte("added")
    # As text: pg_notify returns void, which drivers have no type for.
    woken = select(cast(_wake_nodes, Text)).where(_idle_nodes).scalar_subquery()
    return select(added.c.id, woken.label("woken"))


@functools.cache
def insert_job(dialect: str, *, with_run_at: bool, idempotent: bool) -> Any:
    """Insert one job, returning its id (nothing if its idempotency key exists).

    A `run_at` in the past is stored as now, so that an old due time does not
    jump ahead of jobs enqueued before it.
    """
    statement = _new_job(dialect, with_run_at)
    if idempotent:
        statement = statement.values(
            idempotency_key=bindparam("idempotency_key")
        ).on_conflict_do_nothing(
            index_elements=[jobs.c.idempotency_key], index_where=text(KEYED)
        )
    return with_wakeup(dialect, statement.returning(jobs.c.id))


def _new_job(dialect: str, with_run_at: bool) -> Insert:
    """The INSERT of one job. Only what varies from job to job is a bound
    value: each one costs every enqueue its conversion in the driver."""
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
        state=state_for(run_at) if with_run_at else literal_column(f"'{QUEUED}'"),
        run_at=run_at,
        created_at=utcnow(),
    )


@functools.cache
def insert_jobs(dialect: str, *, with_run_at: bool) -> Any:
    """Insert a batch of jobs that differ only in their params, in one statement.

    The params travel as one value (`params_json`), whatever the batch size:
    one round trip, and no limit on bound values (65,535 per statement on
    PostgreSQL). Rows go in, and take their ids, in the array's order; the
    caller sorts the returned ids to match them to the params.

    On PostgreSQL the value is a JSON array of the params themselves, and
    each job's params are its element's text, which the `json` type keeps
    as it was written: nothing is escaped twice, or unescaped. (A text
    array was worse still: psycopg escapes each element in Python, which
    took twice as long as the INSERT for 10,000 jobs; tools/benchmark.py,
    W1 bulk.) On SQLite it is an array of the params' texts, as strings.
    """
    if dialect == "postgresql":
        source = (
            func.json_array_elements(cast(bindparam("params_json", type_=Text), JSON))
            .table_valued("value", with_ordinality="position")
            .render_derived(name="batch")
        )
        position = source.c.position
        params = cast(source.c.value, Text)
    else:
        source = func.json_each(bindparam("params_json")).table_valued(
            "key", "value", name="batch"
        )
        position = source.c.key
        params = source.c.value
    run_at = (
        later_of(bindparam("run_at", type_=jobs.c.run_at.type), utcnow())
        if with_run_at
        else utcnow()
    )
    rows = (
        # Typed as their columns, so that PostgreSQL gets each value's type
        # in the SQL (::VARCHAR and the like) from every driver that casts.
        select(
            bindparam("task", type_=jobs.c.task.type),
            bindparam("queue", type_=jobs.c.queue.type),
            params,
            bindparam("priority", type_=jobs.c.priority.type),
            bindparam("max_attempts", type_=jobs.c.max_attempts.type),
            state_for(run_at) if with_run_at else literal_column(f"'{QUEUED}'"),
            run_at,
            utcnow(),
        )
        .select_from(source)
        .order_by(position)
    )
    columns = ["task", "queue", "params", "priority", "max_attempts", "state",
               "run_at", "created_at"]
    return with_wakeup(
        dialect, _insert(dialect)(jobs).from_select(columns, rows).returning(jobs.c.id)
    )


#: The job that holds an idempotency key, and its task.
job_by_idempotency_key: Select[Any] = select(jobs.c.id, jobs.c.task).where(
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


def _registration() -> dict[str, Any]:
    """What a node writes into its row when it starts, new or taken over."""
    return {
        "hostname": bindparam("hostname"),
        "pid": bindparam("pid"),
        "tasks": bindparam("tasks"),
        "queues": bindparam("queues"),
        "lifeline_key": bindparam("lifeline_key"),
        "registered_at": utcnow(),
        "heartbeat_at": utcnow(),
    }


@functools.cache
def register_node(dialect: str) -> Insert:
    """Add this node's row; returns no row if the name is taken (see take_over).

    Inserts that may do nothing return what they added: an INSERT's rowcount
    is not reliable across drivers (-1 with psycopg under SQLAlchemy 2.1)."""
    return (
        _insert(dialect)(nodes)
        .values(name=bindparam("node_name"), **_registration())
        .on_conflict_do_nothing(index_elements=[nodes.c.name])
        .returning(nodes.c.name)
    )


def _take_over_node(*condition: Any) -> Update:
    return (
        update(nodes)
        .where(nodes.c.name == bindparam("node_name"), *condition)
        .values(**_registration(), stopped_at=None)
    )


take_over_node = _take_over_node(
    or_(
        nodes.c.stopped_at.is_not(None),
        nodes.c.heartbeat_at <= seconds_from_now(-bindparam("node_timeout")),
    )
)
"""Reuse the row of a dead or stopped node of the same name; row count decides."""

take_over_node_of_gone_process = _take_over_node(
    nodes.c.hostname == bindparam("holder_hostname"),
    nodes.c.pid == bindparam("holder_pid"),
)
"""Reuse the row of a node whose process this host knows has ended, before
its heartbeat expires; unless another worker took the row meanwhile."""

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
    update(nodes)
    .where(nodes.c.name == bindparam("node_name"))
    .values(stopped_at=utcnow(), idle=False)
)

set_node_idle: Update = (
    update(nodes)
    .where(nodes.c.name == bindparam("node_name"))
    .values(idle=bindparam("idle"))
)
"""Say whether this node waits for work. While any node does, adding jobs
sends a NOTIFY (PostgreSQL, with_wakeup); while none does, enqueues pay
nothing for it. Written only when it changes."""

notify_idle_nodes: Select[Any] = select(_wake_nodes).where(_idle_nodes)
"""Wake idle nodes (PostgreSQL) about jobs that became claimable without a
new job (new jobs wake them by with_wakeup): a job queued again (retried,
rescued, handed back), or an `all` job's completions."""

clear_idle_of_dead_nodes: Update = (
    update(nodes)
    .where(nodes.c.idle, ~_node_alive(bindparam("node_timeout")))
    .values(idle=False)
)
"""A node that died while idle would make every enqueue notify for nothing."""


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
    .where(
        jobs.c.lease_owner == bindparam("node_name"),
        jobs.c.lease_token.in_(bindparam("tokens", expanding=True)),
        in_state(jobs.c.state, RUNNING),
    )
    .values(lease_expires_at=seconds_from_now(bindparam("lease")))
)
"""Extend the lease of every job this node runs, named by the lease tokens
the worker holds: not by owner alone, since a claim whose commit went
through while its reply was lost holds jobs the worker never learnt of, and
those must expire and be rescued rather than be renewed for ever."""

renew_completion_leases: Update = (
    update(completions)
    .where(
        completions.c.node == bindparam("node_name"),
        completions.c.lease_token.in_(bindparam("tokens", expanding=True)),
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
    .where(in_state(jobs.c.state, RUNNING), jobs.c.lease_expires_at < utcnow())
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
_pg_database = table(
    "pg_database", column("oid"), column("datname"), schema="pg_catalog"
)

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
        in_state(jobs.c.state, RUNNING),
        nodes.c.name != bindparam("rescuer"),
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
    .where(
        in_state(jobs.c.state, RUNNING),
        jobs.c.lease_owner == bindparam("node_name"),
    )
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
    select(jobs.c.id, jobs.c.state)
    .where(jobs.c.id == bindparam("job_id"))
    .with_for_update()
)
"""Lock a job's row. Taken first by every transaction that changes an `all`
job's completions, so that the last one to finish sees all the others (a
separate statement: under READ COMMITTED, a later statement sees what the
lock holder committed)."""

_fence = and_(
    jobs.c.id == bindparam("job_id"),
    jobs.c.lease_token == bindparam("token"),
    in_state(jobs.c.state, RUNNING),
)

_release_lease = {
    "lease_owner": null(),
    "lease_token": null(),
    "lease_expires_at": null(),
}

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

_succeeded = {
    "state": literal_column(f"'{JobState.SUCCEEDED.value}'"),
    "finished_at": utcnow(),
    "last_error": null(),
    **_release_lease,
}


@functools.cache
def finish_succeeded_jobs_postgresql() -> Update:
    """Record a batch of successes in one statement, each fenced by its token.

    The ids and their tokens travel as two arrays of the same order, so the
    statement's text is the same whatever the batch size and psycopg
    prepares it once; a job matches only with the token at its own position.
    Returns the rows it finished: a job missing from them was no longer this
    worker's.
    """
    ids = bindparam("ids", type_=ARRAY(BigInteger))
    tokens = Grouping(bindparam("tokens", type_=ARRAY(String)))
    return (
        update(jobs)
        .where(
            jobs.c.id == any_(ids),
            jobs.c.lease_token == tokens[func.array_position(ids, jobs.c.id)],
            in_state(jobs.c.state, RUNNING),
        )
        .values(_succeeded)
        .returning(jobs.c.id, jobs.c.schedule)
    )


@functools.cache
def finish_succeeded_jobs_sqlite() -> Update:
    """Record a batch of successes in one statement (SQLite: pairs in a VALUES
    list; the statement holds the write lock, so nothing changes under it)."""
    return (
        update(jobs)
        .where(
            tuple_(jobs.c.id, jobs.c.lease_token).in_(
                bindparam("done", expanding=True)
            ),
            in_state(jobs.c.state, RUNNING),
        )
        .values(_succeeded)
        .returning(jobs.c.id, jobs.c.schedule)
    )


retry_job: Update = (
    update(jobs)
    .where(_fence)
    .values(
        state=case(
            (bindparam("delay") > 0, literal_column(f"'{SCHEDULED}'")),
            else_=literal_column(f"'{QUEUED}'"),
        ),
        run_at=case(
            (bindparam("delay") > 0, seconds_from_now(bindparam("delay"))),
            else_=jobs.c.run_at,
        ),
        last_error=bindparam("error"),
        **_release_lease,
    )
    .returning(jobs.c.id)
)
"""Queue a job again after `delay` seconds. With no delay (a rescue) it keeps
its due time, and with it its place ahead of the jobs enqueued after it."""

hand_back_job: Update = (
    update(jobs)
    .where(_fence)
    .values(
        state=QUEUED,
        attempt=jobs.c.attempt - 1,
        **_release_lease,
    )
    .returning(jobs.c.id)
)
"""Return an unfinished job at shutdown, with its attempt given back and its
place in the queue kept (its due time is left as it was)."""

_completion_fence = and_(
    completions.c.job_id == bindparam("completion_job"),
    completions.c.node == bindparam("node_name"),
    completions.c.lease_token == bindparam("token"),
    completions.c.state == CompletionState.RUNNING.value,
)

_release_completion_lease = {"lease_token": null(), "lease_expires_at": null()}

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
        in_state(jobs.c.state, RUNNING),
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
        in_state(jobs.c.state, RUNNING),
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
_SERIES_INDEX_WHERE = text(OPEN_IN_SERIES)


@functools.cache
def enqueue_next_in_series(dialect: str) -> Any:
    """Enqueue the next job of a series at now + its schedule's frequency.

    Copies the finished job's task settings, so a worker that does not know the
    task (a rescuer) can continue the series. Does nothing when the schedule
    was retired, or when a job of the series is already queued or running.
    """
    finished = jobs.alias("finished")
    due = seconds_from_now(schedules.c.frequency)
    source = select(
        finished.c.task,
        finished.c.queue,
        finished.c.params,
        finished.c.priority,
        finished.c.max_attempts,
        finished.c.schedule,
        state_for(due),
        due,
        utcnow(),
    ).where(
        finished.c.id == bindparam("job_id"),
        schedules.c.task == finished.c.schedule,
    )
    columns = ["task", "queue", "params", "priority", "max_attempts", "schedule",
               "state"]
    return with_wakeup(
        dialect,
        _insert(dialect)(jobs)
        .from_select([*columns, "run_at", "created_at"], source)
        .on_conflict_do_nothing(
            index_elements=[jobs.c.schedule],
            index_where=_SERIES_INDEX_WHERE,
        )
        .returning(jobs.c.id),
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

def _waiting_in_series(*conditions: Any) -> Any:
    """Ids of the series' waiting (scheduled or queued) jobs no one has locked.

    For the two statements that change a series' jobs while holding its
    schedule row: they must never wait for a job row, since a finishing
    worker holds its job row while it waits for the schedule row. A locked
    waiting job is being claimed, so it is no longer theirs to change.
    """
    waiting = jobs.alias("waiting")
    return (
        select(waiting.c.id)
        .where(
            waiting.c.schedule == bindparam("schedule_task"),
            in_state(waiting.c.state, *WAITING_STATES),
            *(condition(waiting) for condition in conditions),
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


_retimed = add_seconds(jobs.c.run_at, bindparam("shift"))

retime_series_job: Update = (
    update(jobs)
    .where(
        jobs.c.id.in_(_waiting_in_series(lambda waiting: waiting.c.attempt == 0))
    )
    .values(run_at=_retimed, state=state_for(_retimed))
)
"""Move a waiting series job by the change in frequency (its first attempt
only; a retry keeps its backoff)."""


@functools.cache
def ensure_series_job(dialect: str) -> Any:
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
        in_state(series.c.state, *OPEN_STATES),
    )
    source = select(
        schedules.c.task,
        bindparam("series_queue"),
        literal("{}"),
        bindparam("series_priority"),
        bindparam("series_max_attempts"),
        schedules.c.task,
        state_for(schedules.c.next_run_at),
        schedules.c.next_run_at,
        utcnow(),
    ).where(schedules.c.task == bindparam("schedule_task"), ~exists(open_job))
    columns = ["task", "queue", "params", "priority", "max_attempts", "schedule",
               "state"]
    return with_wakeup(
        dialect,
        _insert(dialect)(jobs)
        .from_select([*columns, "run_at", "created_at"], source)
        .on_conflict_do_nothing(
            index_elements=[jobs.c.schedule],
            index_where=_SERIES_INDEX_WHERE,
        )
        .returning(jobs.c.id),
    )


all_schedules: Select[Any] = select(schedules.c.task)

retire_schedule: Delete = delete(schedules).where(
    schedules.c.task == bindparam("schedule_task")
)

cancel_retired_series: Update = (
    update(jobs)
    .where(jobs.c.id.in_(_waiting_in_series()))
    .values(
        state=JobState.CANCELLED.value,
        finished_at=utcnow(),
        last_error="schedule retired: no live node registers this periodic task",
    )
)


# --- idle sleep and retention --------------------------------------------------


@functools.cache
def next_due(queue_count: int) -> Select[Any]:
    """The database's time, then the earliest due time of this node's
    completions, then of the scheduled jobs of each of its queues (bound as
    queue_0, queue_1 ...). Queued jobs are due already: the claim takes them.

    Each queue's time is the first entry of ix_dbtasks_jobs_scheduled.
    """
    completion = select(func.min(completions.c.run_at)).where(
        completions.c.node == bindparam("node_name"),
        completions.c.state == CompletionState.QUEUED.value,
    )
    per_queue = [
        select(jobs.c.run_at)
        .where(
            in_state(jobs.c.state, SCHEDULED),
            jobs.c.queue == bindparam(f"queue_{number}"),
        )
        .order_by(jobs.c.run_at)
        .limit(1)
        .scalar_subquery()
        for number in range(queue_count)
    ]
    return select(utcnow(), completion.scalar_subquery(), *per_queue)


#: Scheduled jobs moved to queued per statement; more wait for the next one.
PROMOTE_BATCH = 1000


def due_scheduled_jobs(queue: Any, key: Any = None) -> Any:
    """Ids (or `key(row)`) of a queue's scheduled jobs whose time has come,
    earliest first, that no one else is moving (SKIP LOCKED)."""
    scheduled = jobs.alias("scheduled")
    return (
        select(scheduled.c.id if key is None else key(scheduled))
        .where(
            in_state(scheduled.c.state, SCHEDULED),
            scheduled.c.queue == queue,
            scheduled.c.run_at <= utcnow(),
        )
        .order_by(scheduled.c.run_at)
        .limit(literal_column(str(PROMOTE_BATCH)))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


@functools.cache
def promote_scheduled_jobs(dialect: str) -> Update:
    """Move a queue's due scheduled jobs to queued, where the claim finds them.

    Run by every claim, for the worker's queues, so a job due at a time
    reaches the claim's index when its time comes, whatever worker is busy.
    Returns the moved ids: other nodes are notified of them (the caller
    does), since they may be idle and not due to look.
    """
    queue = bindparam("promote_queue")
    if dialect == "postgresql":
        picked = due_scheduled_jobs(queue, row_address)
        where = row_address(jobs) == any_(array_of(picked))
    else:
        where = jobs.c.id.in_(due_scheduled_jobs(queue))
    return (
        update(jobs)
        .where(where)
        .values(state=literal_column(f"'{QUEUED}'"))
        .returning(jobs.c.id)
    )


PRUNE_BATCH = 1000
"""Jobs deleted per pruning transaction, so that none holds many locks."""

_old = jobs.alias("old")
prune_jobs: Delete = delete(jobs).where(
    jobs.c.id.in_(
        select(_old.c.id)
        .where(
            in_state(_old.c.state, *FINISHED),
            _old.c.finished_at < seconds_from_now(-bindparam("retention")),
        )
        # Oldest first, and a literal batch size: a generic plan cannot see
        # the cutoff and, with a parameter for a limit, guesses that a third
        # of the table qualifies, so it would scan the whole table (every
        # housekeeping pass, however little is old enough) where the
        # finished index finds the few rows past the cutoff at once.
        .order_by(_old.c.finished_at)
        .limit(literal_column(str(PRUNE_BATCH)))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
)
"""Delete a batch of jobs finished before the retention period (completions
go with them, ON DELETE CASCADE). Batched so no transaction holds many locks."""
