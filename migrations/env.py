"""Alembic environment for dbtasks' own tables.

dbtasks keeps its revision history in its own version table, so an
application's Alembic history is never touched. `dbtasks migrate` passes the
connection and the optional PostgreSQL schema through `config.attributes`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from dbtasks.schema import PREFIX, VERSION_TABLE, metadata


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001
    """Look only at dbtasks' own tables when comparing with the database."""
    if type_ == "table":
        return name.startswith(PREFIX) and name != VERSION_TABLE
    return True


def _note_applied(ctx, step, heads, run_args) -> None:  # noqa: ANN001
    context.config.attributes.setdefault("applied", []).append(step.up_revision_id)


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    schema = context.config.attributes.get("schema")
    if schema:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        connection.commit()
        connection = connection.execution_options(
            schema_translate_map={None: schema}
        )

    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_object=include_object,
        include_schemas=False,
        transaction_per_migration=True,
        # What this run applied, for `dbtasks migrate` to report (migrate.py).
        on_version_apply=_note_applied,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("dbtasks migrations run online only: use `dbtasks migrate`")
run_migrations_online()
