"""`all` jobs on real workers: one run per node in the job's set, a killed node
dropped from the set, and a node that registered after the due time left out."""

from __future__ import annotations

import signal

from dbtasks import enqueue
from tests.app_tasks import basic
from tests.conftest import sql, wait_for

NODES = ["n1", "n2", "n3"]


def start_nodes(database_url, start_worker, *args):
    workers = [
        start_worker(database_url, "--node", name, *args, wait=False) for name in NODES
    ]
    for worker in workers:
        worker.wait_started()
    return dict(zip(NODES, workers, strict=True))


def job_state(engine, job_id):
    return sql(engine, "SELECT state FROM dbtasks_jobs WHERE id = :id", id=job_id)[0][0]


def wait_for_state(engine, job_id, state, timeout=30.0):
    wait_for(
        lambda: job_state(engine, job_id) == state,
        timeout,
        message=f"job {job_id} to be {state}",
    )


def completions(engine, job_id):
    return sql(
        engine,
        "SELECT node, state, attempt FROM dbtasks_completions WHERE job_id = :id "
        "ORDER BY node",
        id=job_id,
    )


def run_events(engine, job_id):
    return sql(
        engine,
        "SELECT node, event FROM test_runs WHERE job_id = :id ORDER BY node, id",
        id=job_id,
    )


def test_an_all_job_runs_once_on_each_live_node(database_url, engine, start_worker):
    start_nodes(database_url, start_worker)
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.broadcast)

    wait_for_state(engine, job_id, "succeeded")

    assert completions(engine, job_id) == [
        (node, "succeeded", 1) for node in NODES
    ]
    assert run_events(engine, job_id) == [
        (node, event) for node in NODES for event in ("start", "end")
    ]


def test_an_all_job_finishes_when_a_node_killed_mid_run_times_out(
    database_url, engine, start_worker
):
    workers = start_nodes(
        database_url, start_worker, "--lease", "2", "--node-timeout", "2"
    )
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.broadcast, {"sleep": 2})
    wait_for(
        lambda: len(run_events(engine, job_id)) == 3,
        message="every node to start its run",
    )
    workers["n3"].kill()

    wait_for_state(engine, job_id, "succeeded")

    assert completions(engine, job_id) == [
        ("n1", "succeeded", 1),
        ("n2", "succeeded", 1),
        ("n3", "dropped", 1),
    ]
    assert run_events(engine, job_id) == [
        ("n1", "start"),
        ("n1", "end"),
        ("n2", "start"),
        ("n2", "end"),
        ("n3", "start"),
    ]


def test_a_node_registered_after_the_due_time_does_not_run_it(
    pg_url, engine_pg, start_worker
):
    # PostgreSQL only: the test freezes workers with SIGSTOP, and a worker frozen
    # inside a SQLite write transaction would hold the file's only write lock.
    engine = engine_pg
    early = {
        name: start_worker(pg_url, "--node", name, wait=False) for name in ("n1", "n2")
    }
    for worker in early.values():
        worker.wait_started()

    # Freeze the early nodes so that none of them can take the job when it falls
    # due; they stay alive (the node timeout is the default 30 s).
    for worker in early.values():
        worker.signal(signal.SIGSTOP)
    with engine.begin() as conn:
        job_id = enqueue(conn, basic.broadcast)
    late = start_worker(pg_url, "--node", "late")

    # The late node is the first to see the due job, and leaves itself out.
    wait_for_state(engine, job_id, "running")
    assert completions(engine, job_id) == [("n1", "queued", 0), ("n2", "queued", 0)]
    [(registered_after,)] = sql(
        engine,
        "SELECT n.registered_at > j.run_at FROM dbtasks_nodes n, dbtasks_jobs j "
        "WHERE n.name = 'late' AND j.id = :id",
        id=job_id,
    )
    assert registered_after is True

    for worker in early.values():
        worker.signal(signal.SIGCONT)
    wait_for_state(engine, job_id, "succeeded")

    assert completions(engine, job_id) == [
        ("n1", "succeeded", 1),
        ("n2", "succeeded", 1),
    ]
    assert [node for node, event in run_events(engine, job_id) if event == "start"] == [
        "n1",
        "n2",
    ]
    assert late.process.poll() is None
