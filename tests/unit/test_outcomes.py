"""Outcomes of runs that raised something strange: there is always one."""

from __future__ import annotations

import pytest

from dbtasks import Cancel, TaskDefinitionError, TaskNotFound
from dbtasks.claim import ClaimedJob
from dbtasks.outcomes import CANCELLED, FAILED, RETRY, classify


def job(attempt: int = 1, max_attempts: int = 1) -> ClaimedJob:
    return ClaimedJob(id=7, task="t", queue="default", params="{}", attempt=attempt,
                      max_attempts=max_attempts, priority=0, schedule=None,
                      token="token")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("__str__ fails")


class NamelessMeta(type):
    def __getattribute__(cls, name: str):
        if name in ("__name__", "__qualname__"):
            raise RuntimeError("name fails")
        return super().__getattribute__(name)


class Nameless(Exception, metaclass=NamelessMeta):
    """An exception whose class cannot say its own name."""


def test_an_exception_whose_class_name_raises_is_a_failed_attempt():
    outcome = classify(job(), Nameless("meta"))

    assert outcome.kind == FAILED
    assert "could not be described" in outcome.error


def test_a_cancel_whose_reason_cannot_be_text_is_still_a_cancel():
    outcome = classify(job(attempt=1, max_attempts=5), Cancel(Unprintable()))

    assert outcome.kind == CANCELLED
    assert outcome.error == (
        "cancelled with a reason that a Cancel could not turn into text"
    )


@pytest.mark.parametrize(
    ("error", "ending"),
    [(ValueError("lone \ud800 x"), "ValueError: lone \\ud800 x"),
     (ValueError("nul\x00byte"), "ValueError: nul\\x00byte")],
    ids=["surrogate", "nul"],
)
def test_error_texts_come_out_encodable(error, ending):
    outcome = classify(job(attempt=1, max_attempts=2), error)

    assert outcome.kind == RETRY
    assert outcome.error.endswith(ending)
    outcome.error.encode("utf-8")  # raises if a lone surrogate were left


def test_a_task_definition_error_fails_at_once_but_other_task_errors_retry():
    """A plain function returning a coroutine fails each attempt the same way;
    an unknown task name met by the task's own enqueue may be deployed soon."""
    early = job(attempt=1, max_attempts=5)

    assert classify(early, TaskDefinitionError("returned a coroutine")).kind == FAILED
    assert classify(early, TaskNotFound("not yet deployed")).kind == RETRY
