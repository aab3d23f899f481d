"""The `dbtasks` command line: parses arguments and calls `commands`; no logic.

Every option can also come from the environment: `--database-url` from
DBTASKS_DATABASE_URL, `--tasks` from DBTASKS_TASKS, `--schema` from
DBTASKS_SCHEMA, `--log-level` from DBTASKS_LOG_LEVEL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from dbtasks import commands, logs
from dbtasks.config import DEFAULT_DATABASE_URL, Config, config_from_env
from dbtasks.database import create_queue_engine
from dbtasks.errors import Cancel, DbtasksError, JobError, Retry
from dbtasks.outcomes import summarize


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="DBTASKS_DATABASE_URL", show_envvar=True,
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="postgresql://user@host/db or sqlite:///file.db",
)
@click.option(
    "--tasks",
    "tasks_path",
    envvar="DBTASKS_TASKS", show_envvar=True,
    default="tasks",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder of task modules.",
)
@click.option("--schema", envvar="DBTASKS_SCHEMA", show_envvar=True,
              help="PostgreSQL schema for the tables.")
@click.option(
    "--log-level",
    envvar="DBTASKS_LOG_LEVEL", show_envvar=True,
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.pass_context
def main(ctx: click.Context, database_url: str, tasks_path: Path, schema: str | None,
         log_level: str) -> None:
    """dbtasks: a durable job queue in your application's own database."""
    logs.configure(log_level.upper())
    ctx.obj = _guard(
        lambda: config_from_env(
            database_url=database_url, tasks_path=tasks_path, schema=schema
        )
    )


@main.command()
@click.pass_obj
def migrate(config: Config) -> None:
    """Create or upgrade dbtasks' tables."""
    _guard(lambda: commands.migrate(config))


@main.command(short_help="Run jobs until SIGTERM or SIGINT.")
@click.option("--concurrency", "-c", type=int, default=10, show_default=True,
              help="Jobs run at once by this worker.")
@click.option("--queues", "-q", default="default", show_default=True,
              help="Comma-separated queues to serve.")
@click.option("--node", "node_name", envvar="DBTASKS_NODE", show_envvar=True,
              help="Node name (default: host:pid:random, unique per process).")
@click.option("--poll-interval", type=float, default=1.0, show_default=True,
              help="Longest idle wait between claims, in seconds.")
@click.option("--lease", "lease_seconds", type=float, default=30.0, show_default=True,
              help="Seconds a claimed job stays owned without a heartbeat.")
@click.option("--node-timeout", type=float, default=None,
              help="Seconds without heartbeat before a node counts as dead "
              "[default: the lease].")
@click.option("--shutdown-grace", type=float, default=30.0, show_default=True,
              help="Seconds running jobs get to finish after SIGTERM.")
@click.option("--retention", type=float, default=7 * 24 * 3600.0, show_default=True,
              help="Seconds finished jobs are kept; 0 keeps them forever.")
@click.option("--lifeline/--no-lifeline", default=True, show_default=True,
              help="PostgreSQL: hold a session lock so a dead worker's jobs are "
              "rescued within seconds; turn off behind PgBouncer in transaction "
              "mode.")
@click.pass_obj
def worker(config: Config, queues: str, node_timeout: float | None,
           **options: Any) -> None:
    """Run jobs until SIGTERM or SIGINT (a second signal hands them back at once).

    \b
    The first signal stops claiming and gives running jobs --shutdown-grace
    seconds to finish; unfinished ones go back to the queue.
    """
    def build() -> Config:
        return config.replace(
            queues=tuple(queues.split(",")),
            node_timeout=(options["lease_seconds"] if node_timeout is None
                          else node_timeout),
            **options,
        )

    if _guard(lambda: commands.worker(_guard(build))):
        _restart_in_place()
    left = _threads_left()
    if left:
        logging.getLogger("dbtasks.worker").warning(
            "exiting without waiting for %d thread(s) tasks left running: %s",
            len(left), ", ".join(thread.name for thread in left),
            extra={"event": "worker.threads_left"},
        )
        _exit_now(0)


def _threads_left() -> list[threading.Thread]:
    """Threads a task started and left running, which Python would wait for
    before the process exits: for good, if they never end. Meanwhile the runs
    of a stopped worker (daemon threads, handed back to the queue) would go
    on beside their next attempt elsewhere."""
    return [thread for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon
            and thread.is_alive()]


def _exit_now(code: int) -> NoReturn:
    """End the process without waiting for threads (see _threads_left)."""
    logs.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _restart_in_place() -> None:
    """Replace this process with a fresh worker: same PID, same arguments.

    The only way to end a task thread that ran past its timeout and would not
    return (see Worker._retire_if_stuck).
    """
    logging.getLogger("dbtasks.worker").warning(
        "restarting the worker process", extra={"event": "worker.restarting"}
    )
    logs.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@main.command()
@click.argument("task")
@click.option("--params", default="{}", show_default=True, help="Params as JSON.")
@click.option("--run-at", default=None,
              help="Timezone-aware ISO time, e.g. 2030-01-01T09:00:00+00:00.")
@click.option("--priority", type=int, default=None, help="-100 to 100, lower first.")
@click.option("--queue", default=None, help="Queue name [default: the task's].")
@click.option("--idempotency-key", default=None)
@click.option("--not-yet-deployed", is_flag=True,
              help="Accept a task name no worker has registered yet.")
@click.pass_obj
def enqueue(config: Config, task: str, params: str, run_at: str | None,
            **options: Any) -> None:
    """Enqueue a job of TASK and print its id."""
    job_id = _guard(
        lambda: commands.enqueue(
            config, task, _parse_json(params), run_at=_parse_time(run_at), **options
        )
    )
    click.echo(job_id)


@main.command()
@click.argument("task")
@click.option("--params", default="{}", show_default=True, help="Params as JSON.")
@click.pass_obj
def run(config: Config, task: str, params: str) -> None:
    """Run TASK inline, now, in this process, and print its result.

    A task that raises shows its traceback and exits 1, as one that runs past
    its timeout does; Cancel, Retry and sys.exit() are one line each.
    """
    values = _parse_json(params)
    found = _guard(lambda: commands.load_task(config, task))
    # For the task's context.transaction(); it connects only if that is used.
    engine = _guard(lambda: create_queue_engine(config))
    code = 1
    try:
        result = commands.run_task(found, values, engine=engine, own_process=True)
        click.echo(json.dumps(result, default=repr))
        code = 0
    except (Cancel, Retry) as outcome:
        kind = "cancelled" if isinstance(outcome, Cancel) else "asked to be retried"
        reason = summarize(outcome).partition(": ")[2]
        click.echo(f"task {task} {kind}: {reason}", err=True)
    except SystemExit as exited:
        click.echo(f"task {task} called sys.exit({exited.code!r})", err=True)
    except BaseException:  # noqa: BLE001 - the task's failure, KeyboardInterrupt too
        traceback.print_exc()
    left = _threads_left()
    if left:
        click.echo(f"task {task} left {len(left)} thread(s) running; they end with "
                   "this process", err=True)
        _exit_now(code)
    sys.exit(code)


@main.command(name="tasks")
@click.pass_obj
def list_tasks(config: Config) -> None:
    """List the tasks found in the tasks folder."""
    for task in _guard(lambda: commands.list_tasks(config)):
        every = f"every {task.frequency:g}s" if task.is_periodic else "on enqueue"
        click.echo(f"{task.name}\t{task.scope}\t{every}\t{task.description}")


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant,
                          parse_int=_read_integer, parse_float=_read_float,
                          object_pairs_hook=_refuse_repeated_keys)
    except ValueError as exc:
        raise click.BadParameter(
            f"not valid JSON: {exc}", param_hint="--params"
        ) from None


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON lets a key repeat and Python keeps the last one: a typo would
    # silently drop a value.
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given more than once")
        seen.add(key)
    return dict(pairs)


def _read_integer(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:
        # Past Python's limit on digits read as an integer (4,300 by default),
        # whose own message tells a shell user to call a Python function.
        raise ValueError(
            f"an integer of {len(digits.lstrip('-')):,} digits is longer than "
            "Python reads; pass it as a string"
        ) from None


def _read_float(digits: str) -> float:
    value = float(digits)
    if math.isinf(value):
        # JSON has no infinity: 1e999 reads as one, which params refuse.
        raise ValueError(f"{digits} is beyond a float's range; pass it as a string")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in params")


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO time such as 2030-01-01T09:00:00+00:00",
            param_hint="--run-at",
        ) from None
    if moment.tzinfo is None:
        # enqueue would refuse it too, with advice for Python callers.
        raise JobError(
            f"--run-at {text.strip()} is naive: add its UTC offset, such as "
            f"{moment.isoformat()}+00:00 or {moment.isoformat()}Z"
        )
    return moment


def _guard(action: Any) -> Any:
    """Run an action; turn dbtasks errors into a one-line message and exit 2."""
    try:
        return action()
    except DbtasksError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
