"""Settings of dbtasks: the database, the tasks folder, and the worker's timings.

A `Config` is built once, validated, and passed to the commands. Values come
from the CLI's options, which read the `DBTASKS_*` environment variables.
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dbtasks.clock import MAX_SECONDS
from dbtasks.errors import ConfigError

#: With no database configured, a SQLite file in the current directory.
DEFAULT_DATABASE_URL = "sqlite:///dbtasks.sqlite3"

#: The queue a job goes to when none is named.
DEFAULT_QUEUE = "default"

#: Longest queue name and task name (the jobs table's columns).
MAX_QUEUE_NAME = 100
MAX_TASK_NAME = 200

#: Longest node name (the nodes table's column).
MAX_NODE_NAME = 200

#: A schema name, as PostgreSQL takes one unquoted.
SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def is_encodable(text: str) -> bool:
    """Whether `text` has a UTF-8 form: no lone surrogate (as "\\ud800" in
    Python source, or an undecodable byte read with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: What no name may hold: ASCII control characters (NUL among them).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")


def name_problem(name: object, limit: int) -> str | None:
    """What is wrong with the name of a task, a queue or a node, or None: the
    one rule, wherever a name is given (@task, enqueue, `dbtasks worker
    --queues` and `--node`).

    A name is 1 to `limit` characters of printable text: no surrounding
    spaces, no control characters, no lone surrogate (which no database can
    store), and none that is invisible or breaks a line where the name is
    shown (a zero-width space, a line separator: str.isprintable). The
    caller says which name it is and raises its own error.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= limit:
        return f"must be a name of 1 to {limit} characters, got {name!r:.80}"
    if name != name.strip() or _CONTROL_CHARACTER.search(name):
        return f"{name!r:.80} has surrounding spaces or control characters"
    if not is_encodable(name):
        return f"{name!r:.80} has a lone surrogate, which no database can store"
    if not name.isprintable():
        odd = next(character for character in name if not character.isprintable())
        return (
            f"{name!r:.80} has U+{ord(odd):04X} "
            f"({unicodedata.name(odd, 'unnamed')}), which is not printable "
            "text; use letters, digits, punctuation and plain spaces"
        )
    return None


def queue_name_problem(name: object) -> str | None:
    """What is wrong with a queue name, or None: a name (name_problem) of up
    to MAX_QUEUE_NAME characters, without a comma."""
    problem = name_problem(name, MAX_QUEUE_NAME)
    if problem is None and "," in str(name):
        # --queues takes a comma-separated list: no worker could serve it.
        return f"{name!r:.80} has a comma, which separates names in --queues"
    return problem


def parse_database_url(raw: str) -> URL:
    """Parse a database URL, choosing psycopg 3 for a bare `postgresql://`.

    Only PostgreSQL and SQLite are supported; anything else is a ConfigError
    that shows the URL with its password hidden.
    """
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"the database URL {_mask(raw)!r} is malformed: {exc}; expected "
            "postgresql://user@host:5432/dbname or sqlite:///path/to/file.db"
        ) from None

    if url.host and "@" in url.host:
        raise ConfigError(
            f"the database URL {_mask(raw)!r} has more than one '@' before its "
            "host: percent-encode an '@' in the user name or password as %40"
        )
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if url.drivername == "sqlite+pysqlite":  # the same driver, named
            url = url.set(drivername="sqlite")
        if url.drivername != "sqlite":
            raise ConfigError(
                f"the SQLite driver {url.drivername!r} is not supported by the "
                "worker; use a plain sqlite:///path URL"
            )
        return url
    raise ConfigError(
        f"the database URL {safe_url(url)!r} names "
        f"{backend!r}; dbtasks supports postgresql:// and sqlite:/// URLs"
    )


def _mask(raw: str) -> str:
    """Hide what looks like a password in a URL that could not be parsed: all
    between the user name and the last '@' of the authority, and the values of
    query parameters that name one."""
    masked = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", raw)
    return _SECRET_QUERY.sub(r"\1***", masked)


_SECRET_QUERY = re.compile(r"([?&][^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)


def safe_url(url: URL) -> str:
    """The URL as it may appear in logs and errors: never with its password,
    in its authority or in its query (`?password=...`, `?sslpassword=...`)."""
    return _SECRET_QUERY.sub(r"\1***", url.render_as_string(hide_password=True))


#: The worker's command-line flags whose names differ from Config's fields.
_FLAGS = {"lease_seconds": "lease"}


@dataclass(frozen=True)
class Config:
    """Validated settings shared by every command.

    Timings are seconds. A job's lease lasts `lease_seconds` and is renewed
    every `lease_seconds / 3` while the job runs; a node whose heartbeat is
    older than `node_timeout` is dead. `retention` is how long finished jobs
    are kept (0 keeps them forever). `lifeline` (PostgreSQL only) keeps one
    extra connection per worker so that a dead worker's jobs are rescued in
    about a second rather than after their lease, and LISTENs for new jobs
    (lifeline.Lifeline).
    """

    database_url: URL = field(default_factory=lambda: make_url(DEFAULT_DATABASE_URL))
    tasks_path: Path = Path("tasks")
    schema: str | None = None
    node_name: str | None = None
    concurrency: int = 10
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    poll_interval: float = 1.0
    lease_seconds: float = 30.0
    node_timeout: float = 30.0
    shutdown_grace: float = 30.0
    retention: float = 7 * 24 * 3600.0
    lifeline: bool = True

    def __post_init__(self) -> None:
        if self.schema is not None and not SQL_IDENTIFIER.match(self.schema):
            raise ConfigError(
                f"schema {self.schema!r} is not a plain SQL identifier; use letters, "
                "digits and underscores, starting with a letter"
            )
        if self.schema is not None and self.dialect != "postgresql":
            raise ConfigError("a schema can only be set on PostgreSQL")
        if not 1 <= self.concurrency <= 1000:
            raise ConfigError(
                f"concurrency must be 1 to 1000, got {self.concurrency}"
            )
        if not self.queues or not all(self.queues):
            raise ConfigError("name at least one queue, and no empty queue names")
        for queue in self.queues:
            problem = queue_name_problem(queue)
            if problem is not None:
                raise ConfigError(f"queue (--queues) {problem}")
        repeated = [queue for n, queue in enumerate(self.queues)
                    if queue in self.queues[:n]]
        if repeated:
            # The order of --queues is the order they are served in; a
            # repeated name would leave that order unclear.
            raise ConfigError(
                f"queue {repeated[0]!r} is named twice in --queues; name each "
                "queue once, in the order they are to be served"
            )
        self._check_at_least(0.01, "poll_interval")
        # Leases and heartbeats are renewed every third of these: below a
        # second a worker would spend itself renewing them.
        self._check_at_least(1.0, "lease_seconds", "node_timeout")
        self._check_at_least(0.0, "shutdown_grace", "retention")
        if self.node_name is not None:
            # Written to the nodes table and into every line the worker logs.
            problem = name_problem(self.node_name, MAX_NODE_NAME)
            if problem is not None:
                raise ConfigError(f"the node name (--node) {problem}")

    def _check_at_least(self, least: float, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not least <= value <= MAX_SECONDS:  # NaN fails too
                flag = "--" + _FLAGS.get(name, name).replace("_", "-")
                raise ConfigError(
                    f"{name} ({flag}) must be from {least:g} to {MAX_SECONDS:g} "
                    f"seconds (ten years); got {value}"
                )

    @property
    def dialect(self) -> str:
        return self.database_url.get_backend_name()

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker renews its node heartbeat and its jobs' leases."""
        return min(self.lease_seconds, self.node_timeout) / 3

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def config_from_env(**overrides: object) -> Config:
    """Build a Config from the `DBTASKS_*` environment variables and overrides.

    This is what an application gets when it calls dbtasks without a CLI.
    """
    values: dict[str, object] = {
        "database_url": os.environ.get("DBTASKS_DATABASE_URL", DEFAULT_DATABASE_URL),
        "tasks_path": os.environ.get("DBTASKS_TASKS", "tasks"),
        "schema": os.environ.get("DBTASKS_SCHEMA") or None,
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    url = values["database_url"]
    values["database_url"] = parse_database_url(url) if isinstance(url, str) else url
    values["tasks_path"] = Path(str(values["tasks_path"]))
    return Config(**values)  # type: ignore[arg-type]
