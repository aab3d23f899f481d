"""Workers killed and stopped for real: SIGKILL mid-job, a job that kills its
worker, SIGTERM and SIGINT during a long job, a periodic series whose worker
died. Leases are short (2 s) only where a test waits for one to expire."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import psycopg
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from dbtasks import enqueue, enqueue_many, lease
from dbtasks.claim import ClaimedJob
from dbtasks.outcomes import FAILED, HANDED_BACK, RETRY, SUCCEEDED, Outcome, record
from dbtasks.schema import jobs
from tests.app_tasks import basic, faults
from tests.conftest import PERIODIC_TASKS, sql, wait_for


def job_row(engine, job_id):
    return sql(
        engine,
        "SELECT state, attempt, lease_owner, lease_token FROM dbtasks_jobs "
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


def wait_for_event(engine, job_id, node, attempt, event="start"):
    wait_for(
        lambda: (node, attempt, event) in run_events(engine, job_id),
        message=f"{event} of attempt {attempt} of job {job_id} on {node}",
    )


def whole_row(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(select(jobs).where(jobs.c.id == job_id)).one()


def claimed_job(engine, job_id):
    """The job as the worker holding it now sees it: its lease token included."""
    row = whole_row(engine, job_id)
    return ClaimedJob(
        id=row.id,
        task=row.task,
        queue=row.queue,
        params=row.params,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        priority=row.priority,
        schedule=row.schedule,
        token=row.lease_token,
    )


def record_late(engine, job, outcome):
    with engine.begin() as conn:
        return record(conn, job, outcome)


# --- SIGKILL --------------------------------------------------------------------


def test_a_killed_workers_job_runs_again_elsewhere_and_its_late_finish_is_refused(
    database_url, engine, start_worker
):
    killed = start_worker(database_url, "--node", "killed", "--lease", "2")
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 1.5})
    wait_for_event(engine, job_id, "killed", 1)
    old = claimed_job(engine, job_id)
    assert (old.attempt, whole_row(engine, job_id).lease_owner) == (1, "killed")

    start_worker(database_url, "--node", "rescuer", "--lease", "2")
    killed.kill()
    wait_for_event(engine, job_id, "rescuer", 2)

    # The killed worker's lease token no longer owns the job: whatever it would
    # record now is refused and changes nothing, while the rescuer holds it.
    holding = whole_row(engine, job_id)
    assert (holding.state, holding.lease_owner) == ("running", "rescuer")
    for outcome in (
        Outcome(SUCCEEDED),
        Outcome(FAILED, error="late"),
        Outcome(RETRY, error="late"),
        Outcome(HANDED_BACK),
    ):
        assert record_late(engine, old, outcome) is False
    assert whole_row(engine, job_id) == holding

    wait_for_state(engine, job_id, "succeeded")
    finished = whole_row(engine, job_id)
    # Once finished, no token records anything: neither the old one nor the
    # rescuer's own.
    rescuers = replace(old, token=holding.lease_token, attempt=2)
    for job in (old, rescuers):
        assert record_late(engine, job, Outcome(FAILED, error="late")) is False
    assert whole_row(engine, job_id) == finished
    assert (finished.attempt, finished.lease_owner) == (2, None)
    assert run_events(engine, job_id) == [
        ("killed", 1, "start"),
        ("rescuer", 2, "start"),
        ("rescuer", 2, "end"),
    ]


def test_a_rescued_job_keeps_its_place_ahead_of_later_jobs(
    database_url, engine, start_worker
):
    killed = start_worker(database_url, "--node", "killed", "--lease", "2",
                          "--concurrency", "1")
    with engine.begin() as conn:
        first = enqueue(conn, basic.record, {"sleep": 3})
    wait_for_event(engine, first, "killed", 1)
    with engine.begin() as conn:
        later = [enqueue(conn, faults.tick) for _ in range(3)]
    killed.kill()
    # Rescued here, so that no worker claims the later jobs before the rescue.
    wait_for(lambda: sql(engine, "SELECT lease_expires_at < CURRENT_TIMESTAMP "
                         "FROM dbtasks_jobs WHERE id = :id", id=first)[0][0],
             message="the killed worker's lease to expire")
    with engine.begin() as conn:
        assert lease.rescue_expired_jobs(conn) == 1

    start_worker(database_url, "--node", "rescuer", "--concurrency", "1")
    wait_for_state(engine, later[-1], "succeeded")

    # One slot: the rescuer runs jobs one by one, and the rescued job first.
    order = sql(engine, "SELECT job_id FROM test_runs WHERE node = 'rescuer' "
                "AND event IN ('start', 'run') ORDER BY id")
    assert [job_id for (job_id,) in order] == [first, *later]


def test_a_claim_whose_reply_was_lost_expires_and_runs_again(
    database_url, engine, start_worker
):
    """A claim can commit while its reply never reaches the worker (the
    connection drops at that moment): the job is the worker's in the table,
    under a token it never learnt. Its heartbeat must not renew that lease."""
    worker = start_worker(database_url, "--node", "holder", "--lease", "2")
    # A job the worker does hold, so that its heartbeat renews leases meanwhile.
    with engine.begin() as conn:
        held = enqueue(conn, basic.record, {"sleep": 20})
    wait_for_event(engine, held, "holder", 1)
    with engine.begin() as conn:
        job_id = enqueue(conn, faults.tick)
        conn.execute(
            text("UPDATE dbtasks_jobs SET state = 'running', attempt = 1, "
                 "lease_owner = 'holder', lease_token = 'never-learnt', "
                 "lease_expires_at = :soon WHERE id = :id"),
            {"soon": datetime.now(timezone.utc) + timedelta(seconds=2), "id": job_id},
        )

    wait_for_state(engine, job_id, "succeeded", timeout=15)

    assert job_row(engine, held).state == "running"  # renewed all along
    assert run_events(engine, job_id) == [("holder", 2, "run")]
    worker.wait_for_output(f"rescued job {job_id} (tick) from node holder")


def test_a_job_that_keeps_killing_its_worker_ends_failed(
    database_url, engine, start_worker
):
    with engine.begin() as conn:
        job_id = enqueue(conn, faults.kills_its_worker)

    # Each attempt kills the worker that runs it; the next worker rescues the
    # job. With max_attempts=2 the third worker finds it spent and fails it.
    exits = []
    while job_row(engine, job_id).state != "failed" and len(exits) < 3:
        worker = start_worker(database_url, "--lease", "2", wait=False)
        wait_for(
            lambda worker=worker: worker.process.poll() is not None
            or job_row(engine, job_id).state == "failed",
            message="the worker to die or the job to fail",
        )
        exits.append(worker.process.poll())

    assert exits == [-signal.SIGKILL, -signal.SIGKILL, None]
    assert job_row(engine, job_id)[:3] == ("failed", 2, None)
    assert [(a, e) for _, a, e in run_events(engine, job_id)] == [
        (1, "start"),
        (2, "start"),
    ]
    last_error = whole_row(engine, job_id).last_error
    assert "died" in last_error or "lease expired" in last_error


# --- SIGTERM and SIGINT -----------------------------------------------------------


def test_sigterm_lets_a_running_job_finish_within_the_grace(
    database_url, engine, start_worker
):
    worker = start_worker(database_url, "--node", "stopping")
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 1.5})
    wait_for_event(engine, job_id, "stopping", 1)

    worker.signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in worker.output, message="the signal")
    with engine.begin() as conn:
        after_signal = enqueue(conn, faults.tick)

    assert worker.wait(30) == 0
    assert job_row(engine, job_id)[:3] == ("succeeded", 1, None)
    assert run_events(engine, job_id) == [
        ("stopping", 1, "start"),
        ("stopping", 1, "end"),
    ]
    # A stopping worker claims nothing new.
    assert job_row(engine, after_signal)[:2] == ("queued", 0)
    [(stopped_at,)] = sql(engine, "SELECT stopped_at FROM dbtasks_nodes")
    assert stopped_at is not None


def test_sigterm_past_the_grace_hands_the_job_back_with_its_attempt(
    database_url, engine, start_worker
):
    worker = start_worker(
        database_url, "--node", "stopping", "--shutdown-grace", "0.5"
    )
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 4})
    wait_for_event(engine, job_id, "stopping", 1)

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0
    assert job_row(engine, job_id)[:4] == ("queued", 0, None, None)
    worker.wait_for_output("handed back to the queue unfinished")

    start_worker(database_url, "--node", "next")
    wait_for_state(engine, job_id, "succeeded")
    assert job_row(engine, job_id)[:2] == ("succeeded", 1)
    assert run_events(engine, job_id) == [
        ("stopping", 1, "start"),
        ("next", 1, "start"),
        ("next", 1, "end"),
    ]


def test_a_second_signal_hands_the_job_back_at_once(
    database_url, engine, start_worker
):
    # The grace (30 s) is far longer than the job (4 s): only the second signal
    # can explain a hand-back.
    worker = start_worker(database_url, "--node", "stopping")
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 4})
    wait_for_event(engine, job_id, "stopping", 1)

    worker.signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in worker.output, message="the first signal")
    worker.signal(signal.SIGINT)

    assert worker.wait(30) == 0
    worker.wait_for_output("received SIGINT: handing back running jobs now")
    assert job_row(engine, job_id)[:4] == ("queued", 0, None, None)
    assert run_events(engine, job_id) == [("stopping", 1, "start")]


# --- periodic series ----------------------------------------------------------------


def test_a_periodic_series_survives_its_worker_being_killed(
    database_url, engine, start_worker
):
    killed = start_worker(
        database_url, "--node", "killed", "--lease", "2", tasks=PERIODIC_TASKS
    )
    wait_for(
        lambda: sql(
            engine,
            "SELECT job_id FROM test_runs WHERE task = 'slow_every_second' "
            "AND node = 'killed' AND event = 'start'",
        ),
        message="a slow run to start on the first worker",
    )
    [(interrupted,)] = sql(
        engine,
        "SELECT job_id FROM test_runs WHERE task = 'slow_every_second'",
    )
    start_worker(
        database_url, "--node", "rescuer", "--lease", "2", tasks=PERIODIC_TASKS
    )
    killed.kill()

    # Two runs ended on the second worker and were recorded: a run's end is
    # written by the task, its success by the worker just after.
    wait_for(
        lambda: sql(
            engine,
            "SELECT count(DISTINCT r.job_id) FROM test_runs r JOIN dbtasks_jobs j "
            "ON j.id = r.job_id WHERE r.task = 'slow_every_second' "
            "AND r.node = 'rescuer' AND r.event = 'end' AND j.state = 'succeeded'",
        )[0][0]
        >= 2,
        message="two slow runs to end on the second worker and be recorded",
        timeout=40,
    )

    # The interrupted job ran again (attempt counted), then the series went on.
    assert job_row(engine, interrupted)[:2] == ("succeeded", 2)
    assert run_events(engine, interrupted) == [
        ("killed", 1, "start"),
        ("rescuer", 2, "start"),
        ("rescuer", 2, "end"),
    ]
    series = sql(
        engine,
        "SELECT id, state FROM dbtasks_jobs WHERE schedule = 'slow_every_second' "
        "ORDER BY id",
    )
    assert series[0] == (interrupted, "succeeded")
    states = [state for _, state in series]
    assert states[1] == "succeeded"
    open_states = ("scheduled", "queued", "running")
    assert all(state in ("succeeded", *open_states) for state in states)
    assert sum(state in open_states for state in states) == 1


@contextmanager
def connections_refused(admin_url: str, url: str) -> Iterator[None]:
    """Cut every connection to the database of `url`, and refuse new ones,
    as a server does while it shuts down, until the block ends."""
    database = make_url(url).database
    with psycopg.connect(admin_url, autocommit=True) as admin:
        try:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


def test_an_idle_worker_logs_an_outage_once_and_its_end_once(
    postgres_admin_url, pg_url, engine_pg, start_worker
):
    """A pass of the loop with nothing to ask of the database is no sign that
    the database is back; a reconnected lifeline is, and the loop is on its
    way at once."""
    worker = start_worker(pg_url)
    with connections_refused(postgres_admin_url, pg_url):
        worker.wait_for_output("database unavailable")
        time.sleep(4)
    engine_pg.dispose()
    worker.wait_for_output("database reachable again")
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, basic.noop)
    wait_for(lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                         id=job_id) == [("succeeded",)], message="the job to run")

    assert worker.output.count("database unavailable") == 1, worker.output
    assert worker.output.count("database reachable again") == 1, worker.output


def test_a_worker_outlives_a_database_that_refuses_new_connections(
    postgres_admin_url, pg_url, engine_pg, start_worker
):
    """Its connections cut while the server refuses new ones (as while it
    shuts down): every way back in fails for a while, none may end the
    worker, and every job still runs."""
    worker = start_worker(pg_url, "--concurrency", "2")
    with engine_pg.begin() as conn:
        enqueue_many(conn, basic.nap, [{"sleep": 0.05}] * 100)
    wait_for(lambda: sql(engine_pg, "SELECT count(*) FROM dbtasks_jobs "
                         "WHERE state = 'succeeded'")[0][0] >= 10,
             message="the worker to be busy")
    with connections_refused(postgres_admin_url, pg_url):
        time.sleep(3)
        assert worker.process.poll() is None, worker.output
    engine_pg.dispose()  # its connections were cut too

    wait_for(lambda: sql(engine_pg, "SELECT state, count(*) FROM dbtasks_jobs "
                         "GROUP BY state") == [("succeeded", 100)],
             timeout=60, message="every job to succeed")
    assert worker.process.poll() is None
    worker.wait_for_output("database reachable again")
    assert "Traceback" not in worker.output
