"""How a dbtasks command logs: to stderr, from a writer thread of its own.

The library itself only logs to `logging.getLogger(__name__)` and configures
nothing; this is the CLI's setup for its own process. A busy worker logs each
job's outcome at INFO, thousands of lines a second, so the records are
queued as they are and a writer thread formats and writes them in bursts,
overlapping the worker's waits on the database.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
from typing import Any

#: The line every record becomes.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: Seconds between the writer's looks at its queue (warnings are written at once).
WRITE_INTERVAL = 0.05

#: The writer of this process, once configured.
_writer: logging.handlers.QueueListener | None = None


def configure(level: str) -> None:
    """Send this process's log records, from `level` up, to stderr."""
    global _writer
    # What LOG_FORMAT does not show need not be gathered for every record
    # (the logging HOWTO's "Optimization"): the caller's frame above all.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(LOG_FORMAT))
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    urgent = threading.Event()
    _writer = _BatchingQueueListener(records, urgent, stream)
    _writer.start()
    atexit.register(flush)
    logging.basicConfig(level=level, handlers=[_InProcessQueueHandler(records, urgent)])
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # The pool logs a traceback at ERROR when it cannot reset or close a
    # connection the server already dropped. The worker says that once, in
    # one line ("database unavailable ..."), and the pool replaces the
    # connection; the traceback adds sixty lines and nothing to act on.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)


def flush() -> None:
    """Write every queued record and stop the writer (at exit, before exec)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


class _InProcessQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are, waking it only for a
    warning or worse.

    The stock QueueHandler formats each record in the logging thread, to
    make it safe to pickle; in one process that is not needed, and leaving
    the formatting and the write to the writer thread lets them overlap the
    worker's waits on the database. The cost: a record's arguments are
    rendered when it is written, a moment later.
    """

    def __init__(self, records: queue.SimpleQueue[Any], urgent: threading.Event):
        super().__init__(records)
        self._urgent = urgent

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self._urgent.set()


class _BatchingQueueListener(logging.handlers.QueueListener):
    """A QueueListener that writes what has queued up every `WRITE_INTERVAL`
    seconds, or at once after a warning, instead of being woken by every
    record.

    Waking the writer thread for each of thousands of INFO records a second
    cost the worker a thread switch and a pass of the GIL per record. The
    price: an INFO line reaches stderr up to WRITE_INTERVAL late, and a
    SIGKILL loses the last WRITE_INTERVAL of them.
    """

    def __init__(self, records: queue.SimpleQueue[Any], urgent: threading.Event,
                 *handlers: logging.Handler):
        super().__init__(records, *handlers)
        self._urgent = urgent

    def dequeue(self, block: bool) -> Any:
        while True:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                self._urgent.wait(WRITE_INTERVAL)
                self._urgent.clear()
