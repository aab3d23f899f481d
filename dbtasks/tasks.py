"""Tasks: the `@task` decorator, the registry, and loading an application's tasks/.

A task is a plain function or an `async def` coroutine function that takes a
job's params and a `JobContext`. The decorator validates its settings at once,
so a bad task fails at import with the file and the problem named.

`load_tasks(path)` imports the folder as a package named after it, so that
relative imports inside it work, and a module the application already imported
under that name is not imported a second time. A folder that cannot be loaded
whole raises `TaskError`: a worker never runs with half of its tasks.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import pkgutil
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, overload

from sqlalchemy import Connection, Engine

from dbtasks.clock import MAX_SECONDS
from dbtasks.config import MAX_TASK_NAME, name_problem, queue_name_problem
from dbtasks.errors import (
    ConfigError,
    DuplicateTask,
    JobError,
    TaskDefinitionError,
    TaskError,
    TaskNotFound,
)
from dbtasks.params import decode_params, encode_params

logger = logging.getLogger(__name__)

#: Attempts a job gets unless its task says otherwise.
DEFAULT_MAX_ATTEMPTS = 5

#: Seconds a job may run unless its task says otherwise; None means no limit.
DEFAULT_TIMEOUT = 30 * 60.0

SCOPES = ("any", "all")

#: Every task this process has declared, by name (the latest declaration
#: wins). `enqueue` reads it to fill in a task's defaults from its name.
declared_tasks: dict[str, Task] = {}


@dataclass(frozen=True)
class JobContext:
    """What a running task knows about its job.

    `job_id` is None when the task runs inline. `attempt` counts from 1.
    """

    job_id: int | None
    task: str
    attempt: int
    node: str
    logger: logging.Logger
    queue: str = "default"
    _transaction: Callable[[], Any] | None = field(default=None, repr=False)

    def transaction(self) -> Any:
        """Open the transaction in which this job will be recorded as succeeded.

        Rows the task writes on the connection this yields commit together with
        the job's success, or not at all: if the worker lost the job's lease,
        the whole transaction rolls back and `LeaseLost` is raised. Use it once,
        as the last thing the task does. An inline run given an engine
        (`run_inline(..., engine=)`, `dbtasks run`) gets a plain transaction
        on it.
        """
        if self._transaction is None:
            raise TaskError(
                "context.transaction() needs a worker, or an inline run given an "
                "engine (run_inline(task, params, engine=engine)); this run has "
                "no database"
            )
        return self._transaction()


@dataclass(frozen=True)
class Task:
    """A registered function, with the settings that govern its jobs."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    scope: str = "any"
    frequency: float = 0.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = DEFAULT_TIMEOUT
    queue: str = "default"
    priority: int = 0

    @functools.cached_property
    def is_async(self) -> bool:
        # Asked at every start of a job: worked out once.
        return inspect.iscoroutinefunction(self.fn)

    @property
    def is_periodic(self) -> bool:
        return self.frequency > 0

    def __call__(self, params: Any = None, context: JobContext | None = None) -> Any:
        """Call the function directly, as `run_inline` does. An async task
        called where an event loop runs gives the awaitable of that run:
        `await send_report({"id": 7})` in async code."""
        if self.is_async and _loop_is_running():
            return _within_timeout(*_inline_run(self, params, context))
        return run_inline(self, params, context=context)


@overload
def task(name: Callable[..., Any], /) -> Task: ...
@overload
def task(
    name: str | None = None,
    *,
    description: str | None = None,
    scope: str = "any",
    frequency: float | timedelta = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout: float | timedelta | None = DEFAULT_TIMEOUT,
    queue: str = "default",
    priority: int = 0,
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    name: Any = None,
    *,
    description: str | None = None,
    scope: str = "any",
    frequency: float | timedelta = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout: float | timedelta | None = DEFAULT_TIMEOUT,
    queue: str = "default",
    priority: int = 0,
) -> Callable[[Callable[..., Any]], Task]:
    """Declare a task: `@task(scope="all", frequency=60)` above a function.

    `name` defaults to the function's name and `description` to the first line
    of its docstring. `frequency` (seconds or a timedelta) makes the task
    periodic; 0 runs it only when enqueued. `timeout` (seconds, or None for no
    limit) stops a run that takes too long and counts it as a failed attempt.
    A bare `@task` declares the function with every default.
    """
    if callable(name):
        return task()(name)

    def decorate(fn: Callable[..., Any]) -> Task:
        where = _where(fn)
        if not callable(fn):
            raise TaskError(f"{where}: @task must decorate a function, not {fn!r}")
        _check_signature(fn, where)
        declared = Task(
            name=_check_name(name if name is not None else _default_name(fn, where),
                             where),
            fn=fn,
            description=description if description is not None else _summary(fn),
            scope=_check_scope(scope, where),
            frequency=_check_frequency(frequency, where),
            max_attempts=_check_attempts(max_attempts, where),
            timeout=None
            if timeout is None
            else _check_seconds("timeout", timeout, where, zero_ok=False),
            queue=_check_queue(queue, where),
            priority=_check_priority(priority, where),
        )
        declared_tasks[declared.name] = declared
        return declared

    return decorate


def _check_signature(fn: Callable[..., Any], where: str) -> None:
    """Refuse at load time a function that could not take (params, context),
    rather than fail every attempt of every job of it; and a generator, whose
    call would return at once, its body never run."""
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TaskError(
            f"{where}: {getattr(fn, '__name__', fn)} is a generator function "
            "(it has a yield): calling it would run none of its code; return a "
            "value instead of yielding"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): let the run tell
    try:
        signature.bind(None, None)
    except TypeError:
        raise TaskError(
            f"{where}: a task function is called with two positional arguments, "
            f"(params, context), but {getattr(fn, '__name__', fn)}{signature} "
            "cannot take them; define it as def name(params, context)"
        ) from None


def _underlying(fn: Any) -> Any:
    """The function a functools.partial calls, whose name, docstring and
    source line are the task's; anything else as it is."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _where(fn: Any) -> str:
    return _source_line(fn) or f"task {getattr(fn, '__name__', fn)!r}"


def _source_line(fn: Any) -> str | None:
    """`file:line` of the function's definition, or None (no Python code)."""
    code = getattr(_underlying(fn), "__code__", None)
    if code is None:
        return None
    return f"{code.co_filename}:{code.co_firstlineno}"


def _default_name(fn: Any, where: str) -> str:
    name = getattr(_underlying(fn), "__name__", None)
    if not isinstance(name, str):
        raise TaskError(
            f"{where}: it has no __name__ to name the task by; give it one "
            "with @task(name=...)"
        )
    if name == "<lambda>":
        # Every lambda has this name: a second one would clash with the first.
        raise TaskError(
            f"{where}: a lambda has no name of its own to name the task by; "
            "give it one with task(name=...)(lambda params, context: ...)"
        )
    return name


def _summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(_underlying(fn)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _check_name(value: Any, where: str) -> str:
    problem = name_problem(value, MAX_TASK_NAME)
    if problem is not None:
        raise TaskError(f"{where}: task name {problem}")
    return value


def _check_queue(value: Any, where: str) -> str:
    problem = queue_name_problem(value)
    if problem is not None:
        raise TaskError(f"{where}: queue {problem}")
    return value


def _check_scope(value: Any, where: str) -> str:
    if value not in SCOPES:
        raise TaskError(
            f"{where}: scope must be 'any' (one node runs each job) or 'all' "
            f"(every live node runs it), got {value!r}"
        )
    return str(value)


#: Shortest period of a periodic task: each run enqueues the next, and a
#: period near zero would fill the jobs table as fast as workers can write.
MIN_FREQUENCY = 0.1


def _check_frequency(value: Any, where: str) -> float:
    seconds = _check_seconds("frequency", value, where, zero_ok=True)
    if 0 < seconds < MIN_FREQUENCY:
        raise TaskError(
            f"{where}: frequency must be 0 (run only when enqueued) or at least "
            f"{MIN_FREQUENCY:g} seconds, got {value!r}"
        )
    return seconds


def _check_seconds(what: str, value: Any, where: str, zero_ok: bool) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TaskError(
            f"{where}: {what} must be a number of seconds or a timedelta, "
            f"got {value!r}"
        )
    smallest = "0 or more" if zero_ok else "more than 0"
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise TaskError(f"{where}: {what} must be {smallest} seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise TaskError(
            f"{where}: {what} must be at most {MAX_SECONDS:g} seconds (ten years), "
            f"got {value!r}"
        )
    return float(value)


#: Most attempts a job may have (the jobs table's integer column).
MAX_ATTEMPTS = 2**31 - 1


def attempts_problem(value: Any) -> str | None:
    """What is wrong with a max_attempts value, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
        1 <= value <= MAX_ATTEMPTS
    ):
        return (
            f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS:,}, "
            f"got {value!r}"
        )
    return None


def _check_attempts(value: Any, where: str) -> int:
    problem = attempts_problem(value)
    if problem is not None:
        raise TaskError(f"{where}: {problem}")
    return value


PRIORITY_RANGE = range(-100, 101)


def _check_priority(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskError(f"{where}: priority must be an integer, got {value!r}")
    if value not in PRIORITY_RANGE:
        raise TaskError(f"{where}: priority must be -100 to 100, got {value}")
    return value


class Registry:
    """The tasks one process knows, by name."""

    def __init__(self, tasks: Iterable[Task] = ()):
        self._tasks: dict[str, Task] = {}
        self._origins: dict[str, str] = {}
        for each in tasks:
            self.add(each)

    def add(self, new: Task, origin: str | None = None) -> None:
        """Register a task; the same object twice is fine, a second one is not."""
        origin = _source_line(new.fn) or origin or _where(new.fn)
        known = self._tasks.get(new.name)
        if known is new:
            return
        if known is not None:
            raise DuplicateTask(
                f"task name {new.name!r} is defined twice: in {self._origins[new.name]}"
                f" and in {origin}; rename one of them"
            )
        self._tasks[new.name] = new
        self._origins[new.name] = origin

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._tasks, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (
                "; `dbtasks tasks` lists the loaded ones, from the folder --tasks "
                "names")
            raise TaskNotFound(f"no task named {name!r} is loaded{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self, scope: str | None = None) -> list[str]:
        return sorted(t.name for t in self if scope is None or t.scope == scope)

    def periodic(self) -> list[Task]:
        """The periodic tasks in name order, the order series are locked in."""
        return sorted((t for t in self if t.is_periodic), key=lambda t: t.name)


def load_tasks(path: str | Path) -> Registry:
    """Import every module of a tasks folder and register the tasks they define.

    Raises ConfigError for a missing folder and TaskError, naming the file, for
    a module that fails to import or defines a bad or duplicate task.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        problem = "is a file, not a folder:" if folder.exists() else (
            "does not exist; create it, or")
        raise ConfigError(
            f"the tasks folder {folder} {problem} point --tasks / DBTASKS_TASKS "
            "at the folder that holds your task modules"
        )

    package = _import_package(folder)
    registry = Registry()
    for module in _import_modules(package, folder):
        for value in vars(module).values():
            if isinstance(value, Task):
                registry.add(value, origin=module.__file__)
    logger.debug("loaded %d tasks from %s", len(registry), folder)
    return registry


def _import_package(folder: Path) -> ModuleType:
    name = folder.name
    if not name.isidentifier():
        raise ConfigError(
            f"the tasks folder name {name!r} is not a Python identifier, so it cannot "
            "be imported as a package; rename it (for example to tasks)"
        )

    existing = sys.modules.get(name)
    if existing is not None:
        locations = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if folder in locations:
            return existing
        raise ConfigError(
            f"cannot import the tasks folder {folder} as package {name!r}: a module "
            f"of that name is already imported from {existing.__file__}; rename "
            "the folder"
        )

    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(folder)]
        )
    else:
        # A folder without __init__.py is imported as a namespace package.
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    if spec is None:
        raise ConfigError(f"cannot import the tasks folder {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise _import_error(init, exc) from exc
    return module


def _import_modules(package: ModuleType, folder: Path) -> list[ModuleType]:
    modules = [package]
    names = sorted(
        info.name
        for info in pkgutil.walk_packages([str(folder)], prefix=f"{package.__name__}.")
    )
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except BaseException as exc:
            file = folder.joinpath(*name.split(".")[1:])
            source = file / "__init__.py" if file.is_dir() else file.with_suffix(".py")
            raise _import_error(source, exc) from exc
    return modules


def _import_error(source: Path, exc: BaseException) -> TaskError:
    if isinstance(exc, TaskError):
        return type(exc)(f"{exc} (while importing {source})")
    if isinstance(exc, SyntaxError):
        return TaskError(
            f"{exc.filename}:{exc.lineno}: syntax error in a task module: {exc.msg}"
        )
    return TaskError(
        f"{source}: the task module failed to import: {type(exc).__name__}: {exc}"
    )


def run_inline(
    task_or_fn: Task | str,
    params: Any = None,
    *,
    context: JobContext | None = None,
    engine: Engine | None = None,
) -> Any:
    """Run a task now, in this process, without a job row; return its result.

    `task_or_fn` is a Task, or the name of one this process has loaded. The
    params go through the same check and JSON round trip as an enqueued
    job's, so the task gets what a worker would give it. A run that ends
    past the task's timeout raises TimeoutError, as a worker fails it,
    whatever it returned.

    Given `engine`, the task's `context.transaction()` is a transaction on
    it, committed when its block ends and rolled back if it raises; once per
    run, as in a worker. Without one, a task that asks for it raises
    TaskError.

    A coroutine task is run in an event loop of its own, so call this
    outside an event loop; inside one, `await task(params)` instead. Past
    its timeout the coroutine is cancelled, and ASYNC_CANCEL_GRACE later the
    run fails even if it would not stop. A plain function runs on the
    caller's thread, which nothing can stop from outside, so it runs to its
    end first (`dbtasks run` stops one at its timeout with SIGALRM).
    """
    task, params, context = _inline_run(task_or_fn, params, context, engine)
    if task.is_async:
        if not _loop_is_running():
            return _run_in_new_loop(_within_timeout(task, params, context))
        raise TaskError(
            f"task {task.name!r} is async and an event loop is running: "
            f"await {task.name}(params) instead of run_inline"
        )
    started = time.monotonic()
    result = plain_result(task.name, task.fn(params, context))
    _check_in_time(task, time.monotonic() - started)
    return result


def _inline_run(
    task_or_fn: Any, params: Any, context: JobContext | None,
    engine: Engine | None = None,
) -> tuple[Task, Any, JobContext]:
    """The task, its params as the queue would give them, and its context."""
    task = _inline_task(task_or_fn)
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(
            f"run_inline's engine must be a SQLAlchemy Engine, got "
            f"{type(engine).__name__}"
        )
    if context is None:
        context = JobContext(
            job_id=None,
            task=task.name,
            attempt=1,
            node="inline",
            logger=logging.getLogger(f"dbtasks.task.{task.name}"),
            _transaction=None if engine is None else _inline_transaction(engine),
        )
    elif engine is not None:
        raise TypeError("give run_inline a context or an engine, not both")
    return task, decode_params(encode_params(params)), context


def _inline_transaction(engine: Engine) -> Callable[[], Any]:
    """context.transaction() of an inline run: a plain transaction on
    `engine`, refused a second time as a worker refuses it."""
    opened = False

    @contextmanager
    def transaction() -> Iterator[Connection]:
        nonlocal opened
        if opened:
            raise JobError(
                "context.transaction() was used already in this inline run; use "
                "it once per job, with every write that must commit with the "
                "job's success inside that one block"
            )
        opened = True
        with engine.begin() as conn:
            yield conn

    return transaction


def _loop_is_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _inline_task(task_or_fn: Any) -> Task:
    if isinstance(task_or_fn, Task):
        return task_or_fn
    if isinstance(task_or_fn, str):
        found = declared_tasks.get(task_or_fn)
        if found is None:
            raise TaskNotFound(
                f"no task named {task_or_fn!r} is loaded in this process; import "
                "the module that defines it, or pass the Task itself"
            )
        return found
    raise TaskError(
        f"run_inline takes a Task (a function decorated with @task) or a task "
        f"name, got {type(task_or_fn).__name__}"
    )


def _check_in_time(task: Task, elapsed: float) -> None:
    if task.timeout is not None and elapsed > task.timeout:
        raise TimeoutError(timeout_message(task.name, task.timeout))


def plain_result(task: str, result: Any) -> Any:
    """What a plain function's run returned; a TaskDefinitionError if it
    returned a coroutine, which nothing would ever await: the task's work
    never ran.

    A sync wrapper around an async function does this (a decorator without
    async def, a lambda). Without this check the job would succeed having
    done nothing.
    """
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never to run: without Python's "never awaited"
        raise TaskDefinitionError(
            f"task {task} is a plain function that returned "
            f"{type(result).__name__} unawaited, so its work never ran; declare "
            "it with async def, or await the call inside it"
        )
    return result


async def _within_timeout(task: Task, params: Any, context: JobContext) -> Any:
    return await within_timeout(task.name, task.timeout, task.fn(params, context))


#: Seconds past its timeout a cancelled coroutine gets to end. One that
#: swallows the cancellation, or blocks the event loop, must not hold its
#: caller, its slot or its job for good: it is failed then, and left to run.
ASYNC_CANCEL_GRACE = 1.0


async def within_timeout(
    task: str,
    timeout: float | None,
    awaitable: Awaitable[Any],
    escape: Callable[[TimeoutError], BaseException] = lambda error: error,
    grace: float = ASYNC_CANCEL_GRACE,
) -> Any:
    """Await a run of `task` under its timeout; the one rule, inline and in a
    worker.

    Past the timeout the run is cancelled and fails with a TimeoutError that
    says so, raised as `escape` makes it (a worker carries it out of its
    event loop wrapped). So does a run that ended past it all the same: it
    blocked the loop, or swallowed the cancellation and returned. One that
    has not ended `grace` seconds after its cancellation is left running,
    not waited for: asyncio.wait_for would wait for it for good. A
    TimeoutError of the task's own passes as it is, a failure like any other.
    """
    started = time.monotonic()
    run = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({run}, timeout=timeout)
    except asyncio.CancelledError:
        run.cancel()  # whoever awaits this is being stopped: so is the run
        raise
    if not done:
        run.cancel()
        await asyncio.wait({run}, timeout=grace)
        run.add_done_callback(_outcome_unwanted)
        _given_up.add(run)
        raise escape(TimeoutError(timeout_message(task, timeout)))
    result = run.result()  # raises what the run raised, as it was raised
    if timeout is not None and time.monotonic() - started > timeout:
        raise escape(TimeoutError(timeout_message(task, timeout)))
    return result


#: Runs failed at their timeout that would not stop: they had their grace.
_given_up: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()


def _outcome_unwanted(run: asyncio.Future[Any]) -> None:
    """Read the late outcome of a run failed at its timeout, so that asyncio
    does not log it as an exception nobody retrieved."""
    if not run.cancelled():
        run.exception()


def _run_in_new_loop(coroutine: Awaitable[Any]) -> Any:
    """asyncio.run, except at the end: tasks still running are cancelled and
    given ASYNC_CANCEL_GRACE (none for a run within_timeout gave up on, which
    had it), not waited for without end, since a coroutine that swallows its
    cancellation would hold the caller for good (asyncio then logs that it
    was destroyed while pending)."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coroutine)
    finally:
        try:
            leftovers = asyncio.all_tasks(loop) - set(_given_up)
            for leftover in leftovers:
                leftover.cancel()
            if leftovers:
                loop.run_until_complete(
                    asyncio.wait(leftovers, timeout=ASYNC_CANCEL_GRACE)
                )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def timeout_message(task: str, timeout: float | None) -> str:
    """What a run past the task's timeout fails with, wherever it ran."""
    return f"task {task} ran past its timeout of {timeout:g}s"
