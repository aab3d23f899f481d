"""The exception tree of dbtasks, and the outcomes a task may choose.

Every error dbtasks raises is a `DbtasksError`, whose message names the bad value
and how to fix it. `Retry` and `Cancel` are not errors: a task raises them to
steer the outcome of its job, and they stand outside the tree on purpose.
"""

from __future__ import annotations

from datetime import timedelta

from dbtasks.clock import MAX_SECONDS


class DbtasksError(Exception):
    """Base class of every error raised by dbtasks."""


class ConfigError(DbtasksError):
    """A setting is wrong: database URL, tasks folder, node name, option value."""


class TaskError(DbtasksError):
    """A task definition or task module is wrong."""


class TaskNotFound(TaskError):
    """No task of that name is known here or to any registered worker."""


class DuplicateTask(TaskError):
    """Two task definitions use the same name."""


class TaskDefinitionError(TaskError):
    """A task's function cannot do its work, whatever the job: a plain function
    that returns a coroutine, which nothing awaits.

    Its job fails at once, without the retries left: each would fail the same
    way until the task is fixed and deployed, then the job can be enqueued
    again.
    """


class JobError(DbtasksError):
    """A job cannot be enqueued or recorded as asked."""


class InvalidParams(JobError):
    """Job params would not come back from the database exactly as given."""


class LeaseLost(JobError):
    """The worker no longer owns the job: it was rescued or handed back."""


class DatabaseError(DbtasksError):
    """The database failed or could not be reached; the cause is chained."""


class SchemaError(DbtasksError):
    """The database schema is missing or at a revision this code cannot use."""


class Retry(Exception):  # noqa: N818 - an outcome, not an error
    """Raise from a task to run its job again later.

    Counts as an attempt: once the task's `max_attempts` are spent, the job
    fails. `delay` (seconds or a timedelta) replaces the usual backoff.
    """

    def __init__(self, delay: float | timedelta | None = None, reason: str = ""):
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if delay is not None and (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not 0 <= delay <= MAX_SECONDS
        ):
            raise ValueError(
                f"Retry delay must be a number of seconds from 0 to {MAX_SECONDS:g} "
                f"(ten years) or a timedelta, got {delay!r}"
            )
        super().__init__(reason or "retry requested by the task")
        self.delay = delay
        self.reason = reason


class Cancel(Exception):  # noqa: N818 - an outcome, not an error
    """Raise from a task to end its job as cancelled, with no further attempts."""

    def __init__(self, reason: str = ""):
        super().__init__(reason or "cancelled by the task")
        self.reason = reason


for _public in (
    DbtasksError,
    ConfigError,
    TaskError,
    TaskNotFound,
    DuplicateTask,
    TaskDefinitionError,
    JobError,
    InvalidParams,
    LeaseLost,
    DatabaseError,
    SchemaError,
    Retry,
    Cancel,
):
    _public.__module__ = "dbtasks"
