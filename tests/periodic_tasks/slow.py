"""A periodic task that runs long enough for a test to kill its worker mid-run."""

from __future__ import annotations

import time

from dbtasks import task
from tests.runs import record_run


@task(name="slow_every_second", frequency=1)
def slow_every_second(params, context):
    """Record a start, sleep two seconds, record an end."""
    record_run(context, "start")
    time.sleep(2)
    record_run(context, "end")
