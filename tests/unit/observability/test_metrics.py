"""The counting underneath the metrics, front side and worker side, directly: requests by
type, result and latency bucket, deltas from the workers, the worker's own counters (a
running server's metrics, as Prometheus sees them: tests/process/test_metrics.py)."""

from __future__ import annotations

import errno
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shardlog.log.logtable import LogTable
from shardlog.observability.metrics import FrontCollector, FrontStats, result_name
from shardlog.observability.requeststats import LATENCY_BOUNDS, RequestStats
from shardlog.observability.workercounters import key, observe, parse_key
from shardlog.observability.workerstats import LogStatus
from shardlog.server import worker
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

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


def exposition(collector: FrontCollector) -> list[str]:
    """The sample lines Prometheus reads."""
    registry = CollectorRegistry()
    registry.register(collector)
    return [line for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("#")]


def test_requests_of_unknown_types_lost_with_a_worker_are_one_series():
    """A dead worker's ring holds whatever it read, types no request has included: each
    such type is counted as "unknown", in one series, where two made two samples of the
    same name and labels (which Prometheus rejects)."""
    stats = FrontStats()
    stats.lost([(0x7E, 0), (0x7F, 0), (T.FLUSH.value, 0)], -errno.EAGAIN, now_ns=10**6)
    lines = exposition(FrontCollector(stats, lambda: {}))
    assert [line for line in lines if line.startswith("shardlog_requests_total")] == [
        'shardlog_requests_total{result="eagain",type="unknown"} 2.0',
        'shardlog_requests_total{result="eagain",type="flush"} 1.0']
    counts = [line for line in lines
              if line.startswith("shardlog_request_duration_seconds_count")]
    assert counts == ['shardlog_request_duration_seconds_count{type="unknown"} 2.0',
                      'shardlog_request_duration_seconds_count{type="flush"} 1.0']


def test_logs_of_every_type_are_counted_clustered_ones_included():
    def status(log_type: str) -> LogStatus:
        return LogStatus(uuid="LVM-a", luid=1, log_type=log_type, state="resumed",
                         region_size=1024, region_count=8, in_sync=8, dirty=0,
                         recovering=None, sync_search=8, requests=3, health="A")

    logs = [status("core"), status("clustered-core"), status("clustered-disk")]
    got = samples(FrontCollector(FrontStats(), lambda: {"logs": logs}, per_log=False))
    counted = {labels: value for (name, labels), value in got.items()
               if name == "shardlog_logs" and value}
    assert counted == {(("log_type", "core"), ("state", "resumed")): 1,
                       (("log_type", "clustered-core"), ("state", "resumed")): 1,
                       (("log_type", "clustered-disk"), ("state", "resumed")): 1}
    assert got[("shardlog_logs", (("log_type", "disk"), ("state", "resumed")))] == 0


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


def test_a_re_send_is_recognised_with_or_without_the_kernels_padding():
    """A dead worker's request is known up to its nlmsg_len (inflight.py); the re-send
    arrives as the kernel sent it, padded to 4 bytes (nlmsg_put)."""
    stats = FrontStats()
    first = protocol.encode_request(T.CTR, seq=7, uuid="log-a", luid=1, data=b"8192 core 8 nosync")
    again = protocol.encode_request(T.CTR, seq=8, uuid="log-a", luid=1, data=b"8192 core 8 nosync")
    assert len(first) % 4  # the kernel would pad it
    stats.expect_resend(first, now_ns=0)
    stats.check_resend(again + bytes(-len(again) % 4), now_ns=1)
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
