"""Alembic wiring: where the migrations are, upgrading, and the revision check.

The migrations stand in `migrations/` at the top of the repository and travel
inside the wheel as `dbtasks/_migrations`; both places are tried, so
`dbtasks migrate` works from a checkout and from an installed package alike.
Their history is kept in `dbtasks_alembic_version`, apart from the
application's own `alembic_version`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, column, inspect, select, table, text

from dbtasks.errors import SchemaError
from dbtasks.queries import LIFELINE_LOCK_CLASS
from dbtasks.schema import VERSION_TABLE, schema_info

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

logger = logging.getLogger(__name__)

#: The newest migration in migrations/versions, which this code runs on. Kept
#: here so that a worker's start checks the schema without loading Alembic (a
#: tenth of its start-up time); a test holds it equal to Alembic's head.
HEAD_REVISION = "0002"

_PACKAGE = Path(__file__).resolve().parent


def migrations_folder() -> Path:
    """The folder holding env.py: inside the package if installed, else the
    checkout's top-level `migrations/`."""
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(
        f"dbtasks' migrations are missing: neither {_PACKAGE / '_migrations'} nor "
        f"{_PACKAGE.parent / 'migrations'} holds env.py; reinstall dbtasks"
    )


def alembic_config(connection: Connection | None = None, schema: str | None = None
                   ) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_folder()))
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    return config


def head_revision() -> str:
    """Alembic's head: the newest script in the migrations folder."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "dbtasks ships at least one migration"
    return head


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return {script.revision for script in scripts.walk_revisions()}


#: The second key of the advisory lock that `dbtasks migrate` holds on
#: PostgreSQL (the first is queries.LIFELINE_LOCK_CLASS; lifelines draw
#: theirs from 1 up).
MIGRATION_LOCK_KEY = 0


def upgrade(engine: Engine, schema: str | None, revision: str = "head") -> None:
    """Create or upgrade dbtasks' tables to `revision`.

    Safe to run from several places at once (every replica of a deploy, say):
    on PostgreSQL the migrations run under an advisory lock, one migrator
    after the other, and each finds the schema as the one before left it; on
    SQLite each migration's transaction takes the database's write lock.
    What is logged is what this run applied.
    """
    with engine.connect() as connection, _migration_lock(connection):
        before = current_revision(connection, schema)
        if before is not None and before not in known_revisions():
            # Migrated by a newer dbtasks: nothing this code can do. Say so,
            # and whether this code may still run on it.
            check_revision(before, compatible_from(connection, schema))
            logger.info(
                "schema at revision %s, newer than this dbtasks and declared "
                "compatible with it: nothing to migrate",
                before,
            )
            return
        # Alembic joins a transaction already begun instead of committing its
        # own, so end the one the read above began, and commit at the end.
        connection.rollback()
        from alembic import command

        config = alembic_config(connection, schema)
        command.upgrade(config, revision)
        connection.commit()
        after = current_revision(connection, schema)
        connection.rollback()
    applied = config.attributes.get("applied", [])
    if not applied:
        logger.info("schema already at revision %s", after)
    else:
        logger.info("schema upgraded from %s to %s", before or "empty", after)


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    if connection.dialect.name != "postgresql":
        yield
        return
    key = {"lock_class": LIFELINE_LOCK_CLASS, "key": MIGRATION_LOCK_KEY}
    connection.execute(text("SELECT pg_advisory_lock(:lock_class, :key)"), key)
    connection.commit()
    try:
        yield
    finally:
        if not connection.invalidated:
            connection.rollback()
            connection.execute(
                text("SELECT pg_advisory_unlock(:lock_class, :key)"), key
            )
            connection.commit()


def current_revision(connection: Connection, schema: str | None) -> str | None:
    """The revision recorded in dbtasks' version table, or None if there is none."""
    if not inspect(connection).has_table(VERSION_TABLE, schema=schema):
        return None
    version = table(VERSION_TABLE, column("version_num"), schema=schema)
    return connection.execute(select(version.c.version_num)).scalar()


def compatible_from(connection: Connection, schema: str | None) -> str | None:
    """The oldest revision whose code may run on this schema (schema.schema_info)."""
    info = schema_info.c
    query = select(info.value).where(info.key == "compatible_from")
    # For this statement only: Connection.execution_options would change the
    # connection in place for whatever it runs next.
    options = {"schema_translate_map": {None: schema}}
    return connection.execute(query, execution_options=options).scalar()


def require_current_schema(engine: Engine, schema: str | None) -> None:
    """Refuse to run against a schema that is missing, older, or newer and
    not declared compatible with this code."""
    # A DBAPIError (server unreachable, bad password) goes up as it is: the
    # caller turns it into one line without the password (commands.py).
    if engine.dialect.name == "sqlite" and not Path(
        engine.url.database or ""
    ).expanduser().exists():
        check_revision(None)  # without connecting, which would create the file
    with engine.connect() as connection:
        current = current_revision(connection, schema)
        if current is None:
            _refuse_missing_schema(connection, schema)
        compatible = None
        if current not in (None, HEAD_REVISION) and current not in known_revisions():
            compatible = compatible_from(connection, schema)
    check_revision(current, compatible)


def _refuse_missing_schema(connection: Connection, schema: str | None) -> None:
    """Say where dbtasks' tables are, if they are in another schema of this
    PostgreSQL database: a --schema left out or mistyped. Migrating as told
    would make a second, empty queue, which the application and the workers
    would not share."""
    if connection.dialect.name != "postgresql":
        return
    others = sorted(connection.execute(
        text("SELECT table_schema FROM information_schema.tables "
             "WHERE table_name = :name"),
        {"name": VERSION_TABLE},
    ).scalars())
    if not others:
        return
    where = f"schema {schema!r}" if schema else "the default schema (search_path)"
    found = ", ".join(repr(other) for other in others)
    raise SchemaError(
        f"the database has no dbtasks tables in {where}, but has them in "
        f"schema {found}: pass --schema {others[0]} (or set DBTASKS_SCHEMA="
        f"{others[0]}); `dbtasks migrate` here would start a separate, empty "
        "queue"
    )


def check_revision(current: str | None, compatible: str | None = None) -> None:
    """Raise SchemaError unless this code may run on a schema at `current`.

    It may at its own head, and at a newer revision it does not know if that
    revision declared itself compatible with a revision this code knows.
    """
    head = HEAD_REVISION
    if current == head:
        return
    if current is None:
        raise SchemaError(
            "the database has no dbtasks tables yet: run `dbtasks migrate` "
            "(with the same --database-url, and --schema if you gave one) before "
            "enqueuing jobs or starting workers"
        )
    known = known_revisions()
    if current in known:
        raise SchemaError(
            f"the database's dbtasks schema is at revision {current}, older than "
            f"this code's {head}: run `dbtasks migrate` to upgrade it"
        )
    if compatible is not None and compatible in known:
        logger.warning(
            "the database's dbtasks schema is at revision %s, newer than this "
            "code's %s, and declared compatible with it: running; upgrade "
            "dbtasks here when you can",
            current,
            head,
        )
        return
    raise SchemaError(
        f"the database's dbtasks schema is at revision {current}, which this "
        f"version of dbtasks (head {head}) does not know: it was migrated by a "
        "newer dbtasks that is not compatible with this one; upgrade dbtasks on "
        "this machine"
    )
