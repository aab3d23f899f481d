"""Tasks of the benchmark (tools/benchmark.py)."""

from __future__ import annotations

import os
import time

from dbtasks import task


@task(name="bench_noop")
def bench_noop(params, context):
    """Do nothing: what is measured is the queue."""


@task(name="bench_pickup")
def bench_pickup(params, context):
    """Note when the run started, for the pickup latency (W3): the time is
    taken first, so that opening the file is not counted."""
    started = time.time()
    path = os.environ["DBTASKS_BENCH_PICKUPS"]
    with open(path, "a") as pickups:
        pickups.write(f"{params['n']} {started}\n")
