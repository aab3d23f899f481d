"""The test application's own table, where test tasks record each run.

Tasks write here through their own engine, in a transaction of their own, so
a run is counted even when its worker is killed before recording the job.
"""

from __future__ import annotations

import functools
import os

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.pool import NullPool

from dbtasks.clock import UtcDateTime, utcnow

app_metadata = MetaData()

runs = Table(
    "test_runs",
    app_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer),
    Column("task", String(200), nullable=False),
    Column("node", String(200), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("event", String(20), nullable=False),
    Column("note", String(200)),
    Column("at", UtcDateTime, nullable=False),
)


@functools.cache
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def app_engine() -> Engine:
    return _engine(os.environ["DBTASKS_DATABASE_URL"])


def record_run(context, event: str, note: str | None = None) -> None:  # noqa: ANN001
    """Record an event of this run, committed at once, with the database time."""
    with app_engine().begin() as conn:
        write_run(conn, context, event, note)


def write_run(
    conn, context, event: str, note: str | None = None  # noqa: ANN001
) -> None:
    """Write an event of this run on `conn`, in its transaction."""
    conn.execute(
        insert(runs).values(
            job_id=context.job_id,
            task=context.task,
            node=context.node,
            attempt=context.attempt,
            event=event,
            note=note,
            at=utcnow(),
        )
    )


def count_runs(engine: Engine, **where: object) -> int:
    query = select(func.count()).select_from(runs)
    for column, value in where.items():
        query = query.where(runs.c[column] == value)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()
