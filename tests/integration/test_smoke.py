import os
import subprocess
import sys

from sqlalchemy import create_engine

from dbtasks import enqueue
from tests.app_tasks.basic import record
from tests.conftest import ROOT, sql, wait_for


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


def test_the_example_application_enqueues_only_what_commits(tmp_path):
    """examples/app.py as the README runs it, on a SQLite file of its own."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    env = {**os.environ, "DBTASKS_DATABASE_URL": url}

    def example(*args):
        return subprocess.run(
            [sys.executable, "-m", "dbtasks", "migrate"] if args == ("migrate",)
            else [sys.executable, str(ROOT / "examples" / "app.py"), *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )

    assert example("migrate").returncode == 0
    signed = example("alice@example.com")
    failed = example("--fail", "bob@example.com")
    again = example("alice@example.com")

    assert (signed.returncode, signed.stdout) == (
        0, "user 1 signed up; welcome email enqueued\n")
    assert (failed.returncode, failed.stderr) == (
        1, "sign-up failed after enqueueing: rolled back; no user, no job\n")
    assert (again.returncode, again.stderr) == (
        1, "alice@example.com has signed up already: nothing added, no job\n")
    engine = create_engine(url)
    try:
        assert sql(engine, "SELECT email FROM users") == [("alice@example.com",)]
        assert sql(engine, "SELECT task, params FROM dbtasks_jobs") == [
            ("sendWelcomeEmail", '{"user_id":1,"email":"alice@example.com"}')
        ]
    finally:
        engine.dispose()
