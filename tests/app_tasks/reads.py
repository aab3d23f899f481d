"""A task that reads the application's own table, for the enqueue tests."""

from __future__ import annotations

from sqlalchemy import select

from dbtasks import task
from tests.runs import app_engine, record_run, runs


@task(name="read_app_row")
def read_app_row(params, context):
    """Record the note of the application row `row_id`, as this task sees it."""
    with app_engine().connect() as conn:
        note = conn.execute(
            select(runs.c.note).where(runs.c.id == params["row_id"])
        ).scalar()
    record_run(context, "read", note=f"saw {note}")
