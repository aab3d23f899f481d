"""dbtasks: a durable job queue that lives in your application's SQL database.

Define tasks with `@task` in a `tasks/` folder, enqueue jobs with `enqueue()`
inside your own SQLAlchemy transaction, and run `dbtasks worker`.
"""

from dbtasks.errors import (
    Cancel,
    ConfigError,
    DatabaseError,
    DbtasksError,
    DuplicateTask,
    InvalidParams,
    JobError,
    LeaseLost,
    Retry,
    SchemaError,
    TaskDefinitionError,
    TaskError,
    TaskNotFound,
)
from dbtasks.jobs import enqueue, enqueue_many
from dbtasks.schema import CompletionState, JobState, metadata
from dbtasks.tasks import JobContext, Registry, Task, load_tasks, run_inline, task
from dbtasks.worker import Worker

__all__ = [
    # tasks
    "task",
    "Task",
    "JobContext",
    "Registry",
    "load_tasks",
    # jobs
    "enqueue",
    "enqueue_many",
    "run_inline",
    "JobState",
    "CompletionState",
    # running
    "Worker",
    # outcomes a task may choose
    "Retry",
    "Cancel",
    # schema, for applications that keep dbtasks out of their autogenerate
    "metadata",
    # errors
    "DbtasksError",
    "ConfigError",
    "TaskError",
    "TaskNotFound",
    "DuplicateTask",
    "TaskDefinitionError",
    "JobError",
    "InvalidParams",
    "LeaseLost",
    "DatabaseError",
    "SchemaError",
]
