"""The benchmark (tools/benchmark.py) runs end to end, on a tiny size.

Not a timed test: the figures of a tiny run on a shared machine mean nothing.
What is checked is that every workload and baseline ran on both databases
and produced a figure.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXPECTED = [
    "base_pgbench1", "base_pgbench10", "base_notify", "ref_notified_claim",
    "ref_insert_transactions_postgresql", "ref_insert_transactions_sqlite",
    "ref_job_row",
    "base_insert_postgresql", "base_insert8_postgresql", "base_bulk_postgresql",
    "base_claim1_postgresql", "base_claim100_postgresql",
    "w1_one_postgresql", "w1_eight_postgresql", "w1_bulk_postgresql",
    "w2_200_INFO_postgresql", "w2_200_WARNING_postgresql",
    "w2_start_INFO_postgresql", "w2_first_WARNING_postgresql",
    "w2_c1_INFO_postgresql", "w2_four_WARNING_postgresql",
    "w3_median_INFO_postgresql", "w3_p99_WARNING_postgresql",
    "w4_plain_postgresql", "w4_kept_postgresql", "w4_future_postgresql",
    "w5_idle_rss_postgresql", "w5_idle_qps_postgresql",
    "w5_drain_peak_postgresql", "w5_drain_growth_postgresql",
    "base_insert_sqlite", "base_bulk_sqlite", "base_claim1_sqlite",
    "w1_one_sqlite", "w1_bulk_sqlite", "w2_200_INFO_sqlite", "w2_c1_WARNING_sqlite",
    "w3_median_INFO_sqlite", "w4_kept_sqlite", "w5_idle_rss_sqlite",
    "w5_drain_peak_sqlite",
]


@pytest.mark.timeout(600)
def test_the_benchmark_runs_every_workload_on_a_tiny_size(tmp_path, postgres_admin_url):
    figures = tmp_path / "figures.json"

    result = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--size", "tiny", "--repeat", "1",
         "--postgres-url", postgres_admin_url, "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    measured = json.loads(figures.read_text())
    missing = [key for key in EXPECTED if key not in measured]
    assert missing == []
    for key in EXPECTED:
        if key != "w5_drain_growth_postgresql" and key != "w5_drain_growth_sqlite":
            assert measured[key]["median"] > 0, (key, measured[key])
    # The table is printed, with its ratios and targets.
    assert "pgbench -N, 10 client(s)" in result.stdout
    assert ">= 1.25x base_pgbench10" in result.stdout
