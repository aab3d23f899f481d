"""Running tasks: plain functions on a pool of threads, coroutines on one loop.

The executor runs a job's task and reports how the run ended, through the
callback it was given; it never touches the database (the worker records
outcomes, in batches, on its own loop). A run ends once: it finishes, or the
worker abandons it first (its timeout passed, or the worker is shutting
down), and only the first of the two counts.

A plain function cannot be stopped from outside its thread. When the worker
abandons one, the executor starts a thread in its place, so the pool keeps
its size; the abandoned thread ends when the function returns, and what it
returns is dropped. `async def` tasks share one event loop thread and are
cancelled at their timeout.

LIMITATION: a coroutine that blocks (time.sleep, a synchronous driver) stops
every other coroutine of the worker while it blocks; run blocking code in a
plain function task. The loop beats (`last_loop_beat`), so that the worker
can tell a loop blocked past a timeout from a coroutine that only ignores
its cancellation, and start afresh (Worker._retire_if_stuck).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from dbtasks.tasks import ASYNC_CANCEL_GRACE, plain_result, within_timeout

logger = logging.getLogger(__name__)

#: Seconds between the event loop's beats: a loop that misses them is blocked.
LOOP_BEAT = 0.5

#: How a run ended: None if the task returned, else what it raised.
Done = Callable[[BaseException | None], None]


class Run:
    """One run of a task: what to call, and whether it has ended yet."""

    __slots__ = ("fn", "is_async", "timeout", "params", "context", "done",
                 "thread", "_ended", "_lock")

    def __init__(self, fn: Callable[..., Any], is_async: bool, timeout: float | None,
                 params: Any, context: Any, done: Done):
        self.fn = fn
        self.is_async = is_async
        self.timeout = timeout
        self.params = params
        self.context = context
        self.done = done
        self.thread: threading.Thread | None = None
        self._ended = False
        self._lock = threading.Lock()

    def begin(self, thread: threading.Thread) -> bool:
        """Note the thread the run starts on; False if it was abandoned already."""
        with self._lock:
            self.thread = thread
            return not self._ended

    def end(self) -> bool:
        """Mark the run ended; True for the first caller only."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            return True


class Executor:
    """Runs plain functions on `threads` threads and coroutines on an event loop."""

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue[Run | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_beat: float | None = None  # monotonic time of the last beat
        self._serial = 0
        with self._lock:
            for _ in range(threads):
                self._start_thread()

    def submit(self, run: Run) -> None:
        """Start a run; its `done` is called when it ends, unless abandoned first."""
        if run.is_async:
            self._submit_coroutine(run)
        else:
            self._queue.put(run)

    def abandon(self, run: Run) -> bool:
        """End a run now, without waiting for it; False if it had ended already.

        A plain function goes on running on its thread, so a new thread takes
        that thread's place in the pool.
        """
        if not run.end():
            return False
        with self._lock:
            if run.thread is not None and run.thread in self._threads:
                self._threads.discard(run.thread)
                self._start_thread()
        return True

    def last_loop_beat(self) -> float | None:
        """When the event loop last ran its beat (time.monotonic), or None if
        no coroutine has run yet. Older than LOOP_BEAT: something blocks it."""
        return self._loop_beat

    def stop(self) -> None:
        """Let the pool's threads end once they are idle; stop the event loop."""
        with self._lock:
            for _ in self._threads:
                self._queue.put(None)
            self._threads.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    # --- plain functions ---------------------------------------------------------

    def _start_thread(self) -> None:
        self._serial += 1
        thread = threading.Thread(
            target=self._serve, name=f"dbtasks-job-{self._serial}", daemon=True
        )
        self._threads.add(thread)
        thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            run = self._queue.get()
            if run is None:
                return
            if not run.begin(me):
                continue  # abandoned before it started: nothing to run
            error = _call(run)
            if not run.end():
                return  # abandoned: another thread has taken this one's place
            run.done(error)

    # --- coroutines ----------------------------------------------------------------

    def _submit_coroutine(self, run: Run) -> None:
        coroutine = _bounded(run)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._event_loop())
        future.add_done_callback(lambda future: _settle(run, future))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="dbtasks-asyncio", daemon=True
                )
                thread.start()
                while not loop.is_running():
                    time.sleep(0.001)
                self._loop = loop
                loop.call_soon_threadsafe(self._beat, loop)
            return self._loop

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_beat = time.monotonic()
        loop.call_later(LOOP_BEAT, self._beat, loop)


def _call(run: Run) -> BaseException | None:
    """Call a plain function; return what it raised, or None."""
    try:
        plain_result(run.context.task, run.fn(run.params, run.context))
    except BaseException as error:  # noqa: B036 - a task's sys.exit is its failure
        return error
    return None


def _settle(run: Run, future: Future[Any]) -> None:
    if not run.end():
        return
    try:
        future.result()
    except _Escaped as escaped:
        run.done(escaped.error)
    except BaseException as error:  # noqa: B036 - cancelled or failed
        run.done(error)
    else:
        run.done(None)


async def _bounded(run: Run) -> Any:
    """Run the coroutine within its timeout (tasks.within_timeout), whose
    TimeoutError leaves the loop wrapped, as it is.

    A coroutine that will not stop is the worker's to fail, at
    ASYNC_CANCEL_GRACE past its timeout, saying so (Worker._enforce_timeouts);
    the longer grace here only backs that up."""
    return await within_timeout(
        run.context.task, run.timeout, _contained(run.fn(run.params, run.context)),
        escape=_Escaped, grace=2 * ASYNC_CANCEL_GRACE,
    )


class _Escaped(Exception):
    """Carries an outcome out of the event loop as it is: a task's SystemExit or
    KeyboardInterrupt, or its timeout.

    Raised as is inside a coroutine, those end `run_forever` and with it every
    async job of the worker; wrapped, they fail only their own job.
    """

    def __init__(self, error: BaseException):
        super().__init__(repr(error))
        self.error = error


async def _contained(awaitable: Any) -> Any:
    try:
        return await awaitable
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as error:  # noqa: B036 - SystemExit, KeyboardInterrupt
        raise _Escaped(error) from error
