"""A plain function that runs far past its timeout."""

from __future__ import annotations

import time

from dbtasks import task
from tests.runs import record_run


@task(name="hangs", timeout=0.5, max_attempts=1)
def hangs(params, context):
    """Start, then sleep a minute: its thread outlives the timeout."""
    record_run(context, "start")
    time.sleep(60)
    record_run(context, "end")


@task(name="hangs_async", timeout=0.5, max_attempts=1)
async def hangs_async(params, context):
    """Start, then block the event loop for a minute (time.sleep in a
    coroutine): cancelling it cannot stop it, and no other coroutine runs."""
    record_run(context, "start")
    time.sleep(60)
    record_run(context, "end")
