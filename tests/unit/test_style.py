"""The code style is checked, not hoped for: ruff with the rules in pyproject.toml
(88 columns everywhere, imports sorted, pyflakes, bugbear, pyupgrade)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "dbtasks", "migrations", "tests",
         "tools", "examples", "tasks"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
