"""The metrics of a running `shardlog serve`, as Prometheus sees them.

A real Prometheus server (Debian's package, installed by scripts/setup) scrapes a server
that the simulated kernel drives, and its HTTP API must show what was sent: requests by
type, sync progress per log, a worker restart after a SIGKILL.  promtool checks the
exposition itself.  The counting underneath (front and worker side) is tested directly, in
tests/unit/observability/test_metrics.py.
"""

from __future__ import annotations

import os
import random
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim import Connector, Mirror
from shardlog.observability.workercounters import WORKER_METRICS
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import PROJECT
from ..harness import PEER_PORT, RawPeer, ServerProcess
from ..prometheus import Prometheus, promtool

GRAFANA = PROJECT / "grafana"
RULES = GRAFANA / "prometheus" / "shardlog-rules.yml"

REGION_SECTORS = 8
REGIONS = 64


@pytest.fixture
def kernel(private_netns) -> Iterator[Connector]:
    with Connector(PEER_PORT, retry_timeout=2.0, reconnect_delay=0.1,
                   remote_recovering_interval=0.01, history=200_000) as conn:
        yield conn


@pytest.fixture
def server(private_netns, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "state", workers=2).start()
    yield process
    process.close()


def core_mirror(kernel: Connector, uuid: str, *args: str) -> Mirror:
    return Mirror.create(kernel, uuid, "core", [str(REGION_SECTORS), *args],
                         REGIONS * REGION_SECTORS)


def drive(mirrors: list[Mirror], rng: random.Random, rounds: int = 10) -> None:
    for _ in range(rounds):
        for mirror in mirrors:
            regions = rng.sample(range(REGIONS), rng.choice((1, 3, 40)))
            # Writes above the resync point that the kernel's IS_REMOTE_RECOVERING
            # throttle requeued wait in the mirror for its next pass.
            while mirror.write(regions, complete=False):
                regions = []
                time.sleep(0.01)
            mirror.read(rng.randrange(REGIONS))
            mirror.complete_writes()
            mirror.update_states()


def exposition(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def families(text: str) -> dict[str, str]:
    """Metric family name → type, from the exposition's TYPE lines (a counter's without
    the ``_total`` that its line carries)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            found[name.removesuffix("_total") if kind == "counter" else name] = kind
    return found


# -- a real Prometheus -------------------------------------------------------------------------


def test_prometheus_sees_the_load_the_simulated_kernel_sent(server, kernel, tmp_path):
    target = f"127.0.0.1:{server.metrics_port}"
    with Prometheus(tmp_path / "prometheus", [target], rule_files=(RULES,)) as prometheus:
        prometheus.wait_for('up{job="shardlog"}', 1)
        resync = core_mirror(kernel, "mirror-resync")  # every region out of sync
        nosync = [core_mirror(kernel, f"mirror-{n}", "nosync") for n in range(3)]
        in_sync = 'shardlog_log_regions_in_sync{uuid="%s"}'
        prometheus.wait_for(in_sync % "mirror-resync", 0)
        prometheus.wait_for('shardlog_log_regions{uuid="mirror-resync"}', REGIONS)
        prometheus.wait_for(in_sync % "mirror-0", REGIONS)

        drive(nosync, random.Random(5))
        recovered = resync.recover(REGIONS // 2)
        assert recovered == REGIONS // 2
        prometheus.wait_for(in_sync % "mirror-resync", REGIONS // 2)  # progress, halfway
        resync.recover()
        prometheus.wait_for(in_sync % "mirror-resync", REGIONS)

        # Every request the simulated kernel sent, by type, received and answered.
        sent = Counter(request.request_type.name.lower() for request in kernel.history)
        assert kernel.stats.requests_sent == sum(sent.values())  # the history is whole
        prometheus.wait_for("sum(shardlog_requests_total)", sum(sent.values()))
        received = prometheus.query("shardlog_requests_received_total")
        assert {dict(labels)["type"]: value for labels, value in received.items()} == sent
        answered = prometheus.query("sum by (type) (shardlog_requests_total)")
        assert {dict(labels)["type"]: value for labels, value in answered.items()} == sent
        assert not prometheus.query('shardlog_requests_total{result!="ok"}')  # all ok
        latency = prometheus.query("shardlog_request_duration_seconds_count")
        assert {dict(labels)["type"]: value for labels, value in latency.items()} == sent

        # What the workers counted, from their reports.
        synced = sum(1 for request in kernel.history
                     if request.request_type is T.SET_REGION_SYNC)
        prometheus.wait_for("shardlog_recovery_completed_total", synced)
        assert synced == REGIONS
        prometheus.wait_for("shardlog_recovery_handed_out_total", REGIONS)
        marked = sum(len(request.data) // 8 for request in kernel.history
                     if request.request_type is T.MARK_REGION)
        prometheus.wait_for("shardlog_region_marks_total", marked)
        assert marked > 0
        # Only FLUSHes with new marks commit (write), one commit per log and batch.
        commits = prometheus.wait_until(
            'shardlog_flush_commit_seconds_count{log_type="core"}', lambda n: n > 0)
        assert commits <= sent["flush"]
        prometheus.wait_for('sum(shardlog_logs{state="resumed"})', 4)
        assert prometheus.value('shardlog_regions{kind="total"}') == 4 * REGIONS

        # A worker killed: Prometheus sees the restart, and the alert fires.
        assert prometheus.value("shardlog_worker_restarts_total") == 0
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        prometheus.wait_for("shardlog_worker_restarts_total", 1)
        prometheus.wait_for("shardlog_workers_up", 2)
        prometheus.wait_for('count(ALERTS{alertname="ShardlogWorkerRestarted",'
                            'alertstate="firing"})', 1)
        assert prometheus.value('ALERTS{alertname="ShardlogDown"}') is None


# -- the exposition --------------------------------------------------------------------------


def test_the_exposition_passes_promtool_and_has_every_family(server, kernel):
    mirror = core_mirror(kernel, "lint")
    drive([mirror], random.Random(1), rounds=2)
    mirror.recover()
    peer = RawPeer(PEER_PORT + 1)  # a forged sender: dropped
    try:
        peer.request(T.IN_SYNC, protocol.pack_u64(1), uuid="lint")
    finally:
        peer.close()
    text = exposition(server)
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" or "SUCCESS" in result.stdout, result.stdout
    found = families(text)
    for name, spec in WORKER_METRICS.items():
        assert found[f"shardlog_{name}"] == spec.kind
    for name in ("requests", "requests_received", "datagrams_dropped", "enobufs",
                 "send_errors", "eagain_replies", "resent_requests", "worker_restarts"):
        assert found[f"shardlog_{name}"] == "counter", name
    assert found["shardlog_request_duration_seconds"] == "histogram"
    for name in ("workers_up", "worker_up", "worker_requests_in_flight", "logs", "regions",
                 "log_regions", "log_regions_in_sync", "logs_failed", "build_info"):
        assert found[f"shardlog_{name}"] == "gauge", name
    assert 'shardlog_datagrams_dropped_total{reason="forged_sender"} 1.0' in text


def test_per_log_series_can_be_switched_off(private_netns, tmp_path, kernel):
    server = ServerProcess(tmp_path / "state", extra=("--per-log-metrics", "off")).start()
    try:
        core_mirror(kernel, "quiet")
        text = exposition(server)
        assert "shardlog_log_regions{" not in text
        assert "shardlog_log_regions_in_sync{" not in text
        assert 'shardlog_regions{kind="total"}' in text
    finally:
        server.close()
