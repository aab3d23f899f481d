"""The hot statements: compiled once, then run straight on psycopg.

For the busiest statements only: the worker's claim and finish, and enqueue
on an application's psycopg connection. At thousands of executions a second,
SQLAlchemy's work around each one was half of the worker loop's own time,
and a fifth of an enqueue's. A RawStatement runs on a psycopg cursor, or,
below psycopg's cursors, through the libpq calls they make, as a statement
the session prepared once under dbtasks' own name.

Not public API: the rules of what may be sent, and how, are the callers'
(jobs.py, worker.py, lifeline.py), written where they call.
"""

from __future__ import annotations

import functools
import hashlib
import re
import select
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

#: A pyformat SQL text's tokens: an escaped percent sign, or a named parameter.
_PYFORMAT_TOKEN = re.compile(r"%%|%\((\w+)\)s")

#: The same SQL in psycopg's positional form: a percent sign, or a parameter.
_FORMAT_TOKEN = re.compile(r"%%|%s")

#: PostgreSQL's code for a prepared statement the session does not have.
_NO_SUCH_STATEMENT = "26000"


@functools.cache
def libpq() -> Any:
    """psycopg's libpq wrapper (`psycopg.pq`), imported when first needed:
    an application or worker on SQLite never loads psycopg."""
    from psycopg import pq

    return pq


class RawStatement:
    """A Core statement compiled once to its final SQL, then run straight on
    psycopg: on a cursor (`execute`), or through libpq as a statement the
    session prepared once (`execute_prepared`).

    Write the statement's literals (a LIMIT, a state) into its text, so
    that nothing is left to expand at execution, and give every bound value
    a type in the SQL (SQLAlchemy's psycopg dialect casts them), so that
    the server needs none from us.

    `execute` sends the parameters positionally, on a cursor the caller may
    keep. `execute_prepared` goes below psycopg's cursors, to the libpq
    calls they make: one round trip, the values as text, no Python between
    the call and the wire but the conversion. With eight processes
    enqueuing on two cores, the cursor's own machinery cost an enqueue
    about as much CPU as the rest of its client side (tools/benchmark.py,
    W1).
    """

    def __init__(
        self,
        statement: Any,
        dialect: Dialect,
        schema_translate_map: dict[str | None, str | None] | None = None,
    ):
        compiled = statement.compile(
            dialect=dialect,
            schema_translate_map=schema_translate_map,
            render_schema_translate=schema_translate_map is not None,
        )
        names: list[str] = []

        def positional(token: re.Match[str]) -> str:
            if token.group(1) is None:
                return "%%"
            names.append(token.group(1))
            return "%s"

        self.sql = _PYFORMAT_TOKEN.sub(positional, compiled.string)
        # The values the statement carries itself (states, constants).
        fixed = {
            name: bind.effective_value
            for bind, name in compiled.bind_names.items()
            if not bind.required
        }
        self._order = tuple((name, name in fixed, fixed.get(name)) for name in names)
        numbers = iter(range(1, len(names) + 1))
        self._libpq_sql = _FORMAT_TOKEN.sub(
            lambda token: "%" if token.group() == "%%" else f"${next(numbers)}",
            self.sql,
        ).encode()
        digest = hashlib.sha1(self._libpq_sql, usedforsecurity=False).hexdigest()
        #: The name the statement is prepared under, in every session.
        self.name = f"dbtasks_{digest[:24]}".encode()
        self._returns_rows = bool(
            compiled.statement.is_select or compiled.effective_returning
        )
        self._dialect = dialect
        self._dbapi_error = dialect.loaded_dbapi.Error
        self._loaders: list[Any] | None = None  # of the result's columns

    @classmethod
    def for_engine(cls, statement: Any, engine: Engine) -> RawStatement:
        """Compile for the engine's dialect and schema translate map."""
        translate = engine.get_execution_options().get("schema_translate_map")
        return cls(statement, engine.dialect, translate)

    def execute(
        self, dbapi_connection: Any, values: dict[str, Any], cursor: Any = None
    ) -> list[Any]:
        """Run with `values` for the statement's named parameters; return its
        rows (none for a statement that returns none).

        `cursor`, if given, is one of `dbapi_connection`'s that the caller
        keeps for its statements; else one is opened and closed here. A
        driver error is raised as SQLAlchemy's DBAPIError, as an execution
        through SQLAlchemy would raise it, saying whether the connection is
        lost (`connection_invalidated`).
        """
        params = self._params(values)
        own_cursor = cursor is None
        if own_cursor:
            cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, params)
            # Fetched as the statement says, not as the cursor has it so far:
            # in a pipeline, the rows come only when they are fetched.
            return cursor.fetchall() if self._returns_rows else []
        except self._dbapi_error as exc:
            raise self._wrapped(exc, dbapi_connection, values) from exc
        finally:
            if own_cursor:
                cursor.close()

    def execute_prepared(
        self,
        dbapi_connection: Any,
        values: dict[str, Any],
        prepared: set[bytes],
        begin: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Run as a statement prepared in the session, through libpq; return
        its rows, as `execute` would.

        `prepared` holds the names of the statements this session has
        prepared, kept by the caller for as long as the session lives: a
        statement is prepared on its first run in a session. The session
        must be one whose statements are ours to send as they come: no
        pipeline, no COPY under way, in autocommit or inside a transaction
        already begun, and with UTF-8 as its client encoding. With `begin`,
        it is outside a transaction, and a plain BEGIN goes first, as
        psycopg would send it, but in the same round trip (_begun_and_run).
        Values are sent as text: str, int, float, bool, aware datetimes,
        None, and lists of str or int; results are read as psycopg reads
        them.
        """
        params = [_as_text(value) for value in self._params(values)]
        with dbapi_connection.lock:
            try:
                result = self._run_prepared(dbapi_connection, params, prepared, begin)
            except self._dbapi_error as exc:  # from libpq's calls themselves
                raise self._wrapped(exc, dbapi_connection, values) from exc
            self._check(result, dbapi_connection, values, prepared)
        return self._rows(result, dbapi_connection)

    def _run_prepared(self, dbapi_connection: Any, params: list[bytes | None],
                      prepared: set[bytes], begin: bool) -> Any:
        """execute_prepared's exchange with the server; its result."""
        pgconn = dbapi_connection.pgconn
        self._prepare_in(dbapi_connection, prepared)
        if not begin:
            return pgconn.exec_prepared(self.name, params)
        result = self._begin_and_run(dbapi_connection, params, prepared)
        if _sqlstate(result) == _NO_SUCH_STATEMENT:
            # Deallocated behind our back (DISCARD ALL, DEALLOCATE ALL), in a
            # transaction this call began: nothing of the caller's is in it
            # yet, so it is rolled back and the statement prepared again.
            prepared.discard(self.name)
            pgconn.exec_(b"ROLLBACK")
            self._prepare_in(dbapi_connection, prepared)
            result = self._begin_and_run(dbapi_connection, params, prepared)
        return result

    def _prepare_in(self, dbapi_connection: Any, prepared: set[bytes]) -> None:
        if self.name not in prepared:
            result = dbapi_connection.pgconn.prepare(self.name, self._libpq_sql, None)
            self._check(result, dbapi_connection, {}, prepared)
            prepared.add(self.name)

    def _begin_and_run(self, dbapi_connection: Any, params: list[bytes | None],
                       prepared: set[bytes]) -> Any:
        begun, result = _begun_and_run(dbapi_connection.pgconn, self.name, params)
        self._check(begun, dbapi_connection, {}, prepared)
        return result

    def _rows(self, result: Any, dbapi_connection: Any) -> list[tuple[Any, ...]]:
        """A result's rows, as psycopg's cursors would give them."""
        columns = range(result.nfields)
        loaders = self._loaders
        if loaders is None or len(loaders) != result.nfields:
            types = [result.ftype(column) for column in columns]
            loaders = [_loader(dbapi_connection, oid) for oid in types]
            if all(oid in _LOADERS for oid in types):
                self._loaders = loaders  # ours: the same in every session
        value = result.get_value
        return [
            tuple(
                None if (text := value(row, column)) is None else loaders[column](text)
                for column in columns
            )
            for row in range(result.ntuples)
        ]

    def _params(self, values: dict[str, Any]) -> list[Any]:
        return [fixed_value if is_fixed else values[name]
                for name, is_fixed, fixed_value in self._order]

    def _check(self, result: Any, dbapi_connection: Any, values: dict[str, Any],
               prepared: set[bytes]) -> None:
        """Raise what psycopg would for a failed libpq result."""
        if result.status in _succeeded():
            return
        from psycopg import errors

        error = errors.error_from_result(
            result, encoding=dbapi_connection.info.encoding
        )
        if error.sqlstate is None and (
            dbapi_connection.pgconn.status == libpq().ConnStatus.BAD
        ):
            # The connection was lost: OperationalError, as psycopg raises.
            error = errors.OperationalError(str(error))
        if error.sqlstate == _NO_SUCH_STATEMENT:
            prepared.discard(self.name)  # prepared again at the next run
        raise self._wrapped(error, dbapi_connection, values) from error

    def _wrapped(self, exc: Exception, dbapi_connection: Any,
                 values: dict[str, Any]) -> DBAPIError:
        lost = self._dialect.is_disconnect(exc, dbapi_connection, None)
        return DBAPIError.instance(
            self.sql, values, exc, self._dbapi_error, hide_parameters=True,
            connection_invalidated=lost,
        )


def _begun_and_run(pgconn: Any, name: bytes, params: list[bytes | None]
                   ) -> tuple[Any, Any]:
    """BEGIN, then the prepared statement `name`; return both results.

    One round trip, in libpq's pipeline mode, where psycopg would wait for
    the server twice: for a one-job transaction, a third of the trips. The
    connection stays non-blocking and the waits are ours (_wait), made with
    Python's other threads free to run, as psycopg's own are: libpq's
    blocking reads, through psycopg's wrapper, would hold the GIL while the
    INSERT waits for a row lock, and stop every thread of the process, the
    lock's holder among them.
    """
    pq = libpq()
    if pq.version() < 140000:  # no pipelines before libpq 14
        begun = pgconn.exec_(b"BEGIN")
        if begun.status != pq.ExecStatus.COMMAND_OK:
            return begun, begun
        return begun, pgconn.exec_prepared(name, params)
    pgconn.enter_pipeline_mode()
    try:
        pgconn.send_query_params(b"BEGIN", None)
        pgconn.send_query_prepared(name, params)
        pgconn.pipeline_sync()
        while pgconn.flush():  # the messages are a few hundred bytes: seldom
            if _wait(pgconn.socket, writing=True):
                pgconn.consume_input()
        begun = _statement_result(pgconn)
        result = _statement_result(pgconn)
        synced = _next_result(pgconn)
    except BaseException:
        # Cut off mid-exchange (a lost connection, KeyboardInterrupt): the
        # session's state is unknown, so it is closed, and its transaction
        # with it; the caller's next statement finds it closed.
        pgconn.finish()
        raise
    if synced is not None and synced.status == pq.ExecStatus.PIPELINE_SYNC:
        pgconn.exit_pipeline_mode()
    return begun, result


def _next_result(pgconn: Any) -> Any:
    """libpq's next result of the pipeline, once it has come in whole."""
    while pgconn.is_busy():
        _wait(pgconn.socket)
        pgconn.consume_input()  # raises OperationalError on a lost connection
    return pgconn.get_result()


def _wait(socket: int, writing: bool = False) -> bool:
    """Wait until the socket can be read (or written, with `writing`),
    releasing the GIL; return whether it can be read."""
    if not hasattr(select, "poll"):  # Windows
        readable, _, broken = select.select(
            [socket], [socket] if writing else [], [socket]
        )
        return bool(readable or broken)
    poller = select.poll()
    poller.register(socket, select.POLLIN | (select.POLLOUT if writing else 0))
    return any(event & (select.POLLIN | select.POLLERR | select.POLLHUP)
               for _, event in poller.poll())


def _sqlstate(result: Any) -> str | None:
    code = result.error_field(libpq().DiagnosticField.SQLSTATE)
    return code.decode() if code else None


def _statement_result(pgconn: Any) -> Any:
    """The result of the next statement of a pipeline, and the end of it."""
    result = _next_result(pgconn)
    if result is not None:
        _next_result(pgconn)  # None: the statement's results are over
    return result if result is not None else pgconn.make_empty_result(
        libpq().ExecStatus.FATAL_ERROR
    )


def _as_text(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format, for libpq."""
    if value is None:
        return None
    kind = type(value)
    if kind is str:
        return value.encode()
    if kind is bool:
        return b"t" if value else b"f"
    if kind is int or kind is float:
        return repr(value).encode()
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(f"a naive datetime cannot be sent: {value!r}")
        return value.isoformat().encode()
    if kind is list or kind is tuple:
        return ("{" + ",".join(_array_item(item) for item in value) + "}").encode()
    raise TypeError(f"cannot send a {kind.__name__} as a parameter")


def _array_item(item: Any) -> str:
    if type(item) is int:
        return str(item)
    if type(item) is str:
        return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot send a {type(item).__name__} in an array")


@functools.cache
def _succeeded() -> frozenset[Any]:
    status = libpq().ExecStatus
    return frozenset({status.COMMAND_OK, status.TUPLES_OK})


def _text_result(value: bytes) -> str:
    return value.decode()


def _bool_result(value: bytes) -> bool:
    return value == b"t"


#: Text-format readers of the result columns the hot statements return, by
#: type OID: int2, int4, int8; text, varchar, bpchar, name; bool.
_LOADERS = {21: int, 23: int, 20: int, 25: _text_result, 1043: _text_result,
            1042: _text_result, 19: _text_result, 16: _bool_result}


def _loader(dbapi_connection: Any, oid: int) -> Any:
    """The reader of a result column of type `oid`: ours for the usual
    types, psycopg's own (as its cursors would use) for the rest."""
    load = _LOADERS.get(oid)
    if load is None:
        loader = dbapi_connection.adapters.get_loader(oid, libpq().Format.TEXT)
        load = loader(oid, dbapi_connection).load
    return load
