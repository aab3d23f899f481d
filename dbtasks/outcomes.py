"""Recording what happened to a job, fenced by its lease.

A run ends in one `Outcome`: succeeded, retry (queued again after a delay),
failed, cancelled, or handed back (unfinished at shutdown, attempt returned).
`record` writes it in the caller's transaction, and only if the worker still
holds the job's lease token: a worker that lost its lease records nothing.

When a periodic job ends for good, the next job of its series is enqueued in
the same transaction, at now + the schedule's frequency.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from dbtasks import queries
from dbtasks.claim import ClaimedJob
from dbtasks.errors import Cancel, Retry, TaskDefinitionError
from dbtasks.schema import JobState

#: First retry delay in seconds; each further attempt doubles it.
BACKOFF_BASE = 2.0

#: Longest retry delay in seconds.
BACKOFF_CAP = 3600.0

SUCCEEDED = JobState.SUCCEEDED.value
FAILED = JobState.FAILED.value
CANCELLED = JobState.CANCELLED.value
RETRY = "retry"
HANDED_BACK = "handed_back"


#: Longest error text kept in a job's row; a longer one keeps its start and,
#: where the exception itself is, its end.
MAX_ERROR_CHARS = 65_536

#: Longest error text in the log record of a job's failure. Log pipelines
#: split or drop far shorter records than a row keeps (Docker splits lines
#: at 16 KB); the whole stored text is in the job's last_error.
LOGGED_ERROR_CHARS = 8_000


@dataclass(frozen=True)
class Outcome:
    """How a run ended. `delay` is in seconds and only used by a retry.

    The texts are made storable as the outcome is made, whatever the task
    raised: a NUL, which PostgreSQL text refuses, and a lone surrogate, which
    no UTF-8 encoder takes, are written as backslash escapes (`\\x00`,
    `\\ud800`), and an error longer than MAX_ERROR_CHARS is cut in its
    middle. An outcome the database refused would otherwise never be
    recorded, and would hold up the worker's other outcomes with it.
    """

    kind: str
    error: str | None = None
    delay: float = 0.0
    summary: str | None = None  # one line for the log; `error` has the traceback

    def __post_init__(self) -> None:
        if self.error is not None:
            object.__setattr__(self, "error", storable_text(self.error))
        if self.summary is not None:
            object.__setattr__(
                self, "summary", storable_text(self.summary, limit=1000)
            )

    @property
    def is_final(self) -> bool:
        return self.kind in (SUCCEEDED, FAILED, CANCELLED)


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter: about 2, 4, 8 ... seconds, capped.

    The delay is drawn from the upper half of the range, so retries of many
    jobs that failed together spread out without any one retrying at once.
    """
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def classify(job: ClaimedJob, error: BaseException | None) -> Outcome:
    """Turn the end of a run (an exception or None) into an Outcome.

    Whatever the task raised, this returns: an error that cannot even be
    described (its traceback machinery raising) is a failed attempt that
    says so, never a job left without an outcome.
    """
    try:
        return _classify(job, error)
    except Exception:  # noqa: BLE001 - see above
        try:
            name = f"a {type(error).__name__}"
        except Exception:  # noqa: BLE001 - even its class's name may raise
            name = "an error"
        if isinstance(error, Cancel):
            return Outcome(CANCELLED, error=f"cancelled with a reason that {name} "
                           "could not turn into text")
        return _classify(
            job, RuntimeError(f"the task raised {name} that could not be described")
        )


def _classify(job: ClaimedJob, error: BaseException | None) -> Outcome:
    if error is None:
        return Outcome(SUCCEEDED)
    if isinstance(error, Cancel):
        return Outcome(CANCELLED, error=str(error.reason or error))

    text, summary = describe(error), summarize(error)
    if job.attempt >= job.max_attempts or isinstance(error, TaskDefinitionError):
        return Outcome(FAILED, error=text, summary=summary)
    if isinstance(error, Retry) and error.delay is not None:
        return Outcome(RETRY, error=text, delay=error.delay, summary=summary)
    return Outcome(
        RETRY, error=text, delay=retry_delay(job.attempt), summary=summary
    )


def unreadable_params(job: ClaimedJob, error: ValueError) -> Outcome:
    """The job's stored params are not JSON: it fails at once, since no retry
    of the same row could read them (they were changed outside enqueue)."""
    message = (
        f"params of job {job.id} are not valid JSON ({error}); the task did not "
        "run. Params written by enqueue are always valid: the row was changed "
        "by hand or by another program. Enqueue the job again with good params."
    )
    return Outcome(FAILED, error=message, summary=message)


def storable_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` as every database and driver takes it: no NUL, no lone
    surrogate (both written as backslash escapes), at most about `limit`
    characters long."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return cut_middle(text, limit)


def cut_middle(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters; else at most `limit` of
    them: a quarter from its start, the rest from its end (a traceback's end
    says what was raised), and the cut marked between."""
    if len(text) <= limit:
        return text
    room = limit - 40  # the marker's length, with a count of up to 13 digits
    head = room // 4
    tail = room - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut:,} characters cut ...]\n{text[-tail:]}"


def summarize(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    try:
        message = str(error).strip().split("\n", 1)[0]
    except Exception:  # noqa: BLE001 - a task's own __str__ may raise anything
        message = "<the error's str() failed>"
    try:
        name = type(error).__name__
    except Exception:  # noqa: BLE001 - and so may its class's __name__
        name = "<an error whose class name failed>"
    return f"{name}: {message}" if message else name


def describe(error: BaseException) -> str:
    """The error and its traceback, as kept in the job's last_error."""
    return "".join(traceback.format_exception(error)).rstrip()


class Recording:
    """The outcomes recorded in one transaction.

    A job that ends its periodic series' run adds the next job of the series;
    those are added last, when the recording closes, in schedule-name order,
    each after locking its schedule row (queries: locking conventions).
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self._series: dict[str, int] = {}
        self._queued_again = False

    def record(self, job: ClaimedJob, outcome: Outcome) -> bool:
        """Record one outcome; False if the lease is lost (nothing written)."""
        if job.is_completion:
            return self._record_completion(job, outcome)

        fence = {"job_id": job.id, "token": job.token}
        if outcome.kind == RETRY:
            values = {**fence, "delay": outcome.delay, "error": outcome.error}
            return self._queued(self.conn.execute(queries.retry_job, values))
        if outcome.kind == HANDED_BACK:
            return self._queued(self.conn.execute(queries.hand_back_job, fence))

        values = {**fence, "state": outcome.kind, "error": outcome.error}
        finished = self.conn.execute(queries.finish_job, values).first()
        if finished is None:
            return False
        self._ended_run(job.id, finished.schedule)
        return True

    def record_successes(self, jobs: list[ClaimedJob]) -> set[int]:
        """Record that `any` jobs succeeded, in one statement; return the ids
        of those whose lease still held (the others record nothing)."""
        if not jobs:
            return set()
        jobs = sorted(jobs, key=lambda job: job.id)  # job rows in id order
        if self.conn.dialect.name == "postgresql":
            statement = queries.finish_succeeded_jobs_postgresql()
            values: dict[str, Any] = {
                "ids": [job.id for job in jobs],
                "tokens": [job.token for job in jobs],
            }
        else:
            statement = queries.finish_succeeded_jobs_sqlite()
            values = {"done": [(job.id, job.token) for job in jobs]}
        finished = self.conn.execute(statement, values).all()
        for row in finished:
            self._ended_run(row.id, row.schedule)
        return {row.id for row in finished}

    def _record_completion(self, job: ClaimedJob, outcome: Outcome) -> bool:
        conn = self.conn
        conn.execute(queries.lock_job, {"job_id": job.id})
        fence = {"completion_job": job.id, "node_name": job.node, "token": job.token}

        if outcome.kind == RETRY:
            values = {**fence, "delay": outcome.delay, "error": outcome.error}
            return self._queued(conn.execute(queries.retry_completion, values))
        if outcome.kind == HANDED_BACK:
            return self._queued(conn.execute(queries.hand_back_completion, fence))

        values = {**fence, "state": outcome.kind, "error": outcome.error}
        if conn.execute(queries.finish_completion, values).first() is None:
            return False
        self.finish_all_job(job.id)
        return True

    def finish_all_job(self, job_id: int) -> bool:
        """Finish an `all` job if no node has a run open.

        The caller holds the job's row lock (queries.lock_job).
        """
        finished = self.conn.execute(queries.finish_all_job, {"job_id": job_id}).first()
        if finished is None:
            return False
        self._ended_run(job_id, finished.schedule)
        return True

    def _queued(self, result: Any) -> bool:
        """Note a job queued again; True if the fenced UPDATE found it."""
        found = result.first() is not None
        self._queued_again = self._queued_again or found
        return found

    def _ended_run(self, job_id: int, schedule: str | None) -> None:
        if schedule is not None:
            self._series[schedule] = job_id

    def close(self) -> None:
        """Enqueue the next job of every series whose run ended here, and
        wake idle nodes about jobs queued again."""
        for schedule in sorted(self._series):
            continue_series(self.conn, self._series.pop(schedule), schedule)
        if self._queued_again and self.conn.dialect.name == "postgresql":
            self.conn.execute(queries.notify_idle_nodes)
            self._queued_again = False


@contextmanager
def recording(conn: Connection) -> Iterator[Recording]:
    """Record outcomes in the caller's transaction; continue series at the end."""
    batch = Recording(conn)
    yield batch
    batch.close()


def record(conn: Connection, job: ClaimedJob, outcome: Outcome) -> bool:
    """Record one outcome in the caller's transaction; False if the lease is lost."""
    with recording(conn) as batch:
        return batch.record(job, outcome)


def continue_series(conn: Connection, job_id: int, schedule: str) -> None:
    """Enqueue the next job of a periodic series after `job_id` ended.

    The schedule row is locked first, by the UPDATE, as every transaction
    that adds a job to a series does.
    """
    conn.execute(queries.mark_schedule_run, {"schedule_task": schedule})
    conn.execute(queries.enqueue_next_in_series(conn.dialect.name), {"job_id": job_id})
