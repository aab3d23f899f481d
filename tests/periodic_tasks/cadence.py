"""A one-second periodic task whose runs are judged from test_runs."""

from __future__ import annotations

import time

from dbtasks import task
from tests.runs import record_run


@task(name="every_second", frequency=1)
def every_second(params, context):
    """Record a start and an end a fifth of a second apart."""
    record_run(context, "start")
    time.sleep(0.2)
    record_run(context, "end")
