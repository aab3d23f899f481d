"""The database clock: SQL expressions for "now" and time arithmetic.

The database clock is the only clock dbtasks trusts, so every timestamp the
queue writes is computed in SQL. These constructs compile per dialect:

- PostgreSQL: `timestamptz` arithmetic on `now()`, the time of the statement's
  transaction (`clock_timestamp()` would drift within a long transaction, and a
  job's rows must agree with each other).
- SQLite: no timezone type exists and offsets are dropped silently, so every
  timestamp is UTC text in one sortable format, `YYYY-MM-DD HH:MM:SS.SSS`,
  compared as text. `UtcDateTime` turns it back into an aware datetime.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement, literal

#: strftime() format of every timestamp stored in SQLite; sorts as text.
SQLITE_FORMAT = "%Y-%m-%d %H:%M:%f"

#: The longest duration dbtasks adds to a time (ten years): a delay, a
#: frequency, a lease. Beyond it a timestamp overflows somewhere (Python's
#: time_t, PostgreSQL's range, SQLite's text), and it is a unit mistake anyway.
MAX_SECONDS = 366 * 10 * 24 * 3600.0


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime: `timestamptz` on PostgreSQL, UTC text on SQLite.

    Naive datetimes are refused on the way in; values always come out aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        if dialect.name == "sqlite":
            utc = value.astimezone(timezone.utc)
            return utc.strftime("%Y-%m-%d %H:%M:%S.") + f"{utc.microsecond:06d}"
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class utcnow(FunctionElement[datetime]):  # noqa: N801 - reads as SQL
    """The database's current time, as `UtcDateTime`."""

    type = UtcDateTime()
    inherit_cache = True


class add_seconds(FunctionElement[datetime]):  # noqa: N801 - reads as SQL
    """A timestamp plus a number of seconds (a column or a bound value)."""

    type = UtcDateTime()
    inherit_cache = True

    def __init__(self, timestamp: Any, seconds: Any):
        if not isinstance(seconds, ColumnElement):
            seconds = literal(float(seconds))
        super().__init__(timestamp, seconds)


def seconds_from_now(seconds: Any) -> add_seconds:
    """The database's current time plus a number of seconds."""
    return add_seconds(utcnow(), seconds)


class later_of(FunctionElement[datetime]):  # noqa: N801 - reads as SQL
    """The later of two timestamps."""

    type = UtcDateTime()
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return f"strftime('{SQLITE_FORMAT}', 'now')"


@compiles(add_seconds, "postgresql")
def _add_seconds_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    timestamp, seconds = (compiler.process(c, **kw) for c in element.clauses)
    return f"({timestamp} + make_interval(secs => {seconds}))"


@compiles(add_seconds, "sqlite")
def _add_seconds_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    timestamp, seconds = (compiler.process(c, **kw) for c in element.clauses)
    return f"strftime('{SQLITE_FORMAT}', {timestamp}, ({seconds}) || ' seconds')"


@compiles(later_of, "postgresql")
def _later_of_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    return f"GREATEST({compiler.process(element.clauses, **kw)})"


@compiles(later_of, "sqlite")
def _later_of_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    # Two-argument max() is a scalar function in SQLite; the text format sorts.
    return f"max({compiler.process(element.clauses, **kw)})"
