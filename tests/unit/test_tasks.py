"""Tasks: the decorator's checks, loading a tasks folder, and inline runs."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from dbtasks import (
    ConfigError,
    DuplicateTask,
    InvalidParams,
    JobContext,
    JobError,
    Registry,
    Retry,
    TaskDefinitionError,
    TaskError,
    TaskNotFound,
    load_tasks,
    run_inline,
    task,
)
from dbtasks.tasks import ASYNC_CANCEL_GRACE, DEFAULT_TIMEOUT, Task


@pytest.fixture
def tasks_folder(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Write a tasks folder under a unique package name; forget it afterwards.

    `tasks_folder({"a.py": "..."})` returns the folder. The package name is
    unique, because a loaded folder stays in sys.modules under its name.
    """
    name = f"unit_tasks_{uuid.uuid4().hex[:8]}"

    def write(files: dict[str, str], init: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if init:
            (folder / "__init__.py").write_text("")
        for relative, source in files.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
        return folder

    yield write
    for module in [m for m in sys.modules if m.split(".")[0] == name]:
        del sys.modules[module]


# --- the decorator -------------------------------------------------------------


def test_defaults_come_from_the_function():
    @task()
    def unit_defaults(params, context):
        """Say hello.

        More about it.
        """

    assert unit_defaults.name == "unit_defaults"
    assert unit_defaults.description == "Say hello."
    assert (unit_defaults.scope, unit_defaults.frequency) == ("any", 0.0)
    assert (unit_defaults.max_attempts, unit_defaults.timeout) == (5, DEFAULT_TIMEOUT)
    assert (unit_defaults.queue, unit_defaults.priority) == ("default", 0)
    assert not unit_defaults.is_periodic
    assert not unit_defaults.is_async


def test_explicit_settings_and_timedeltas():
    @task(name="unit_every_five", description="Tick.", scope="all",
          frequency=timedelta(minutes=5), timeout=timedelta(seconds=90),
          max_attempts=2, queue="ticks", priority=-100)
    async def tick(params, context):
        pass

    assert (tick.name, tick.description, tick.scope) == ("unit_every_five", "Tick.",
                                                         "all")
    assert (tick.frequency, tick.timeout) == (300.0, 90.0)
    assert (tick.max_attempts, tick.queue, tick.priority) == (2, "ticks", -100)
    assert tick.is_periodic
    assert tick.is_async


def test_no_timeout_and_a_float_frequency_are_accepted():
    @task(name="unit_no_timeout", timeout=None, frequency=0.5)
    def unit_no_timeout(params, context):
        pass

    assert unit_no_timeout.timeout is None
    assert unit_no_timeout.frequency == 0.5


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scope": "some"}, "scope must be 'any' (one node runs each job) or 'all'"),
        ({"scope": None}, "got None"),
        ({"frequency": -1}, "frequency must be 0 or more seconds, got -1"),
        ({"frequency": timedelta(seconds=-5)}, "frequency must be 0 or more "
         "seconds, got -5.0"),
        ({"frequency": "60"}, "frequency must be a number of seconds or a "
         "timedelta, got '60'"),
        ({"frequency": True}, "frequency must be a number of seconds"),
        ({"frequency": float("inf")}, "frequency must be 0 or more seconds, got inf"),
        ({"frequency": float("nan")}, "got nan"),
        ({"timeout": 0}, "timeout must be more than 0 seconds, got 0"),
        ({"frequency": 1e308}, "frequency must be at most 3.16224e+08 seconds (ten "
         "years), got 1e+308"),
        ({"timeout": timedelta(days=4000)}, "timeout must be at most"),
        ({"max_attempts": 0}, "max_attempts must be an integer from 1 to "
         "2,147,483,647, got 0"),
        ({"max_attempts": 2.0}, "max_attempts must be an integer from 1 to"),
        ({"max_attempts": 2**31}, "max_attempts must be an integer from 1 to "
         "2,147,483,647, got 2147483648"),
        ({"priority": 101}, "priority must be -100 to 100, got 101"),
        ({"priority": "1"}, "priority must be an integer, got '1'"),
        ({"queue": ""}, "queue must be a name of 1 to 100 characters"),
        ({"queue": "q" * 101}, "queue must be a name of 1 to 100 characters"),
        ({"queue": "a,b"}, "has a comma, which separates names in --queues"),
        ({"name": " padded "}, "has surrounding spaces or control characters"),
        ({"name": "tab\there"}, "has surrounding spaces or control characters"),
        ({"name": "x" * 201}, "task name must be a name of 1 to 200 characters"),
        ({"name": "bad\ud800"}, "has a lone surrogate"),
        ({"queue": "q\ud800"}, "has a lone surrogate"),
        ({"name": "line\u2028break"}, "has U+2028 (LINE SEPARATOR), which is not "
         "printable text; use letters, digits, punctuation and plain spaces"),
        ({"queue": "zero\u200bwidth"}, "has U+200B (ZERO WIDTH SPACE), which is not "
         "printable text"),
        ({"queue": "del\x7f"}, "has U+007F (unnamed), which is not printable"),
        ({"frequency": 1e-9}, "frequency must be 0 (run only when enqueued) or at "
         "least 0.1 seconds, got 1e-09"),
    ],
    ids=["scope", "scope-none", "negative-frequency", "negative-timedelta",
         "string-frequency", "bool-frequency", "infinite-frequency",
         "nan-frequency", "zero-timeout", "huge-frequency", "huge-timeout",
         "zero-attempts", "float-attempts", "huge-attempts",
         "priority-range", "priority-type", "empty-queue", "long-queue",
         "comma-queue", "padded-name",
         "control-name", "long-name", "surrogate-name", "surrogate-queue",
         "line-separator-name", "zero-width-queue", "delete-queue",
         "tiny-frequency"],
)
def test_bad_settings_are_refused_where_the_function_is(settings, message):
    def bad(params, context):
        pass

    with pytest.raises(TaskError) as refused:
        task(**settings)(bad)

    assert message in str(refused.value)
    assert str(refused.value).startswith(f"{__file__}:")



def test_a_bare_decorator_declares_the_task_with_every_default():
    @task
    def unit_bare(params, context):
        """Runs with the defaults."""

    assert isinstance(unit_bare, Task)
    assert (unit_bare.name, unit_bare.description, unit_bare.scope,
            unit_bare.frequency, unit_bare.timeout) == (
        "unit_bare", "Runs with the defaults.", "any", 0.0, DEFAULT_TIMEOUT)


@pytest.mark.parametrize(
    "fn",
    [lambda: None, lambda params: None, lambda params, context, extra: None,
     lambda *, params, context: None],
    ids=["no-arguments", "one-argument", "a-required-third", "keyword-only"],
)
def test_a_function_that_cannot_take_params_and_context_is_refused(fn):
    with pytest.raises(TaskError) as refused:
        task(name="unit_unfit")(fn)

    assert str(refused.value).startswith(f"{__file__}:")
    assert "is called with two positional arguments, (params, context)" in str(
        refused.value)
    assert "define it as def name(params, context)" in str(refused.value)


def test_a_generator_function_is_refused_for_it_would_run_nothing():
    def sync_gen(params, context):
        yield 1

    async def async_gen(params, context):
        yield 1

    for fn in (sync_gen, async_gen):
        with pytest.raises(TaskError, match=r"is a generator function \(it has a "
                           r"yield\): calling it would run none of its code"):
            task(name="unit_gen")(fn)


def test_extra_parameters_with_defaults_are_fine():
    @task(name="unit_roomy")
    def roomy(params, context=None, *rest, verbose=False, **more):
        pass

    assert roomy.name == "unit_roomy"


def test_a_partial_is_named_and_described_by_the_function_it_calls():
    def unit_send(params, context, *, channel):
        """Send a message on a channel.

        More about it."""
        return channel

    sends_mail = task(functools.partial(unit_send, channel="mail"))

    assert (sends_mail.name, sends_mail.description) == (
        "unit_send", "Send a message on a channel.")
    assert run_inline(sends_mail) == "mail"


def test_a_callable_without_a_name_must_be_given_one():
    class Sender:
        """Sends things."""

        def __call__(self, params, context):
            return "sent"

    with pytest.raises(TaskError, match=r"it has no __name__ to name the task by; "
                       r"give it one with @task\(name=...\)"):
        task(Sender())
    named = task(name="unit_sender")(Sender())
    assert (named.name, named.description, run_inline(named)) == (
        "unit_sender", "Sends things.", "sent")


def test_a_lambda_must_be_given_a_name():
    with pytest.raises(TaskError, match=r"a lambda has no name of its own to name "
                       r"the task by; give it one with task\(name=...\)"):
        task(lambda params, context: "done")
    named = task(name="unit_lambda")(lambda params, context: "done")
    assert (named.name, run_inline(named)) == ("unit_lambda", "done")


# --- the registry --------------------------------------------------------------


def test_the_registry_finds_tasks_by_name():
    @task(name="unit_reg_b", frequency=10)
    def b(params, context):
        pass

    @task(name="unit_reg_a", scope="all")
    def a(params, context):
        pass

    registry = Registry([b, a, b])

    assert registry.names() == ["unit_reg_a", "unit_reg_b"]
    assert registry.names(scope="all") == ["unit_reg_a"]
    assert registry.periodic() == [b]
    assert registry.get("unit_reg_a") is a
    assert "unit_reg_b" in registry
    assert len(registry) == 2
    with pytest.raises(TaskNotFound, match="no task named 'missing' is loaded; "
                       "`dbtasks tasks` lists the loaded ones"):
        registry.get("missing")
    with pytest.raises(TaskNotFound, match=r"no task named 'unit_reg_aa' is loaded; "
                       r"did you mean 'unit_reg_a'\?"):
        registry.get("unit_reg_aa")


# --- loading a folder -----------------------------------------------------------


def test_every_module_and_subpackage_is_loaded(tasks_folder):
    folder = tasks_folder({
        "emails.py": """
            from dbtasks import task

            @task(name="unit_send")
            def send(params, context):
                '''Send one.'''
        """,
        "reports/__init__.py": "",
        "reports/monthly.py": """
            from dbtasks import task

            @task(name="unit_monthly", frequency=60)
            def monthly(params, context):
                pass
        """,
    })

    registry = load_tasks(folder)

    assert registry.names() == ["unit_monthly", "unit_send"]
    assert registry.get("unit_send").description == "Send one."


def test_relative_imports_work_and_no_module_is_imported_twice(tasks_folder):
    folder = tasks_folder({
        "shared.py": """
            from pathlib import Path

            with Path(__file__).with_name("imports.log").open("a") as log:
                log.write("shared\\n")
            GREETING = "hello"
        """,
        "first.py": """
            from dbtasks import task
            from .shared import GREETING

            @task(name="unit_first")
            def first(params, context):
                return GREETING
        """,
        "second.py": """
            from dbtasks import task
            from . import shared
            from .first import first

            @task(name="unit_second")
            def second(params, context):
                return shared.GREETING + " again"
        """,
    })

    registry = load_tasks(folder)
    again = load_tasks(folder)

    assert registry.names() == ["unit_first", "unit_second"]
    assert run_inline(registry.get("unit_first")) == "hello"
    assert run_inline(registry.get("unit_second")) == "hello again"
    assert again.get("unit_first") is registry.get("unit_first")
    assert (folder / "imports.log").read_text() == "shared\n"


def test_a_package_the_application_imported_is_reused(tasks_folder, monkeypatch):
    folder = tasks_folder({
        "jobs.py": """
            from pathlib import Path
            from dbtasks import task

            with Path(__file__).with_name("imports.log").open("a") as log:
                log.write("jobs\\n")

            @task(name="unit_reused")
            def reused(params, context):
                pass
        """,
    })
    monkeypatch.syspath_prepend(str(folder.parent))
    imported = __import__(f"{folder.name}.jobs", fromlist=["reused"])

    registry = load_tasks(folder)

    assert registry.get("unit_reused") is imported.reused
    assert (folder / "imports.log").read_text() == "jobs\n"


def test_a_folder_without_init_py_is_loaded(tasks_folder):
    folder = tasks_folder({
        "plain.py": """
            from dbtasks import task

            @task(name="unit_no_init")
            def plain(params, context):
                pass
        """,
    }, init=False)

    assert load_tasks(folder).names() == ["unit_no_init"]


def test_a_syntax_error_names_the_file_and_line(tasks_folder):
    folder = tasks_folder({
        "good.py": "X = 1\n",
        "broken.py": "def oops(:\n    pass\n",
    })

    with pytest.raises(TaskError) as refused:
        load_tasks(folder)

    assert str(refused.value).startswith(
        f"{folder / 'broken.py'}:1: syntax error in a task module"
    )


def test_an_import_error_names_the_file_and_the_cause(tasks_folder):
    folder = tasks_folder({"needs.py": "import a_module_that_is_not_installed\n"})

    with pytest.raises(TaskError) as refused:
        load_tasks(folder)

    assert str(refused.value) == (
        f"{folder / 'needs.py'}: the task module failed to import: "
        "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'"
    )


def test_an_error_in_the_package_init_names_it(tasks_folder):
    folder = tasks_folder({"__init__.py": "raise RuntimeError('no config')\n"})

    with pytest.raises(TaskError) as refused:
        load_tasks(folder)

    assert str(refused.value) == (
        f"{folder / '__init__.py'}: the task module failed to import: "
        "RuntimeError: no config"
    )
    assert folder.name not in sys.modules


def test_a_module_that_exits_at_import_is_an_error_not_an_exit(tasks_folder):
    folder = tasks_folder({
        "a_fine.py": """
            from dbtasks import task

            @task(name="unit_half_fine")
            def fine(params, context):
                pass
        """,
        "b_exits.py": "raise SystemExit(3)\n",
    })

    with pytest.raises(TaskError) as refused:
        load_tasks(folder)

    assert str(refused.value) == (
        f"{folder / 'b_exits.py'}: the task module failed to import: SystemExit: 3"
    )


def test_two_tasks_with_one_name_in_two_files(tasks_folder):
    source = """
        from dbtasks import task

        @task(name="unit_twice")
        def {0}(params, context):
            pass
    """
    folder = tasks_folder({
        "one.py": source.replace("{0}", "one"),
        "two.py": source.replace("{0}", "two"),
    })

    with pytest.raises(DuplicateTask) as refused:
        load_tasks(folder)

    assert str(refused.value) == (
        f"task name 'unit_twice' is defined twice: in {folder / 'one.py'}:4 and in "
        f"{folder / 'two.py'}:4; rename one of them"
    )


def test_two_tasks_with_one_name_in_one_file(tasks_folder):
    folder = tasks_folder({
        "both.py": """
            from dbtasks import task

            @task(name="unit_twice_here")
            def first(params, context):
                pass

            @task(name="unit_twice_here")
            def second(params, context):
                pass
        """,
    })

    with pytest.raises(DuplicateTask, match=(
        r"'unit_twice_here' is defined twice: in .*both.py:4 and in .*both.py:8;"
    )):
        load_tasks(folder)


@pytest.mark.parametrize(
    "settings, message",
    [
        ('scope="everywhere"', "scope must be 'any'"),
        ("frequency=-30", "frequency must be 0 or more seconds, got -30"),
        ('frequency="hourly"', "frequency must be a number of seconds"),
    ],
    ids=["scope", "negative-frequency", "text-frequency"],
)
def test_a_bad_task_in_a_module_names_the_file(tasks_folder, settings, message):
    folder = tasks_folder({
        "bad.py": f"""
            from dbtasks import task

            @task(name="unit_bad", {settings})
            def bad(params, context):
                pass
        """,
    })

    with pytest.raises(TaskError) as refused:
        load_tasks(folder)

    text = str(refused.value)
    assert text.startswith(f"{folder / 'bad.py'}:4: ")
    assert message in text
    assert text.endswith(f"(while importing {folder / 'bad.py'})")


def test_a_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(ConfigError) as refused:
        load_tasks(missing)

    assert str(refused.value).startswith(f"the tasks folder {missing} does not exist")


def test_a_folder_whose_name_is_not_an_identifier(tmp_path):
    folder = tmp_path / "my-tasks"
    folder.mkdir()

    with pytest.raises(ConfigError, match="'my-tasks' is not a Python identifier"):
        load_tasks(folder)


def test_a_folder_named_like_an_imported_module(tmp_path):
    folder = tmp_path / "json"
    folder.mkdir()

    with pytest.raises(ConfigError, match="a module of that name is already imported"):
        load_tasks(folder)


# --- inline runs ------------------------------------------------------------------


@task(name="unit_sync_echo")
def sync_echo(params, context):
    return {"params": params, "job": context.job_id, "attempt": context.attempt,
            "node": context.node, "task": context.task}


@task(name="unit_slow_async", timeout=0.1)
async def slow_async(params, context):
    await asyncio.sleep(5)


@task(name="unit_async_echo")
async def async_echo(params, context):
    await asyncio.sleep(0)
    return {"params": params, "node": context.node, "task": context.task}


@task(name="unit_raises")
def raises(params, context):
    raise LookupError(params["why"])


def test_a_plain_task_runs_inline():
    expected = {"params": {"n": 1}, "job": None, "attempt": 1, "node": "inline",
                "task": "unit_sync_echo"}

    assert run_inline(sync_echo, {"n": 1}) == expected
    assert sync_echo({"n": 1}) == expected


def test_an_async_task_runs_inline():
    assert run_inline(async_echo, [1, 2]) == {
        "params": [1, 2], "node": "inline", "task": "unit_async_echo"
    }


def test_inline_params_default_to_an_empty_dict():
    assert run_inline(sync_echo)["params"] == {}


def test_an_inline_run_takes_a_given_context():
    context = JobContext(job_id=9, task="unit_sync_echo", attempt=3, node="here",
                         logger=logging.getLogger("test"))

    result = run_inline(sync_echo, {}, context=context)

    assert (result["job"], result["attempt"], result["node"]) == (9, 3, "here")


def test_an_inline_error_reaches_the_caller():
    with pytest.raises(LookupError, match="on purpose"):
        run_inline(raises, {"why": "on purpose"})


def test_an_async_task_inside_a_running_loop_asks_for_await():
    async def inside() -> None:
        run_inline(async_echo, {})

    with pytest.raises(TaskError, match=r"await unit_async_echo\(params\) instead"):
        asyncio.run(inside())


def test_an_async_task_called_in_async_code_is_awaited_with_its_timeout():
    async def inside() -> tuple[Any, str]:
        echoed = await async_echo({"n": 3})
        try:
            await slow_async({})
        except TimeoutError as error:
            return echoed, str(error)
        return echoed, "no timeout"

    echoed, timed_out = asyncio.run(inside())

    assert echoed["params"] == {"n": 3}
    assert timed_out == "task unit_slow_async ran past its timeout of 0.1s"


def test_run_inline_refuses_a_coroutine_a_plain_function_returned(recwarn):
    reached = []

    async def work() -> None:
        reached.append(True)

    wrapper = task(name=f"unit_wrapper_{uuid.uuid4().hex[:6]}")(
        lambda params, context: work()
    )

    with pytest.raises(TaskDefinitionError, match=(
        r"is a plain function that returned coroutine unawaited, so its work "
        r"never ran; declare it with async def"
    )):
        run_inline(wrapper)
    assert reached == []
    # Closed, not left for the garbage collector to warn about.
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("how", ["plain", "blocking-async", "swallowing-async"])
def test_run_inline_fails_a_run_that_ends_past_its_timeout(how):
    """As a worker fails it: whatever the task returned, it was too late."""
    if how == "plain":
        def late(params, context):
            time.sleep(0.3)
            return "late"
    elif how == "blocking-async":
        async def late(params, context):
            time.sleep(0.3)  # blocks the loop: no cancellation reaches it
            return "late"
    else:
        async def late(params, context):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return "swallowed"

    slow = task(name=f"unit_late_{uuid.uuid4().hex[:6]}", timeout=0.1)(late)

    with pytest.raises(TimeoutError, match=r"ran past its timeout of 0.1s"):
        run_inline(slow)


@pytest.mark.parametrize("how", ["run_inline", "awaited"])
def test_a_coroutine_that_never_stops_fails_a_grace_after_its_timeout(how):
    """asyncio.wait_for, and asyncio.run's end, would wait for it for good."""
    async def never_stops(params, context):
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    stubborn = task(name=f"unit_stubborn_{uuid.uuid4().hex[:6]}",
                    timeout=0.2)(never_stops)

    async def awaited():
        await stubborn({})

    # An application's loop, which goes on after the failure: not asyncio.run,
    # whose end would wait for the stubborn coroutine for good.
    loop = asyncio.new_event_loop()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"ran past its timeout of 0.2s"):
            if how == "run_inline":
                run_inline(stubborn)
            else:
                loop.run_until_complete(asyncio.wait_for(awaited(), timeout=30))
        # Cancelled at 0.2 s, failed a grace later, and not waited for again.
        assert time.monotonic() - started < 0.2 + ASYNC_CANCEL_GRACE + 0.5
    finally:
        loop.close()


def test_run_inline_takes_a_loaded_task_by_name_and_checks_its_params():
    assert run_inline(sync_echo.name, {"n": 2})["params"] == {"n": 2}
    with pytest.raises(TaskNotFound, match="no task named 'unit_nowhere' is loaded"):
        run_inline("unit_nowhere")
    with pytest.raises(TaskError, match="run_inline takes a Task"):
        run_inline(print)
    # What the queue would refuse, or give back changed, is refused here too.
    with pytest.raises(InvalidParams, match="tuple"):
        run_inline(sync_echo, (1, 2))
    with pytest.raises(InvalidParams, match="inf"):
        run_inline(sync_echo, {"x": float("inf")})


def test_an_inline_context_has_no_transaction_without_an_engine():
    @task(name="unit_wants_transaction")
    def wants(params, context):
        return context.transaction()

    with pytest.raises(TaskError, match=r"needs a worker, or an inline run given an "
                       r"engine \(run_inline\(task, params, engine=engine\)\)"):
        run_inline(wants)


def test_an_inline_run_given_an_engine_writes_through_its_transaction(tmp_path):
    """Committed when the block ends, rolled back when it raises, once per run."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (note TEXT NOT NULL)"))

    @task(name=f"unit_writes_{uuid.uuid4().hex[:6]}")
    def writes(params, context):
        with context.transaction() as conn:
            conn.execute(text("INSERT INTO notes VALUES (:note)"), params)
            if params["note"] == "dropped":
                raise RuntimeError("after the write")
        return "written"

    @task(name=f"unit_twice_{uuid.uuid4().hex[:6]}")
    def twice(params, context):
        with context.transaction():
            pass
        with context.transaction():
            pass

    assert run_inline(writes, {"note": "kept"}, engine=engine) == "written"
    with pytest.raises(RuntimeError, match="after the write"):
        run_inline(writes, {"note": "dropped"}, engine=engine)
    with pytest.raises(JobError, match="used already in this inline run"):
        run_inline(twice, engine=engine)
    with pytest.raises(TypeError, match="must be a SQLAlchemy Engine, got str"):
        run_inline(writes, {"note": "x"}, engine="sqlite:///app.db")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT note FROM notes")).all() == [("kept",)]
    engine.dispose()


@pytest.mark.parametrize("delay", [1e308, float("nan"), -1, "soon", True,
                                   timedelta(days=4000)])
def test_a_retry_delay_beyond_ten_years_or_not_a_number_is_refused(delay):
    """Raised inside the task, so it fails that job alone; a delay past what
    a timestamp holds would otherwise fail the whole batch's recording."""
    with pytest.raises(ValueError, match="Retry delay must be a number of seconds "
                       "from 0 to 3.16224e"):
        Retry(delay=delay)


def test_a_retry_delay_up_to_ten_years_is_kept():
    assert Retry(delay=timedelta(days=3660)).delay == 3660 * 86400.0
