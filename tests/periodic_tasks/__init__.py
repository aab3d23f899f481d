"""A periodic task for the schedule tests."""

from __future__ import annotations

import time

from dbtasks import task
from tests.runs import record_run


@task(name="tick", frequency=1)
def tick(params, context):
    """Every second: record a start and an end a little later."""
    record_run(context, "start")
    time.sleep(0.2)
    record_run(context, "end")
