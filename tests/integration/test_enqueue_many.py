"""Bulk enqueue: many jobs in the caller's transaction, ids in order."""

from __future__ import annotations

from collections import UserDict
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from dbtasks import enqueue_many
from dbtasks.errors import InvalidParams, JobError
from dbtasks.params import MAX_PARAMS_BYTES, decode_params
from dbtasks.schema import jobs
from tests.app_tasks.basic import noop
from tests.conftest import sql


def _rows(engine):
    query = select(jobs.c.id, jobs.c.task, jobs.c.params, jobs.c.priority,
                   jobs.c.run_at).order_by(jobs.c.id)
    with engine.connect() as conn:
        return conn.execute(query).all()


def test_more_jobs_than_one_statement_can_bind_go_in_with_their_ids_in_order(engine):
    # 20,000 rows of 7 values each is over PostgreSQL's 65,535 bound values.
    params = [{"n": n} for n in range(20_000)]
    with engine.begin() as conn:
        ids = enqueue_many(conn, noop, params, priority=3)

    rows = _rows(engine)
    assert len(ids) == len(set(ids)) == 20_000
    assert [row.id for row in rows] == sorted(ids)
    by_id = {row.id: row for row in rows}
    assert [decode_params(by_id[job_id].params) for job_id in ids] == params
    assert {row.priority for row in rows} == {3}


def test_a_rolled_back_bulk_enqueue_leaves_nothing(engine):
    with pytest.raises(RuntimeError), engine.begin() as conn:
        enqueue_many(conn, noop, [{"n": 1}, {"n": 2}])
        raise RuntimeError("the application's transaction fails")

    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_one_bad_params_value_refuses_the_whole_batch_before_writing(engine):
    with engine.begin() as conn:
        with pytest.raises(
            InvalidParams, match=r"^params_list\[1\]: params\['x'\] is nan"
        ):
            enqueue_many(conn, noop, [{"x": 1}, {"x": float("nan")}])

    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_a_params_value_over_the_size_limit_is_refused_by_its_position(engine):
    params = [{"n": n} for n in range(2_500)]
    params[1_500] = {"text": "x" * MAX_PARAMS_BYTES}
    with engine.begin() as conn:
        with pytest.raises(InvalidParams, match=(
            r"^params_list\[1500\]: params are 1,048,587 bytes as JSON, over the "
            r"limit of 1,048,576"
        )):
            enqueue_many(conn, noop, params)

    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


def test_a_batch_over_the_size_limit_of_one_params_value_goes_in_whole(engine):
    # Each value is within the limit; together they are twice over it.
    params = [{"text": letter * (MAX_PARAMS_BYTES - 20)} for letter in "ab"]
    params.append(None)
    with engine.begin() as conn:
        ids = enqueue_many(conn, noop, params)

    stored = dict(sql(engine, "SELECT id, params FROM dbtasks_jobs"))
    assert [decode_params(stored[job_id]) for job_id in ids] == [*params[:2], {}]


def test_run_at_applies_to_every_job_and_a_naive_one_is_refused(engine):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    with engine.begin() as conn:
        enqueue_many(conn, noop, [{}, {}], run_at=later)
        with pytest.raises(JobError, match="naive"):
            enqueue_many(conn, noop, [{}], run_at=datetime.now())

    assert [abs((row.run_at - later).total_seconds()) < 0.001
            for row in _rows(engine)] == [True, True]


def test_an_empty_list_enqueues_nothing(engine):
    with engine.begin() as conn:
        assert enqueue_many(conn, noop, []) == []
    assert sql(engine, "SELECT count(*) FROM dbtasks_jobs") == [(0,)]


@pytest.mark.parametrize(
    "params_list",
    ["abc", {"a": 1}, b"ab", bytearray(b"ab"), memoryview(b"ab"),
     UserDict({"a": 1}), 5],
    ids=["str", "dict", "bytes", "bytearray", "memoryview", "mapping", "int"],
)
def test_params_list_must_be_a_list_of_values(engine, params_list):
    with engine.begin() as conn:
        with pytest.raises(JobError, match="enqueue_many takes a list of params"):
            enqueue_many(conn, noop, params_list)

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dbtasks_jobs")).scalar() == 0
