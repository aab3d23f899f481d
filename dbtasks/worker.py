"""The worker: claim due jobs, run them, record their outcomes, until stopped.

Execution is at least once. A job runs again when its worker dies or freezes
(its lease expires, or on PostgreSQL its lifeline closes, and another worker
rescues it), or when the worker loses the database for longer than a lease
before it can record the outcome. A task whose effects live in the same
database can make them exactly once with `context.transaction()` (see
tasks.JobContext).

One loop thread does all of the worker's database work but the heartbeat:
in one transaction per turn it records the outcomes of the runs that ended
(successes in one statement) and claims as many due jobs as it has free
slots, so a busy worker commits once per batch, not twice per job. Tasks
run on the executor (executor.py) and never touch the queue's tables,
except a task's own `context.transaction()`, which records its job itself.

SIGTERM or SIGINT stops claiming and lets running jobs finish for up to
`shutdown_grace` seconds; what is still running then is handed back to the
queue with its attempt returned. A second signal hands them back at once.
SIGKILL loses nothing either: the jobs are rescued.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from dbtasks import claim, lease, queries, scheduler
from dbtasks.claim import ClaimedJob
from dbtasks.config import Config
from dbtasks.database import (
    create_queue_engine,
    is_transient,
    raw_connection,
    set_up_hot_session,
)
from dbtasks.errors import Cancel, ConfigError, JobError, LeaseLost
from dbtasks.executor import Executor, Run
from dbtasks.lifeline import Lifeline
from dbtasks.migrate import require_current_schema
from dbtasks.outcomes import (
    FAILED,
    HANDED_BACK,
    LOGGED_ERROR_CHARS,
    RETRY,
    SUCCEEDED,
    Outcome,
    classify,
    cut_middle,
    recording,
    summarize,
    unreadable_params,
)
from dbtasks.params import decode_params
from dbtasks.statements import RawStatement
from dbtasks.tasks import (
    ASYNC_CANCEL_GRACE,
    JobContext,
    Registry,
    Task,
    timeout_message,
)

logger = logging.getLogger(__name__)

#: Seconds between maintenance passes that retire schedules and prune history.
HOUSEKEEPING_INTERVAL = 60.0

#: Seconds a housekeeping pass may spend pruning before it leaves the rest,
#: if any, to the next maintenance pass.
PRUNE_TIME_BUDGET = 0.25

#: Seconds between rescues of jobs whose worker is known dead (PostgreSQL).
RESCUE_INTERVAL = 1.0

#: Seconds a timed-out plain function may keep running on its abandoned thread,
#: or a timed-out coroutine keep the event loop blocked, before the worker
#: retires (see Worker._retire_if_stuck).
ABANDONED_THREAD_LIMIT = 10.0

#: Successes logged one by one at INFO in a second; past that they are
#: counted, and one line at the end of the second says how many. A quiet
#: worker logs every job; a busy one keeps a readable log, and does not spend
#: a tenth of its rate writing it (tools/benchmark.py, W2). Every outcome
#: stays in the jobs table, and failures are all logged.
SUCCESS_LINES_PER_SECOND = 20

#: What a task did that breaks context.transaction()'s promise.
_EARLY_COMMIT = ("committed inside context.transaction(), which commits the "
                 "task's writes with the job's success")

#: What a database raises for a value it will not store (not for the
#: connection): a type refused, a constraint violated, text it cannot encode.
REFUSED_VALUES = (DataError, IntegrityError, UnicodeError)

#: Longest wait between retries of the loop while the database is down.
MAX_OUTAGE_BACKOFF = 15.0

#: An idle worker that LISTENs polls this many times less often.
LISTENING_POLL_FACTOR = 10


def default_node_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(eq=False)
class RunningJob:
    """A claimed job and its run, owned by the worker until its outcome is
    recorded."""

    job: ClaimedJob
    task: Task
    started: float = field(default_factory=time.monotonic)
    #: When the run ended (time.monotonic): its duration is not the wait to
    #: record it, which an outage can make long.
    ended: float | None = None
    deadline: float | None = None
    run: Run | None = None
    #: Set when the task's own context.transaction() recorded the success.
    recorded: bool = False
    #: Set when the task opened its context.transaction(): once per run.
    transaction_opened: bool = False

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

    `run()` registers the node, then repeats record-and-claim, start, note
    idleness, maintain, wait, until a signal or `stop()`; then it hands back
    what it could not finish and deregisters.
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
        # What an outage raises: SQLAlchemy's wrapper, and the driver's own
        # error wherever one gets past it.
        self._outage_errors = (DBAPIError, self.engine.dialect.loaded_dbapi.Error)
        self._any_tasks = tuple(registry.names("any"))
        self._task_loggers = {
            name: logging.getLogger(f"dbtasks.task.{name}")
            for name in registry.names()
        }
        self._all_tasks = registry.names("all")
        self._queues = list(config.queues)
        self._executor: Executor | None = None
        self._running: dict[int, RunningJob] = {}  # by id(RunningJob)
        self._ended: deque[tuple[RunningJob, Outcome | None]] = deque()
        self._unrecorded: list[tuple[RunningJob, Outcome | None]] = []
        self._lock = threading.Lock()
        # Held by whichever thread claims and starts jobs: the loop, or the
        # lifeline when a notification finds the worker idle.
        self._claim_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._force = threading.Event()
        self._heartbeat: lease.Heartbeat | None = None
        self._lifeline: Lifeline | None = None
        # PostgreSQL: the same pool, in autocommit, for one-statement commits.
        self._autocommit: Engine | None = None
        if self.engine.dialect.name == "postgresql":
            self._autocommit = self.engine.execution_options(
                isolation_level="AUTOCOMMIT"
            )
        self._hot: Any = None  # a DBAPI connection of the pool's, detached
        self._hot_prepared: set[bytes] = set()  # the statements it has prepared
        self._hot_statements: dict[Any, RawStatement] = {}  # by statement
        # The claim the lifeline runs when notified (_claim_when_idle).
        self._notified_claim: RawStatement | None = None
        self._notified_values = {
            "node_name": self.node,
            "lease": config.lease_seconds,
            "claim_queue": self._queues[0],
        }
        self._asleep_until = math.inf  # monotonic time; see _wait
        self._idle = False  # as last written to the node's row
        self._drained = False  # the last claim found fewer jobs than free slots
        self._next_poll = 0.0
        self._next_full_claim = 0.0
        self._next_due: float | None = None  # monotonic time, once drained
        self._next_maintenance = 0.0
        self._next_rescue = 0.0
        self._next_housekeeping = 0.0
        self._outage = False
        self._abandoned: list[tuple[threading.Thread, float]] = []
        # When a coroutine was last failed at its deadline, until the event
        # loop shows it is not blocked (_retire_if_stuck).
        self._async_abandoned_at: float | None = None
        # The success lines of the current second (SUCCESS_LINES_PER_SECOND).
        self._success_log = threading.Lock()
        self._success_second = 0.0  # when the current second ends (monotonic)
        self._success_lines = 0
        self._unlogged_successes = 0
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
            self._lifeline = Lifeline(self.engine, self.node, self._on_job_notified)
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
        self._executor = Executor(threads=self.config.concurrency)
        self._heartbeat = lease.Heartbeat(
            self.engine,
            self.node,
            self.config.lease_seconds,
            self.config.heartbeat_interval,
            held=self._held_tokens,
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
        # What start-up made (modules, tasks, compiled statements) lives as
        # long as the worker: out of the cyclic collector's sight, a full
        # collection no longer walks it in the middle of a job's pickup
        # (tools/benchmark.py, W3's p99).
        gc.freeze()

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
        taken = conn.execute(queries.take_over_node, values).rowcount
        holder = conn.execute(queries.node_holder, {"node_name": self.node}).first()
        if not taken and holder and _process_gone(holder.hostname, holder.pid):
            # A worker restarted in place (by systemd, say) after a crash: its
            # heartbeat has not expired yet, but this host knows it has ended.
            taken = conn.execute(
                queries.take_over_node_of_gone_process,
                {**values, "holder_hostname": holder.hostname,
                 "holder_pid": holder.pid},
            ).rowcount
        if taken:
            # The name's last holder is dead: its jobs carry this name as owner
            # and would otherwise have their leases renewed by us.
            lease.rescue_jobs_of_node(conn, self.node)
            return
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
        """Run a step; while the database is down, log once and retry with backoff.

        The first retry comes at once (a dropped connection is replaced by
        then), the next ones after growing, jittered waits.
        """
        try:
            step()
            return
        except self._outage_errors as exc:
            self._log_outage(exc)

        retrying = Retrying(
            retry=retry_if_exception_type(self._outage_errors),
            wait=wait_random_exponential(multiplier=0.5, max=MAX_OUTAGE_BACKOFF),
            sleep=self._sleep_unless_stopping,
            before_sleep=lambda state: self._log_outage(state.outcome.exception()),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._stopping.is_set() and attempt.retry_state.attempt_number > 1:
                    return
                # A step may have nothing to ask of the database this time;
                # without the probe it would pass for the database's return.
                self._probe_database()
                step()
        if self._outage:
            logger.warning(
                "database reachable again",
                extra={"event": "worker.database_restored", "node": self.node},
            )
            self._outage = False

    def _probe_database(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _sleep_unless_stopping(self, seconds: float) -> None:
        """The backoff's wait, cut short by a stop or a sign the database may
        be back: the lifeline reconnected (it wakes the loop), or a run ended."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _log_outage(self, error: BaseException | None) -> None:
        if not self._outage:
            logger.warning(
                "database unavailable, retrying with backoff: %s",
                getattr(error, "orig", error),
                extra={"event": "worker.database_unavailable", "node": self.node},
            )
        self._outage = True

    def _iterate(self) -> None:
        self._enforce_timeouts()
        self._retire_if_stuck()
        self._retire_if_node_gone()

        woken = self._wake.is_set()  # a run ended, a job was enqueued, a stop
        self._wake.clear()
        with self._claim_lock:  # the lifeline may claim too (_on_job_notified)
            self._collect_ended()
            free = 0 if self._stopping.is_set() or self._lifeline_lost() else (
                self._free_slots())
            # An idle worker that woke only for its maintenance does not claim:
            # nothing new can be due before its next poll.
            look = woken or not self._drained or time.monotonic() >= self._next_poll
            claimed: list[ClaimedJob] = []
            turn = bool(self._unrecorded or (free and look))
            if turn:
                claimed = self._record_and_claim(free)
                for job in claimed:
                    self._start_job(job)
                self._drained = len(claimed) < free
        if turn:
            if claimed:
                time.sleep(0)  # let the runs start before the bookkeeping below
            self._note_idleness(self._drained)
            self._next_poll = time.monotonic() + self._idle_poll
            if self._drained and self._next_due is not None:
                self._next_poll = min(self._next_poll, self._next_due)
        elif self._idle and not self._drained:
            self._note_idleness(False)  # the lifeline claimed (_claim_when_idle)
        self._maintain_if_due()
        if free and not self._drained:
            return  # every free slot was filled: more may be due
        self._wait()

    def _on_job_notified(self) -> None:
        """A job was enqueued (NOTIFY; run on the lifeline's thread).

        An idle worker claims the first queue's due jobs at once, here, on
        the listening session that the notification has just woken. That
        spares the claim a thread hand-off and the wake-up of the loop's
        sleeping server process: W3 in tools/benchmark.py went from about
        1.3 ms to 0.9 ms, commit to task start (traced at each step). Then,
        or instead, the loop is woken, unless the claim left it nothing to
        do sooner than it planned (_claim_when_idle). A worker with jobs
        running, or busy claiming on its loop, leaves it all to the loop.

        The loop holds `_claim_lock` while it claims and starts jobs, so the
        two never count the same free slots.
        """
        settled = False
        try:
            if self._claim_lock.acquire(blocking=False):
                try:
                    settled = self._claim_when_idle()
                finally:
                    self._claim_lock.release()
        except Exception as exc:  # noqa: BLE001 - the loop claims instead
            # A lost session is noticed, and logged, by the lifeline itself,
            # which reconnects and wakes the worker again.
            lost = isinstance(exc, DBAPIError) and exc.connection_invalidated
            logger.log(
                logging.DEBUG if lost else logging.WARNING,
                "claim on notification failed (%s: %s); the loop claims instead",
                type(exc).__name__,
                _first_line(exc),
                extra={"event": "worker.notified_claim_failed", "node": self.node},
            )
        if not settled:
            self._wake.set()

    def _claim_when_idle(self) -> bool:
        """Claim and start jobs if the worker is idle; True if the loop need
        not look for more now. It then wakes when a run ends, and is not
        woken at once to compete for the GIL with the runs starting."""
        assert self._lifeline is not None
        with self._lock:
            idle = not (self._running or self._ended or self._unrecorded)
        if not idle or not self._any_tasks or self._outage or self._stopping.is_set():
            return False
        # Idle, every slot is free: the statement and its values but the
        # token are the same at every notification, made once.
        free = self.config.concurrency
        if self._notified_claim is None:
            self._notified_claim = RawStatement.for_engine(
                claim.claim_any_jobs_postgresql(free, self._any_tasks), self.engine
            )
        token = secrets.token_hex(16)
        rows = self._lifeline.execute(
            self._notified_claim, {**self._notified_values, "token": token}
        )
        claimed = [ClaimedJob(*row, token=token) for row in rows]
        claimed.sort(key=lambda job: (job.priority, job.id))
        for job in claimed:
            self._start_job(job)
        if not claimed:
            return False  # the job may be in another queue, or scheduled
        self._drained = False  # the loop then says in the node row it is busy
        if self._earliest_deadline() < self._asleep_until:
            return False  # the loop must enforce a timeout sooner than it would
        # Every slot taken, or the only queue has no more due.
        return len(claimed) == free or not self._more_to_claim()

    def _wait(self) -> None:
        """Sleep until a run ends, a job is enqueued (NOTIFY), the next poll,
        the next rescue or maintenance pass, or a running job's deadline.

        `_asleep_until` tells the lifeline, which may start jobs meanwhile,
        when the loop will look at their deadlines next; infinite while it
        works that out, so that a job started then wakes it.
        """
        self._asleep_until = math.inf
        duty = min(self._next_rescue if self._lifeline else math.inf,
                   self._next_maintenance, self._earliest_deadline())
        until = min(self._next_poll, duty)
        self._asleep_until = until
        self._wake.wait(max(until - time.monotonic(), 0.005))
        self._asleep_until = math.inf

    def _earliest_deadline(self) -> float:
        with self._lock:
            deadlines = [running.deadline for running in self._running.values()
                         if running.deadline is not None]
        return min(deadlines, default=math.inf)

    def _held_tokens(self) -> list[str]:
        """The lease tokens of every job this worker holds (for the heartbeat).

        Under the lock, as a run moves from running to ended to unrecorded,
        so that none is missed on the way.
        """
        with self._lock:
            tokens = {running.job.token for running in self._running.values()}
            tokens.update(running.job.token for running, _ in self._ended)
            tokens.update(running.job.token for running, _ in self._unrecorded)
        return sorted(tokens)

    def _lifeline_lost(self) -> bool:
        """Whether this node's lifeline is down (PostgreSQL). Other workers
        then take its running jobs for orphans, so it claims none until the
        lifeline is back: a job it claimed now would be rescued at once, and
        run twice over."""
        return self._lifeline is not None and not self._lifeline.held

    def _free_slots(self) -> int:
        with self._lock:
            return self.config.concurrency - len(self._running)

    def _collect_ended(self) -> None:
        with self._lock:
            self._unrecorded.extend(self._ended)
            self._ended.clear()

    def _record_and_claim(self, free: int) -> list[ClaimedJob]:
        """Record what ended and claim up to `free` due jobs, in one commit.

        On PostgreSQL the usual case is one statement
        (claim.finish_and_claim_postgresql): successes recorded, the first
        queue's jobs claimed. A transaction does the rest: other outcomes,
        other queues, and `all` jobs (whenever the node is idle, and at least
        once per poll interval while it is busy).
        """
        claimed: list[ClaimedJob] = []
        if self._fast_path_fits():
            claimed, promoted = self._finish_and_claim(free)
            if promoted and len(claimed) < free:
                # Jobs just moved to queued: the next statement sees them.
                more, _ = self._finish_and_claim(free - len(claimed))
                claimed += more
            if len(claimed) == free or not self._more_to_claim():
                return claimed
        return claimed + self._record_and_claim_in_transaction(free - len(claimed))

    def _fast_path_fits(self) -> bool:
        if self._autocommit is None or not self._any_tasks:
            return False
        if self._all_tasks and time.monotonic() >= self._next_full_claim:
            return False
        return all(
            outcome is None
            or (
                outcome.kind == SUCCEEDED
                and not running.job.is_completion
                and running.job.schedule is None
            )
            for running, outcome in self._unrecorded
        )

    def _more_to_claim(self) -> bool:
        """Whether jobs may wait where the one-statement claim did not look."""
        return len(self._queues) > 1 or bool(self._all_tasks)

    def _finish_and_claim(self, free: int) -> tuple[list[ClaimedJob], int]:
        """The one-statement path; returns the claimed jobs and how many
        scheduled jobs it moved to queued."""
        ended = self._unrecorded
        successes = [running.job for running, outcome in ended if outcome is not None]
        successes.sort(key=lambda job: job.id)  # job rows in id order
        token = secrets.token_hex(16)
        values = {
            "ids": [job.id for job in successes],
            "tokens": [job.token for job in successes],
            "node_name": self.node,
            "token": token,
            "lease": self.config.lease_seconds,
            "claim_queue": self._queues[0],
            "promote_queue": self._queues[0],
        }
        rows = self._execute_hot(
            claim.finish_and_claim_postgresql(free, self._any_tasks), values
        )
        self._unrecorded = []

        owned = {(row[1], None) for row in rows if row[0] == claim.FINISHED}
        self._log_outcomes(ended, owned)
        claimed = [
            ClaimedJob(*row[1:], token=token) for row in rows if row[0] == claim.CLAIMED
        ]
        claimed.sort(key=lambda job: (job.priority, job.id))
        promoted = sum(1 for row in rows if row[0] == claim.PROMOTED)
        return claimed, promoted

    def _execute_hot(self, statement: Any, values: dict[str, Any]) -> list[Any]:
        """Run one of the loop's own statements on its own connection.

        The connection is held for the worker's life in autocommit, not
        checked out of the pool per batch, and opened again after a failure.
        Each statement is compiled once (statements.RawStatement).
        """
        raw = self._hot_statements.get(statement)
        if raw is None:
            raw = RawStatement.for_engine(statement, self.engine)
            self._hot_statements[statement] = raw
        if self._hot is None:
            pooled = raw_connection(self.engine)
            pooled.detach()  # autocommit: it must never go back to the pool
            set_up_hot_session(pooled.dbapi_connection)
            self._hot = pooled
            self._hot_prepared = set()
        try:
            return raw.execute_prepared(
                self._hot.dbapi_connection, values, self._hot_prepared
            )
        except DBAPIError:
            self._close_hot()
            raise

    def _close_hot(self) -> None:
        if self._hot is not None:
            try:
                self._hot.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass
            self._hot = None

    def _record_and_claim_in_transaction(self, free: int) -> list[ClaimedJob]:
        ended = self._unrecorded
        recording = True
        try:
            with self.engine.begin() as conn:
                owned = self._record(conn, ended)
                recording = False
                claimed = self._claim(conn, free) if free else []
        except REFUSED_VALUES as exc:
            if not recording:
                raise  # refused by the claim, not by an outcome: the loop's guard's
            # The database refused a value, not the connection: one outcome
            # it will never take would fail every batch it is in, and the
            # worker would retry them as an outage for good. Record them one
            # by one instead; the next turn claims.
            logger.warning(
                "recording %d outcomes together failed (%s); recording them "
                "one by one",
                len(ended),
                _first_line(exc),
                extra={"event": "worker.recording_refused", "node": self.node},
            )
            ended, owned = self._record_one_by_one(ended)
            claimed = []
        self._unrecorded = []
        self._next_full_claim = time.monotonic() + self.config.poll_interval
        self._log_outcomes(ended, owned)
        return claimed

    def _record_one_by_one(
        self, ended: list[tuple[RunningJob, Outcome | None]]
    ) -> tuple[list[tuple[RunningJob, Outcome | None]], set[tuple[int, str | None]]]:
        """Record each outcome in a transaction of its own; one the database
        refuses is recorded as a failure that says why. If even that is
        refused, the job is left to its lease, and another run.

        Returns the outcomes as recorded (to be logged as such), and which
        jobs this worker still owned.
        """
        owned: set[tuple[int, str | None]] = set()
        recorded: list[tuple[RunningJob, Outcome | None]] = []
        for running, outcome in sorted(ended, key=lambda pair: pair[0].job.id):
            recorded.append((running, outcome))
            if outcome is None:
                continue
            try:
                with self.engine.begin() as conn:
                    owned |= self._record(conn, [(running, outcome)])
                continue
            except REFUSED_VALUES as exc:
                refusal = exc
            job = running.job
            logger.error(
                "the database refused the outcome (%s) of %s job %s: %s; "
                "recording it as failed",
                outcome.kind,
                job.task,
                job.id,
                _first_line(refusal),
                extra={"event": "job.outcome_refused", **running.fields(self.node)},
            )
            failure = Outcome(
                FAILED,
                error=(
                    f"dbtasks could not record this job's outcome ({outcome.kind}): "
                    f"the database refused it: {_first_line(refusal)}"
                ),
            )
            recorded[-1] = (running, failure)
            try:
                with self.engine.begin() as conn:
                    owned |= self._record(conn, [(running, failure)])
            except REFUSED_VALUES as exc:
                logger.error(
                    "the database refused the failure of %s job %s as well: %s; "
                    "its lease will expire and it runs again",
                    job.task,
                    job.id,
                    _first_line(exc),
                    extra={"event": "job.outcome_refused", **running.fields(self.node)},
                )
        return recorded, owned

    def _note_idleness(self, idle: bool) -> None:
        """Learn when the next job falls due, and say in the node's row whether
        it waits for work (written only when that changes, and only where a
        NOTIFY can wake it)."""
        if not idle:
            self._next_due = None
            if idle == self._idle:
                return
        tell = self._lifeline is not None and idle != self._idle
        if self._autocommit is not None:
            # PostgreSQL: on the loop's own connection, each statement commits
            # on its own. Lean, as this runs while the jobs just claimed start.
            due_in = self._next_due_in(self._execute_hot) if idle else None
            if tell:
                self._execute_hot(
                    queries.set_node_idle, {"node_name": self.node, "idle": idle}
                )
        else:
            with self.engine.begin() as conn:
                due_in = self._next_due_in(
                    lambda statement, values: conn.execute(statement, values).all()
                ) if idle else None
        self._next_due = None if due_in is None else time.monotonic() + due_in
        self._idle = idle

    def _log_outcomes(
        self,
        ended: list[tuple[RunningJob, Outcome | None]],
        owned: set[tuple[int, str | None]],
    ) -> None:
        for running, outcome in ended:
            if outcome is not None:
                key = (running.job.id, running.job.node)
                self._log_outcome(running, outcome, owned=key in owned)

    def _record(
        self, conn: Connection, ended: list[tuple[RunningJob, Outcome | None]]
    ) -> set[tuple[int, str | None]]:
        """Record outcomes; return the (job id, node) of those still owned.

        The successes of `any` jobs, the bulk of a busy worker's outcomes, go
        in one statement; the rest one by one, in job id order.
        """
        successes: list[ClaimedJob] = []
        others: list[tuple[ClaimedJob, Outcome]] = []
        for running, outcome in ended:
            if outcome is None:
                continue  # recorded by the task's own transaction
            if outcome.kind == SUCCEEDED and not running.job.is_completion:
                successes.append(running.job)
            else:
                others.append((running.job, outcome))
        others.sort(key=lambda pair: pair[0].id)

        with recording(conn) as batch:
            owned = {(job_id, None) for job_id in batch.record_successes(successes)}
            for job, outcome in others:
                if batch.record(job, outcome):
                    owned.add((job.id, job.node))
        return owned

    def _claim(self, conn: Connection, free: int) -> list[ClaimedJob]:
        token = secrets.token_hex(16)
        claimed: list[ClaimedJob] = []
        claim.promote_scheduled_jobs(conn, self._queues)
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

    def _next_due_in(self, execute: Callable[[Any, dict[str, Any]], list[Any]]
                     ) -> float | None:
        """Seconds until this node's earliest scheduled job or completion is
        due, if it has any; `execute` runs a statement and returns its rows."""
        values: dict[str, Any] = {"node_name": self.node}
        values.update({f"queue_{n}": queue for n, queue in enumerate(self._queues)})
        ((now, *due),) = execute(queries.next_due(len(self._queues)), values)
        due = [when for when in due if when is not None]
        return (min(due) - now).total_seconds() if due else None

    @property
    def _idle_poll(self) -> float:
        """The longest idle wait. Listening, a worker is told of new jobs, and
        the poll is only a safety net for a notification lost in a reconnect."""
        listening = self._lifeline is not None
        return self.config.poll_interval * (LISTENING_POLL_FACTOR if listening else 1)


    # --- maintenance -----------------------------------------------------------

    def _maintain_if_due(self) -> None:
        now = time.monotonic()
        if self._unlogged_successes and now >= self._success_second:
            self._log_unlogged_successes()
        if self._lifeline is not None and now >= self._next_rescue:
            # Frequent, so one cheap statement: are there jobs of a worker
            # whose lifeline is gone? Only then the rescue's transaction.
            self._next_rescue = now + RESCUE_INTERVAL
            assert self._autocommit is not None
            with self._autocommit.connect() as conn:
                orphans = lease.any_orphaned_jobs(conn, self.node)
            if orphans:
                with self.engine.begin() as conn:
                    lease.rescue_orphaned_jobs(conn, self.node)
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.config.heartbeat_interval
        with self.engine.begin() as conn:
            lease.rescue_expired_jobs(conn)
        with self.engine.begin() as conn:
            lease.drop_dead_nodes(conn, self.config.node_timeout)
            lease.rescue_expired_completions(conn)
            lease.finish_stranded_all_jobs(conn)
            conn.execute(
                queries.clear_idle_of_dead_nodes,
                {"node_timeout": self.config.node_timeout},
            )
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
        values = {"retention": self.config.retention}
        with self.engine.begin() as conn:
            conn.execute(queries.prune_nodes, values)
        # Batch after batch, each its own transaction, for a bounded time: a
        # busy queue finishes far more than one batch a minute, and pruning
        # must keep up without holding up this loop's claims for long. What is
        # left waits for the next maintenance pass (a heartbeat interval).
        pruned = 0
        deadline = time.monotonic() + PRUNE_TIME_BUDGET
        while True:
            with self.engine.begin() as conn:
                batch = conn.execute(queries.prune_jobs, values).rowcount
            pruned += batch
            if batch < queries.PRUNE_BATCH:
                break
            if time.monotonic() >= deadline:
                self._next_housekeeping = 0.0
                break
        if pruned:
            logger.info(
                "pruned %d finished jobs older than the retention period",
                pruned,
                extra={"event": "worker.pruned", "node": self.node},
            )

    # --- running a job ------------------------------------------------------------

    def _start_job(self, job: ClaimedJob) -> None:
        running = RunningJob(job=job, task=self.registry.get(job.task))
        # A start is logged at DEBUG: at INFO each job gets one line, its
        # outcome's, which says the attempt and the duration too. With two
        # lines per job, W2 at INFO ran at 57% of its rate at WARNING
        # (tools/benchmark.py); with one, at about 88%.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "started %s job %s, attempt %d",
                job.task,
                job.id,
                job.attempt,
                extra={"event": "job.started", **running.fields(self.node)},
            )
        try:
            params = decode_params(job.params)
        except ValueError as exc:
            self._end(running, unreadable_params(job, exc))
            return

        task = running.task
        if task.timeout is not None:
            grace = ASYNC_CANCEL_GRACE if task.is_async else 0.0
            running.deadline = running.started + task.timeout + grace
        running.run = Run(
            task.fn,
            task.is_async,
            task.timeout,
            params,
            self._context(running),
            lambda error: self._on_run_ended(running, error),
        )
        with self._lock:
            self._running[id(running)] = running
        assert self._executor is not None
        self._executor.submit(running.run)

    def _on_run_ended(self, running: RunningJob, error: BaseException | None) -> None:
        """Called on the run's thread: hand the outcome to the loop."""
        if running.recorded and error is not None:
            logger.warning(
                "%s job %s raised after its transaction committed, which recorded "
                "it as succeeded; the error is not recorded: %s",
                running.job.task,
                running.job.id,
                summarize(error),
                extra={"event": "job.raised_after_commit",
                       **running.fields(self.node)},
            )
        self._end(running, None if running.recorded else classify(running.job, error))

    def _end(self, running: RunningJob, outcome: Outcome | None) -> None:
        """Hand a run's outcome (None: recorded already) to the loop."""
        running.ended = time.monotonic()
        with self._lock:
            self._running.pop(id(running), None)
            self._ended.append((running, outcome))
        self._wake.set()

    def _context(self, running: RunningJob) -> JobContext:
        return JobContext(
            job_id=running.job.id,
            task=running.job.task,
            attempt=running.job.attempt,
            node=self.node,
            logger=self._task_loggers[running.job.task],
            queue=running.job.queue,
            _transaction=lambda: self._job_transaction(running),
        )

    @contextmanager
    def _job_transaction(self, running: RunningJob) -> Iterator[Connection]:
        """The transaction that records the job's success with the task's writes.

        Committed apart from the loop's batches, so the task's rows and the
        job's success commit together or not at all. Once per run: a second
        block would commit apart from the success, which is recorded by then.

        A task that commits on the connection itself has broken that: its
        writes so far are in, without the success. The commit is seen (an
        event on this connection), so that a retry does not write them
        again: if the block then ends, the job succeeds with what came
        after; if it raises, the job is cancelled rather than retried.
        """
        job = running.job
        if running.ended is not None:
            # A thread the task left behind, or a run past its timeout: the
            # outcome is the worker's already, and no lease was lost.
            raise JobError(
                f"the run of job {job.id} has ended (it returned, or ran past its "
                "timeout); context.transaction() is for the run itself, not for "
                "threads it leaves running"
            )
        if running.transaction_opened:
            raise JobError(
                f"context.transaction() was used already in job {job.id}; use it "
                "once per job, with every write that must commit with the job's "
                "success inside that one block"
            )
        running.transaction_opened = True
        with self.engine.connect() as conn:
            commits: list[bool] = []  # the task's own commits, if any
            event.listen(conn, "commit", lambda _: commits.append(True))
            conn.begin()
            try:
                yield conn
            except BaseException as error:
                conn.rollback()
                if commits:
                    raise Cancel(
                        f"{_EARLY_COMMIT}, then raised {type(error).__name__}: "
                        f"{_first_line(error)}; not "
                        "retried, since what it committed would be written again"
                    ) from error
                raise
            if commits:
                logger.warning(
                    "%s job %s %s; recording its success now, with what it wrote "
                    "after",
                    job.task,
                    job.id,
                    _EARLY_COMMIT,
                    extra={"event": "job.committed_early", **running.fields(self.node)},
                )
            with recording(conn) as batch:
                owned = batch.record(job, Outcome(SUCCEEDED))
            if not owned:
                conn.rollback()
                raise LeaseLost(
                    f"job {job.id} is no longer held by node {self.node}: "
                    "its lease expired and it was rescued; nothing was committed"
                )
            conn.commit()
        running.recorded = True
        self._log_outcome(running, Outcome(SUCCEEDED), owned=True)

    def _log_outcome(self, running: RunningJob, outcome: Outcome, owned: bool) -> None:
        job = running.job
        if not owned:
            logger.warning(
                "lease of job %s lost before its outcome (%s) was recorded; another "
                "worker has it",
                job.id,
                outcome.kind,
                extra={"event": "lease.lost", **running.fields(self.node)},
            )
            return
        if outcome.kind == SUCCEEDED and not logger.isEnabledFor(logging.INFO):
            return

        if outcome.kind == SUCCEEDED and not self._success_line_allowed():
            return
        ended = running.ended if running.ended is not None else time.monotonic()
        duration_ms = round((ended - running.started) * 1000, 1)
        extra = {**running.fields(self.node), "duration_ms": duration_ms}
        if outcome.kind == SUCCEEDED:
            logger.info(
                "%s job %s succeeded in %.1f ms, attempt %d",
                job.task,
                job.id,
                duration_ms,
                job.attempt,
                extra={"event": "job.succeeded", **extra},
            )
        elif outcome.kind == RETRY:
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
                "%s job %s %s after %d attempt(s):\n%s",
                job.task,
                job.id,
                outcome.kind,
                job.attempt,
                cut_middle(outcome.error or "", LOGGED_ERROR_CHARS),
                extra={"event": f"job.{outcome.kind}", **extra},
            )

    def _success_line_allowed(self) -> bool:
        """Whether this second still has room for a success line; if not,
        the success is counted, to be said at the second's end."""
        with self._success_log:
            self._end_success_second()
            if self._success_lines < SUCCESS_LINES_PER_SECOND:
                self._success_lines += 1
                return True
            self._unlogged_successes += 1
            return False

    def _log_unlogged_successes(self, now: bool = False) -> None:
        """Say how many successes were not logged one by one, once their
        second is over, or `now` (at shutdown)."""
        with self._success_log:
            self._end_success_second(force=now)

    def _end_success_second(self, force: bool = False) -> None:
        """Under _success_log: once the second is over (or if forced), log the
        count of its unlogged successes and start a new second."""
        now = time.monotonic()
        if now < self._success_second and not force:
            return
        if self._unlogged_successes:
            logger.info(
                "%d more jobs succeeded, past the %d logged one by one a second",
                self._unlogged_successes,
                SUCCESS_LINES_PER_SECOND,
                extra={"event": "job.succeeded_count", "node": self.node,
                       "count": self._unlogged_successes},
            )
            self._unlogged_successes = 0
        self._success_second = now + 1.0
        self._success_lines = 0

    def _enforce_timeouts(self) -> None:
        """Fail jobs past their timeout and free their slots.

        A thread cannot be stopped from outside, so the function keeps running
        on its abandoned thread; what it then tries to record is refused, and
        if it does not end soon the worker retires (_retire_if_stuck).
        `async def` tasks are cancelled by the executor at their timeout; one
        still running ASYNC_CANCEL_GRACE later is failed here the same way.
        """
        now = time.monotonic()
        with self._lock:
            late = [
                running
                for running in self._running.values()
                if running.deadline is not None and now > running.deadline
            ]
        for running in late:
            if not self._abandon(running):
                continue  # it ended just now, on its own
            thread = running.run.thread if running.run else None
            if thread is not None:
                self._abandoned.append((thread, now))
            if running.task.is_async:
                self._async_abandoned_at = now
            timeout = TimeoutError(
                timeout_message(running.task.name, running.task.timeout)
            )
            self._end(running, classify(running.job, timeout))
            logger.warning(
                "job %s timed out; %s",
                running.job.id,
                "it did not end when cancelled, and what it does next is dropped"
                if running.task.is_async
                else "its thread cannot be stopped and keeps running",
                extra={"event": "job.timed_out", **running.fields(self.node)},
            )

    def _abandon(self, running: RunningJob) -> bool:
        """End the job's run without it (its slot is freed when the caller
        hands over the outcome, _end); False if the run ended first."""
        assert self._executor is not None and running.run is not None
        return self._executor.abandon(running.run)

    def _retire_if_stuck(self) -> None:
        """Retire the worker when a timed-out thread will not end.

        A thread cannot be stopped from outside. One that runs on long past
        its task's timeout holds memory, connections, maybe locks, for good;
        the only way to end it is to end the process. So the worker stops
        claiming, gives its other jobs the shutdown grace, hands back the rest
        and, under the CLI, starts again in place (same PID and arguments).
        """
        if not self._abandoned and self._async_abandoned_at is None:
            return
        now = time.monotonic()
        self._abandoned = [(t, since) for t, since in self._abandoned if t.is_alive()]
        stuck = [since for _, since in self._abandoned
                 if now - since > ABANDONED_THREAD_LIMIT]
        what = "a timed-out task has kept running"
        if not stuck and self._async_abandoned_at is not None:
            # The same for the event loop, which every coroutine of the worker
            # shares: one blocking it would stall them all for good.
            assert self._executor is not None
            beat = self._executor.last_loop_beat()
            if beat is None or beat > self._async_abandoned_at:
                self._async_abandoned_at = None  # it runs: only that coroutine hangs
            elif now - self._async_abandoned_at > ABANDONED_THREAD_LIMIT:
                stuck = [self._async_abandoned_at]
                what = ("a timed-out async task has blocked the event loop, and with "
                        "it every async job,")
        if not stuck or self._stopping.is_set():
            return
        logger.error(
            "%s %.0fs past its timeout and cannot be stopped; retiring this worker: "
            "it finishes its other jobs, then restarts",
            what,
            now - min(stuck),
            extra={"event": "worker.retiring", "node": self.node},
        )
        self.retired = True
        self.stop()

    def _retire_if_node_gone(self) -> None:
        """Retire the worker when its node's row is gone or marked stopped.

        The database was recreated or restored under it, or the row was
        deleted: no other worker sees this node as alive, so it has no part
        in `all` jobs, and its lifeline key is on record nowhere. A fresh
        start registers it again; the jobs it runs finish first.
        """
        if (self._heartbeat is None or not self._heartbeat.node_gone
                or self._stopping.is_set()):
            return
        logger.error(
            "node %s is no longer registered in the database (its row is gone or "
            "marked stopped); retiring this worker: it finishes its other jobs, "
            "then restarts and registers again",
            self.node,
            extra={"event": "worker.retiring", "node": self.node},
        )
        self.retired = True
        self.stop()

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_grace
        with self._claim_lock:
            pass  # a claim on notification under way ends first; none starts now
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
            self._enforce_timeouts()
            self._guarded_once(self._record_ended)

        self._hand_back_all()
        self._guarded_once(self._record_ended)
        self._log_unlogged_successes(now=True)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._guarded_once(self._deregister)
        if self._lifeline is not None:
            self._lifeline.close()
        self._close_hot()
        if self._executor is not None:
            self._executor.stop()
        self.engine.dispose()
        logger.info(
            "worker %s stopped",
            self.node,
            extra={"event": "worker.stopped", "node": self.node},
        )

    def _record_ended(self) -> None:
        self._collect_ended()
        if self._unrecorded:
            self._record_and_claim(free=0)

    def _hand_back_all(self) -> None:
        with self._lock:
            unfinished = list(self._running.values())
        for running in unfinished:
            if self._abandon(running):
                self._end(running, Outcome(HANDED_BACK))

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


def _first_line(error: BaseException) -> str:
    """The first line of the driver's message (of a DBAPIError: its original).

    Not the rest: PostgreSQL's DETAIL repeats the refused row, values and all.
    """
    return str(getattr(error, "orig", error)).split("\n", 1)[0]


def _last_line(error: str | None) -> str:
    return (error or "").rstrip().rsplit("\n", 1)[-1]


def _process_gone(hostname: str, pid: int) -> bool:
    """Whether the process `pid` on `hostname` has certainly ended.

    Only this host can tell, and only for its own processes. Our own pid
    counts as ended: a restarted container may hand the new worker the pid of
    the old one. A pid the system has reused for another process counts as
    alive, the safe side: the name then waits for the heartbeat to expire.
    """
    if hostname != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether the process has ended and waits only to be reaped (Linux; a
    container without an init leaves killed workers so)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may
    # itself hold spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
