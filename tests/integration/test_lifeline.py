"""PostgreSQL: a dead worker's jobs run again within seconds, not a lease.

The lease here is a minute; the test asserts the second run started while the
first run's lease still had most of that minute left, which only the lifeline
(lifeline.Lifeline) can explain.
"""

from __future__ import annotations

import psycopg
from sqlalchemy import text

from dbtasks import enqueue, lease
from tests.app_tasks.basic import record
from tests.conftest import sql, wait_for


def _runs(engine, job_id):
    return sql(
        engine,
        "SELECT node, attempt, event, at FROM test_runs WHERE job_id = :id ORDER BY id",
        id=job_id,
    )


def test_a_killed_workers_job_runs_again_long_before_its_lease_ends(
    pg_url, engine_pg, start_worker
):
    first = start_worker(pg_url, "--lease", "60", "--node", "first")
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, record, {"sleep": 2})
    wait_for(lambda: _runs(engine_pg, job_id), message="the first run to start")
    (lease_end,) = sql(
        engine_pg, "SELECT lease_expires_at FROM dbtasks_jobs WHERE id = :id", id=job_id
    )[0]

    second = start_worker(pg_url, "--lease", "60", "--node", "second")
    first.kill()

    wait_for(
        lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                    id=job_id) == [("succeeded",)],
        timeout=30,
        message="the job to succeed on the second worker",
    )
    runs = _runs(engine_pg, job_id)
    assert [(node, attempt, event) for node, attempt, event, _ in runs] == [
        ("first", 1, "start"),
        ("second", 2, "start"),
        ("second", 2, "end"),
    ]
    rerun_started = runs[1][3]
    assert (lease_end - rerun_started).total_seconds() > 30
    second.wait_for_output(f"rescued job {job_id} (record) from node first")
    assert "lifeline connection closed" in second.output


def test_a_worker_whose_lifeline_is_terminated_reconnects_and_keeps_working(
    pg_url, engine_pg, start_worker
):
    worker = start_worker(pg_url, "--lease", "3", "--node", "survivor")
    (key,) = sql(engine_pg, "SELECT lifeline_key FROM dbtasks_nodes")[0]
    assert key is not None
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
        terminated = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks "
            "WHERE locktype = 'advisory' AND objid = %s",
            (key,),
        ).fetchall()
    assert terminated == [(True,)]

    worker.wait_for_output("lifeline connection lost")
    with engine_pg.begin() as conn:
        job_id = enqueue(conn, record)
    wait_for(
        lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                    id=job_id) == [("succeeded",)],
        message="a job to run after the lifeline came back",
    )
    held = wait_for(
        lambda: sql(
            engine_pg,
            "SELECT count(*) FROM pg_locks l JOIN dbtasks_nodes n "
            "ON l.objid::bigint = n.lifeline_key WHERE l.locktype = 'advisory' "
            "AND l.granted",
        )[0][0] == 1,
        timeout=15,
        message="the lifeline lock to be held again",
    )
    assert held
    assert worker.process.poll() is None


def test_without_a_lifeline_the_node_has_no_lock_key(pg_url, engine_pg, start_worker):
    start_worker(pg_url, "--no-lifeline")
    assert sql(engine_pg, "SELECT lifeline_key FROM dbtasks_nodes") == [(None,)]


def test_a_node_whose_lifeline_is_down_is_rescued_by_others_never_by_itself(
    engine_pg,
):
    """A live worker reconnecting its lifeline looks dead to the others; to
    itself it is not, and it must not take back the jobs it is running."""
    with engine_pg.begin() as conn:
        conn.execute(text(
            "INSERT INTO dbtasks_nodes (name, hostname, pid, tasks, queues, "
            "registered_at, heartbeat_at, lifeline_key) VALUES ('reconnecting', "
            "'h', 1, '{}', '[]', now(), now(), 2147483000)"))
        job_id = enqueue(conn, record)
        conn.execute(text(
            "UPDATE dbtasks_jobs SET state = 'running', attempt = 1, lease_owner = "
            "'reconnecting', lease_token = 't', lease_expires_at = now() + "
            "interval '1 minute', started_at = now() WHERE id = :id"), {"id": job_id})

    with engine_pg.begin() as conn:
        assert not lease.any_orphaned_jobs(conn, "reconnecting")
        assert lease.rescue_orphaned_jobs(conn, "reconnecting") == 0
    with engine_pg.begin() as conn:
        assert lease.any_orphaned_jobs(conn, "another")
        assert lease.rescue_orphaned_jobs(conn, "another") == 1

    assert sql(engine_pg, "SELECT state, lease_owner FROM dbtasks_jobs WHERE id = :id",
               id=job_id) == [("queued", None)]
