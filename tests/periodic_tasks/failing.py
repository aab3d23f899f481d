"""A periodic task whose every run fails: the series must go on regardless."""

from __future__ import annotations

from dbtasks import task
from tests.runs import record_run


@task(name="fails_every_second", frequency=1, max_attempts=1)
def fails_every_second(params, context):
    """Fail at once, on the only attempt."""
    record_run(context, "start")
    raise RuntimeError("periodic run failed on purpose")
