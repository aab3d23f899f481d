"""Schedules as workers start: one series per periodic task, re-timed on change."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from dbtasks import claim, scheduler
from dbtasks.outcomes import SUCCEEDED, Outcome, record
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
    # Due now, it was queued; 20 seconds later it waits again, scheduled.
    assert (same_job, state) == (job_id, "scheduled")
    assert due_after - due_before == timedelta(seconds=20)


def test_the_same_frequency_leaves_the_queued_job_alone(engine):
    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(10))
    before = _series(engine)

    with engine.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(10))

    assert _series(engine) == before


def test_workers_starting_while_a_series_runs_never_deadlock(engine_pg):
    """Starting workers lock a schedule, then add its job; a finishing run must
    take the same locks in the same order, or the two deadlock (PostgreSQL
    aborts one of them, and a worker that was starting exited)."""
    registries = [_periodic(0.001), _periodic(0.002)]
    with engine_pg.begin() as conn:
        scheduler.sync_schedules(conn, registries[0])
    errors: list[BaseException] = []
    finished = 0
    stop = time.monotonic() + 3

    def start_workers() -> None:
        turn = 0
        while time.monotonic() < stop and not errors:
            turn += 1
            try:
                with engine_pg.begin() as conn:
                    scheduler.sync_schedules(conn, registries[turn % 2])
            except DBAPIError as exc:
                errors.append(exc)

    def run_series() -> None:
        nonlocal finished
        while time.monotonic() < stop and not errors:
            try:
                with engine_pg.begin() as conn:
                    claim.promote_scheduled_jobs(conn, ["default"])
                    claimed = claim.claim_any_jobs(
                        conn, node="runner", token=uuid.uuid4().hex,
                        tasks=["report"], queues=["default"], limit=1, lease=30,
                    )
                for job in claimed:
                    with engine_pg.begin() as conn:
                        assert record(conn, job, Outcome(SUCCEEDED))
                    finished += 1
            except DBAPIError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=start_workers) for _ in range(2)]
    threads += [threading.Thread(target=run_series) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert finished > 20  # the series really ran while workers started
    open_jobs = [state for _, state, _ in _series(engine_pg)
                 if state in ("scheduled", "queued", "running")]
    assert len(open_jobs) == 1


def _claim_when_due(conn):
    """Claim the series' next job, waiting the millisecond until it is due."""
    for _ in range(1000):
        with conn.begin():
            claim.promote_scheduled_jobs(conn, ["default"])
            claimed = claim.claim_any_jobs(
                conn, node="runner", token=uuid.uuid4().hex, tasks=["report"],
                queues=["default"], limit=1, lease=30,
            )
        if claimed:
            return claimed[0]
        time.sleep(0.001)
    raise AssertionError("the series' next job never fell due")


def test_a_series_continues_run_after_run_on_one_connection(engine_pg):
    """The statements that add a series' next job stay valid once psycopg has
    prepared them and PostgreSQL plans them generically (after about ten
    runs on a connection); a bound value in ON CONFLICT's WHERE broke them."""
    with engine_pg.begin() as conn:
        scheduler.sync_schedules(conn, _periodic(0.001))

    with engine_pg.connect() as conn:
        for _ in range(25):
            job = _claim_when_due(conn)
            with conn.begin():
                assert record(conn, job, Outcome(SUCCEEDED))
                scheduler.ensure_series(conn, _periodic(0.001))

    states = [state for _, state, _ in _series(engine_pg)]
    assert states == ["succeeded"] * 25 + ["scheduled"]
