"""The benchmark scripts still run, end to end (a smoke run: their numbers go in the
README, from full runs; nothing here is timed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from ..conftest import PROJECT, requires_root

SCRIPTS = PROJECT / "scripts"


def test_the_core_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPTS / "bench_core.py", "--rounds", "2", "--seconds", "0.05",
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 alternating rounds" in result.stdout
    ratios = {line[:37].strip(): float(line.split()[-2].rstrip("x"))
              for line in result.stdout.splitlines() if line.startswith("shardlog ")}
    assert set(ratios) == {"shardlog IN_SYNC", "shardlog MARK_REGION / CLEAR_REGION",
                           "shardlog FLUSH, nothing new",
                           "shardlog FLUSH with a new mark (core)"}
    assert all(ratio > 0 for ratio in ratios.values())
    assert "a worker's batch of one (answer_batch)" in result.stdout


def test_the_server_benchmark_runs_both_servers_and_reports_every_target(tmp_path):
    requires_root("the server benchmark (a private network namespace)")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, SCRIPTS / "bench_server.py", "--rounds", "1", "--seconds", "0.3",
         "--flushes", "50", "--logs", "70", "--state-dir", str(tmp_path),
         "--json", str(report), "--trace"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shardlog traced by `shardlog trace`" in result.stdout  # (its attach is checked)
    for line in ("(a) IN_SYNC, serial", "(b) write path, 64 in flight",
                 "(d) core FLUSH + new mark", "(e) disk FLUSH + new mark"):
        assert line in result.stdout
    verdicts = json.loads(report.read_text())["verdicts"]
    assert {v["load"] for v in verdicts} == {"serial", "write64", "read64", "flush",
                                             "diskflush"}
    # Both servers answered every load.  (The disk FLUSH figure is a difference of two
    # p50s, which a noisy machine can make negative: it only has to be there.)
    assert all(v["value"] > 0 for v in verdicts if v["load"] != "diskflush")
    assert all(math.isfinite(v["value"]) for v in verdicts)


def test_the_responders_benchmark_takes_every_contender_apart_against_lean(tmp_path):
    requires_root("the responders benchmark (a private network namespace)")
    result = subprocess.run(
        [sys.executable, SCRIPTS / "bench_responders.py", "--rounds", "1", "--seconds",
         "0.3", "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[:24].strip(): line[24:].split() for line in result.stdout.splitlines()
            if line.startswith(("lean", "shardlog "))}
    assert set(rows) == {"lean", "lean + clock", "lean + wait and clock",
                         "lean + codec and table", "shardlog"}
    assert rows["lean"][2] == "1.00x"  # the baseline against itself
    # Every contender answered the load and used some CPU doing it.
    assert all(float(row[0]) > 0 and float(row[3]) > 0 for row in rows.values())


def test_the_metrics_benchmark_runs_both_modes_and_gives_a_verdict(tmp_path):
    requires_root("the metrics benchmark (a private network namespace)")
    result = subprocess.run(
        [sys.executable, SCRIPTS / "bench_metrics.py", "--quick", "--logs", "64",
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1/1 metrics off" in result.stdout
    assert "round 1/1 metrics on" in result.stdout
    assert "(c) read path, 64 in flight" in result.stdout
    assert "of the request path (target <= +5%)" in result.stdout


def test_the_routing_balance_script_compares_the_hash_with_an_ideal_one():
    result = subprocess.run(
        [sys.executable, SCRIPTS / "routing_balance.py", "--logs", "200", "--samples", "2",
         "--shards", "2,8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [
        ["lvm_uuids", "route_hash"], ["lvm_uuids", "blake2b"],
        ["random_uuids", "route_hash"], ["random_uuids", "blake2b"]]
    assert all("8: " in row and "/2" in row for row in rows)


def test_the_take_over_benchmark_runs_and_reports_the_longest_wait(tmp_path):
    requires_root("the take-over benchmark (a private network namespace)")
    result = subprocess.run(
        [sys.executable, SCRIPTS / "bench_takeover.py", "--logs", "10", "--rounds", "1",
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1/1: longest wait" in result.stdout
    assert "0 resends, 0 errors" in result.stdout
