"""The fault-injection run (tools/fault_injection.py): short in every run, long
on demand.

The script starts its own PostgreSQL so that it may restart it; its printed
table and exit status say whether anything was lost or applied twice.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    seed = str(random.randrange(1_000_000))
    return subprocess.run(
        [sys.executable, "tools/fault_injection.py", "--seed", seed, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def _check(result: subprocess.CompletedProcess[str]) -> None:
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "OK: nothing lost, nothing applied twice" in result.stdout, report
    for line in result.stdout.splitlines():
        if line.startswith(("jobs lost", "jobs stuck", "effect rows committed twice")):
            assert line.split()[-1] == "0", report
    # Faults were really injected, and jobs really ran.
    assert "faults: " in result.stdout and "faults: none" not in result.stdout
    enqueued = next(line for line in result.stdout.splitlines()
                    if line.startswith("any jobs enqueued"))
    assert int(enqueued.split()[-1]) > 100, report


@pytest.mark.timeout(400)
def test_a_short_fault_injection_run_loses_nothing():
    _check(_run("--duration", "45", timeout=390))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_long_fault_injection_run_loses_nothing():
    _check(_run("--duration", "600", "--rate", "30", timeout=1450))
