"""Create the queue's tables: jobs, completions, schedules, nodes, schema info.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Timestamps: timestamptz on PostgreSQL, sortable UTC text on SQLite (see
# dbtasks/clock.py). Written out here so this revision never changes.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JOB_STATES = (
    "state IN ('scheduled', 'queued', 'running', 'succeeded', 'failed', 'cancelled')"
)
COMPLETION_STATES = (
    "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dropped')"
)
FINISHED = "state IN ('succeeded', 'failed', 'cancelled')"


def _partial(where: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}


def upgrade() -> None:
    op.create_table(
        "dbtasks_jobs",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False, server_default="default"),
        sa.Column("params", sa.Text, nullable=False, server_default="{}"),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("run_at", TIMESTAMP, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", TIMESTAMP),
        sa.Column("schedule", sa.String(200)),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_dbtasks_jobs"),
        sa.CheckConstraint(JOB_STATES, name=op.f("ck_dbtasks_jobs_state")),
        sa.CheckConstraint("attempt >= 0", name=op.f("ck_dbtasks_jobs_attempt")),
        sa.CheckConstraint(
            "max_attempts >= 1", name=op.f("ck_dbtasks_jobs_max_attempts")
        ),
    )
    op.create_index(
        "uq_dbtasks_jobs_idempotency_key",
        "dbtasks_jobs",
        ["idempotency_key"],
        unique=True,
        **_partial("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_dbtasks_jobs_due",
        "dbtasks_jobs",
        ["queue", "priority", "run_at", "id"],
        **_partial("state = 'queued'"),
    )
    op.create_index(
        "ix_dbtasks_jobs_scheduled",
        "dbtasks_jobs",
        ["queue", "run_at"],
        **_partial("state = 'scheduled'"),
    )
    op.create_index(
        "ix_dbtasks_jobs_lease",
        "dbtasks_jobs",
        ["lease_expires_at"],
        **_partial("state = 'running'"),
    )
    op.create_index(
        "uq_dbtasks_jobs_series",
        "dbtasks_jobs",
        ["schedule"],
        unique=True,
        **_partial(
            "schedule IS NOT NULL AND state IN ('scheduled', 'queued', 'running')"
        ),
    )
    op.create_index(
        "ix_dbtasks_jobs_finished",
        "dbtasks_jobs",
        ["finished_at"],
        **_partial(FINISHED),
    )

    op.create_table(
        "dbtasks_completions",
        sa.Column("job_id", ID, nullable=False),
        sa.Column("node", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("run_at", TIMESTAMP, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", TIMESTAMP),
        sa.Column("started_at", TIMESTAMP),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("job_id", "node", name="pk_dbtasks_completions"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["dbtasks_jobs.id"],
            name="fk_dbtasks_completions_job_id_dbtasks_jobs",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            COMPLETION_STATES, name=op.f("ck_dbtasks_completions_state")
        ),
    )
    op.create_index(
        "ix_dbtasks_completions_node_state",
        "dbtasks_completions",
        ["node", "state", "run_at"],
    )

    op.create_table(
        "dbtasks_schedules",
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("frequency", sa.Float, nullable=False),
        sa.Column("next_run_at", TIMESTAMP, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("task", name="pk_dbtasks_schedules"),
        sa.CheckConstraint(
            "frequency > 0", name=op.f("ck_dbtasks_schedules_frequency")
        ),
    )

    op.create_table(
        "dbtasks_nodes",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("tasks", sa.Text, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("registered_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.Column("stopped_at", TIMESTAMP),
        sa.Column("lifeline_key", sa.BigInteger),
        sa.Column("idle", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("name", name="pk_dbtasks_nodes"),
    )

    info = op.create_table(
        "dbtasks_schema_info",
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_dbtasks_schema_info"),
    )
    op.bulk_insert(info, [{"key": "compatible_from", "value": revision}])

    if op.get_bind().dialect.name == "postgresql":
        _postgresql_only()


def _postgresql_only() -> None:
    schema = context.config.attributes.get("schema")
    prefix = f'"{schema}".' if schema else ""
    # Finished rows are updated once and deleted by retention: leave room on
    # each page for those updates, and vacuum the busy table early and often.
    op.execute(
        f"ALTER TABLE {prefix}dbtasks_jobs SET (fillfactor = 80, "
        "autovacuum_vacuum_scale_factor = 0.02, "
        "autovacuum_analyze_scale_factor = 0.02)"
    )
    # Wake idle workers when jobs are inserted: one NOTIFY per statement, and
    # none while every worker is busy, since NOTIFY takes a lock that every
    # notifying commit in the cluster waits on.
    op.execute(
        f"""
        CREATE FUNCTION {prefix}dbtasks_notify_jobs() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM {prefix}dbtasks_nodes WHERE idle) THEN
                PERFORM pg_notify('dbtasks_jobs', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"CREATE TRIGGER dbtasks_notify_jobs AFTER INSERT ON {prefix}dbtasks_jobs "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}dbtasks_notify_jobs()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        schema = context.config.attributes.get("schema")
        prefix = f'"{schema}".' if schema else ""
        op.execute(f"DROP TRIGGER dbtasks_notify_jobs ON {prefix}dbtasks_jobs")
        op.execute(f"DROP FUNCTION {prefix}dbtasks_notify_jobs()")
    op.drop_table("dbtasks_schema_info")
    op.drop_table("dbtasks_nodes")
    op.drop_table("dbtasks_schedules")
    op.drop_table("dbtasks_completions")
    op.drop_table("dbtasks_jobs")
