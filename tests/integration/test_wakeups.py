"""PostgreSQL wake-ups: LISTEN/NOTIFY instead of polling, and no NOTIFY cost
while every node is busy.

The workers here poll every 60 seconds (ten times that while listening), so a
job that starts within seconds was brought by a notification, not a poll.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from sqlalchemy import text

from dbtasks import enqueue, enqueue_many
from dbtasks.schema import NOTIFY_CHANNEL
from tests.app_tasks import basic, faults
from tests.conftest import sql, wait_for

SLOW_POLL = ("--poll-interval", "60")


def node_is_idle(engine, node: str) -> bool:
    rows = sql(engine, "SELECT idle FROM dbtasks_nodes WHERE name = :n", n=node)
    return bool(rows and rows[0][0])


def start_idle_worker(start_worker, pg_url, engine_pg, node: str, *args: str):
    """A worker that polls once a minute, once its node row says it is idle:
    from then on only a notification (or a due time) wakes it early."""
    worker = start_worker(pg_url, "--node", node, *args, *SLOW_POLL)
    wait_for(lambda: node_is_idle(engine_pg, node), message=f"node {node} to idle")
    return worker


def state(engine, job_id: int) -> str:
    return sql(engine, "SELECT state FROM dbtasks_jobs WHERE id = :id", id=job_id)[0][0]


@pytest.fixture
def listener(pg_url):
    """A session LISTENing on the jobs channel, as a worker's lifeline does."""
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield conn


def notifications(conn) -> int:
    return len(list(conn.notifies(timeout=0.3)))


def set_idle(engine, idle: bool) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dbtasks_nodes (name, hostname, pid, tasks, "
                          "queues, registered_at, heartbeat_at, idle) VALUES ('n', "
                          "'h', 1, '{}', '[]', now(), now(), :idle) ON CONFLICT "
                          "(name) DO UPDATE SET idle = :idle"), {"idle": idle})


def test_enqueues_notify_only_while_some_node_is_idle(engine_pg, listener):
    set_idle(engine_pg, False)
    with engine_pg.begin() as conn:
        enqueue(conn, basic.noop)
        enqueue_many(conn, basic.noop, [{}] * 50)
    assert notifications(listener) == 0

    set_idle(engine_pg, True)
    with engine_pg.begin() as conn:
        enqueue_many(conn, basic.noop, [{}] * 50)
    # One per statement, not per job (and one per transaction, once delivered).
    assert notifications(listener) == 1


def test_an_idle_worker_is_woken_by_an_enqueue(pg_url, engine_pg, start_worker):
    start_idle_worker(start_worker, pg_url, engine_pg, "sleeper")

    with engine_pg.begin() as conn:
        job_id = enqueue(conn, faults.tick)

    wait_for(lambda: state(engine_pg, job_id) == "succeeded", timeout=10,
             message="the notified worker to run the job")


def test_jobs_of_every_queue_start_at_once_on_one_notification(
    pg_url, engine_pg, start_worker
):
    # The lifeline claims from the first queue only, then wakes the loop for
    # the others: the second queue's job must not wait for the first's to end.
    start_idle_worker(start_worker, pg_url, engine_pg, "queues",
                      "--queues", "default,other")

    with engine_pg.begin() as conn:
        first = enqueue(conn, basic.record, {"sleep": 5})
        second = enqueue(conn, basic.record, queue="other")

    wait_for(lambda: state(engine_pg, second) == "succeeded", timeout=4,
             message="the second queue's job to run beside the first's")
    assert state(engine_pg, first) == "running"
    # At once, not at the loop's next tick (its rescue pass, once a second).
    [(gap,)] = sql(engine_pg, "SELECT extract(epoch FROM max(at) - min(at)) FROM "
                   "test_runs WHERE event = 'start' AND job_id IN (:a, :b)",
                   a=first, b=second)
    assert gap < 0.5


def test_a_job_claimed_on_notification_still_times_out_on_time(
    pg_url, engine_pg, start_worker
):
    """The idle loop sleeps until its next poll (here a minute), its next
    rescue pass (a second) or maintenance; a job the lifeline starts
    meanwhile must wake it at the job's timeout."""
    start_idle_worker(start_worker, pg_url, engine_pg, "timer", "--lease", "60")

    with engine_pg.begin() as conn:
        job_id = enqueue(conn, basic.short_timeout, {"sleep": 30})

    wait_for(lambda: state(engine_pg, job_id) == "failed", timeout=5,
             message="the job to fail at its half-second timeout")
    [(late,)] = sql(engine_pg, "SELECT extract(epoch FROM finished_at - started_at) "
                    "FROM dbtasks_jobs WHERE id = :id", id=job_id)
    assert 0.5 <= late < 0.9


def test_a_busy_worker_clears_its_idle_flag_and_sets_it_again(
    pg_url, engine_pg, start_worker
):
    start_idle_worker(start_worker, pg_url, engine_pg, "flag", "--concurrency", "1")

    with engine_pg.begin() as conn:
        job_id = enqueue(conn, basic.record, {"sleep": 1.5})
    wait_for(lambda: not node_is_idle(engine_pg, "flag"),
             message="the saturated node to say it is busy")
    wait_for(lambda: state(engine_pg, job_id) == "succeeded", timeout=10,
             message="the job to succeed")
    wait_for(lambda: node_is_idle(engine_pg, "flag"), message="the node to idle again")


def test_a_scheduled_job_wakes_its_idle_worker_when_due(
    pg_url, engine_pg, start_worker
):
    start_idle_worker(start_worker, pg_url, engine_pg, "waiter")

    with engine_pg.begin() as conn:
        job_id = enqueue(conn, faults.tick,
                         run_at=datetime.now(timezone.utc) + timedelta(seconds=2))
    assert state(engine_pg, job_id) == "scheduled"

    wait_for(lambda: state(engine_pg, job_id) == "succeeded", timeout=10,
             message="the worker to wake at the due time and run the job")


def test_a_listener_cut_off_reconnects_and_is_woken_again(
    pg_url, engine_pg, start_worker
):
    worker = start_idle_worker(start_worker, pg_url, engine_pg, "cutoff")
    # Jobs enqueued while no one listens are found by the poll right after the
    # reconnection; the one after that by a notification.
    (key,) = sql(engine_pg, "SELECT lifeline_key FROM dbtasks_nodes")[0]
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
        terminated = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks "
            "WHERE locktype = 'advisory' AND objid = %s", (key,)
        ).fetchall()
    assert terminated == [(True,)]
    worker.wait_for_output("lifeline connection restored")

    with engine_pg.begin() as conn:
        job_id = enqueue(conn, faults.tick)
    wait_for(lambda: state(engine_pg, job_id) == "succeeded", timeout=10,
             message="the reconnected listener to be woken")
