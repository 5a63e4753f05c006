"""The capacity tool: its load description, its streams, its knee and its progress display
(the tiny real sweeps: tests/process/test_capacity.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from shardlog.harness.capacity import workloads
from shardlog.harness.capacity.results import knee
from shardlog.harness.capacity.runner import Point, balance
from shardlog.harness.capacity.spec import WORKLOADS, LoadSpec, SpecError, parse_sweep
from shardlog.server.routing import shard_of_uuid
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ...conftest import PROJECT

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


# --- the script (its real runs: tests/process/test_capacity.py) ------------------------------


def test_the_script_is_the_command():
    script = PROJECT / "scripts" / "capacity.py"
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--test-peer PORT" in result.stdout and "--sweep" in result.stdout


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
