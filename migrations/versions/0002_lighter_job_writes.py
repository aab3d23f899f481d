"""Lighter job writes on PostgreSQL: no CHECK constraints, no trigger.

PostgreSQL parses a table's CHECK constraints again for every statement that
writes the table, and runs a trigger's function after every INSERT. On the
jobs table, written by every enqueue, claim and finish, the three CHECK
constraints and the NOTIFY trigger took about a fifth of the server's time
for a one-job enqueue (tools/benchmark.py, W1, measured with perf).

- The CHECK constraints went: the values are the queue's own. States are
  written only as the literals of schema.JobState, attempts only by the
  claim (+1) and a hand-back (-1, after the claim's +1), and max_attempts is
  checked by enqueue before it writes. SQLite keeps them (its checks are
  cheap).
- The trigger went: the statements that insert jobs wake idle workers
  themselves (queries.with_wakeup), at the cost of one look at the nodes
  table in the same statement.

Code of revision 0001 runs on this schema, so compatible_from stays 0001:
during a rolling deploy, jobs that the older release enqueues wake no idle
worker, which finds them at its next poll instead.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Written out here so this revision never changes.
CHECKS = {
    "ck_dbtasks_jobs_state": (
        "state IN ('scheduled', 'queued', 'running', 'succeeded', 'failed', "
        "'cancelled')"
    ),
    "ck_dbtasks_jobs_attempt": "attempt >= 0",
    "ck_dbtasks_jobs_max_attempts": "max_attempts >= 1",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    prefix = _schema_prefix()
    op.execute(f"DROP TRIGGER dbtasks_notify_jobs ON {prefix}dbtasks_jobs")
    op.execute(f"DROP FUNCTION {prefix}dbtasks_notify_jobs()")
    for name in CHECKS:
        op.drop_constraint(op.f(name), "dbtasks_jobs", type_="check")


def downgrade() -> None:
    """Put back what 0001 made, written out again here: a revision never
    reads another's code, which may change."""
    if op.get_bind().dialect.name != "postgresql":
        return
    prefix = _schema_prefix()
    for name, condition in CHECKS.items():
        op.create_check_constraint(op.f(name), "dbtasks_jobs", condition)
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


def _schema_prefix() -> str:
    schema = context.config.attributes.get("schema")
    return f'"{schema}".' if schema else ""
