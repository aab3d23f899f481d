"""The real `dbtasks` command line, run as a subprocess.

A bad input ends with one line, `error: ...`, and exit code 2 (or click's own
usage error), never a traceback, and never with the database password.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from dbtasks.migrate import HEAD_REVISION
from dbtasks.schema import jobs
from tests.conftest import APP_TASKS, ROOT, sql

WRONG_PASSWORD = "Wr0ng-horse-battery"
RIGHT_PASSWORD = "c0rrect-horse-staple"


def cli(*args: str, database_url: str | None = None, tasks: Path = APP_TASKS
        ) -> subprocess.CompletedProcess[str]:
    """Run `python -m dbtasks` with no DBTASKS_* variables from this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBTASKS_")}
    options = ["--tasks", str(tasks)]
    if database_url is not None:
        options += ["--database-url", database_url]
    return subprocess.run(
        [sys.executable, "-m", "dbtasks", *options, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *expected: str
                       ) -> str:
    """Exit code 2 and a single `error: ...` line that holds every expected part."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for part in expected:
        assert part in lines[0]
    return lines[0]


def assert_usage_error(result: subprocess.CompletedProcess[str], *expected: str
                       ) -> None:
    """Click's usage error: exit code 2, `Error: ...` and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Error: Invalid value for " in result.stderr
    for part in expected:
        assert part in result.stderr


# --- commands that work -------------------------------------------------------


def test_migrate_creates_the_tables_then_has_nothing_to_do(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"

    first = cli("migrate", database_url=url)
    second = cli("migrate", database_url=url)

    assert first.returncode == 0, first.stderr
    assert f"schema upgraded from empty to {HEAD_REVISION}" in first.stderr
    assert second.returncode == 0, second.stderr
    assert f"schema already at revision {HEAD_REVISION}" in second.stderr
    assert (tmp_path / "fresh.db").exists()


def test_enqueue_with_params_run_at_and_options(database_url, engine):
    args = ("enqueue", "noop", "--params", '{"id": 7, "name": "Zoë"}',
            "--run-at", "2030-01-01T09:00:00+02:00", "--priority", "3",
            "--queue", "reports", "--idempotency-key", "cli:7")

    first = cli(*args, database_url=database_url)
    again = cli(*args, database_url=database_url)

    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    job_id = int(first.stdout)
    query = select(jobs.c.id, jobs.c.task, jobs.c.params, jobs.c.run_at,
                   jobs.c.priority, jobs.c.queue, jobs.c.idempotency_key)
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(query)]
    assert rows == [(
        job_id, "noop", '{"id":7,"name":"Zo\\u00eb"}',
        datetime(2030, 1, 1, 7, 0, tzinfo=timezone.utc), 3, "reports", "cli:7",
    )]


def test_enqueue_of_a_task_not_yet_deployed(database_url, engine):
    result = cli("enqueue", "tomorrows_task", "--not-yet-deployed",
                 database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert sql(engine, "SELECT id, task FROM dbtasks_jobs") == [
        (int(result.stdout), "tomorrows_task")
    ]


@pytest.fixture
def cli_tasks(tmp_path: Path) -> Path:
    folder = tmp_path / "cli_tasks"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "reports.py").write_text(
        "from dbtasks import task\n\n"
        "@task(name='double')\n"
        "def double(params, context):\n"
        "    '''Double n.\n\n    More words.'''\n"
        "    return {'doubled': params['n'] * 2, 'node': context.node}\n"
    )
    (folder / "ticks.py").write_text(
        "from datetime import timedelta\n"
        "from dbtasks import task\n\n"
        "@task(name='tick', scope='all', frequency=timedelta(minutes=5))\n"
        "async def tick(params, context):\n"
        "    '''Tick every five minutes.'''\n"
        "    return ['tick', params]\n"
    )
    return folder


def test_tasks_lists_each_task_with_scope_frequency_and_description(cli_tasks):
    result = cli("tasks", tasks=cli_tasks)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "double\tany\ton enqueue\tDouble n.",
        "tick\tall\tevery 300s\tTick every five minutes.",
    ]


def test_run_runs_sync_and_async_tasks_inline(cli_tasks):
    double = cli("run", "double", "--params", '{"n": 21}', tasks=cli_tasks)
    tick = cli("run", "tick", "--params", '{"at": "noon"}', tasks=cli_tasks)

    assert double.returncode == 0, double.stderr
    assert double.stdout == '{"doubled": 42, "node": "inline"}\n'
    assert tick.returncode == 0, tick.stderr
    assert tick.stdout == '["tick", {"at": "noon"}]\n'



@pytest.fixture
def outcome_tasks(tmp_path: Path) -> Path:
    folder = tmp_path / "outcome_tasks"
    folder.mkdir()
    (folder / "outcomes.py").write_text(
        "from dbtasks import Cancel, Retry, task\n\n"
        "@task\n"
        "def cancels(params, context):\n"
        "    raise Cancel('not needed any more')\n\n"
        "@task\n"
        "def retries(params, context):\n"
        "    raise Retry(delay=5)\n\n"
        "@task\n"
        "def fails(params, context):\n"
        "    raise RuntimeError('failed on purpose')\n\n"
        "@task\n"
        "def exits(params, context):\n"
        "    import sys\n"
        "    sys.exit(3)\n\n"
        "@task(timeout=0.5)\n"
        "def hangs(params, context):\n"
        "    import time\n"
        "    time.sleep(60)\n\n"
        "@task(timeout=0.5)\n"
        "async def hangs_async(params, context):\n"
        "    import asyncio\n"
        "    await asyncio.sleep(60)\n\n"
        "@task(timeout=0.5)\n"
        "async def swallows(params, context):\n"
        "    import asyncio\n"
        "    for _ in range(60):\n"
        "        try:\n"
        "            await asyncio.sleep(1)\n"
        "        except asyncio.CancelledError:\n"
        "            pass\n\n"
        "@task(timeout=0.5)\n"
        "async def blocks_loop(params, context):\n"
        "    import time\n"
        "    time.sleep(60)\n\n"
        "@task\n"
        "def writes_note(params, context):\n"
        "    from sqlalchemy import text\n"
        "    with context.transaction() as conn:\n"
        "        insert = text('INSERT INTO inline_notes VALUES (:note)')\n"
        "        conn.execute(insert, params)\n"
        "        if params['note'] == 'dropped':\n"
        "            raise RuntimeError('after the write')\n"
        "    return 'written'\n\n"
        "@task\n"
        "def twice(params, context):\n"
        "    with context.transaction():\n"
        "        pass\n"
        "    with context.transaction():\n"
        "        pass\n"
    )
    return folder


def test_run_gives_a_task_its_transaction_on_the_configured_database(
    database_url, engine, outcome_tasks
):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE inline_notes (note VARCHAR(20) NOT NULL)"))
    try:
        kept = cli("run", "writes_note", "--params", '{"note": "kept"}',
                   database_url=database_url, tasks=outcome_tasks)
        dropped = cli("run", "writes_note", "--params", '{"note": "dropped"}',
                      database_url=database_url, tasks=outcome_tasks)
        twice = cli("run", "twice", database_url=database_url,
                    tasks=outcome_tasks)

        assert (kept.returncode, kept.stdout) == (0, '"written"\n'), kept.stderr
        assert dropped.returncode == 1
        assert dropped.stderr.rstrip().endswith("RuntimeError: after the write")
        assert twice.returncode == 1
        assert "JobError: context.transaction() was used already in this inline " \
            "run" in twice.stderr
        assert sql(engine, "SELECT note FROM inline_notes") == [("kept",)]
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE inline_notes"))


@pytest.mark.parametrize(
    ("task", "line"),
    [("cancels", "task cancels cancelled: not needed any more"),
     ("retries", "task retries asked to be retried: retry requested by the task"),
     ("exits", "task exits called sys.exit(3)")],
)
def test_run_of_a_task_that_cancels_or_retries_says_so_in_one_line(
    outcome_tasks, task, line
):
    result = cli("run", task, tasks=outcome_tasks)

    assert (result.returncode, result.stdout, result.stderr) == (1, "", line + "\n")


def test_run_of_a_task_that_leaves_a_thread_running_still_exits():
    started = time.monotonic()
    result = cli("run", "leaves_thread")

    assert time.monotonic() - started < 30  # not the thread's ten minutes
    assert (result.returncode, result.stdout) == (0, '"left"\n'), result.stderr
    assert result.stderr.endswith(
        "task leaves_thread left 1 thread(s) running; they end with this process\n")


def test_run_of_a_failing_task_shows_its_traceback(outcome_tasks):
    result = cli("run", "fails", tasks=outcome_tasks)

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.rstrip().endswith("RuntimeError: failed on purpose")


@pytest.mark.parametrize("task", ["hangs", "hangs_async", "swallows", "blocks_loop"])
def test_run_stops_a_task_at_its_timeout(outcome_tasks, task):
    started = time.monotonic()
    result = cli("run", task, tasks=outcome_tasks)

    assert time.monotonic() - started < 20  # not the task's minute
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.rstrip().endswith(
        f"TimeoutError: task {task} ran past its timeout of 0.5s"
    )


# --- bad inputs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql://app:s3cr3t-pw@db:notaport/app", "is malformed"),
        ("not a url at all", "is malformed"),
        ("mysql://app:s3cr3t-pw@localhost/app",
         "names 'mysql'; dbtasks supports postgresql:// and sqlite:/// URLs"),
        ("sqlite+aiosqlite:///queue.db", "the SQLite driver 'sqlite+aiosqlite'"),
        ("postgresql://app@127.0.0.1:1/app?password=s3cr3t-pw&sslpassword=s3cr3t-pw",
         "database postgresql+psycopg://app@127.0.0.1:1/app?password=***&"
         "sslpassword=***: connection failed"),
        ("postgresql://app:s3cr3t@pw@127.0.0.1/app",
         "has more than one '@' before its host: percent-encode"),
    ],
    ids=["bad-port", "garbage", "mysql", "async-sqlite", "query-password",
         "unescaped-at"],
)
def test_an_unusable_database_url(url, expected):
    result = cli("migrate", database_url=url)

    assert_clean_error(result, expected)
    assert "s3cr3t" not in result.stderr
    assert "pw@" not in result.stderr


def test_a_sqlite_file_in_a_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"

    result = cli("migrate", database_url=f"sqlite:///{missing / 'queue.db'}")

    assert_clean_error(result, "the folder of the SQLite database", str(missing))
    assert not (tmp_path / "no").exists()


UNREACHABLE = "postgresql://postgres:not-sent-pw@127.0.0.1:1/app"


def test_migrate_on_an_unreachable_server():
    result = cli("migrate", database_url=UNREACHABLE)

    assert_clean_error(
        result, "error: database postgresql+psycopg://postgres:***@127.0.0.1:1/app",
        "Connection refused",
    )
    assert "not-sent-pw" not in result.stderr


def test_enqueue_on_an_unreachable_server():
    result = cli("enqueue", "noop", database_url=UNREACHABLE)

    assert_clean_error(result, "127.0.0.1:1", "Connection refused", "; is the server "
                       "running, and listening on that host and port?")


def test_migrate_on_a_database_that_does_not_exist(pg_url):
    missing = make_url(pg_url).set(database="dbtasks_nowhere_to_be_found")
    result = cli("migrate", database_url=missing.render_as_string(False))

    assert_clean_error(result, 'database "dbtasks_nowhere_to_be_found" does not '
                       "exist; create it (createdb), or fix the name in the URL")


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[int]:
    """A private PostgreSQL that checks passwords; yields its port.

    The shared server trusts every local connection, so a wrong password
    would be accepted there. This one has a role with a password.
    """
    bindir = _postgres_bindir()
    folder = Path(tempfile.mkdtemp(prefix="dbtasks-pw-"))
    port = _free_port()
    (folder / "pw").write_text(RIGHT_PASSWORD)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(folder / "data"),
         "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}"],
        check=True, capture_output=True,
    )
    subprocess.run(
        [*as_postgres, str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-w",
         "-l", str(folder / "log"), "-o",
         f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -F", "start"],
        check=True, capture_output=True,
    )
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                             password=RIGHT_PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(
                f"CREATE ROLE dbtasks_app LOGIN PASSWORD '{RIGHT_PASSWORD}'"
            )
            conn.execute("CREATE DATABASE dbtasks_app OWNER dbtasks_app")
        yield port
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(folder / "data"),
             "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def _postgres_bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        bindir = subprocess.run([found, "--bindir"], capture_output=True, text=True)
        candidate = Path(bindir.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    pytest.skip("no initdb to start a password-checking PostgreSQL")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_private_server_accepts_the_right_password(password_postgres):
    url = (f"postgresql://dbtasks_app:{RIGHT_PASSWORD}@127.0.0.1:"
           f"{password_postgres}/dbtasks_app")

    result = cli("migrate", database_url=url)

    assert result.returncode == 0, result.stderr
    assert RIGHT_PASSWORD not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["migrate", "enqueue", "worker"])
def test_a_wrong_password_is_refused_and_never_shown(password_postgres, command):
    url = (f"postgresql://dbtasks_app:{WRONG_PASSWORD}@127.0.0.1:"
           f"{password_postgres}/dbtasks_app")
    args = ["enqueue", "noop"] if command == "enqueue" else [command]

    result = cli(*args, database_url=url)

    assert result.returncode == 2, result.stderr
    assert 'password authentication failed for user "dbtasks_app"' in result.stderr
    assert "Traceback" not in result.stderr
    assert WRONG_PASSWORD not in result.stderr + result.stdout


def test_a_wrong_password_on_migrate_is_one_line(password_postgres):
    url = (f"postgresql://dbtasks_app:{WRONG_PASSWORD}@127.0.0.1:"
           f"{password_postgres}/dbtasks_app")

    result = cli("migrate", database_url=url)

    assert_clean_error(
        result,
        f"error: database postgresql+psycopg://dbtasks_app:***@127.0.0.1:"
        f"{password_postgres}/dbtasks_app",
        "password authentication failed",
    )


INVALID_JSON = pytest.mark.parametrize(
    "params, expected",
    [("{bad", "not valid JSON"), ('{"x": NaN}', "NaN is not allowed in params"),
     ('{"a": 1, "b": {"c": 2, "c": 3}}', "the key 'c' is given more than once"),
     ('{"n": -' + "9" * 5000 + "}", "an integer of 5,000 digits is longer than "
      "Python reads; pass it as a string"),
     ('{"x": [1e999]}', "1e999 is beyond a float's range; pass it as a string")],
    ids=["broken", "nan", "repeated-key", "huge-integer", "infinite-float"],
)


@INVALID_JSON
def test_invalid_json_params_to_enqueue(database_url, engine, params, expected):
    result = cli("enqueue", "noop", "--params", params, database_url=database_url)

    assert_usage_error(result, "--params", expected)
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


@INVALID_JSON
def test_invalid_json_params_to_run(cli_tasks, params, expected):
    result = cli("run", "double", "--params", params, tasks=cli_tasks)

    assert_usage_error(result, "--params", expected)


def test_params_that_json_holds_but_dbtasks_refuses(database_url, engine):
    deep = "[" * 101 + "]" * 101
    result = cli("enqueue", "noop", "--params", f'{{"n": {deep}}}',
                 database_url=database_url)

    assert_clean_error(result, "params['n'][0][0]",
                       "nests dicts and lists more than 100 levels deep; flatten them")
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_a_naive_run_at(database_url, engine):
    result = cli("enqueue", "noop", "--run-at", "2030-01-01T09:00:00",
                 database_url=database_url)

    assert_clean_error(result, "--run-at 2030-01-01T09:00:00 is naive: add its UTC "
                       "offset, such as 2030-01-01T09:00:00+00:00 or "
                       "2030-01-01T09:00:00Z")
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_a_run_at_that_is_not_a_time(database_url):
    result = cli("enqueue", "noop", "--run-at", "next tuesday",
                 database_url=database_url)

    assert_usage_error(result, "--run-at", "'next tuesday' is not an ISO time")


def test_an_unknown_task_name(database_url, engine):
    result = cli("enqueue", "no_such_task", database_url=database_url)

    assert_clean_error(result, "no task named 'no_such_task'",
                       "not_yet_deployed=True")
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_run_of_an_unknown_task_name(cli_tasks):
    result = cli("run", "no_such_task", tasks=cli_tasks)

    assert_clean_error(result, "no task named 'no_such_task' is loaded")


@pytest.mark.parametrize("command", ["tasks", "run", "worker"])
def test_a_missing_tasks_folder(tmp_path, command):
    missing = tmp_path / "tasks_that_are_not_here"
    args = ["run", "noop"] if command == "run" else [command]

    result = cli(*args, database_url=f"sqlite:///{tmp_path / 'q.db'}",
                 tasks=missing)

    assert_clean_error(result, f"the tasks folder {missing} does not exist")


def test_a_tasks_folder_that_is_a_file(tmp_path):
    file = tmp_path / "tasks"
    file.write_text("")

    result = cli("tasks", tasks=file)

    assert_clean_error(result, f"the tasks folder {file} is a file, not a folder: "
                       "point --tasks / DBTASKS_TASKS at the folder")
