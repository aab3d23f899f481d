"""Tasks whose errors the database cannot store as they are."""

from __future__ import annotations

from dbtasks import Cancel, task

#: In a refused task's error: the test's check constraint rejects rows with it.
REFUSED_MARK = "refuse-this-row"


@task(name="raise_nul", max_attempts=1)
def raise_nul(params, context):
    """Fail with a NUL in the message: PostgreSQL text cannot hold one."""
    raise ValueError("bad\x00byte")


@task(name="cancel_nul")
def cancel_nul(params, context):
    """Cancel with a NUL in the reason."""
    raise Cancel("stop\x00here")


@task(name="raise_huge", max_attempts=1)
def raise_huge(params, context):
    """Fail with a message of a million characters and a telling end."""
    raise ValueError("x" * 1_000_000 + " the end")


@task(name="raise_refused", max_attempts=1)
def raise_refused(params, context):
    """Fail with an error the test's check constraint refuses to store."""
    raise ValueError(REFUSED_MARK)


@task(name="raise_surrogate", max_attempts=1)
def raise_surrogate(params, context):
    """Fail with a lone surrogate in the message: no UTF-8 encoder takes it."""
    raise ValueError("lone \ud800 surrogate")


class Unprintable(Exception):
    """An exception whose message cannot be read."""

    def __str__(self):
        raise RuntimeError("__str__ itself fails")


@task(name="raise_unprintable", max_attempts=1)
def raise_unprintable(params, context):
    """Fail with an exception whose str() raises."""
    raise Unprintable()
