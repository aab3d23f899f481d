"""Bad inputs that the rest of the suite left out: each ends in a clear error,
and nothing is lost (a bad job never stops a worker; a lock never drops a job).

The catalogue of bad inputs, with the tests of each, is `CATALOGUE` at the end
of this file; a test checks that every test it names exists. Everything here
runs real processes against real databases: a SQLite file locked by another
connection, an application transaction left open, broken task folders, rows
changed by hand, and a copy of dbtasks one migration ahead.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from dbtasks import enqueue, migrate
from dbtasks.config import config_from_env
from dbtasks.database import SQLITE_BUSY_TIMEOUT_MS, create_queue_engine
from dbtasks.migrate import HEAD_REVISION
from dbtasks.outcomes import LOGGED_ERROR_CHARS, MAX_ERROR_CHARS
from tests.app_tasks import faults
from tests.app_tasks.effects import (
    commits_inside,
    commits_then_raises,
    transaction_after_return,
    transaction_twice,
)
from tests.bad_tasks import errors
from tests.bad_tasks.echo import echo_params
from tests.bad_tasks.unawaited import wrapped_async
from tests.conftest import ROOT, sql, wait_for
from tests.runs import app_metadata

BAD_TASKS = ROOT / "tests" / "bad_tasks"
BUSY_TIMEOUT = SQLITE_BUSY_TIMEOUT_MS / 1000
LOCKED = "database is locked"
UNAVAILABLE = "database unavailable, retrying with backoff: database is locked"
RESTORED = "database reachable again"


def command(*args: str, database_url: str, tasks: Path = BAD_TASKS) -> list[str]:
    """The `python -m dbtasks` command line, with the database and tasks given."""
    return [sys.executable, "-m", "dbtasks", "--database-url", database_url,
            "--tasks", str(tasks), *args]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any DBTASKS_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBTASKS_")}
    return {**env, **extra}


def cli(*args: str, database_url: str, tasks: Path = BAD_TASKS, cwd: Path = ROOT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args, database_url=database_url, tasks=tasks),
        cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=60,
    )


def start_cli(*args: str, database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args, database_url=database_url), cwd=ROOT, env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def error_line(returncode: int, stdout: str, stderr: str) -> str:
    """Exit code 2 and one `error: ...` line, no traceback; return that line."""
    assert returncode == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def job_row(engine: Engine, job_id: int) -> tuple:
    return sql(
        engine,
        "SELECT state, attempt, lease_owner, last_error FROM dbtasks_jobs "
        "WHERE id = :id",
        id=job_id,
    )[0]


def wait_for_state(engine: Engine, job_id: int, state: str) -> None:
    wait_for(lambda: job_row(engine, job_id).state == state,
             message=f"job {job_id} to be {state}")


def run_events(engine: Engine, job_id: int) -> list[tuple]:
    return sql(
        engine,
        "SELECT node, attempt, event FROM test_runs WHERE job_id = :id ORDER BY id",
        id=job_id,
    )


def count_jobs(engine: Engine) -> int:
    return sql(engine, "SELECT count(*) FROM dbtasks_jobs")[0][0]


# --- a SQLite file locked by another process --------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A migrated SQLite file of this test's own (the PostgreSQL half of
    `database_url` has no file lock to take)."""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    engine = create_queue_engine(config_from_env(database_url=url))
    try:
        migrate.upgrade(engine, None)
        app_metadata.create_all(engine)
    finally:
        engine.dispose()
    yield url


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlite_url)
    yield engine
    engine.dispose()


def hold_write_lock(url: str, mode: str) -> sqlite3.Connection:
    """Another connection, holding the file's write lock until it ends."""
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute(f"BEGIN {mode}")
    return holder


def has_open(process: subprocess.Popen[str], path: str) -> bool:
    """Whether the process has the file open (Linux: /proc/PID/fd)."""
    folder = Path(f"/proc/{process.pid}/fd")
    try:
        return any(os.path.realpath(fd) == path for fd in folder.iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_locked_sqlite_file_fails_enqueue_and_migrate_after_the_busy_timeout(
    sqlite_url, sqlite_engine
):
    holder = hold_write_lock(sqlite_url, "EXCLUSIVE")
    try:
        started = time.monotonic()
        running = [start_cli("enqueue", "echo_params", database_url=sqlite_url),
                   start_cli("migrate", database_url=sqlite_url)]
        results = [(p.wait(60), *p.communicate()) for p in running]
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    for result in results:
        assert error_line(*result) == (
            f"error: database {sqlite_url}: {LOCKED}; another connection held "
            "SQLite's write lock for all of the 5 s waited (a transaction left "
            "open?): try again once it ends")
    # Both waited for the lock for the whole busy timeout before giving up.
    assert elapsed >= BUSY_TIMEOUT
    assert count_jobs(sqlite_engine) == 0
    assert sql(sqlite_engine, "SELECT version_num FROM dbtasks_alembic_version") == [
        (HEAD_REVISION,)
    ]


def test_a_lock_released_within_the_busy_timeout_is_waited_out(
    sqlite_url, sqlite_engine
):
    path = sqlite_url.removeprefix("sqlite:///")
    holder = hold_write_lock(sqlite_url, "IMMEDIATE")
    try:
        enqueuing = start_cli("enqueue", "echo_params", "--params", '{"n": 1}',
                              database_url=sqlite_url)
        migrating = start_cli("migrate", database_url=sqlite_url)
        for process in (enqueuing, migrating):
            wait_for(lambda process=process: has_open(process, path),
                     message="the command to open the database file")
        # A second under the lock, and neither has given up.
        with pytest.raises(subprocess.TimeoutExpired):
            migrating.wait(1.0)
        assert enqueuing.poll() is None
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    enqueued, migrated = [(p.wait(60), *p.communicate())
                          for p in (enqueuing, migrating)]

    assert enqueued[0] == 0, enqueued
    assert migrated[0] == 0, migrated
    assert f"schema already at revision {HEAD_REVISION}" in migrated[2]
    assert sql(sqlite_engine, "SELECT id, task, params, state FROM dbtasks_jobs") == [
        (int(enqueued[1]), "echo_params", '{"n":1}', "queued")
    ]


def test_a_worker_outlives_a_locked_sqlite_file_and_then_runs_the_job_once(
    sqlite_url, sqlite_engine, start_worker
):
    worker = start_worker(sqlite_url, "--node", "patient")
    # Due in a few seconds: the worker cannot claim it before the lock is taken.
    with sqlite_engine.begin() as conn:
        job_id = enqueue(conn, faults.tick,
                         run_at=datetime.now(timezone.utc) + timedelta(seconds=3))
    holder = hold_write_lock(sqlite_url, "EXCLUSIVE")
    try:
        wait_for(lambda: UNAVAILABLE in worker.output, timeout=3 * BUSY_TIMEOUT,
                 message="the worker to log the locked database")
        assert worker.process.poll() is None
        # Seen through the lock holder's own transaction: nothing ran meanwhile.
        assert holder.execute(
            "SELECT state, attempt FROM dbtasks_jobs WHERE id = ?", (job_id,)
        ).fetchall() == [("scheduled", 0)]
        assert holder.execute("SELECT count(*) FROM test_runs").fetchall() == [(0,)]
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    wait_for_state(sqlite_engine, job_id, "succeeded")
    wait_for(lambda: RESTORED in worker.output, message="the worker to recover")

    assert job_row(sqlite_engine, job_id) == ("succeeded", 1, None, None)
    assert run_events(sqlite_engine, job_id) == [("patient", 1, "run")]
    assert worker.output.count(UNAVAILABLE) == 1
    assert worker.output.count(RESTORED) == 1
    assert worker.process.poll() is None


# --- an application transaction left open on SQLite -------------------------------


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_an_open_application_transaction_on_sqlite_blocks_workers_but_loses_nothing(
    sqlite_url, sqlite_engine, start_worker, ending
):
    worker = start_worker(sqlite_url, "--node", "waiting")
    app = create_engine(sqlite_url)
    try:
        with app.connect() as conn:
            transaction = conn.begin()
            job_id = enqueue(conn, faults.tick)
            wait_for(lambda: UNAVAILABLE in worker.output, timeout=3 * BUSY_TIMEOUT,
                     message="the worker to log the locked database")
            assert worker.process.poll() is None
            getattr(transaction, ending)()
    finally:
        app.dispose()

    # A job enqueued after the transaction shows the worker is working again.
    with sqlite_engine.begin() as conn:
        after = enqueue(conn, faults.tick)
    wait_for_state(sqlite_engine, after, "succeeded")

    if ending == "commit":
        wait_for_state(sqlite_engine, job_id, "succeeded")
        assert job_row(sqlite_engine, job_id) == ("succeeded", 1, None, None)
        assert run_events(sqlite_engine, job_id) == [("waiting", 1, "run")]
        assert count_jobs(sqlite_engine) == 2
    else:
        # SQLite may give the rolled-back job's id to the next one: compare runs
        # by the job that exists, not by the id the rollback discarded.
        assert sql(sqlite_engine, "SELECT id FROM dbtasks_jobs") == [(after,)]
    # Both jobs may be claimed in one batch and run side by side: compare sets.
    assert sorted(sql(sqlite_engine, "SELECT job_id FROM test_runs")) == (
        sorted([(job_id,), (after,)]) if ending == "commit" else [(after,)]
    )
    worker.wait_for_output(RESTORED)
    assert worker.output.count(UNAVAILABLE) == 1
    assert worker.process.poll() is None


# --- a worker on a broken tasks folder --------------------------------------------

GOOD_MODULE = """
    from dbtasks import task

    @task(name="fine")
    def fine(params, context):
        pass
"""

BROKEN_FOLDERS = {
    "syntax": ({"broken.py": "def oops(:\n    pass\n"},
               "{folder}/broken.py:1: syntax error in a task module"),
    "import": ({"needs.py": "import a_module_nobody_installed\n"},
               "{folder}/needs.py: the task module failed to import: "
               "ModuleNotFoundError: No module named 'a_module_nobody_installed'"),
    "duplicate": ({"again.py": GOOD_MODULE},
                  "task name 'fine' is defined twice: in {folder}/again.py:4 and "
                  "in {folder}/good.py:4; rename one of them"),
    "scope": ({"bad.py": GOOD_MODULE.replace('"fine"', '"x", scope="every"')},
              "{folder}/bad.py:4: scope must be 'any'"),
    "negative-frequency": (
        {"bad.py": GOOD_MODULE.replace('"fine"', '"x", frequency=-5')},
        "{folder}/bad.py:4: frequency must be 0 or more seconds, got -5"),
    "text-frequency": (
        {"bad.py": GOOD_MODULE.replace('"fine"', '"x", frequency="hourly"')},
        "{folder}/bad.py:4: frequency must be a number of seconds"),
}


@pytest.fixture
def tasks_folder(tmp_path: Path) -> Callable[[dict[str, str]], Path]:
    """Write a tasks folder holding a good module and the given ones."""
    def write(files: dict[str, str]) -> Path:
        folder = tmp_path / "broken_tasks"
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "good.py").write_text(textwrap.dedent(GOOD_MODULE))
        for name, source in files.items():
            (folder / name).write_text(textwrap.dedent(source))
        return folder

    return write


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_worker_refuses_to_start_on_a_broken_tasks_folder(
    pg_url, engine_pg, tasks_folder, case
):
    files, expected = BROKEN_FOLDERS[case]
    folder = tasks_folder(files)

    result = cli("worker", database_url=pg_url, tasks=folder)

    line = error_line(result.returncode, result.stdout, result.stderr)
    assert expected.format(folder=folder) in line
    assert sql(engine_pg, "SELECT count(*) FROM dbtasks_nodes") == [(0,)]


# --- rows written by hand ---------------------------------------------------------


def enqueue_with_raw_params(engine: Engine, raw: str, **options: object) -> int:
    """Enqueue a tick, then overwrite its params by hand, in one transaction."""
    with engine.begin() as conn:
        job_id = enqueue(conn, faults.tick, **options)
        conn.execute(text("UPDATE dbtasks_jobs SET params = :raw WHERE id = :id"),
                     {"raw": raw, "id": job_id})
    return job_id


def test_a_job_whose_params_are_not_json_fails_and_the_worker_goes_on(
    database_url, engine, start_worker
):
    broken = enqueue_with_raw_params(engine, "{'single': 'quotes'}", max_attempts=1)
    with engine.begin() as conn:
        after = enqueue(conn, faults.tick)
    worker = start_worker(database_url, "--concurrency", "1", "--node", "reader")

    wait_for_state(engine, after, "succeeded")
    wait_for_state(engine, broken, "failed")

    state, attempt, owner, last_error = job_row(engine, broken)
    assert (state, attempt, owner) == ("failed", 1, None)
    assert last_error.startswith(f"params of job {broken} are not valid JSON (")
    assert run_events(engine, broken) == []
    assert run_events(engine, after) == [("reader", 1, "run")]
    assert worker.process.poll() is None


@pytest.mark.parametrize(("raw", "reason"), [
    ("{not json", "Expecting property name enclosed in double quotes"),
    ('{"ratio": NaN}', "NaN is not JSON"),
], ids=["broken", "nan"])
def test_a_job_whose_params_are_not_json_fails_at_once_saying_so(
    pg_url, engine_pg, start_worker, raw, reason
):
    # The task allows 5 attempts; the worker, not the database, decides that
    # none is worth it, so PostgreSQL alone is enough. NaN is what Python's
    # JSON reader takes, and enqueue never writes.
    broken = enqueue_with_raw_params(engine_pg, raw)
    start_worker(pg_url)

    wait_for(lambda: job_row(engine_pg, broken)[1:3] == (1, None),
             message="the first attempt to be recorded")

    state, attempt, _, last_error = job_row(engine_pg, broken)
    last_line = last_error.rsplit("\n", 1)[-1]
    # No retry can mend stored params: the first attempt is the last.
    assert (state, attempt) == ("failed", 1)
    assert f"params of job {broken} are not valid JSON ({reason}" in last_line


# --- params that must reach the task exactly --------------------------------------


def test_nul_and_lone_surrogates_in_params_reach_the_task_exactly(
    database_url, engine, start_worker
):
    params = {"nul": "a\x00b", "surrogate": "\ud800", "quote": "'; --", "e": "é"}
    with engine.begin() as conn:
        job_id = enqueue(conn, echo_params, params)
    start_worker(database_url, tasks=BAD_TASKS)

    wait_for_state(engine, job_id, "succeeded")

    assert sql(engine, "SELECT note FROM test_runs WHERE job_id = :id",
               id=job_id) == [(ascii(params),)]


# --- errors the database cannot store as they are ---------------------------------


def test_error_texts_are_stored_with_nuls_escaped_and_a_huge_one_cut(
    database_url, engine, start_worker
):
    with engine.begin() as conn:
        nul = enqueue(conn, errors.raise_nul)
        cancelled = enqueue(conn, errors.cancel_nul)
        huge = enqueue(conn, errors.raise_huge)
        surrogate = enqueue(conn, errors.raise_surrogate)
        unprintable = enqueue(conn, errors.raise_unprintable)
        fine = enqueue(conn, echo_params, {"after": "them"})
    worker = start_worker(database_url, tasks=BAD_TASKS)

    for job_id, state in ((nul, "failed"), (cancelled, "cancelled"),
                          (huge, "failed"), (surrogate, "failed"),
                          (unprintable, "failed"), (fine, "succeeded")):
        wait_for_state(engine, job_id, state)

    assert job_row(engine, nul).last_error.endswith("ValueError: bad\\x00byte")
    assert job_row(engine, surrogate).last_error.endswith(
        "ValueError: lone \\ud800 surrogate")
    assert job_row(engine, unprintable).last_error.endswith(
        "Unprintable: <exception str() failed>")
    assert job_row(engine, cancelled).last_error == "stop\\x00here"
    huge_error = job_row(engine, huge).last_error
    assert MAX_ERROR_CHARS - 40 < len(huge_error) <= MAX_ERROR_CHARS
    assert "characters cut ...]" in huge_error
    assert huge_error.startswith("Traceback (most recent call last):")
    assert huge_error.endswith("x the end")
    # The log record has a shorter excerpt, ending as the row's does.
    logged = worker.output.split(f"raise_huge job {huge} failed after 1 attempt(s):\n",
                                 1)[1]
    assert "x the end" in logged[:LOGGED_ERROR_CHARS + 100]
    assert len(worker.output) < MAX_ERROR_CHARS // 2
    assert worker.process.poll() is None


def test_an_outcome_the_database_refuses_is_recorded_as_a_failure_saying_so(
    pg_url, engine_pg, start_worker
):
    # A real refusal, by a check constraint, of a value no bound in dbtasks
    # foresees: the worker must not take it for an outage and stall on it.
    refuse = (f"ALTER TABLE dbtasks_jobs ADD CONSTRAINT test_refuse CHECK "
              f"(last_error IS NULL OR last_error NOT LIKE '%{errors.REFUSED_MARK}%')")
    with engine_pg.begin() as conn:
        conn.execute(text(refuse))
    try:
        with engine_pg.begin() as conn:
            refused = enqueue(conn, errors.raise_refused)
            others = [enqueue(conn, errors.raise_nul) for _ in range(3)]
            fine = enqueue(conn, echo_params, {"with": "them"})
        worker = start_worker(pg_url, "--concurrency", "10", tasks=BAD_TASKS)

        for job_id in (refused, *others):
            wait_for_state(engine_pg, job_id, "failed")
        wait_for_state(engine_pg, fine, "succeeded")
        with engine_pg.begin() as conn:
            later = enqueue(conn, echo_params, {"later": True})
        wait_for_state(engine_pg, later, "succeeded")
    finally:
        with engine_pg.begin() as conn:
            conn.execute(text("ALTER TABLE dbtasks_jobs DROP CONSTRAINT test_refuse"))

    state, attempt, owner, last_error = job_row(engine_pg, refused)
    assert (state, attempt, owner) == ("failed", 1, None)
    assert last_error == (
        "dbtasks could not record this job's outcome (failed): the database "
        'refused it: new row for relation "dbtasks_jobs" violates check '
        'constraint "test_refuse"'
    )
    assert all(job_row(engine_pg, job_id).last_error.endswith("bad\\x00byte")
               for job_id in others)
    # The outcome is logged as it was recorded, not as the task ended.
    worker.wait_for_output(
        f"raise_refused job {refused} failed after 1 attempt(s):\n"
        "dbtasks could not record this job's outcome (failed)"
    )
    assert worker.process.poll() is None
    assert "database unavailable" not in worker.output


def test_a_plain_function_returning_a_coroutine_fails_rather_than_succeeding(
    database_url, engine, start_worker
):
    """Nothing would await the coroutine: recorded as a success, the job's work
    would be lost without a word. No retry could do better: it fails at once."""
    with engine.begin() as conn:
        unawaited = enqueue(conn, wrapped_async, max_attempts=5)
        after = enqueue(conn, echo_params, {"after": "it"})
    worker = start_worker(database_url, tasks=BAD_TASKS)

    wait_for_state(engine, unawaited, "failed")
    wait_for_state(engine, after, "succeeded")
    row = job_row(engine, unawaited)
    assert (row.state, row.attempt) == ("failed", 1)
    assert row.last_error.endswith(
        "TaskDefinitionError: task wrapped_async is a plain function that returned "
        "coroutine unawaited, so its work never ran; declare it with async def, "
        "or await the call inside it"
    )
    assert "never awaited" not in worker.output
    assert worker.process.poll() is None


def test_a_commit_inside_the_job_transaction_never_has_its_writes_made_twice(
    database_url, engine, start_worker
):
    """context.transaction() commits the task's writes with the job's success;
    a task that commits on its own has its writes in without the success. A
    retry would write them again: the worker sees the commit instead."""
    with engine.begin() as conn:
        went_on = enqueue(conn, commits_inside)
        raised = enqueue(conn, commits_then_raises)
        twice = enqueue(conn, transaction_twice)
    worker = start_worker(database_url)

    wait_for_state(engine, went_on, "succeeded")
    wait_for_state(engine, raised, "cancelled")
    wait_for_state(engine, twice, "succeeded")

    assert [event for _, _, event in run_events(engine, went_on)] == [
        "before", "after"]
    assert [event for _, _, event in run_events(engine, raised)] == ["before"]
    assert job_row(engine, raised).attempt == 1
    assert job_row(engine, raised).last_error == (
        "committed inside context.transaction(), which commits the task's writes "
        "with the job's success, then raised RuntimeError: after the commit; not "
        "retried, since what it committed would be written again"
    )
    # A second block would commit apart from the success: refused, saying so.
    assert [event for _, _, event in run_events(engine, twice)] == ["first"]
    worker.wait_for_output(
        f"JobError: context.transaction() was used already in job {twice}; use it "
        "once per job"
    )
    assert "lease expired" not in worker.output


def test_a_thread_left_behind_is_refused_the_job_transaction_saying_why(
    database_url, engine, start_worker
):
    """Not "lease lost": the job succeeded, and no other worker has it."""
    with engine.begin() as conn:
        job_id = enqueue(conn, transaction_after_return)
    start_worker(database_url)

    wait_for_state(engine, job_id, "succeeded")
    wait_for(lambda: sql(engine, "SELECT note FROM test_runs WHERE job_id = :id "
                         "AND event = 'refused'", id=job_id),
             message="the thread left behind to be refused")

    assert sql(engine, "SELECT note FROM test_runs WHERE job_id = :id",
               id=job_id) == [(
        f"JobError: the run of job {job_id} has ended (it returned, or ran past "
        "its timeout); context.transaction() is for the run itself, not for "
        "threads it leaves running",
    )]


# --- command-line values ----------------------------------------------------------


def test_an_out_of_range_priority_from_the_cli_writes_nothing(pg_url, engine_pg):
    result = cli("enqueue", "echo_params", "--priority", "101", database_url=pg_url)

    assert error_line(result.returncode, result.stdout, result.stderr) == (
        "error: priority 101 is out of range: use -100 to 100 (lower runs first)"
    )
    assert count_jobs(engine_pg) == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lease", "0.001", "lease_seconds (--lease) must be from 1 to "
         "3.16224e+08 seconds (ten years); got 0.001"),
        ("--lease", "1e12", "lease_seconds (--lease) must be from 1 to "
         "3.16224e+08 seconds (ten years); got 1000000000000.0"),
        ("--node-timeout", "0", "node_timeout (--node-timeout) must be from 1 to "
         "3.16224e+08 seconds (ten years); got 0.0"),
        ("--poll-interval", "nan", "poll_interval (--poll-interval) must be from "
         "0.01 to 3.16224e+08 seconds (ten years); got nan"),
        ("--shutdown-grace", "inf", "shutdown_grace (--shutdown-grace) must be "
         "from 0 to 3.16224e+08 seconds (ten years); got inf"),
        ("--retention", "-1", "retention (--retention) must be from 0 to "
         "3.16224e+08 seconds (ten years); got -1.0"),
    ],
)
def test_a_worker_refuses_timings_it_cannot_keep(sqlite_url, option, value,
                                                 message):
    """A lease of a millisecond would have the worker renew it without rest;
    a NaN or infinite one would never expire. Refused before any work."""
    result = cli("worker", option, value, database_url=sqlite_url)

    assert error_line(result.returncode, result.stdout, result.stderr) == (
        f"error: {message}"
    )


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("n" * 201, "the node name (--node) must be a name of 1 to 200 characters"),
        ("tab\there", "the node name (--node) 'tab\\there' has surrounding spaces "
         "or control characters"),
        (" padded", "the node name (--node) ' padded' has surrounding spaces or "
         "control characters"),
    ],
    ids=["too-long", "control-character", "padded"],
)
def test_a_worker_refuses_a_node_name_its_logs_and_rows_cannot_hold(
    sqlite_url, node, message
):
    result = cli("worker", "--node", node, database_url=sqlite_url)

    line = error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith(f"error: {message}")


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        ("q" * 101, "must be a name of 1 to 100 characters"),
        ("a,,b", "name at least one queue, and no empty queue names"),
        ("default,b,default", "queue 'default' is named twice in --queues"),
        # Refused as `dbtasks enqueue --queue " b"` is: no job could be in it.
        ("a, b", "queue (--queues) ' b' has surrounding spaces"),
    ],
    ids=["too-long", "empty", "repeated", "spaced"],
)
def test_a_worker_refuses_queue_names_no_job_can_have(sqlite_url, queues, message):
    result = cli("worker", "--queues", queues, database_url=sqlite_url)

    line = error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith("error: ") and message in line


def test_a_worker_on_an_unreachable_server_exits_with_one_line():
    url = "postgresql://postgres:never-shown-pw@127.0.0.1:1/app"

    result = cli("worker", database_url=url)

    line = error_line(result.returncode, result.stdout, result.stderr)
    assert line.startswith("error: database postgresql+psycopg://postgres:***@"
                           "127.0.0.1:1/app: ")
    assert "Connection refused" in line
    assert "never-shown-pw" not in result.stderr


# --- a database at an older revision ----------------------------------------------

#: The revision of the next release, one after this code's head.
NEXT_REVISION = f"{int(HEAD_REVISION) + 1:04d}"

NEXT_MIGRATION = f'''
"""The next release's migration: nothing to change, only a newer revision.

Revision ID: {NEXT_REVISION}
Revises: {HEAD_REVISION}
"""

revision = "{NEXT_REVISION}"
down_revision = "{HEAD_REVISION}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


@pytest.fixture
def next_release(tmp_path: Path) -> Path:
    """A copy of this dbtasks with one more migration: the next release.

    Run from the copy's folder, `python -m dbtasks` imports the copy, whose
    head is NEXT_REVISION; a database migrated by this checkout is older.
    """
    copy = tmp_path / "next_release"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "dbtasks", copy / "dbtasks", ignore=ignore)
    shutil.copytree(ROOT / "migrations", copy / "migrations", ignore=ignore)
    (copy / "migrations" / "versions" / f"{NEXT_REVISION}_next.py").write_text(
        NEXT_MIGRATION
    )
    # As the release that adds the migration does (a test holds the two equal).
    migrate_module = copy / "dbtasks" / "migrate.py"
    migrate_module.write_text(migrate_module.read_text().replace(
        f'HEAD_REVISION = "{HEAD_REVISION}"', f'HEAD_REVISION = "{NEXT_REVISION}"'))
    (copy / "release_tasks").mkdir()
    (copy / "release_tasks" / "jobs.py").write_text(textwrap.dedent(GOOD_MODULE))
    return copy


def test_a_database_at_an_older_revision_is_refused_until_migrated(
    sqlite_url, sqlite_engine, next_release
):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, database_url=sqlite_url, cwd=next_release,
                   tasks=next_release / "release_tasks",
                   env=clean_env(PYTHONPATH=str(next_release)))

    worker, enqueued = run("worker"), run("enqueue", "fine")
    migrated = run("migrate")
    after = run("enqueue", "fine")

    older = (f"error: the database's dbtasks schema is at revision {HEAD_REVISION}, "
             f"older than this code's {NEXT_REVISION}: run `dbtasks migrate` to "
             "upgrade it")
    assert error_line(worker.returncode, worker.stdout, worker.stderr) == older
    assert error_line(enqueued.returncode, enqueued.stdout, enqueued.stderr) == older
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema upgraded from {HEAD_REVISION} to {NEXT_REVISION}" in (
        migrated.stderr
    )
    assert after.returncode == 0, after.stderr
    assert sql(sqlite_engine, "SELECT id, task FROM dbtasks_jobs") == [
        (int(after.stdout), "fine")
    ]
    assert sql(sqlite_engine, "SELECT count(*) FROM dbtasks_nodes") == [(0,)]


# --- the catalogue ----------------------------------------------------------------

CATALOGUE: list[tuple[str, list[str]]] = [
    ("malformed database URL", ["test_cli::test_an_unusable_database_url"]),
    ("wrong password, never shown", [
        "test_cli::test_a_wrong_password_is_refused_and_never_shown",
        "test_cli::test_a_wrong_password_on_migrate_is_one_line"]),
    ("unreachable server", [
        "test_cli::test_migrate_on_an_unreachable_server",
        "test_cli::test_enqueue_on_an_unreachable_server",
        "test_bad_inputs::test_a_worker_on_an_unreachable_server_exits_with_one_line"]),
    ("database never migrated", [
        "test_migrations::test_enqueue_on_an_unmigrated_database_says_to_migrate",
        "test_migrations::test_the_library_enqueue_on_an_unmigrated_database_says_"
        "to_migrate",
        "test_migrations::test_a_worker_on_an_unmigrated_database_stops_and_says_"
        "to_migrate"]),
    ("database at an older revision", [
        "test_bad_inputs::test_a_database_at_an_older_revision_is_refused_until_"
        "migrated"]),
    ("database at a newer revision", [
        "test_migrations::test_a_database_from_a_newer_incompatible_dbtasks_is_"
        "refused",
        "test_migrations::test_migrate_on_a_database_from_a_newer_dbtasks_says_to_"
        "upgrade"]),
    ("params with NaN (refused)", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written",
        "test_params::test_unfit_values_are_refused_with_their_path_and_a_fix",
        "test_cli::test_invalid_json_params_to_enqueue"]),
    ("params with Infinity (refused)", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written",
        "test_cli::test_params_that_json_holds_but_dbtasks_refuses"]),
    ("params with NUL in a string (accepted, round-trips)", [
        "test_enqueue::test_params_round_trip_exactly",
        "test_params::test_non_ascii_and_nul_are_stored_escaped",
        "test_bad_inputs::test_nul_and_lone_surrogates_in_params_reach_the_task_"
        "exactly"]),
    ("params over the size limit", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written",
        "test_params::test_params_up_to_the_limit_are_accepted_and_one_byte_more_"
        "refused"]),
    ("params with a datetime", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written"]),
    ("params with a Decimal", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written"]),
    ("params with bytes", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written"]),
    ("params with a set", [
        "test_enqueue::test_unfit_params_are_refused_before_anything_is_written"]),
    ("naive run_at", ["test_enqueue::test_a_naive_run_at_is_refused",
                      "test_cli::test_a_naive_run_at"]),
    ("run_at beyond the 10-year bound", [
        "test_enqueue::test_a_run_at_more_than_ten_years_ahead_is_refused"]),
    ("out-of-range priority", [
        "test_enqueue::test_priority_bounds_are_stored_and_beyond_them_refused",
        "test_bad_inputs::test_an_out_of_range_priority_from_the_cli_writes_"
        "nothing"]),
    ("unknown task name from the CLI", [
        "test_cli::test_an_unknown_task_name",
        "test_cli::test_run_of_an_unknown_task_name"]),
    ("unknown task name from Python", [
        "test_enqueue::test_an_unknown_task_name_is_refused"]),
    ("task names and params with SQL metacharacters and quotes", [
        "test_enqueue::test_task_names_with_sql_metacharacters_round_trip",
        "test_enqueue::test_params_round_trip_exactly",
        "test_security::test_hostile_rows_in_the_jobs_table_run_nothing_outside_"
        "the_registry"]),
    ("a task module with a syntax error", [
        "test_tasks::test_a_syntax_error_names_the_file_and_line",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("a task module that fails to import", [
        "test_tasks::test_an_import_error_names_the_file_and_the_cause",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("two tasks with the same name", [
        "test_tasks::test_two_tasks_with_one_name_in_two_files",
        "test_tasks::test_two_tasks_with_one_name_in_one_file",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("an invalid scope", [
        "test_tasks::test_bad_settings_are_refused_where_the_function_is",
        "test_tasks::test_a_bad_task_in_a_module_names_the_file",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("a negative frequency", [
        "test_tasks::test_bad_settings_are_refused_where_the_function_is",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("a non-numeric frequency", [
        "test_tasks::test_a_bad_task_in_a_module_names_the_file",
        "test_bad_inputs::test_a_worker_refuses_to_start_on_a_broken_tasks_folder"]),
    ("a missing tasks folder", ["test_cli::test_a_missing_tasks_folder",
                                "test_tasks::test_a_missing_folder"]),
    ("a SQLite file locked by another process", [
        "test_bad_inputs::test_a_locked_sqlite_file_fails_enqueue_and_migrate_after_"
        "the_busy_timeout",
        "test_bad_inputs::test_a_lock_released_within_the_busy_timeout_is_waited_out",
        "test_bad_inputs::test_a_worker_outlives_a_locked_sqlite_file_and_then_runs_"
        "the_job_once"]),
    ("a SQLite file in a folder that does not exist", [
        "test_cli::test_a_sqlite_file_in_a_missing_folder"]),
    ("two workers given the same explicit node name", [
        "test_worker::test_a_second_worker_refuses_a_node_name_in_use"]),
    ("an application transaction on SQLite left open while workers run", [
        "test_bad_inputs::test_an_open_application_transaction_on_sqlite_blocks_"
        "workers_but_loses_nothing"]),
    ("a task function that cannot take (params, context)", [
        "test_tasks::test_a_function_that_cannot_take_params_and_context_is_"
        "refused",
        "test_tasks::test_a_generator_function_is_refused_for_it_would_run_"
        "nothing"]),
    ("a Retry delay or task frequency past what a timestamp holds", [
        "test_tasks::test_a_retry_delay_beyond_ten_years_or_not_a_number_is_"
        "refused",
        "test_tasks::test_bad_settings_are_refused_where_the_function_is"]),
    ("queue names no worker can serve: too long, empty, with a comma, repeated", [
        "test_bad_inputs::test_a_worker_refuses_queue_names_no_job_can_have",
        "test_enqueue::test_the_queue_name_is_stored_and_an_unservable_one_refused",
        "test_tasks::test_bad_settings_are_refused_where_the_function_is"]),
    ("max_attempts beyond its column, a schema that is not a name", [
        "test_enqueue::test_max_attempts_beyond_the_column_and_a_schema_not_a_name_"
        "are_refused"]),
    ("an async task that swallows its cancellation or blocks the event loop", [
        "test_worker::test_an_async_task_that_will_not_stop_at_its_timeout_is_"
        "failed_anyway"]),
    ("worker timings too short, too long, negative, NaN or infinite", [
        "test_bad_inputs::test_a_worker_refuses_timings_it_cannot_keep"]),
    ("a task error with a NUL, a lone surrogate, a million characters, or a "
     "str() that raises", [
        "test_bad_inputs::test_error_texts_are_stored_with_nuls_escaped_and_a_huge_"
        "one_cut"]),
    ("an outcome the database refuses to store", [
        "test_bad_inputs::test_an_outcome_the_database_refuses_is_recorded_as_a_"
        "failure_saying_so"]),
    ("a plain function that returns a coroutine instead of running it", [
        "test_bad_inputs::test_a_plain_function_returning_a_coroutine_fails_rather_"
        "than_succeeding",
        "test_tasks::test_run_inline_refuses_a_coroutine_a_plain_function_returned"]),
    ("a task that commits inside context.transaction(), opens it twice, or "
     "leaves a thread that opens it after the run", [
        "test_bad_inputs::test_a_commit_inside_the_job_transaction_never_has_its_"
        "writes_made_twice",
        "test_bad_inputs::test_a_thread_left_behind_is_refused_the_job_transaction_"
        "saying_why"]),
    ("a node name too long, padded or with control characters", [
        "test_bad_inputs::test_a_worker_refuses_a_node_name_its_logs_and_rows_"
        "cannot_hold"]),
    ("a job whose stored params are not valid JSON, or hold NaN", [
        "test_security::test_hostile_rows_in_the_jobs_table_run_nothing_outside_"
        "the_registry",
        "test_bad_inputs::test_a_job_whose_params_are_not_json_fails_and_the_worker_"
        "goes_on",
        "test_bad_inputs::test_a_job_whose_params_are_not_json_fails_at_once_saying_"
        "so"]),
]


def test_every_catalogued_case_names_tests_that_exist():
    """The catalogue of bad inputs: at least thirty cases, each with a test.

    A renamed or deleted test fails this, so the catalogue cannot go stale.
    """
    missing = []
    for _, tests in CATALOGUE:
        for reference in tests:
            module_name, function = reference.split("::")
            folder = "unit" if module_name in ("test_params", "test_tasks") else (
                "integration")
            module = importlib.import_module(f"tests.{folder}.{module_name}")
            if not callable(getattr(module, function, None)):
                missing.append(reference)

    assert missing == []
    assert len(CATALOGUE) >= 30
    assert all(tests for _, tests in CATALOGUE)
