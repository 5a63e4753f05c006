"""scripts/bench_kernel.py still runs against the real kernel (a smoke run: its numbers go
in the README, from full runs; nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[3] / "scripts" / "bench_kernel.py"


def test_the_kernel_benchmark_measures_every_log_it_is_asked_for(shared_server, tmp_path):
    shared_server.close()  # the benchmark starts its own server: never two at once
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, BENCH, "--here", "--runtime", "1", "--rounds", "1",
         "--workloads", "randwrite-4k-qd1", "--logs", "shardlog core+iflush",
         "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads(report.read_text())["runs"]
    assert {run["log"] for run in runs} == {"kernel disk", "lean responder",
                                            "shardlog core+iflush"}
    assert all(run["iops"] > 0 and run["p50_us"] > 0 for run in runs)
    assert "shardlog core+iflush" in result.stdout
    assert "vs disk" in result.stdout and "vs lean" in result.stdout
    # The time inside shardlog, from its own metrics: a write of an integrated-flush
    # mirror costs the kernel's IN_SYNCs, a FLUSH and a CLEAR.
    (timed,) = [run for run in runs if run["log"] == "shardlog core+iflush"]
    assert timed["requests_per_write"] > 1 and timed["server_us"] > 0
    assert "where a shardlog write's time goes" in result.stdout
