"""The metrics of a running `shardlog serve`, as Prometheus sees them.

A real Prometheus server (Debian's package, installed by scripts/setup) scrapes a server
that the simulated kernel drives, and its HTTP API must show what was sent: requests by
type, sync progress per log, a worker restart after a SIGKILL.  promtool checks the
exposition itself.  The counting underneath (front and worker side) is tested directly.
"""

from __future__ import annotations

import errno
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
from shardlog.log.logtable import LogTable
from shardlog.observability.metrics import FrontCollector, FrontStats, result_name
from shardlog.observability.requeststats import LATENCY_BOUNDS, RequestStats
from shardlog.observability.workercounters import WORKER_METRICS, key, observe, parse_key
from shardlog.server import worker
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from .harness import PEER_PORT, RawPeer, ServerProcess
from .prometheus import Prometheus, promtool

GRAFANA = Path(__file__).parent.parent / "grafana"
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


# -- counting, front side --------------------------------------------------------------------


def samples(collector: FrontCollector) -> dict[tuple, float]:
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_replies_are_counted_by_type_result_and_latency_bucket():
    worker_stats = RequestStats()  # a worker counts what it answers...
    flush, in_sync = T.FLUSH.value, T.IN_SYNC.value
    sent = [(flush, 1_000, 0),  # 30 µs
            (flush, 0, -errno.EIO),  # 31 µs
            (in_sync, 0, 0)]
    worker_stats.answered(sent, now_ns=31_000)
    stats = FrontStats(2)  # ... and the front adds what its reports carry
    assert stats.add_deltas(worker_stats.take_deltas()) == 0  # answered, not received
    assert worker_stats.take_deltas() == {}  # shipped once
    stats.lost([(flush, 0)], -errno.EAGAIN, now_ns=2_000_000_000)  # 2 s
    got = samples(FrontCollector(stats, lambda: {}))
    requests = "shardlog_requests_total"
    assert got[(requests, (("result", "ok"), ("type", "flush")))] == 1
    assert got[(requests, (("result", "eio"), ("type", "flush")))] == 1
    assert got[(requests, (("result", "eagain"), ("type", "flush")))] == 1
    assert got[(requests, (("result", "ok"), ("type", "in_sync")))] == 1
    bucket = "shardlog_request_duration_seconds_bucket"
    assert LATENCY_BOUNDS[:2] == (16384e-9, 32768e-9)
    assert got[(bucket, (("le", "1.6384e-05"), ("type", "flush")))] == 0
    assert got[(bucket, (("le", "3.2768e-05"), ("type", "flush")))] == 2
    assert got[(bucket, (("le", "1.073741824"), ("type", "flush")))] == 2
    assert got[(bucket, (("le", "2.147483648"), ("type", "flush")))] == 3
    assert got[(bucket, (("le", "+Inf"), ("type", "flush")))] == 3
    assert got[("shardlog_request_duration_seconds_sum", (("type", "flush"),))] == (
        pytest.approx(2 + 61e-6))


def test_an_observation_past_every_bound_counts_in_inf_only():
    stats = FrontStats()
    stats.lost([(T.FLUSH.value, 0)], -errno.EAGAIN, now_ns=3600 * 10**9)
    got = samples(FrontCollector(stats, lambda: {}))
    bucket = "shardlog_request_duration_seconds_bucket"
    assert got[(bucket, (("le", repr(LATENCY_BOUNDS[-1])), ("type", "flush")))] == 0
    assert got[(bucket, (("le", "+Inf"), ("type", "flush")))] == 1


def test_result_names_are_errno_names():
    assert result_name(0) == "ok"
    assert result_name(-errno.ESRCH) == "esrch"
    assert result_name(-errno.EAGAIN) == "eagain"


def test_a_re_send_of_a_request_answered_eagain_is_counted_once():
    stats = FrontStats()
    first = protocol.encode_request(T.FLUSH, seq=7, uuid="log-a", luid=1)
    again = protocol.encode_request(T.FLUSH, seq=8, uuid="log-a", luid=1)
    other = protocol.encode_request(T.FLUSH, seq=9, uuid="log-b", luid=1)
    stats.expect_resend(first, now_ns=0)
    stats.check_resend(other, now_ns=1)
    assert stats.resent_requests == 0
    stats.check_resend(again, now_ns=2)
    stats.check_resend(again, now_ns=3)
    assert stats.resent_requests == 1
    stats.expect_resend(first, now_ns=0)
    stats.check_resend(again, now_ns=10**10)  # long after: not a re-send of it
    assert stats.resent_requests == 1


def test_request_deltas_of_workers_add_up_in_the_front():
    stats = FrontStats(2)
    for _ in range(2):
        worker_stats = RequestStats()
        worker_stats.requests[T.IN_SYNC.value] += 3
        worker_stats.dropped["malformed"] += 1
        worker_stats.enobufs += 2
        stats.add_deltas(worker_stats.take_deltas())
    got = samples(FrontCollector(stats, lambda: {}))
    assert got[("shardlog_requests_received_total", (("type", "in_sync"),))] == 6
    assert got[("shardlog_datagrams_dropped_total", (("reason", "malformed"),))] == 2
    assert got[("shardlog_enobufs_total", ())] == 4
    with pytest.raises((ValueError, TypeError)):
        stats.add_deltas({"received": [["x", 1]]})


def test_worker_deltas_add_up_and_unknown_names_are_ignored():
    stats = FrontStats()
    stats.add_worker_deltas({key("region_marks"): 3, key("not_a_metric"): 1})
    stats.add_worker_deltas({key("region_marks"): 2})
    got = samples(FrontCollector(stats, lambda: {}))
    assert got[("shardlog_region_marks_total", ())] == 5
    assert got[("shardlog_storage_errors_total", (("kind", "log_device"),))] == 0
    assert not any("not_a_metric" in name for name, _ in got)


# -- counting, worker side -------------------------------------------------------------------


def test_keys_round_trip_and_histograms_count_buckets_and_sum():
    assert parse_key(key("storage_errors", kind="log_device")) == (
        "storage_errors", {"kind": "log_device"})
    counts: Counter[str] = Counter()
    observe(lambda name, amount: counts.update({name: amount}), "worker_batch_size", 3)
    assert counts == {key("worker_batch_size", bucket="2"): 1,
                      key("worker_batch_size", bucket="sum"): 3}


def test_the_worker_counts_marks_clears_recovery_commits_and_reconnects(tmp_path):
    counts: Counter[str] = Counter()

    def count(name: str, amount: float = 1) -> None:
        counts[name] += amount

    table = LogTable(tmp_path, count)
    seq = 0

    def send(request_type: T, data: bytes = b"", uuid: str = "log-a") -> bytes:
        nonlocal seq
        seq += 1
        datagram = protocol.encode_request(request_type, seq=seq, uuid=uuid, luid=1,
                                           data=data)
        return worker.answer(table, datagram, count)

    send(T.CTR, b"1024 core 8 nosync")  # every region in sync: marks dirty clean bits
    send(T.RESUME)
    send(T.MARK_REGION, protocol.pack_regions([1, 2, 3]))
    send(T.FLUSH)
    send(T.CLEAR_REGION, protocol.pack_regions([1]))
    send(T.FLUSH)  # only a clear staged: nothing to commit yet (clears are lazy)
    send(T.CTR, b"1024 core 8", uuid="log-b")  # every region to recover
    send(T.RESUME, uuid="log-b")
    send(T.GET_RESYNC_WORK, uuid="log-b")
    send(T.SET_REGION_SYNC, protocol.pack_set_region_sync(0, True), uuid="log-b")
    send(T.CTR, b"1024 core 8 nosync\0")  # the kernel's reconnect CTR
    failed = send(T.MARK_REGION, protocol.pack_regions([1]), uuid="unknown")
    assert protocol.decode_reply(failed).error == -errno.ESRCH
    assert counts[key("region_marks")] == 3  # not the failed one
    assert counts[key("region_clears")] == 1
    assert counts[key("recovery_handed_out")] == 1
    assert counts[key("recovery_completed")] == 1
    assert counts[key("reconnect_ctrs")] == 1
    assert counts[key("flush_commit_seconds", log_type="core", bucket="sum")] > 0
    assert sum(amount for name, amount in counts.items()
               if name.startswith("flush_commit_seconds|log_type=core|bucket=")
               and not name.endswith("=sum")) == 1  # the FLUSH with new marks
    table.close()
