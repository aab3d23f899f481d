"""On-demand tasks used by the integration tests."""

from __future__ import annotations

import asyncio
import threading
import time

from dbtasks import Cancel, Retry, task
from tests.runs import record_run


@task(name="noop")
def noop(params, context):
    """Do nothing."""


@task(name="nap")
def nap(params, context):
    """Sleep, touching no database: runs on while the database is away."""
    time.sleep(params["sleep"])


@task(name="record")
def record(params, context):
    """Record a start and an end, sleeping `sleep` seconds in between."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 0))
    record_run(context, "end")


@task(name="record_async")
async def record_async(params, context):
    """The async twin of record."""
    record_run(context, "start")
    await asyncio.sleep(params.get("sleep", 0))
    record_run(context, "end")


@task(name="fail", max_attempts=2)
def fail(params, context):
    """Fail every attempt."""
    record_run(context, "start")
    raise RuntimeError("this task always fails")


@task(name="retry_once", max_attempts=3)
def retry_once(params, context):
    """Ask for a retry on the first attempt, succeed on the second."""
    record_run(context, "start")
    if context.attempt == 1:
        raise Retry(delay=0.1, reason="try again")


@task(name="cancel_me")
def cancel_me(params, context):
    """End as cancelled."""
    raise Cancel("not needed any more")


@task(name="short_timeout", timeout=0.5, max_attempts=1)
def short_timeout(params, context):
    """Run past a half-second timeout."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 3))


@task(name="short_timeout_async", timeout=0.5, max_attempts=1)
async def short_timeout_async(params, context):
    """Run past a half-second timeout, cancellably."""
    record_run(context, "start")
    await asyncio.sleep(params.get("sleep", 3))
    record_run(context, "end")


@task(name="stubborn_async", timeout=0.5, max_attempts=1)
async def stubborn_async(params, context):
    """Run past a half-second timeout and swallow every cancellation."""
    record_run(context, "start")
    while True:
        try:
            await asyncio.sleep(params.get("sleep", 3))
        except asyncio.CancelledError:
            continue


@task(name="blocking_async", timeout=0.5, max_attempts=1)
async def blocking_async(params, context):
    """Run past a half-second timeout blocking the event loop, which no
    cancellation can interrupt."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 3))


@task(name="broadcast", scope="all")
def broadcast(params, context):
    """Run once on every live node."""
    record_run(context, "start")
    time.sleep(params.get("sleep", 0))
    record_run(context, "end")


@task(name="exits")
def exits(params, context):
    """End with sys.exit, which must not stop the worker."""
    raise SystemExit(3)


@task(name="leaves_thread")
def leaves_thread(params, context):
    """Start a thread that outlives the run by far, and is not a daemon (a
    thread started on a daemon thread would be one, unless told so)."""
    threading.Thread(target=time.sleep, args=(600,), name="left-behind",
                     daemon=False).start()
    return "left"
