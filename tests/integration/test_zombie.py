"""A frozen worker keeps its job until the lease expires; awake, it records nothing.

PostgreSQL only: a worker frozen on SQLite may hold the file's one write lock.
"""

from __future__ import annotations

import signal

from dbtasks import enqueue
from tests.app_tasks.effects import effect
from tests.conftest import sql, wait_for


def test_a_frozen_workers_job_runs_elsewhere_and_its_effect_commits_once(
    pg_url, engine_pg, start_worker
):
    frozen = start_worker(pg_url, "--lease", "2", "--node", "frozen")
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, effect, {"sleep": 3})
    wait_for(lambda: sql(engine_pg, "SELECT node FROM test_runs") == [("frozen",)],
             message="the first run to start")
    frozen.signal(signal.SIGSTOP)

    awake = start_worker(pg_url, "--lease", "2", "--node", "awake")
    wait_for(
        lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                    id=job_id) == [("succeeded",)],
        message="the job to succeed on the awake worker",
    )
    # The frozen worker's lifeline stayed open: only the lease could free the job.
    awake.wait_for_output(f"rescued job {job_id} (effect) from node frozen")
    assert "lease expired" in awake.output

    frozen.signal(signal.SIGCONT)
    wait_for(lambda: f"lease of job {job_id} lost" in frozen.output, timeout=30,
             message="the woken worker to find its lease lost")

    assert sql(
        engine_pg, "SELECT node, attempt, event FROM test_runs ORDER BY id"
    ) == [("frozen", 1, "start"), ("awake", 2, "start"), ("awake", 2, "effect")]
    assert sql(engine_pg, "SELECT state, attempt FROM dbtasks_jobs") == [
        ("succeeded", 2)
    ]
    assert frozen.process.poll() is None
