"""An on-demand task the workers on tests/app_tasks do not know.

A job of it waits in the queue until a worker on this folder starts.
"""

from __future__ import annotations

from dbtasks import task
from tests.runs import record_run


@task(name="deployed_later")
def deployed_later(params, context):
    """Record one run."""
    record_run(context, "run")
