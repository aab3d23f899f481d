"""A task that records the params it was given, escaped to ASCII."""

from __future__ import annotations

from dbtasks import task
from tests.runs import record_run


@task(name="echo_params", max_attempts=1)
def echo_params(params, context):
    """Record ascii(params): NUL and lone surrogates survive as escapes."""
    record_run(context, "echo", note=ascii(params))
