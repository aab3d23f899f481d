"""A task that will not end after its timeout retires its worker.

The worker fails the job at the timeout at once; when the thread is still
running ABANDONED_THREAD_LIMIT seconds later, or the coroutine still blocks
the event loop that every async job shares, the worker finishes its other
jobs and starts afresh in the same process, which ends the thread.
"""

from __future__ import annotations

import pytest

from dbtasks import enqueue
from tests.app_tasks.basic import record, record_async
from tests.app_tasks.hangs import hangs, hangs_async
from tests.conftest import sql, wait_for


@pytest.mark.parametrize(
    ("hanging", "other", "why"),
    [
        (hangs, record, "a timed-out task has kept running"),
        (hangs_async, record_async, "a timed-out async task has blocked the event "
         "loop, and with it every async job,"),
    ],
    ids=["thread", "event-loop"],
)
def test_a_task_stuck_past_its_timeout_restarts_the_worker_in_place(
    pg_url, engine_pg, start_worker, hanging, other, why
):
    # A short grace: a job stuck behind a blocked event loop cannot finish in it.
    worker = start_worker(pg_url, "--node", "stuck", "--shutdown-grace", "3")
    with engine_pg.begin() as conn:
        stuck = enqueue(conn, hanging)
    wait_for(
        lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                    id=stuck) == [("failed",)],
        message="the timed-out job to fail",
    )
    with engine_pg.begin() as conn:
        meanwhile = enqueue(conn, other, {"sleep": 1})

    wait_for(lambda: worker.output.count("worker stuck started") == 2, timeout=40,
             message="the worker to restart")
    worker.wait_for_output(f"{why} ")
    worker.wait_for_output("retiring this worker")
    assert worker.process.poll() is None  # the same process, started afresh

    with engine_pg.begin() as conn:
        after = enqueue(conn, other)
    for job_id in (meanwhile, after):
        wait_for(
            lambda job_id=job_id: sql(
                engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id", id=job_id
            ) == [("succeeded",)],
            message=f"job {job_id} to succeed",
        )
    # The stuck thread died with the old process image: it never ended its run.
    assert sql(engine_pg, "SELECT event FROM test_runs WHERE job_id = :id",
               id=stuck) == [("start",)]
    assert sql(engine_pg, "SELECT name, stopped_at IS NULL FROM dbtasks_nodes") == [
        ("stuck", True)
    ]
