"""Alembic wiring: where the migrations are, upgrading, and the revision check.

The migrations stand in `migrations/` at the top of the repository and travel
inside the wheel as `dbtasks/_migrations`; both places are tried, so
`dbtasks migrate` works from a checkout and from an installed package alike.
Their history is kept in `dbtasks_alembic_version`, apart from the
application's own `alembic_version`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, column, inspect, select, table

from dbtasks.errors import SchemaError
from dbtasks.schema import VERSION_TABLE, schema_info

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

logger = logging.getLogger(__name__)

#: The newest migration in migrations/versions, which this code runs on. Kept
#: here so that a worker's start checks the schema without loading Alembic (a
#: tenth of its start-up time); a test holds it equal to Alembic's head.
HEAD_REVISION = "0001"

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


def upgrade(engine: Engine, schema: str | None, revision: str = "head") -> None:
    """Create or upgrade dbtasks' tables to `revision`."""
    with engine.connect() as connection:
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

        command.upgrade(alembic_config(connection, schema), revision)
        connection.commit()
        after = current_revision(connection, schema)
    if before == after:
        logger.info("schema already at revision %s", after)
    else:
        logger.info("schema upgraded from %s to %s", before or "empty", after)


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
    with engine.connect() as connection:
        current = current_revision(connection, schema)
        compatible = None
        if current not in (None, HEAD_REVISION) and current not in known_revisions():
            compatible = compatible_from(connection, schema)
    check_revision(current, compatible)


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
            "(with the same --database-url) before enqueuing jobs or starting workers"
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
