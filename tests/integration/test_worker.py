"""Real `dbtasks worker` processes running jobs: outcomes, faults raised inside
tasks, timeouts, unknown tasks and node names. Every verdict is read from the
database: job rows, and the test_runs rows the tasks write as they run."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from dbtasks import enqueue, enqueue_many
from dbtasks.clock import utcnow
from dbtasks.schema import completions, jobs
from dbtasks.worker import SUCCESS_LINES_PER_SECOND
from tests.app_tasks import basic, faults
from tests.conftest import PERIODIC_TASKS, sql, wait_for
from tests.runs import runs

JOBS = 2000


def job_row(engine, job_id):
    return sql(
        engine,
        "SELECT state, attempt, lease_owner, last_error FROM dbtasks_jobs "
        "WHERE id = :id",
        id=job_id,
    )[0]


def wait_for_state(engine, job_id, state, timeout=30.0):
    wait_for(
        lambda: job_row(engine, job_id).state == state,
        timeout,
        message=f"job {job_id} to be {state}",
    )


def run_events(engine, job_id):
    """(node, attempt, event) of every run of a job, in the order written."""
    return sql(
        engine,
        "SELECT node, attempt, event FROM test_runs WHERE job_id = :id ORDER BY id",
        id=job_id,
    )


def run_times(engine, job_id, event="start"):
    """Database times of a job's `event` rows, as aware datetimes on both."""
    query = (
        select(runs.c.at)
        .where(runs.c.job_id == job_id, runs.c.event == event)
        .order_by(runs.c.id)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalars().all()


def db_now(engine, minus=0.0):
    """The database's time, less `minus` seconds."""
    with engine.connect() as conn:
        return conn.execute(select(utcnow())).scalar_one() - timedelta(seconds=minus)


def clock_tolerance(database_url):
    """SQLite keeps timestamps to the millisecond, so two of them taken in
    order may compare up to 1 ms out of order; PostgreSQL keeps microseconds."""
    return 0.001 if database_url.startswith("sqlite") else 0.0


# --- throughput -------------------------------------------------------------


def test_four_workers_run_every_job_exactly_once(database_url, engine, start_worker):
    with engine.begin() as conn:
        ids = [enqueue(conn, faults.tick) for _ in range(JOBS)]
    workers = [start_worker(database_url, wait=False) for _ in range(4)]
    for worker in workers:
        worker.wait_started()

    wait_for(
        lambda: sql(
            engine,
            "SELECT count(*) FROM dbtasks_jobs "
            "WHERE state IN ('scheduled', 'queued', 'running')",
        )
        == [(0,)],
        timeout=120,
        interval=0.2,
        message="the queue to drain",
    )

    assert sql(
        engine, "SELECT state, attempt, count(*) FROM dbtasks_jobs GROUP BY 1, 2"
    ) == [("succeeded", 1, JOBS)]
    assert sql(
        engine, "SELECT job_id, count(*) FROM test_runs GROUP BY job_id ORDER BY 1"
    ) == [(job_id, 1) for job_id in ids]
    assert all(worker.process.poll() is None for worker in workers)


# --- outcomes ---------------------------------------------------------------


def test_failures_are_retried_with_backoff_then_fail_with_the_traceback(
    database_url, engine, start_worker
):
    with engine.begin() as conn:
        job_id = enqueue(conn, faults.fail_three_times)
    start_worker(database_url)

    wait_for_state(engine, job_id, "failed")

    row = job_row(engine, job_id)
    assert (row.attempt, row.lease_owner) == (3, None)
    assert row.last_error.startswith("Traceback (most recent call last):")
    assert 'faults.py", line' in row.last_error
    assert row.last_error.endswith("RuntimeError: attempt 3 failed on purpose")
    assert [attempt for _, attempt, _ in run_events(engine, job_id)] == [1, 2, 3]

    # Backoff after attempt n is drawn from [2^n / 2, 2^n] seconds: [1, 2], then
    # [2, 4]. The next start comes after the failure was recorded plus that delay.
    first, second, third = run_times(engine, job_id)
    slack = clock_tolerance(database_url)
    assert 1.0 - slack <= (second - first).total_seconds() < 2.0 + 1.5
    assert 2.0 - slack <= (third - second).total_seconds() < 4.0 + 1.5


def test_retry_runs_again_and_counts_an_attempt(database_url, engine, start_worker):
    with engine.begin() as conn:
        recovers = enqueue(conn, basic.retry_once)
        never_recovers = enqueue(conn, faults.retry_always)
    start_worker(database_url)

    wait_for_state(engine, recovers, "succeeded")
    wait_for_state(engine, never_recovers, "failed")

    assert job_row(engine, recovers)[1:] == (2, None, None)
    assert [a for _, a, _ in run_events(engine, recovers)] == [1, 2]
    failed = job_row(engine, never_recovers)
    assert failed.attempt == 2
    assert failed.last_error.endswith("Retry: not yet")
    assert [a for _, a, _ in run_events(engine, never_recovers)] == [1, 2]


def test_cancel_ends_the_job_at_once(database_url, engine, start_worker):
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.cancel_me, max_attempts=5)
    start_worker(database_url)

    wait_for_state(engine, job_id, "cancelled")

    assert job_row(engine, job_id)[1:] == (1, None, "not needed any more")


@pytest.mark.parametrize("task", [faults.exits_with_code, faults.interrupts])
def test_sys_exit_and_keyboard_interrupt_fail_the_job_not_the_worker(
    database_url, engine, start_worker, task
):
    worker = start_worker(database_url, "--concurrency", "1")
    with engine.begin() as conn:
        crashing = enqueue(conn, task)
        after = [enqueue(conn, faults.tick) for _ in range(3)]

    for job_id in after:
        wait_for_state(engine, job_id, "succeeded")

    row = job_row(engine, crashing)
    assert (row.state, row.attempt) == ("failed", 1)
    last_line = row.last_error.rsplit("\n", 1)[-1]
    assert last_line == {
        "exits_with_code": "SystemExit: 4",
        "interrupts": "KeyboardInterrupt",
    }[task.name]
    assert worker.process.poll() is None


def test_sys_exit_in_an_async_task_fails_only_that_job(
    pg_url, engine_pg, start_worker
):
    # The bug is in the worker, not the database: PostgreSQL alone is enough.
    worker = start_worker(pg_url)
    with engine_pg.begin() as conn:
        crashing = enqueue(conn, faults.async_exits)
        after = enqueue(conn, basic.record_async)

    wait_for_state(engine_pg, crashing, "failed", timeout=8)
    wait_for_state(engine_pg, after, "succeeded", timeout=8)

    assert job_row(engine_pg, crashing).last_error.endswith("SystemExit: 5")
    assert worker.process.poll() is None


def test_async_tasks_run_concurrently_on_one_worker(
    database_url, engine, start_worker
):
    with engine.begin() as conn:
        ids = [enqueue(conn, basic.record_async, {"sleep": 0.5}) for _ in range(5)]
    start_worker(database_url)

    for job_id in ids:
        wait_for_state(engine, job_id, "succeeded")

    events = sql(engine, "SELECT event FROM test_runs ORDER BY at, id")
    assert [event for (event,) in events] == ["start"] * 5 + ["end"] * 5
    for job_id in ids:
        assert job_row(engine, job_id).attempt == 1
        assert [event for _, _, event in run_events(engine, job_id)] == [
            "start",
            "end",
        ]


# --- timeouts ---------------------------------------------------------------


@pytest.mark.parametrize("task", [basic.short_timeout, basic.short_timeout_async])
def test_a_timeout_is_a_failed_attempt_and_frees_the_slot(
    database_url, engine, start_worker, task
):
    # One slot: the tick can only run if the timed-out run gave its slot back.
    start_worker(database_url, "--concurrency", "1")
    with engine.begin() as conn:
        late = enqueue(conn, task, {"sleep": 3}, max_attempts=2)
        tick = enqueue(conn, faults.tick)

    wait_for_state(engine, tick, "succeeded")
    wait_for_state(engine, late, "failed")

    row = job_row(engine, late)
    assert row.attempt == 2
    assert [(a, e) for _, a, e in run_events(engine, late)] == [
        (1, "start"),
        (2, "start"),
    ]
    assert row.last_error.endswith(
        f"TimeoutError: task {task.name} ran past its timeout of 0.5s"
    )
    [first_start] = run_times(engine, late)[:1]
    [tick_run] = run_times(engine, tick, "run")
    assert (tick_run - first_start).total_seconds() < 3.0


def test_an_async_task_that_ends_past_its_timeout_has_failed(
    database_url, engine, start_worker
):
    """It blocked the loop past its timeout and then returned: no cancellation
    could reach it, and its return is not a success."""
    start_worker(database_url)
    with engine.begin() as conn:
        late = enqueue(conn, basic.blocking_async, {"sleep": 0.8})

    wait_for_state(engine, late, "failed")
    assert job_row(engine, late).last_error.endswith(
        "TimeoutError: task blocking_async ran past its timeout of 0.5s"
    )


@pytest.mark.parametrize("task", [basic.stubborn_async, basic.blocking_async])
def test_an_async_task_that_will_not_stop_at_its_timeout_is_failed_anyway(
    database_url, engine, start_worker, task
):
    worker = start_worker(database_url, "--concurrency", "1")
    with engine.begin() as conn:
        late = enqueue(conn, task, {"sleep": 4})
        tick = enqueue(conn, faults.tick)

    wait_for_state(engine, late, "failed")
    wait_for_state(engine, tick, "succeeded")

    row = job_row(engine, late)
    assert row.attempt == 1
    assert row.last_error.endswith(
        f"TimeoutError: task {task.name} ran past its timeout of 0.5s"
    )
    # The slot came back after the timeout and its grace, not at the task's end.
    [started] = run_times(engine, late)
    [tick_run] = run_times(engine, tick, "run")
    assert (tick_run - started).total_seconds() < 3.0
    worker.wait_for_output(f"job {late} timed out; it did not end when cancelled")


def test_a_thread_a_task_left_running_does_not_keep_a_stopped_worker_alive(
    database_url, engine, start_worker
):
    """Python waits for such threads before it exits; the worker would then
    live on, running its handed-back jobs beside their next attempt."""
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.leaves_thread)
    worker = start_worker(database_url)
    wait_for_state(engine, job_id, "succeeded")

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0
    assert "exiting without waiting for 1 thread(s) tasks left running: " \
        "left-behind" in worker.output


# --- logging ----------------------------------------------------------------


def test_a_busy_worker_logs_some_successes_one_by_one_and_counts_the_rest(
    pg_url, engine_pg, start_worker
):
    with engine_pg.begin() as conn:
        enqueue_many(conn, basic.noop, [{}] * 1000)
    worker = start_worker(pg_url)
    wait_for(lambda: sql(engine_pg, "SELECT count(*) FROM dbtasks_jobs "
                         "WHERE state = 'succeeded'") == [(1000,)],
             message="the 1,000 jobs to succeed")
    worker.signal(signal.SIGTERM)
    worker.wait()

    lines = worker.output.splitlines()
    one_by_one = [line for line in lines if " succeeded in " in line]
    counted = [int(match.group(1)) for line in lines
               if (match := re.search(r"INFO .*: (\d+) more jobs succeeded", line))]
    assert len(one_by_one) + sum(counted) == 1000
    assert counted  # 1,000 no-op jobs take well under 50 seconds
    # At most SUCCESS_LINES_PER_SECOND a second; a second of the worker's
    # straddles two seconds of the log's clock.
    per_log_second = Counter(line[:19] for line in one_by_one)
    assert max(per_log_second.values()) <= 2 * SUCCESS_LINES_PER_SECOND


# --- unknown tasks ----------------------------------------------------------


def test_a_job_of_an_unknown_task_waits_for_a_worker_that_knows_it(
    database_url, engine, start_worker
):
    start_worker(database_url)
    with engine.begin() as conn:
        unknown = enqueue(conn, "deployed_later", not_yet_deployed=True)
        ticks = [enqueue(conn, faults.tick) for _ in range(5)]

    # The older job is first in line; the worker ran the newer ones around it.
    for job_id in ticks:
        wait_for_state(engine, job_id, "succeeded")
    assert job_row(engine, unknown) == ("queued", 0, None, None)

    knows = start_worker(database_url, "--node", "knows-it", tasks=PERIODIC_TASKS)
    wait_for_state(engine, unknown, "succeeded")

    assert job_row(engine, unknown)[:2] == ("succeeded", 1)
    assert run_events(engine, unknown) == [("knows-it", 1, "run")]
    assert knows.process.poll() is None


# --- node names -------------------------------------------------------------


def test_a_second_worker_refuses_a_node_name_in_use(
    database_url, engine, start_worker
):
    first = start_worker(database_url, "--node", "shared")
    second = start_worker(database_url, "--node", "shared", wait=False)

    wait_for(
        lambda: second.process.poll() is not None or " started:" in second.output,
        message="the second worker to exit or start",
    )
    assert second.process.poll() == 2
    assert "node name 'shared' is in use by a live worker" in second.output
    assert f"pid {first.process.pid}" in second.output

    with engine.begin() as conn:
        job_id = enqueue(conn, faults.tick)
    wait_for_state(engine, job_id, "succeeded")
    assert run_events(engine, job_id) == [("shared", 1, "run")]
    assert sql(engine, "SELECT name, pid, stopped_at FROM dbtasks_nodes") == [
        ("shared", first.process.pid, None)
    ]
    assert first.process.poll() is None


def test_a_node_name_is_taken_over_once_its_holder_is_dead(
    database_url, engine, start_worker
):
    first = start_worker(database_url, "--node", "shared", "--lease", "2")
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 1})
    wait_for(lambda: run_events(engine, job_id), message="the first run to start")
    first.kill()
    wait_for(
        lambda: sql(
            engine,
            "SELECT count(*) FROM dbtasks_nodes WHERE heartbeat_at < :cutoff",
            cutoff=db_now(engine, minus=2.0),
        )
        == [(1,)],
        message="the dead holder's heartbeat to expire",
    )

    second = start_worker(database_url, "--node", "shared", "--lease", "2")
    wait_for_state(engine, job_id, "succeeded")

    assert job_row(engine, job_id)[:2] == ("succeeded", 2)
    assert run_events(engine, job_id) == [
        ("shared", 1, "start"),
        ("shared", 2, "start"),
        ("shared", 2, "end"),
    ]
    assert sql(engine, "SELECT pid, stopped_at FROM dbtasks_nodes") == [
        (second.process.pid, None)
    ]




def test_a_worker_restarted_in_place_after_a_crash_takes_its_name_at_once(
    database_url, engine, start_worker
):
    """As systemd restarts a crashed worker: same name, same host, at once,
    long before the dead one's heartbeat (a 60-second lease) expires."""
    first = start_worker(database_url, "--node", "fixed", "--lease", "60")
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 1})
    wait_for(lambda: run_events(engine, job_id), message="the first run to start")
    first.kill()

    second = start_worker(database_url, "--node", "fixed", "--lease", "60")
    wait_for_state(engine, job_id, "succeeded", timeout=15)

    assert run_events(engine, job_id) == [
        ("fixed", 1, "start"),
        ("fixed", 2, "start"),
        ("fixed", 2, "end"),
    ]
    assert sql(engine, "SELECT pid, stopped_at FROM dbtasks_nodes") == [
        (second.process.pid, None)
    ]
    second.wait_for_output(
        f"rescued job {job_id} (record) from node fixed, queued again: the worker "
        "running this job ended: a new worker took over its node name"
    )


# --- retention --------------------------------------------------------------


def test_finished_jobs_past_retention_are_pruned_and_nothing_else(
    database_url, engine, start_worker
):
    """More old jobs than one pruning batch, of every finished state, with an
    `all` job's completions; beside them a recent finished job and an old
    open one, which must stay."""
    old = db_now(engine, minus=7200)
    recent = db_now(engine, minus=60)
    old_states = ["succeeded", "failed", "cancelled"] * 1000
    with engine.begin() as conn:
        conn.execute(
            jobs.insert(),
            [
                {"task": "noop", "state": state, "run_at": old, "attempt": 1,
                 "max_attempts": 1, "created_at": old, "finished_at": old}
                for state in old_states
            ],
        )
        broadcast_id = conn.execute(
            jobs.insert().returning(jobs.c.id),
            {"task": "broadcast", "state": "succeeded", "run_at": old,
             "attempt": 1, "max_attempts": 1, "created_at": old, "finished_at": old},
        ).scalar_one()
        conn.execute(
            completions.insert(),
            [{"job_id": broadcast_id, "node": node, "state": "succeeded",
              "run_at": old, "finished_at": old} for node in ("a", "b")],
        )
        kept_finished = conn.execute(
            jobs.insert().returning(jobs.c.id),
            {"task": "noop", "state": "succeeded", "run_at": recent, "attempt": 1,
             "max_attempts": 1, "created_at": recent, "finished_at": recent},
        ).scalar_one()
    with engine.begin() as conn:
        # Queued since long ago, for a task no worker here knows: never run,
        # never finished, so never pruned.
        kept_open = enqueue(conn, "not_deployed_yet", not_yet_deployed=True)
        conn.execute(jobs.update().where(jobs.c.id == kept_open).values(run_at=old))

    start_worker(database_url, "--retention", "3600")

    wait_for(
        lambda: sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(2,)],
        timeout=30,
        message="the old finished jobs to be pruned",
    )
    assert sql(engine, "SELECT id, state FROM dbtasks_jobs ORDER BY id") == [
        (kept_finished, "succeeded"),
        (kept_open, "queued"),
    ]
    assert sql(engine, "SELECT count(*) FROM dbtasks_completions") == [(0,)]


def test_a_logged_duration_is_the_run_s_not_the_wait_to_record_it(
    pg_url, engine_pg, start_worker
):
    """An outage, or a lock, can hold up the recording for long after the run."""
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, basic.nap, {"sleep": 0.5})
    worker = start_worker(pg_url)
    wait_for_state(engine_pg, job_id, "running")

    # The run ends while this lock holds its recording up for three seconds.
    with engine_pg.begin() as conn:
        conn.execute(text("SELECT 1 FROM dbtasks_jobs WHERE id = :id FOR UPDATE"),
                     {"id": job_id})
        time.sleep(3)
    wait_for_state(engine_pg, job_id, "succeeded")
    worker.wait_for_output(f"nap job {job_id} succeeded in ")

    logged = re.search(rf"nap job {job_id} succeeded in ([\d.]+) ms", worker.output)
    assert logged is not None
    assert 500 <= float(logged.group(1)) < 2500


def test_a_worker_whose_node_row_vanished_restarts_and_registers_again(
    pg_url, engine_pg, start_worker
):
    """As after a database restored or recreated under it: otherwise it would
    run on unseen by the others, with no part in `all` jobs."""
    worker = start_worker(pg_url, "--lease", "3", "--node", "vanishing")
    with engine_pg.begin() as conn:
        conn.execute(text("DELETE FROM dbtasks_nodes"))

    worker.wait_for_output("node vanishing is no longer registered in the database")
    worker.wait_for_output("restarting the worker process")
    wait_for(lambda: sql(engine_pg, "SELECT name FROM dbtasks_nodes WHERE stopped_at "
                         "IS NULL") == [("vanishing",)], timeout=30,
             message="the node to be registered again")
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, basic.noop)
    wait_for_state(engine_pg, job_id, "succeeded")
    assert worker.process.poll() is None
