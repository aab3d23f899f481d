"""A plain function that returns a coroutine: a sync wrapper of async work."""

from __future__ import annotations

from dbtasks import task


async def _send(params):
    raise AssertionError("never awaited, so never reached")


@task(name="wrapped_async", max_attempts=1)
def wrapped_async(params, context):
    """Hand back the coroutine instead of running it."""
    return _send(params)
