"""A one-second periodic task on three real workers, judged from the database.

The tasks live in tests/periodic_tasks. Every worker there runs all of them;
each test looks at its own task's rows only.

Times compared here all come from the database clock: the task writes its
start and end with it, and the next job's due time is the finish time (taken
after the end row) plus the frequency. So a next start can never precede the
previous end plus one second. The only tolerance is SQLite's: it keeps
milliseconds, and truncation may put two ordered times up to 1 ms apart the
wrong way.
"""

from __future__ import annotations

from itertools import pairwise

from sqlalchemy import select

from dbtasks.schema import jobs
from tests.conftest import PERIODIC_TASKS, sql, wait_for
from tests.runs import runs

FREQUENCY = 1.0

#: How late a run may start after it fell due, on a loaded two-core machine:
#: workers wake at the next due time, so this is claim latency, not polling.
LATENESS = 0.6


def start_three_workers(database_url, start_worker):
    workers = [
        start_worker(database_url, "--node", f"w{i}", tasks=PERIODIC_TASKS, wait=False)
        for i in range(3)
    ]
    for worker in workers:
        worker.wait_started()
    return workers


def run_rows(engine, task):
    """(job_id, attempt, event, at) of a task's runs, in the order written."""
    query = (
        select(runs.c.job_id, runs.c.attempt, runs.c.event, runs.c.at)
        .where(runs.c.task == task)
        .order_by(runs.c.id)
    )
    with engine.connect() as conn:
        return conn.execute(query).all()


def open_series_jobs(engine, task):
    return sql(
        engine,
        "SELECT count(*) FROM dbtasks_jobs WHERE schedule = :task "
        "AND state IN ('scheduled', 'queued', 'running')",
        task=task,
    )[0][0]


def finished_series_jobs(engine, task):
    """(id, state, attempt) of the series' finished jobs, oldest first."""
    return sql(
        engine,
        "SELECT id, state, attempt FROM dbtasks_jobs WHERE schedule = :task "
        "AND state NOT IN ('scheduled', 'queued', 'running') ORDER BY id",
        task=task,
    )


def clock_tolerance(database_url):
    return 0.001 if database_url.startswith("sqlite") else 0.0


def assert_each_next_job_due_a_frequency_after_the_last_finished(
    engine, database_url, task
):
    """The next job is enqueued in the transaction that records the previous
    outcome, at its finish time + the frequency: exactly so on PostgreSQL,
    where now() is the transaction's time; on SQLite the two statements read
    the clock separately, a few milliseconds apart at most."""
    query = (
        select(jobs.c.state, jobs.c.run_at, jobs.c.finished_at)
        .where(jobs.c.schedule == task)
        .order_by(jobs.c.id)
    )
    with engine.connect() as conn:
        series = conn.execute(query).all()
    assert len(series) >= 4
    for previous, following in pairwise(series):
        if previous.finished_at is None:
            break
        delay = (following.run_at - previous.finished_at).total_seconds()
        if database_url.startswith("postgresql"):
            assert delay == FREQUENCY
        else:
            assert FREQUENCY - 0.001 <= delay < FREQUENCY + 0.1


def test_a_one_second_series_keeps_its_cadence_on_three_workers(
    database_url, engine, start_worker
):
    start_three_workers(database_url, start_worker)
    samples = []

    def five_runs_finished():
        samples.append(open_series_jobs(engine, "every_second"))
        return len(finished_series_jobs(engine, "every_second")) >= 5

    wait_for(five_runs_finished, timeout=30, message="five runs of every_second")

    # From the first sample on (workers had started, so the schedule existed),
    # exactly one job of the series was queued or running, never none or two.
    assert samples and set(samples) == {1}

    finished = finished_series_jobs(engine, "every_second")
    assert [(state, attempt) for _, state, attempt in finished] == [
        ("succeeded", 1)
    ] * len(finished)
    complete = [job_id for job_id, _, _ in finished]

    # One run per due time: each finished job ran once, on its first attempt,
    # and the series' runs are in job order.
    rows = run_rows(engine, "every_second")
    for job_id in complete:
        assert _events(rows, job_id) == ["start", "end"]
    ids = list(dict.fromkeys(row.job_id for row in rows))
    assert ids[: len(complete)] == complete
    assert {row.attempt for row in rows} == {1}

    # Never overlapping, and each run starts the frequency after the previous
    # one ended, give or take the claim latency.
    starts = {row.job_id: row.at for row in rows if row.event == "start"}
    ends = {row.job_id: row.at for row in rows if row.event == "end"}
    slack = clock_tolerance(database_url)
    for previous, following in pairwise(complete):
        gap = (starts[following] - ends[previous]).total_seconds()
        assert FREQUENCY - slack <= gap < FREQUENCY + LATENESS, (previous, gap)
    assert_each_next_job_due_a_frequency_after_the_last_finished(
        engine, database_url, "every_second"
    )


def _events(rows, job_id):
    return [row.event for row in rows if row.job_id == job_id]


def test_a_failing_periodic_run_still_schedules_the_next(
    database_url, engine, start_worker
):
    start_three_workers(database_url, start_worker)

    wait_for(
        lambda: sql(
            engine,
            "SELECT count(*) FROM dbtasks_jobs WHERE schedule = 'fails_every_second' "
            "AND state = 'failed'",
        )[0][0]
        >= 3,
        timeout=30,
        message="three failed runs of fails_every_second",
    )

    failed = sql(
        engine,
        "SELECT id, attempt, last_error FROM dbtasks_jobs "
        "WHERE schedule = 'fails_every_second' AND state = 'failed' ORDER BY id",
    )
    for _, attempt, last_error in failed:
        assert attempt == 1
        assert last_error.endswith("RuntimeError: periodic run failed on purpose")
    assert open_series_jobs(engine, "fails_every_second") == 1
    assert_each_next_job_due_a_frequency_after_the_last_finished(
        engine, database_url, "fails_every_second"
    )

    rows = run_rows(engine, "fails_every_second")
    assert [row.job_id for row in rows][: len(failed)] == [id_ for id_, _, _ in failed]
    slack = clock_tolerance(database_url)
    for previous, following in pairwise(rows):
        gap = (following.at - previous.at).total_seconds()
        assert FREQUENCY - slack <= gap < FREQUENCY + LATENESS + 0.5, gap
