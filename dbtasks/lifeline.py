"""The lifeline: a worker's own PostgreSQL session, for as long as it lives.

The session does two things:

- It holds the node's advisory lock. When the worker's process dies, the
  kernel closes its sockets, the server ends the session and releases the
  lock at once; other workers see that in pg_locks and rescue the node's jobs
  without waiting for their leases (queries.orphaned_jobs_postgresql). The
  lease stays the backstop for what the server learns late: a host that
  vanished, a network cut (TCP keepalives, set in database.py, bound that to
  about a minute).
- It LISTENs for new jobs. A statement that adds jobs sends one NOTIFY while
  some node is idle (queries.with_wakeup), and the lifeline tells the
  worker, so an idle worker claims a new job within a round trip instead of
  at its next poll. The worker's callback may run its claim here, on this
  session and thread (`execute`), which the notification has just woken:
  that is a thread hand-off and a wake-up of a sleeping server process
  shorter than claiming on the loop's connection.

The thread waits on the session's socket and, when the session is lost, opens
a new one, takes the lock again and wakes the worker: notifications sent while
it was away are lost, so the worker polls once at every reconnection. After a
server restart every lifeline is gone at once; rescuers wait `LIFELINE_GRACE`
seconds after the server starts, so live workers have time to take theirs
again. A session that is terminated on its own (pg_terminate_backend) while
its worker lives does get that worker's jobs rescued: they may then run
twice, and what the worker records for them is refused by the lease token.

It needs a server session of its own that stays open. Behind a transaction
pooling proxy (PgBouncer in transaction mode) the lock would be taken on a
server connection shared with other clients, and LISTEN does not work there
either, so turn it off (`--no-lifeline`): leases then rescue dead workers'
jobs, and idle workers poll.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from dbtasks import queries
from dbtasks.database import set_up_hot_session
from dbtasks.schema import NOTIFY_CHANNEL
from dbtasks.statements import RawStatement

logger = logging.getLogger(__name__)

#: Longest wait on the socket before the thread checks whether it should stop.
WAIT_SLICE = 5.0


class Lifeline(threading.Thread):
    """Holds this node's advisory lock and listens for new jobs."""

    def __init__(self, engine: Engine, node: str, on_notify: Callable[[], None]):
        super().__init__(name="dbtasks-lifeline", daemon=True)
        self._engine = engine
        self._node = node
        self._on_notify = on_notify
        self._connection: Any = None
        self._prepared: set[bytes] = set()
        self._executing = threading.Lock()  # held while a statement runs
        self._stopped = threading.Event()
        self.key: int | None = None
        #: Whether the session holds the lock now: between its loss and the
        #: reconnect, other nodes take this node's jobs for orphans.
        self.held = False

    def open(self) -> int:
        """Connect, listen, and hold a lock key no live node holds; return the key."""
        self._connect()
        while not self._try_lock(self.key or _draw_key()):
            self.key = None  # held by a live node: draw another
        assert self.key is not None
        self.held = True
        return self.key

    def _connect(self) -> None:
        # Out of the pool: the session must outlive every checkout. In
        # autocommit, so that LISTEN takes effect at once.
        pooled = self._engine.raw_connection()
        pooled.detach()
        connection = pooled.dbapi_connection
        set_up_hot_session(connection)  # it claims when notified
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self._connection = connection
        self._prepared = set()  # the statements the new session has prepared

    def _try_lock(self, key: int) -> bool:
        (locked,) = self._connection.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (queries.LIFELINE_LOCK_CLASS, key)
        ).fetchone()
        if locked:
            self.key = key
        return bool(locked)

    def run(self) -> None:
        while not self._stopped.is_set():
            if self._connection is None:
                self._reconnect()
            else:
                self._listen()

    def execute(self, statement: RawStatement, values: dict[str, Any]) -> list[Any]:
        """Run a statement on the listening session, in autocommit; only from
        the callback, on this thread. A lost session raises DBAPIError with
        `connection_invalidated`, and the thread then reconnects."""
        with self._executing:
            if self._stopped.is_set():
                raise ConnectionError("the lifeline is closing")
            return statement.execute_prepared(
                self._connection, values, self._prepared
            )

    def _listen(self) -> None:
        """Wait a slice for notifications, and tell the worker of them.

        The generator is closed before the callback runs: it holds the
        session, on which the callback may run a statement. Notifications
        that arrive in between wait in psycopg's backlog for the next round.
        """
        try:
            if list(self._connection.notifies(timeout=WAIT_SLICE, stop_after=1)):
                self._on_notify()
        except Exception:  # noqa: BLE001 - whatever broke, the answer is to reconnect
            if self._stopped.is_set():
                return
            logger.warning(
                "lifeline connection lost; other workers may rescue this node's "
                "jobs; reconnecting",
                extra={"event": "lease.lifeline_lost", "node": self._node},
            )
            self._close_connection()

    def _reconnect(self) -> None:
        old_key = self.key
        try:
            self.open()
            if self.key != old_key:
                self.held = False  # not while the node row names the old key
                with self._engine.begin() as conn:
                    conn.execute(
                        queries.set_lifeline_key,
                        {"node_name": self._node, "lifeline_key": self.key},
                    )
                self.held = True
        except Exception as exc:  # noqa: BLE001 - tried again shortly
            self._close_connection()
            logger.debug("lifeline could not reconnect yet: %s", exc)
            self._stopped.wait(0.5)
            return
        logger.info(
            "lifeline connection restored",
            extra={"event": "lease.lifeline_restored", "node": self._node},
        )
        # Jobs enqueued while no one listened sent no notification to us.
        self._on_notify()

    def close(self) -> None:
        self._stopped.set()
        # libpq frees a closed session: not while this thread waits in it for
        # a statement's answer (which takes milliseconds at most).
        with self._executing:
            self._close_connection()

    def _close_connection(self) -> None:
        self.held = False
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken session
                pass
            self._connection = None


def _draw_key() -> int:
    return random.randint(1, 2**31 - 1)
