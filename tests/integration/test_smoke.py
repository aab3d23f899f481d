from dbtasks import enqueue
from tests.app_tasks.basic import record
from tests.conftest import sql, wait_for


def test_a_job_runs_once_on_a_real_worker(database_url, engine, start_worker):
    with engine.begin() as conn:
        job_id = enqueue(conn, record)
    start_worker(database_url, "--lease", "5")

    wait_for(
        lambda: sql(engine, "SELECT state FROM dbtasks_jobs WHERE id = :id", id=job_id)
        == [("succeeded",)],
        message="the job to succeed",
    )
    assert sql(engine, "SELECT job_id, event FROM test_runs ORDER BY id") == [
        (job_id, "start"),
        (job_id, "end"),
    ]
