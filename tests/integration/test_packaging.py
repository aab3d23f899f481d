"""The built wheel carries the migrations, and `migrate` works from it alone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from dbtasks.migrate import HEAD_REVISION
from tests.conftest import ROOT


def test_migrate_from_an_installed_wheel_outside_the_checkout(tmp_path: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("dbtasks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "dbtasks/_migrations/env.py" in names
    for migration in (ROOT / "migrations" / "versions").glob("*.py"):
        assert f"dbtasks/_migrations/versions/{migration.name}" in names

    # A folder with no checkout in sight; only the unpacked wheel on the path
    # (the dependencies come from this environment's site-packages).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [sys.executable, "-c",
         "import dbtasks, sys; print(dbtasks.__file__); "
         "from dbtasks.cli import main; sys.argv = ['dbtasks', "
         "'--database-url', 'sqlite:///queue.db', 'migrate']; main()"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "site"))
    assert f"upgraded from empty to {HEAD_REVISION}" in result.stderr
    assert (elsewhere / "queue.db").exists()
