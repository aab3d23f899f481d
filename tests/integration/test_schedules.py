"""Schedules as workers start: one series per periodic task, re-timed on change."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from dbtasks import scheduler
from dbtasks.schema import jobs
from dbtasks.tasks import Registry, Task
from tests.conftest import sql


def _periodic(frequency: float) -> Registry:
    return Registry([Task(name="report", fn=lambda params, context: None,
                          frequency=frequency)])


def _series(engine):
    # Through the table's types, so run_at is an aware datetime on both databases.
    query = (
        select(jobs.c.id, jobs.c.state, jobs.c.run_at)
        .where(jobs.c.schedule == "report")
        .order_by(jobs.c.id)
    )
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def test_many_workers_starting_make_one_schedule_and_one_open_job(engine):
    for _ in range(3):
        with engine.begin() as conn:
            scheduler.sync_schedules(conn, _periodic(10))

    assert sql(engine, "SELECT task, frequency FROM dbtasks_schedules") == [
        ("report", 10.0)
    ]
    assert [state for _, state, _ in _series(engine)] == ["queued"]


def test_a_new_frequency_retimes_the_queued_job_by_the_difference(engine):
    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(10))
    ((job_id, _, due_before),) = _series(engine)

    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(30))

    assert sql(engine, "SELECT frequency FROM dbtasks_schedules") == [(30.0,)]
    ((same_job, state, due_after),) = _series(engine)
    assert (same_job, state) == (job_id, "queued")
    assert due_after - due_before == timedelta(seconds=20)


def test_the_same_frequency_leaves_the_queued_job_alone(engine):
    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(10))
    before = _series(engine)

    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(10))

    assert _series(engine) == before
