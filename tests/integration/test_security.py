"""Jobs name tasks; nothing read from the database is imported or evaluated.

And a worker needs no more than the privileges the README lists.
"""

from __future__ import annotations

import uuid

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from dbtasks import enqueue
from tests.app_tasks.basic import record
from tests.conftest import sql, wait_for

HOSTILE_TASK_NAMES = [
    "os.system",
    "__import__('os').system('touch {marker}')",
    "tests.app_tasks.basic.record",
    "tests.app_tasks.basic:record",
    "record'; DROP TABLE dbtasks_jobs; --",
    "subprocess.run",
    "builtins.eval",
]

HOSTILE_PARAMS = [
    # A pickle of os.system('touch ...'), base64 and raw: never unpickled.
    "gASVMQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjBJ0b3VjaCAvdG1wL3B3bmVklIWUUpQu",
    "cos\nsystem\n(S'touch {marker}'\ntR.",
    "{not json",
    "__import__('os').system('touch {marker}')",
]


def _insert_job(conn, task: str, params: str, max_attempts: int = 1) -> int:
    return conn.execute(
        text(
            "INSERT INTO dbtasks_jobs (task, queue, params, state, priority, run_at, "
            "attempt, max_attempts, created_at) VALUES (:task, 'default', :params, "
            "'queued', 0, :now, 0, :max_attempts, :now) RETURNING id"
        ),
        {
            "task": task,
            "params": params,
            "max_attempts": max_attempts,
            "now": "2000-01-01 00:00:00.000000+00:00"
            if conn.dialect.name == "sqlite"
            else "2000-01-01T00:00:00+00:00",
        },
    ).scalar_one()


def test_hostile_rows_in_the_jobs_table_run_nothing_outside_the_registry(
    database_url, engine, start_worker, tmp_path
):
    marker = tmp_path / "pwned"
    with engine.begin() as conn:
        hostile_names = [
            _insert_job(conn, name.replace("{marker}", str(marker)), "{}")
            for name in HOSTILE_TASK_NAMES
        ]
        hostile_params = [
            _insert_job(conn, "record", params.replace("{marker}", str(marker)))
            for params in HOSTILE_PARAMS
        ]
        good = enqueue(conn, record)

    worker = start_worker(database_url)

    def finished(ids):
        rows = sql(
            engine,
            "SELECT count(*) FROM dbtasks_jobs WHERE state IN "
            "('succeeded', 'failed') AND id IN (" + ",".join(map(str, ids)) + ")",
        )
        return rows[0][0] == len(ids)

    wait_for(lambda: finished([good, *hostile_params]), message="the jobs to end")

    # Names that are not registered tasks are never claimed, whatever they say.
    for job_id in hostile_names:
        assert sql(
            engine, "SELECT state, attempt FROM dbtasks_jobs WHERE id = :id", id=job_id
        ) == [("queued", 0)]
    # Params that are not JSON fail their job without the task ever starting.
    for job_id in hostile_params:
        state, error = sql(
            engine, "SELECT state, last_error FROM dbtasks_jobs WHERE id = :id",
            id=job_id,
        )[0]
        assert state == "failed"
        assert "params" in error.lower()
    assert sql(engine, "SELECT job_id, event FROM test_runs ORDER BY id") == [
        (good, "start"),
        (good, "end"),
    ]
    assert not marker.exists()
    assert worker.process.poll() is None
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs")[0][0] == len(
        HOSTILE_TASK_NAMES
    ) + len(HOSTILE_PARAMS) + 1


WORKER_GRANTS = """
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON dbtasks_jobs, dbtasks_completions,
    dbtasks_schedules, dbtasks_nodes TO {role};
GRANT SELECT ON dbtasks_alembic_version, dbtasks_schema_info TO {role};
GRANT SELECT, INSERT ON test_runs TO {role};
GRANT USAGE ON SEQUENCE test_runs_id_seq TO {role};
"""


def test_a_worker_runs_with_only_the_documented_privileges(
    pg_url, engine_pg, start_worker
):
    role = f"dbtasks_worker_{uuid.uuid4().hex[:8]}"
    admin_url = pg_url.replace("+psycopg", "")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        admin.execute(WORKER_GRANTS.format(role=role))
    worker_url = (
        make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    )
    try:
        with engine_pg.begin() as conn:
            job_id = enqueue(conn, record)
        worker = start_worker(worker_url, env={"DBTASKS_DATABASE_URL": worker_url})
        wait_for(
            lambda: sql(engine_pg, "SELECT state FROM dbtasks_jobs WHERE id = :id",
                        id=job_id) == [("succeeded",)],
            message="the job to succeed under the restricted role",
        )
        assert "ERROR" not in worker.output
        # The role really cannot change the schema.
        with psycopg.connect(make_url(worker_url).render_as_string(
                hide_password=False).replace("+psycopg", "")) as conn:
            try:
                conn.execute("CREATE TABLE dbtasks_intruder (id int)")
            except psycopg.errors.InsufficientPrivilege:
                pass
            else:
                raise AssertionError("the worker role could create a table")
        worker.signal(2)
        assert worker.wait(30) == 0
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = %s",
                (role,),
            )
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
