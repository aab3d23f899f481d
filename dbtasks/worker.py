"""The worker: claim due jobs, run them, record their outcomes, until stopped.

Execution is at least once. A job runs again when its worker dies or freezes
(its lease expires and another worker rescues it), or when the worker loses
the database for longer than a lease before it can record the outcome. A
task whose effects live in the same database can make them exactly once with
`context.transaction()` (see tasks.JobContext).

SIGTERM or SIGINT stops claiming and lets running jobs finish for up to
`shutdown_grace` seconds; what is still running then is handed back to the
queue with its attempt returned. A second signal hands them back at once.
SIGKILL loses nothing either: the jobs' leases expire and they are rescued.

Plain functions run on a thread of their own; `async def` tasks run on one
event loop thread shared by all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError
from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from dbtasks import claim, lease, queries, scheduler
from dbtasks.claim import ClaimedJob
from dbtasks.clock import utcnow
from dbtasks.config import Config
from dbtasks.database import create_queue_engine, is_transient
from dbtasks.errors import ConfigError, LeaseLost
from dbtasks.migrate import require_current_schema
from dbtasks.outcomes import (
    HANDED_BACK,
    SUCCEEDED,
    Outcome,
    classify,
    record,
    unreadable_params,
)
from dbtasks.params import decode_params
from dbtasks.tasks import JobContext, Registry, Task

logger = logging.getLogger(__name__)

#: Seconds between maintenance passes that retire schedules and prune history.
HOUSEKEEPING_INTERVAL = 60.0

#: Seconds between rescues of jobs whose worker is known dead (PostgreSQL).
RESCUE_INTERVAL = 1.0

#: Seconds a timed-out plain function may keep running on its abandoned thread
#: before the worker retires (see Worker._retire_if_stuck).
ABANDONED_THREAD_LIMIT = 10.0

#: Longest wait between retries of the loop while the database is down.
MAX_OUTAGE_BACKOFF = 15.0


def default_node_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class RunningJob:
    """A claimed job and its run, owned by the worker until recorded."""

    job: ClaimedJob
    task: Task
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    recorded: bool = False
    abandoned: bool = False
    thread: threading.Thread | None = None

    @property
    def key(self) -> tuple[int, str | None, str]:
        """This run's key: a job's id alone is not enough, since a timed-out
        run's abandoned thread may still end while the job runs again."""
        return (self.job.id, self.job.node, self.job.token)

    def fields(self, node: str) -> dict[str, Any]:
        return {
            "job_id": self.job.id,
            "task": self.job.task,
            "queue": self.job.queue,
            "attempt": self.job.attempt,
            "node": node,
        }


class Worker:
    """One node: its name, its tasks, its engine, and the jobs it is running.

    `run()` registers the node, then repeats maintain, claim, start, wait until
    a signal or `stop()`, then hands back what it could not finish.
    """

    def __init__(self, config: Config, registry: Registry):
        if len(registry) == 0:
            raise ConfigError(
                f"no tasks found in {config.tasks_path}: define tasks with @task "
                "in modules of that folder, or point --tasks at the right folder"
            )
        self.config = config
        self.registry = registry
        self.node = config.node_name or default_node_name()
        self.engine: Engine = create_queue_engine(
            config, pool_size=config.concurrency + 3
        )
        self._any_tasks = registry.names("any")
        self._all_tasks = registry.names("all")
        self._queues = list(config.queues)
        self._running: dict[tuple[int, str | None, str], RunningJob] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._force = threading.Event()
        self._heartbeat: lease.Heartbeat | None = None
        self._lifeline: lease.Lifeline | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_maintenance = 0.0
        self._next_rescue = 0.0
        self._next_housekeeping = 0.0
        self._outage = False
        self._abandoned: list[tuple[threading.Thread, float]] = []
        #: Set when the worker stopped because a timed-out thread would not
        #: end; the CLI then starts the process afresh (cli.worker).
        self.retired = False

    # --- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Run until stopped by a signal or by `stop()`."""
        self._install_signal_handlers()
        self._start()
        try:
            while not self._stopping.is_set():
                self._guarded(self._iterate)
        finally:
            self._shutdown()

    def stop(self, force: bool = False) -> None:
        """Ask the worker to stop; `force` hands back running jobs at once."""
        if self._stopping.is_set() or force:
            self._force.set()
        self._stopping.set()
        self._wake.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        again = self._stopping.is_set()
        logger.warning(
            "received %s: %s",
            signal.Signals(signum).name,
            "handing back running jobs now" if again else "stopping after running jobs",
            extra={"event": "worker.stopping", "node": self.node},
        )
        self.stop(force=again)

    def _start(self) -> None:
        require_current_schema(self.engine, self.config.schema)
        lifeline_key = None
        if self.config.lifeline and self.engine.dialect.name == "postgresql":
            self._lifeline = lease.Lifeline(self.engine, self.node)
            lifeline_key = self._lifeline.open()
        # Many workers starting at once all touch the schedules; the locking
        # conventions (queries.py) keep them from deadlocking, and a transient
        # error anyway runs the transaction again rather than end the worker.
        for attempt in Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(5),
            wait=wait_random_exponential(multiplier=0.1, max=2),
            reraise=True,
        ):
            with attempt, self.engine.begin() as conn:
                self._register(conn, lifeline_key)
                scheduler.sync_schedules(conn, self.registry)
        self._heartbeat = lease.Heartbeat(
            self.engine,
            self.node,
            self.config.lease_seconds,
            self.config.heartbeat_interval,
        )
        self._heartbeat.start()
        if self._lifeline is not None:
            self._lifeline.start()
        logger.info(
            "worker %s started: %d tasks, concurrency %d, queues %s",
            self.node,
            len(self.registry),
            self.config.concurrency,
            ",".join(self._queues),
            extra={"event": "worker.started", "node": self.node},
        )

    def _register(self, conn: Connection, lifeline_key: int | None) -> None:
        values = {
            "node_name": self.node,
            "lifeline_key": lifeline_key,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "tasks": json.dumps(self._task_summary(), sort_keys=True),
            "queues": json.dumps(self._queues),
            "node_timeout": self.config.node_timeout,
        }
        if conn.execute(queries.register_node(conn.dialect.name), values).first():
            return
        if conn.execute(queries.take_over_node, values).rowcount:
            # The name's last holder is dead: its jobs carry this name as owner
            # and would otherwise have their leases renewed by us.
            lease.rescue_jobs_of_node(conn, self.node)
            return
        holder = conn.execute(queries.node_holder, {"node_name": self.node}).first()
        where = f"pid {holder.pid} on {holder.hostname}" if holder else "another worker"
        raise ConfigError(
            f"node name {self.node!r} is in use by a live worker ({where}); give "
            "each worker its own --node name, or leave it out for a unique default"
        )

    def _task_summary(self) -> dict[str, dict[str, Any]]:
        return {
            task.name: {
                "scope": task.scope,
                "frequency": task.frequency,
                "queue": task.queue,
                "priority": task.priority,
                "max_attempts": task.max_attempts,
            }
            for task in self.registry
        }

    # --- the loop -------------------------------------------------------------

    def _guarded(self, step: Any) -> None:
        """Run a step; while the database is down, log once and retry with backoff."""
        retrying = Retrying(
            retry=retry_if_exception_type(DBAPIError),
            wait=wait_random_exponential(multiplier=0.5, max=MAX_OUTAGE_BACKOFF),
            sleep=self._sleep_unless_stopping,
            before_sleep=self._log_outage,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._stopping.is_set() and attempt.retry_state.attempt_number > 1:
                    return
                step()
        if self._outage:
            logger.warning(
                "database reachable again",
                extra={"event": "worker.database_restored", "node": self.node},
            )
            self._outage = False

    def _sleep_unless_stopping(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _log_outage(self, state: Any) -> None:
        if not self._outage:
            error = state.outcome.exception()
            logger.warning(
                "database unavailable, retrying with backoff: %s",
                getattr(error, "orig", error),
                extra={"event": "worker.database_unavailable", "node": self.node},
            )
        self._outage = True

    def _iterate(self) -> None:
        self._maintain_if_due()
        self._enforce_timeouts()
        self._retire_if_stuck()
        if self._stopping.is_set():
            return
        free = self.config.concurrency - len(self._running)
        claimed = self._claim(free) if free > 0 else []
        for job in claimed:
            self._start_job(job)
        if len(claimed) < free or free <= 0:
            self._wait()

    def _claim(self, free: int) -> list[ClaimedJob]:
        token = uuid.uuid4().hex
        with self.engine.begin() as conn:
            if self._all_tasks:
                claim.expand_all_jobs(
                    conn,
                    tasks=self._all_tasks,
                    queues=self._queues,
                    node_timeout=self.config.node_timeout,
                )
            claimed = claim.claim_completions(
                conn,
                node=self.node,
                token=token,
                limit=free,
                lease=self.config.lease_seconds,
            )
            claimed += claim.claim_any_jobs(
                conn,
                node=self.node,
                token=token,
                tasks=self._any_tasks,
                queues=self._queues,
                limit=free - len(claimed),
                lease=self.config.lease_seconds,
            )
        return claimed

    def _wait(self) -> None:
        """Sleep until the next due job, a finished job, or the poll interval."""
        timeout = self.config.poll_interval
        if len(self._running) < self.config.concurrency:
            timeout = min(timeout, self._seconds_to_next_due())
        self._wake.wait(max(timeout, 0.005))
        self._wake.clear()

    def _seconds_to_next_due(self) -> float:
        values = {
            "queues": self._queues,
            "tasks": self._any_tasks + self._all_tasks,
            "node_name": self.node,
        }
        with self.engine.connect() as conn:
            now, job_due, completion_due = conn.execute(
                select(
                    utcnow(),
                    queries.next_due_job.scalar_subquery(),
                    queries.next_due_completion.scalar_subquery(),
                ),
                values,
            ).one()
        due = [when for when in (job_due, completion_due) if when is not None]
        if not due:
            return self.config.poll_interval
        return (min(due) - now).total_seconds()

    # --- maintenance -----------------------------------------------------------

    def _maintain_if_due(self) -> None:
        now = time.monotonic()
        if self._lifeline is not None and now >= self._next_rescue:
            # Cheap and frequent: the jobs of workers whose lifeline is gone.
            self._next_rescue = now + RESCUE_INTERVAL
            with self.engine.begin() as conn:
                lease.rescue_orphaned_jobs(conn)
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.config.heartbeat_interval
        with self.engine.begin() as conn:
            lease.rescue_expired_jobs(conn)
        with self.engine.begin() as conn:
            lease.drop_dead_nodes(conn, self.config.node_timeout)
            lease.rescue_expired_completions(conn)
            lease.finish_stranded_all_jobs(conn)
        with self.engine.begin() as conn:
            scheduler.ensure_series(conn, self.registry)

        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
            self._housekeep()

    def _housekeep(self) -> None:
        with self.engine.begin() as conn:
            scheduler.retire_orphaned_schedules(conn, self.config.node_timeout)
        if not self.config.retention:
            return
        values = {"retention": self.config.retention, "limit": 1000}
        with self.engine.begin() as conn:
            pruned = conn.execute(queries.prune_jobs, values).rowcount
            conn.execute(queries.prune_nodes, values)
        if pruned:
            logger.info(
                "pruned %d finished jobs older than the retention period",
                pruned,
                extra={"event": "worker.pruned", "node": self.node},
            )

    # --- running a job ------------------------------------------------------------

    def _start_job(self, job: ClaimedJob) -> None:
        running = RunningJob(job=job, task=self.registry.get(job.task))
        if running.task.timeout is not None:
            running.deadline = running.started + running.task.timeout
        with self._lock:
            self._running[running.key] = running
        logger.info(
            "started %s job %s, attempt %d",
            job.task,
            job.id,
            job.attempt,
            extra={"event": "job.started", **running.fields(self.node)},
        )
        thread = threading.Thread(
            target=self._run_job, args=(running,), name=f"dbtasks-job-{job.id}"
        )
        thread.daemon = True
        running.thread = thread
        thread.start()

    def _run_job(self, running: RunningJob) -> None:
        try:
            params = decode_params(running.job.params)
        except ValueError as exc:
            outcome = unreadable_params(running.job, exc)
        else:
            outcome = classify(running.job, self._call_task(running, params))
        try:
            if not running.recorded and not running.abandoned:
                self._record(running, outcome)
        finally:
            with self._lock:
                self._running.pop(running.key, None)
            self._wake.set()

    def _call_task(self, running: RunningJob, params: Any) -> BaseException | None:
        """Run the task's function; return what it raised, or None."""
        context = self._context(running)
        try:
            if running.task.is_async:
                self._run_coroutine(running, params, context)
            else:
                running.task.fn(params, context)
        except BaseException as error:  # noqa: B036 - a task's sys.exit is its failure
            return error
        return None

    def _run_coroutine(self, running: RunningJob, params: Any, context: Any) -> None:
        loop = self._event_loop()
        coroutine = asyncio.wait_for(
            _contained(running.task.fn(params, context)), timeout=running.task.timeout
        )
        try:
            asyncio.run_coroutine_threadsafe(coroutine, loop).result()
        except _Escaped as escaped:
            raise escaped.error from None

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
            return self._loop

    def _context(self, running: RunningJob) -> JobContext:
        return JobContext(
            job_id=running.job.id,
            task=running.job.task,
            attempt=running.job.attempt,
            node=self.node,
            logger=logging.getLogger(f"dbtasks.task.{running.job.task}"),
            queue=running.job.queue,
            _transaction=lambda: self._job_transaction(running),
        )

    @contextmanager
    def _job_transaction(self, running: RunningJob) -> Iterator[Connection]:
        """The transaction that records the job's success with the task's writes."""
        with self.engine.begin() as conn:
            yield conn
            if not record(conn, running.job, Outcome(SUCCEEDED)):
                raise LeaseLost(
                    f"job {running.job.id} is no longer held by node {self.node}: "
                    "its lease expired and it was rescued; nothing was committed"
                )
        running.recorded = True
        self._log_outcome(running, Outcome(SUCCEEDED))

    def _record(self, running: RunningJob, outcome: Outcome) -> None:
        """Record an outcome, retrying through a database outage.

        Gives up after a lease's length: by then the job has been rescued, and
        the fence would refuse the record anyway.
        """
        retrying = Retrying(
            retry=retry_if_exception_type(DBAPIError),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(self.config.lease_seconds),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self.engine.begin() as conn:
                    owned = record(conn, running.job, outcome)
        except DBAPIError as exc:
            logger.error(
                "could not record job %s for a whole lease; it will be rescued: %s",
                running.job.id,
                exc.orig,
                extra={"event": "job.record_failed", **running.fields(self.node)},
            )
            return
        if owned:
            self._log_outcome(running, outcome)
        else:
            logger.warning(
                "lease of job %s lost before its outcome (%s) was recorded; another "
                "worker has it",
                running.job.id,
                outcome.kind,
                extra={"event": "lease.lost", **running.fields(self.node)},
            )

    def _log_outcome(self, running: RunningJob, outcome: Outcome) -> None:
        duration_ms = round((time.monotonic() - running.started) * 1000, 1)
        extra = {**running.fields(self.node), "duration_ms": duration_ms}
        job = running.job
        if outcome.kind == SUCCEEDED:
            logger.info(
                "%s job %s succeeded in %.1f ms",
                job.task,
                job.id,
                duration_ms,
                extra={"event": "job.succeeded", **extra},
            )
        elif outcome.kind == "retry":
            logger.warning(
                "%s job %s failed on attempt %d of %d; retry in %.1fs: %s",
                job.task,
                job.id,
                job.attempt,
                job.max_attempts,
                outcome.delay,
                outcome.summary or _last_line(outcome.error),
                extra={"event": "job.retry_scheduled", **extra},
            )
        elif outcome.kind == HANDED_BACK:
            logger.warning(
                "%s job %s handed back to the queue unfinished",
                job.task,
                job.id,
                extra={"event": "job.handed_back", **extra},
            )
        else:
            level = logging.ERROR if outcome.kind == "failed" else logging.WARNING
            logger.log(
                level,
                "%s job %s %s after %d attempts:\n%s",
                job.task,
                job.id,
                outcome.kind,
                job.attempt,
                outcome.error,
                extra={"event": f"job.{outcome.kind}", **extra},
            )

    def _enforce_timeouts(self) -> None:
        """Fail plain-function jobs past their timeout and free their slots.

        A thread cannot be stopped from outside, so the function keeps running
        on its abandoned thread; what it then tries to record is refused, and
        if it does not end soon the worker retires (_retire_if_stuck).
        `async def` tasks are cancelled instead.
        """
        now = time.monotonic()
        with self._lock:
            late = [
                running
                for running in self._running.values()
                if running.deadline is not None
                and now > running.deadline
                and not running.task.is_async
            ]
        for running in late:
            running.abandoned = True
            if running.thread is not None:
                self._abandoned.append((running.thread, now))
            timeout = TimeoutError(
                f"task {running.task.name} ran past its timeout of "
                f"{running.task.timeout:g}s"
            )
            self._record(running, classify(running.job, timeout))
            with self._lock:
                self._running.pop(running.key, None)
            logger.warning(
                "job %s timed out; its thread cannot be stopped and keeps running",
                running.job.id,
                extra={"event": "job.timed_out", **running.fields(self.node)},
            )

    def _retire_if_stuck(self) -> None:
        """Retire the worker when a timed-out thread will not end.

        A thread cannot be stopped from outside. One that runs on long past
        its task's timeout holds memory, connections, maybe locks, for good;
        the only way to end it is to end the process. So the worker stops
        claiming, gives its other jobs the shutdown grace, hands back the rest
        and, under the CLI, starts again in place (same PID and arguments).
        """
        now = time.monotonic()
        self._abandoned = [(t, since) for t, since in self._abandoned if t.is_alive()]
        stuck = [since for _, since in self._abandoned
                 if now - since > ABANDONED_THREAD_LIMIT]
        if not stuck or self._stopping.is_set():
            return
        logger.error(
            "a timed-out task has kept running %.0fs past its timeout and cannot be "
            "stopped; retiring this worker: it finishes its other jobs, then restarts",
            now - min(stuck),
            extra={"event": "worker.retiring", "node": self.node},
        )
        self.retired = True
        self.stop()

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_grace
        while self._running and not self._force.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning(
                    "shutdown grace of %gs over with %d jobs running",
                    self.config.shutdown_grace,
                    len(self._running),
                    extra={"event": "worker.slow_shutdown", "node": self.node},
                )
                break
            self._wake.wait(min(remaining, 0.5))
            self._wake.clear()

        self._hand_back_all()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._guarded_once(self._deregister)
        if self._lifeline is not None:
            self._lifeline.close()
        self.engine.dispose()
        logger.info(
            "worker %s stopped", self.node, extra={"event": "worker.stopped", "node": self.node}
        )

    def _hand_back_all(self) -> None:
        with self._lock:
            unfinished = [r for r in self._running.values() if not r.recorded]
        for running in unfinished:
            running.abandoned = True
            self._guarded_once(
                lambda running=running: self._record(running, Outcome(HANDED_BACK))
            )

    def _deregister(self) -> None:
        with self.engine.begin() as conn:
            lease.drop_node(conn, self.node)
            conn.execute(queries.stop_node, {"node_name": self.node})

    def _guarded_once(self, step: Any) -> None:
        """At shutdown: try once; what fails is left to rescue by other workers."""
        try:
            step()
        except DBAPIError as exc:
            logger.warning(
                "database unavailable at shutdown; leases will expire and other "
                "workers rescue the jobs: %s",
                exc.orig,
                extra={"event": "worker.shutdown_unrecorded", "node": self.node},
            )


class _Escaped(Exception):
    """Carries a task's SystemExit or KeyboardInterrupt out of the event loop.

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


def _last_line(error: str | None) -> str:
    return (error or "").rstrip().rsplit("\n", 1)[-1]

