"""The capacity tool: its load description, its streams, its knee, and tiny real sweeps
whose JSON, CSV and plots are checked for content (nothing here is timed)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardlog.harness.capacity import workloads
from shardlog.harness.capacity.results import knee
from shardlog.harness.capacity.runner import Point, balance
from shardlog.harness.capacity.spec import WORKLOADS, LoadSpec, SpecError, parse_sweep
from shardlog.server.routing import shard_of_uuid
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ...conftest import PROJECT, requires_root
from ...harness import PEER_PORT, ServerProcess

PLOTS = ("throughput.png", "latency.png", "balance.png", "memory.png", "flush_latency.png")


def capacity(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlog.cli", "capacity", "--no-progress",
                           *args], capture_output=True, text=True, timeout=timeout)


# --- the load description ---------------------------------------------------------------


def test_a_sweep_names_a_parameter_and_increasing_values():
    assert parse_sweep("mirrors=1,10,100") == ("mirrors", [1.0, 10.0, 100.0])
    for bad in ("mirrors", "colour=1,2", "mirrors=10,1", "mirrors=1,1", "mirrors=a",
                "mirrors="):
        with pytest.raises(SpecError):
            parse_sweep(bad)


def test_a_load_that_cannot_be_run_is_refused():
    for bad in ({"workload": "nap"}, {"mirrors": 0}, {"region_size": 12},
                {"rate": 0.0}, {"duration": 0.0}):
        with pytest.raises(SpecError):
            LoadSpec(**bad)
    assert LoadSpec(mirrors=3, in_flight=64).effective_in_flight == 3
    assert LoadSpec().with_value("region-size", 64).region_size == 64


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_sends_requests_the_server_can_decode(workload):
    spec = LoadSpec(mirrors=3, regions=16, workload=workload, integrated_flush=True)
    uuids = workloads.log_uuids("t", spec.mirrors)
    for stream in workloads.streams(spec, uuids):
        for request_type, datagram in stream.requests:
            request = protocol.decode_datagram(bytes(datagram))
            assert request.request_type is request_type
            assert request.uuid == stream.uuid
            assert all(region < spec.regions for region in request.regions)


def test_churn_reloads_to_a_second_instance_and_back():
    spec = LoadSpec(mirrors=1, regions=16, workload="churn")
    (stream,) = workloads.streams(spec, ["u"])
    decoded = [protocol.decode_datagram(bytes(d)) for _, d in stream.requests]
    ctrs = [r.luid for r in decoded if r.request_type is T.CTR]
    dtrs = [r.luid for r in decoded if r.request_type is T.DTR]
    assert ctrs == [2, 1] and dtrs == [1, 2]  # each reload creates one, destroys the other


def test_a_resync_storm_starts_from_logs_out_of_sync():
    assert "nosync" not in workloads.ctr_string(LoadSpec(workload="resync-storm"))
    assert workloads.ctr_string(LoadSpec()).split()[-1] == "nosync"


# --- figures ----------------------------------------------------------------------------------


def _point(value: float, flush_p99_us: float) -> Point:
    load = {"by_type": {"FLUSH": {"p99_us": flush_p99_us}}}
    return Point(label=f"mirrors={value:g}", value=value, spec={}, workers=2,
                 setup_seconds=0.0, load=load, baseline=None, memory=[], memory_empty=[],
                 balance={}, cpu_us_per_request={})


def test_the_knee_is_the_last_point_before_flush_p99_first_reaches_the_limit():
    points = [_point(1, 900), _point(10, 4000), _point(100, 12000), _point(1000, 3000)]
    found = knee(points, limit_ms=5)
    assert (found["largest_under"], found["first_over"]) == (10, 100)
    assert knee(points[:2], limit_ms=5)["first_over"] is None
    assert knee(points[2:], limit_ms=5)["largest_under"] is None


def test_balance_is_predicted_with_the_fronts_routing_function():
    uuids = [f"log-{n}" for n in range(50)]
    completed = list(range(50))
    shares = balance(uuids, completed, 3, reported=None)
    for worker in range(3):
        assert shares.predicted[worker] == sum(
            c for u, c in zip(uuids, completed, strict=True)
            if shard_of_uuid(u, 3) == worker)
    assert shares.max_over_mean == max(shares.predicted) / (sum(completed) / 3)


# --- real runs ---------------------------------------------------------------------------------


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


def test_the_script_is_the_command():
    script = PROJECT / "scripts" / "capacity.py"
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--test-peer PORT" in result.stdout and "--sweep" in result.stdout


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_on_a_terminal_and_hands_back_the_result():
    from shardlog.harness.capacity.progress import Progress

    screen = _Terminal()
    assert Progress(screen).timed("loading", 0.3, lambda: time.sleep(0.5) or 42) == 42
    drawn = screen.getvalue()
    assert "\r" in drawn and "] " in drawn and "% loading" in drawn
    with pytest.raises(ZeroDivisionError):
        Progress(_Terminal()).timed("failing", 0.1, lambda: 1 // 0)


def test_without_a_terminal_each_phase_is_one_line():
    from shardlog.harness.capacity.progress import Progress

    log = io.StringIO()
    progress = Progress(log)
    assert progress.timed("loading", 0.1, lambda: 7) == 7
    progress.update(0.5, "half")
    assert log.getvalue() == "loading\n"
