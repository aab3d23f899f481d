"""The queue's tables, defined once as SQLAlchemy Core `Table` objects.

Every table is prefixed `dbtasks_` so it never collides with the application's.
On PostgreSQL the tables may live in a schema of their own: they are defined
here without one, and `schema_translate_map` places them at run time.

The migrations under `migrations/versions/` are written by hand; a test checks
that upgrading an empty database gives exactly these tables.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    false,
    text,
)

from dbtasks.clock import UtcDateTime

PREFIX = "dbtasks_"

#: Alembic's version table for dbtasks, apart from the application's own.
VERSION_TABLE = "dbtasks_alembic_version"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class JobState(str, enum.Enum):
    """Where a job stands. The same words are used in SQL, logs and docs.

    `queued` jobs are due: their run_at has come. `scheduled` ones wait for
    it; the claim moves them to queued once it comes, so that the index the
    claim reads holds due jobs only (queries.promote_scheduled_jobs).
    """

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class CompletionState(str, enum.Enum):
    """Where one node's run of an `all` job stands.

    `dropped` means the node died or stopped before it ran the job, so it no
    longer holds the job open.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def _in_list(column: str, states: tuple[enum.Enum, ...]) -> str:
    values = ", ".join(f"'{state.value}'" for state in states)
    return f"{column} IN ({values})"


#: The predicates of the two unique partial indexes, which an INSERT's ON
#: CONFLICT must name word for word (as literal SQL: see queries.in_state).
KEYED = "idempotency_key IS NOT NULL"
OPEN_STATES = (JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING)
OPEN_IN_SERIES = "schedule IS NOT NULL AND " + _in_list("state", OPEN_STATES)

# The id is a rowid alias on SQLite (Integer primary key) and a bigint identity
# on PostgreSQL.
_id_type = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    f"{PREFIX}jobs",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("task", String(200), nullable=False),
    Column("queue", String(100), nullable=False, server_default="default"),
    Column("params", Text, nullable=False, server_default="{}"),
    Column("state", String(16), nullable=False, server_default="queued"),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("run_at", UtcDateTime, nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_token", String(32)),
    Column("lease_expires_at", UtcDateTime),
    # The task name of the periodic series this job belongs to, if any.
    Column("schedule", String(200)),
    Column("idempotency_key", String(200)),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("last_error", Text),
    # On SQLite only: on PostgreSQL they cost every write of a job the parse
    # of their expressions, and the values are the queue's own (see
    # migrations/versions/0002_lighter_job_writes.py).
    CheckConstraint(_in_list("state", tuple(JobState)), name="state").ddl_if(
        dialect="sqlite"
    ),
    CheckConstraint("attempt >= 0", name="attempt").ddl_if(dialect="sqlite"),
    CheckConstraint("max_attempts >= 1", name="max_attempts").ddl_if(
        dialect="sqlite"
    ),
    # Partial indexes leave out the rows they have no use for: each index a
    # row is in costs every claim and finish of it an entry more.
    Index(
        "uq_dbtasks_jobs_idempotency_key",
        "idempotency_key",
        unique=True,
        postgresql_where=text(KEYED),
        sqlite_where=text(KEYED),
    ),
    # The claim reads this index in order: queued jobs by queue, then priority,
    # then due time. Only due jobs are in it: jobs due later (scheduled) and
    # finished ones stay out, so neither a backlog of future jobs nor history
    # slows the claim.
    Index(
        "ix_dbtasks_jobs_due",
        "queue",
        "priority",
        "run_at",
        "id",
        postgresql_where=text("state = 'queued'"),
        sqlite_where=text("state = 'queued'"),
    ),
    # A queue's scheduled jobs by due time: which to move to queued, and when
    # an idle worker should next wake.
    Index(
        "ix_dbtasks_jobs_scheduled",
        "queue",
        "run_at",
        postgresql_where=text("state = 'scheduled'"),
        sqlite_where=text("state = 'scheduled'"),
    ),
    Index(
        "ix_dbtasks_jobs_lease",
        "lease_expires_at",
        postgresql_where=text("state = 'running'"),
        sqlite_where=text("state = 'running'"),
    ),
    # At most one open job (scheduled, queued or running) per periodic series,
    # by construction.
    Index(
        "uq_dbtasks_jobs_series",
        "schedule",
        unique=True,
        postgresql_where=text(OPEN_IN_SERIES),
        sqlite_where=text(OPEN_IN_SERIES),
    ),
    Index(
        "ix_dbtasks_jobs_finished",
        "finished_at",
        postgresql_where=text(_in_list("state", FINISHED_STATES)),
        sqlite_where=text(_in_list("state", FINISHED_STATES)),
    ),
)

completions = Table(
    f"{PREFIX}completions",
    metadata,
    Column(
        "job_id",
        _id_type,
        ForeignKey(f"{PREFIX}jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("node", String(200), primary_key=True),
    Column("state", String(16), nullable=False, server_default="queued"),
    Column("run_at", UtcDateTime, nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("lease_token", String(32)),
    Column("lease_expires_at", UtcDateTime),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("last_error", Text),
    CheckConstraint(_in_list("state", tuple(CompletionState)), name="state"),
    Index("ix_dbtasks_completions_node_state", "node", "state", "run_at"),
)

schedules = Table(
    f"{PREFIX}schedules",
    metadata,
    Column("task", String(200), primary_key=True),
    Column("frequency", Float, nullable=False),
    Column("next_run_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("frequency > 0", name="frequency"),
)

nodes = Table(
    f"{PREFIX}nodes",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    # JSON object of the tasks this node runs and their settings:
    # {"task name": {"scope": "any", "queue": ..., "max_attempts": ...}}.
    Column("tasks", Text, nullable=False),
    # JSON list of the queues this node serves.
    Column("queues", Text, nullable=False),
    Column("registered_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    Column("stopped_at", UtcDateTime),
    # PostgreSQL: the advisory lock this node holds on its lifeline connection
    # while it lives (see lifeline.Lifeline); NULL on SQLite or without one.
    Column("lifeline_key", BigInteger),
    # True while the node waits for work: on PostgreSQL a statement that
    # adds jobs sends a NOTIFY only if some node is idle (queries.with_wakeup).
    Column("idle", Boolean, nullable=False, server_default=false()),
)

schema_info = Table(
    f"{PREFIX}schema_info",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", String(200), nullable=False),
)
"""Facts about the schema that older code must be able to read.

`compatible_from`: the oldest revision whose code can still run on this
schema. A migration that older code survives (a new index, a new nullable
column) leaves it; one that breaks older code moves it to itself. Code that
finds the schema at a revision it does not know runs if it knows this one
(migrate.check_revision)."""

#: The notification sent on PostgreSQL when jobs are added and a node is idle.
NOTIFY_CHANNEL = "dbtasks_jobs"
