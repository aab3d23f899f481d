"""Migrations: head matches schema.py, reruns are no-ops, the revision is checked.

Each PostgreSQL test gets a database of its own, created and dropped here, so
the session's shared database is never migrated twice or left half-made.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    insert,
    inspect,
    text,
)
from sqlalchemy.engine import make_url

from dbtasks import (
    DbtasksError,
    SchemaError,
    commands,
    enqueue,
    enqueue_many,
    migrate,
)
from dbtasks.config import Config, config_from_env
from dbtasks.database import create_queue_engine
from dbtasks.schema import PREFIX, VERSION_TABLE, metadata
from tests.app_tasks.basic import noop
from tests.conftest import APP_TASKS, ROOT, sql, wait_for

QUEUE_TABLES = ["dbtasks_completions", "dbtasks_jobs", "dbtasks_nodes",
                "dbtasks_schedules", "dbtasks_schema_info"]


@pytest.fixture
def new_database(postgres_admin_url: str, tmp_path: Path
                 ) -> Iterator[Callable[[str], str]]:
    """Make empty databases: `new_database("postgresql")` or `("sqlite")`."""
    created: list[str] = []

    def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'empty-{uuid.uuid4().hex[:6]}.db'}"
        name = f"dbtasks_migrations_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = make_url(postgres_admin_url).set(
            drivername="postgresql+psycopg", database=name
        )
        return url.render_as_string(hide_password=False)

    yield make
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, new_database) -> str:
    """An empty database, on PostgreSQL and on SQLite in turn."""
    return new_database(request.param)


def config_for(url: str, schema: str | None = None) -> Config:
    return config_from_env(database_url=url, schema=schema, tasks_path=APP_TASKS)


@pytest.fixture
def queue_engine(empty_url: str) -> Iterator[Engine]:
    engine = create_queue_engine(config_for(empty_url))
    yield engine
    engine.dispose()


def _only_dbtasks(obj, name, type_, reflected, compare_to):  # noqa: ANN001
    if type_ == "table":
        return name.startswith(PREFIX) and name != VERSION_TABLE
    return True


def schema_differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_object": _only_dbtasks,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return compare_metadata(context, metadata)


def table_names(engine: Engine, schema: str | None = None) -> list[str]:
    return sorted(inspect(engine).get_table_names(schema=schema))


def test_the_head_revision_the_code_names_is_the_newest_migration():
    assert migrate.HEAD_REVISION == migrate.head_revision()


def test_upgrading_an_empty_database_gives_exactly_schema_py(queue_engine):
    migrate.upgrade(queue_engine, None)

    assert table_names(queue_engine) == sorted([*QUEUE_TABLES, VERSION_TABLE])
    assert schema_differences(queue_engine) == []
    assert sql(queue_engine, f"SELECT version_num FROM {VERSION_TABLE}") == [
        (migrate.head_revision(),)
    ]


def test_migrating_twice_changes_nothing(queue_engine, caplog):
    migrate.upgrade(queue_engine, None)
    with queue_engine.begin() as conn:
        job_id = enqueue(conn, noop, {"kept": True})
    shape = _shape(queue_engine)

    caplog.set_level("INFO", logger="dbtasks.migrate")
    migrate.upgrade(queue_engine, None)

    assert _shape(queue_engine) == shape
    assert sql(queue_engine, "SELECT id, params FROM dbtasks_jobs") == [
        (job_id, '{"kept":true}')
    ]
    assert f"schema already at revision {migrate.head_revision()}" in caplog.text


def test_migrations_started_at_once_run_one_after_the_other(empty_url, queue_engine):
    """Every replica of a deploy may run `dbtasks migrate` as it starts."""
    command = [sys.executable, "-m", "dbtasks", "--database-url", empty_url, "migrate"]
    migrators = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    outputs = [migrator.communicate(timeout=120)[1] for migrator in migrators]

    assert [migrator.returncode for migrator in migrators] == [0] * 6, outputs
    head = migrate.head_revision()
    reports = sorted(
        line.split("dbtasks.migrate: ", 1)[1]
        for output in outputs for line in output.splitlines()
        if "dbtasks.migrate: " in line
    )
    assert reports == [f"schema already at revision {head}"] * 5 + [
        f"schema upgraded from empty to {head}"]
    assert schema_differences(queue_engine) == []


def _shape(engine: Engine) -> dict[str, object]:
    inspector = inspect(engine)
    return {
        name: (
            [(c["name"], str(c["type"]), c["nullable"])
             for c in inspector.get_columns(name)],
            sorted(index["name"] for index in inspector.get_indexes(name)),
        )
        for name in inspector.get_table_names()
    }


def test_the_application_alembic_version_is_left_alone(queue_engine):
    with queue_engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"
        ))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_0042')"))

    migrate.upgrade(queue_engine, None)
    migrate.upgrade(queue_engine, None)

    assert sql(queue_engine, "SELECT version_num FROM alembic_version") == [
        ("app_0042",)
    ]
    assert sql(queue_engine, f"SELECT version_num FROM {VERSION_TABLE}") == [
        (migrate.head_revision(),)
    ]


def test_a_postgresql_schema_holds_every_table(new_database):
    url = new_database("postgresql")
    config = config_for(url, schema="queue_space")

    commands.migrate(config)

    engine = create_queue_engine(config)
    app = create_engine(url)
    try:
        assert table_names(app, "queue_space") == sorted([*QUEUE_TABLES, VERSION_TABLE])
        assert table_names(app, "public") == []
        migrate.require_current_schema(engine, "queue_space")
        # Left out or mistyped, --schema is named: migrating would split the
        # queue in two.
        with pytest.raises(SchemaError, match=(
            r"no dbtasks tables in the default schema \(search_path\), but has "
            r"them in schema 'queue_space': pass --schema queue_space \(or set "
            r"DBTASKS_SCHEMA=queue_space\); `dbtasks migrate` here would start a "
            r"separate, empty queue"
        )):
            migrate.require_current_schema(engine, None)
        with pytest.raises(SchemaError, match="no dbtasks tables in schema "
                           "'queue_spcae', but has them in schema 'queue_space'"):
            migrate.require_current_schema(engine, "queue_spcae")

        with app.begin() as conn:
            job_id = enqueue(conn, noop, {"in": "schema"}, schema="queue_space")
        assert sql(app, "SELECT id, params FROM queue_space.dbtasks_jobs") == [
            (job_id, '{"in":"schema"}')
        ]
    finally:
        engine.dispose()
        app.dispose()


def test_an_application_schema_translate_map_places_the_job(new_database):
    # The application's own map, not enqueue's schema argument: enqueue must
    # follow it whichever way it sends the INSERT.
    url = new_database("postgresql")
    commands.migrate(config_for(url, schema="tenant_queue"))
    app = create_engine(url)
    try:
        with app.connect() as conn:
            tenant = conn.execution_options(
                schema_translate_map={None: "tenant_queue"}
            )
            with tenant.begin():
                job_id = enqueue(tenant, noop, {"tenant": 1}, schema=None)
        stored = sql(app, "SELECT id, params FROM tenant_queue.dbtasks_jobs")
    finally:
        app.dispose()

    assert stored == [(job_id, '{"tenant":1}')]


def test_enqueue_into_a_schema_leaves_the_application_tables_where_they_are(
    new_database,
):
    # SQLAlchemy 2 sets a Connection's execution options in place: enqueue's
    # schema must go with its own statements only, not stay on the caller's
    # connection and move the application's tables into the queue's schema.
    url = new_database("postgresql")
    commands.migrate(config_for(url, schema="queue_space"))
    app = create_engine(url)
    orders = Table("orders", MetaData(), Column("id", Integer, primary_key=True))
    orders.metadata.create_all(app)
    try:
        for many in (False, True):
            with app.begin() as conn:
                if many:
                    enqueue_many(conn, noop, [{}], schema="queue_space")
                else:
                    enqueue(conn, noop, schema="queue_space")
                conn.execute(insert(orders))
                assert conn.get_execution_options().get("schema_translate_map") is None
        assert sql(app, "SELECT count(*) FROM public.orders") == [(2,)]
        assert sql(app, "SELECT count(*) FROM queue_space.dbtasks_jobs") == [(2,)]
    finally:
        app.dispose()


# --- the revision check ------------------------------------------------------


def test_enqueue_on_an_unmigrated_database_says_to_migrate(empty_url):
    with pytest.raises(SchemaError) as refused:
        commands.enqueue(config_for(empty_url), "noop", {})

    assert "no dbtasks tables yet: run `dbtasks migrate`" in str(refused.value)


def test_the_library_enqueue_on_an_unmigrated_database_says_to_migrate(empty_url):
    app = create_engine(empty_url)
    try:
        with pytest.raises(SchemaError, match="dbtasks migrate"), app.begin() as conn:
            enqueue(conn, "noop", {})
    finally:
        app.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "pg8000"])
@pytest.mark.parametrize("bulk", [False, True], ids=["enqueue", "enqueue_many"])
def test_every_postgresql_driver_says_to_migrate(new_database, driver, bulk):
    # Each driver reports the server's "undefined table" in its own way.
    url = make_url(new_database("postgresql")).set(drivername=f"postgresql+{driver}")
    app = create_engine(url)
    try:
        with pytest.raises(SchemaError, match="dbtasks migrate"), app.begin() as conn:
            if bulk:
                enqueue_many(conn, "noop", [{}, {}])
            else:
                enqueue(conn, "noop", {})
    finally:
        app.dispose()


def test_a_worker_on_an_unmigrated_database_stops_and_says_to_migrate(empty_url):
    result = subprocess.run(
        [sys.executable, "-m", "dbtasks", "--database-url", empty_url,
         "--tasks", str(APP_TASKS), "worker"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert "error: the database has no dbtasks tables yet: run `dbtasks migrate`" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    if empty_url.startswith("sqlite"):
        # Not made on the way: an empty file would hide the typo in the path.
        assert not Path(make_url(empty_url).database).exists()


def _stamp(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :revision"),
                     {"revision": revision})


def job_state(engine: Engine, job_id: int) -> str:
    return sql(engine, "SELECT state FROM dbtasks_jobs WHERE id = :id", id=job_id)[0][0]


def _declare_compatible_from(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE dbtasks_schema_info SET value = :revision "
                          "WHERE key = 'compatible_from'"), {"revision": revision})


def test_a_database_from_a_newer_incompatible_dbtasks_is_refused(
    queue_engine, empty_url
):
    migrate.upgrade(queue_engine, None)
    _stamp(queue_engine, "9999_from_the_future")
    _declare_compatible_from(queue_engine, "9999_from_the_future")

    with pytest.raises(SchemaError) as refused:
        migrate.require_current_schema(queue_engine, None)
    with pytest.raises(SchemaError) as by_enqueue:
        commands.enqueue(config_for(empty_url), "noop", {})

    for error in (refused.value, by_enqueue.value):
        message = str(error)
        assert "revision 9999_from_the_future" in message
        assert "not compatible with this one; upgrade dbtasks" in message


def test_a_newer_schema_declared_compatible_is_used_and_left_alone(
    queue_engine, empty_url, start_worker
):
    migrate.upgrade(queue_engine, None)
    _stamp(queue_engine, "9999_from_the_future")  # compatible_from stays as it is

    migrate.require_current_schema(queue_engine, None)
    commands.migrate(config_for(empty_url))
    job_id = commands.enqueue(config_for(empty_url), "noop", {})
    worker = start_worker(empty_url)

    wait_for(lambda: job_state(queue_engine, job_id) == "succeeded",
             message="the worker to run the job on the newer schema")
    with queue_engine.connect() as conn:
        assert migrate.current_revision(conn, None) == "9999_from_the_future"
    worker.wait_for_output(
        f"newer than this code's {migrate.HEAD_REVISION}, and declared compatible"
    )


def test_migrate_on_a_database_from_a_newer_dbtasks_says_to_upgrade(
    queue_engine, empty_url
):
    migrate.upgrade(queue_engine, None)
    _stamp(queue_engine, "9999_from_the_future")
    _declare_compatible_from(queue_engine, "9999_from_the_future")

    with pytest.raises(DbtasksError, match="upgrade dbtasks"):
        commands.migrate(config_for(empty_url))
