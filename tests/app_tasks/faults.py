"""Tasks that misbehave on purpose, for the worker and fault-injection tests."""

from __future__ import annotations

import os
import signal
import sys
import time

from dbtasks import Retry, task
from tests.runs import record_run


@task(name="tick")
def tick(params, context):
    """Record one run and return: the cheapest job that leaves a trace."""
    record_run(context, "run")


@task(name="fail_three_times", max_attempts=3)
def fail_three_times(params, context):
    """Fail every attempt, so the job is retried with backoff and then fails."""
    record_run(context, "start")
    raise RuntimeError(f"attempt {context.attempt} failed on purpose")


@task(name="retry_always", max_attempts=2)
def retry_always(params, context):
    """Ask for a retry on every attempt; the last one ends the job failed."""
    record_run(context, "start")
    raise Retry(delay=0.1, reason="not yet")


@task(name="interrupts", max_attempts=1)
def interrupts(params, context):
    """Raise KeyboardInterrupt, which must fail the job and not stop the worker."""
    record_run(context, "start")
    raise KeyboardInterrupt


@task(name="exits_with_code", max_attempts=1)
def exits_with_code(params, context):
    """Call sys.exit, which must fail the job and not stop the worker."""
    record_run(context, "start")
    sys.exit(4)


@task(name="kills_its_worker", max_attempts=2)
def kills_its_worker(params, context):
    """SIGKILL the worker process running it, on every attempt."""
    record_run(context, "start")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


@task(name="async_exits", max_attempts=1)
async def async_exits(params, context):
    """Call sys.exit inside a coroutine, on the worker's shared event loop."""
    record_run(context, "start")
    sys.exit(5)
