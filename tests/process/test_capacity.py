"""Tiny real capacity sweeps, whose JSON, CSV and plots are checked for content (nothing
here is timed): `shardlog serve` and the load in a private network namespace (root)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import requires_root
from ..harness import PEER_PORT, ServerProcess

PLOTS = ("throughput.png", "latency.png", "balance.png", "memory.png", "flush_latency.png")


def capacity(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlog.cli", "capacity", "--no-progress",
                           *args], capture_output=True, text=True, timeout=timeout)


def _png_has_a_picture(path: Path) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    return pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01


def test_a_tiny_sweep_writes_json_csv_summary_and_plots(tmp_path):
    requires_root("a capacity run (a private network namespace, shardlog serve)")
    out = tmp_path / "out"
    result = capacity("--sweep", "mirrors=1,6", "--regions", "64", "--duration", "0.3",
                      "--workload", "random-write", "--restart", "--out", str(out),
                      "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["parameter"] == "mirrors"
    assert [p["value"] for p in report["points"]] == [1, 6]
    for point in report["points"]:
        load, base = point["load"], point["baseline"]
        assert load["requests"] > 0 and base["requests"] > 0
        assert load["by_type"]["FLUSH"]["count"] > 0
        assert sum(point["load"]["flush_histogram"]["counts"]) == \
            load["by_type"]["FLUSH"]["count"]
        roles = sorted(row["role"] for row in point["memory"])
        assert roles == ["front", "worker", "worker"]
        assert all(row["rss"] > 0 and row["pss"] > 0 for row in point["memory"])
        # The server's own counters agree with the routing function, request for request.
        assert point["balance"]["reported"] == point["balance"]["predicted"]
        assert sum(point["balance"]["reported"]) == load["requests"]
        assert point["restart"]["logs"] == point["spec"]["mirrors"]
        derived = point["derived"]
        assert derived["ratio_requests_per_second"] == pytest.approx(
            load["requests_per_second"] / base["requests_per_second"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["mirrors"] for row in rows] == ["1", "6"]
    summary = (out / "summary.txt").read_text()
    assert "knee:" in summary and "x echo" in summary
    for name in PLOTS:
        assert _png_has_a_picture(out / name), name
    # The plots and summary can be drawn again from the JSON alone.
    again = tmp_path / "again"
    replot = capacity("--replot", str(out / "results.json"), "--out", str(again))
    assert replot.returncode == 0, replot.stderr
    assert (again / "summary.txt").read_text() == summary
    assert all(_png_has_a_picture(again / name) for name in PLOTS)


def test_every_workload_runs_against_a_started_server(tmp_path):
    requires_root("a capacity run")
    for workload in ("seq-write", "read-heavy", "resync-storm", "churn"):
        out = tmp_path / workload
        result = capacity("--workload", workload, "--mirrors", "3", "--regions", "32",
                          "--duration", "0.2", "--integrated-flush", "--out", str(out),
                          "--state-dir", str(tmp_path))
        assert result.returncode == 0, workload + result.stdout + result.stderr
        (point,) = json.loads((out / "results.json").read_text())["points"]
        assert point["load"]["requests"] > 0, workload
        assert not point["load"]["errors"]
        # One point has no knee: the summary says which side of the limit its FLUSHes are.
        summary = (out / "summary.txt").read_text()
        flush = point["load"]["by_type"].get("FLUSH")
        side = ("no FLUSH was measured against" if flush is None else
                "FLUSH p99 is under" if flush["p99_us"] < 10_000 else "FLUSH p99 is over")
        assert f"{side} the 10 ms limit (one point: no knee)" in summary, summary
        assert "knee: FLUSH p99 was over" not in summary


def test_it_drives_a_running_server_and_removes_its_logs_afterwards(private_netns, tmp_path):
    server = ServerProcess(tmp_path / "state").start()
    try:
        out = tmp_path / "out"
        result = capacity("--attach", str(PEER_PORT), "--pid-file", str(server.pid_file),
                          "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics",
                          "--mirrors", "4", "--regions", "32", "--duration", "0.2",
                          "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        (point,) = json.loads((out / "results.json").read_text())["points"]
        assert point["balance"]["reported"] == point["balance"]["predicted"]
        assert point["workers"] == 2
        assert not list((tmp_path / "state" / "logs").glob("cap-*"))
    finally:
        server.stop()


def test_it_fails_loudly_when_no_server_is_reachable(private_netns, tmp_path):
    result = capacity("--attach", str(PEER_PORT), "--pid-file", str(tmp_path / "none.pid"),
                      "--mirrors", "2", "--duration", "0.2", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "expected one server in connector group 7" in result.stderr
    assert f"--test-peer {PEER_PORT}" in result.stderr
    assert not (tmp_path / "results.json").exists()


def test_it_fails_loudly_when_the_load_cannot_be_delivered(private_netns, tmp_path):
    # A server that takes requests from another port: every request is dropped.
    server = ServerProcess(tmp_path / "state", peer=PEER_PORT + 1).start()
    try:
        result = capacity("--attach", str(PEER_PORT), "--pid-file", str(server.pid_file),
                          "--mirrors", "2", "--duration", "0.2", "--reply-timeout", "0.5",
                          "--out", str(tmp_path / "out"))
        assert result.returncode == 1
        assert "unanswered for 0.5 s: the load was not delivered" in result.stderr
    finally:
        server.stop()


def test_run_load_runs_each_cycle_exactly_so_often_with_fewer_logs_than_in_flight(
        private_netns):
    from shardlog.harness.kernelsim.echo import running_echo_peer
    from shardlog.harness.kernelsim.load import Stream, run_load
    from shardlog.server.nlsocket import open_connector_socket

    streams = [Stream.build(f"c-{n}", 1, [(T.IN_SYNC, protocol.pack_u64(0))] * (n + 1))
               for n in range(3)]
    with open_connector_socket(PEER_PORT, receive_buffer=1 << 20) as sock, \
            running_echo_peer(PEER_PORT):
        result = run_load(sock, streams, in_flight=64, cycles=2, resend=False)
    assert result.completed_by_stream == [2, 4, 6]
    assert result.requests == 12 and not result.unanswered
