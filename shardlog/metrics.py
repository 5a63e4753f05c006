"""Prometheus metrics of the server, counted as plain integers on the hot path.

Theory of operation
-------------------
The front owns the only registry; no metric object exists until Prometheus scrapes.

- **The front's own figures** are plain ``int`` attributes and fixed arrays of
  :class:`FrontStats`, bumped inline (tens of nanoseconds): requests by type on arrival,
  replies by type and result, per-type latency histograms, drops, overflows.  A latency
  histogram's bounds are powers of two nanoseconds (16.4 µs, 32.8 µs, ... 17.2 s), so
  that an observation's bucket is one shift and ``int.bit_length``: the front's whole
  bookkeeping for a reply costs ~0.3 µs, against ~12 µs of server CPU per request
  (scripts/bench_metrics.py measures it end to end).  prometheus-client's
  own ``Counter.inc`` takes a lock per call, and its multiprocess mode leaves per-pid files
  behind and is ~3x slower per increment (design.md).
- **The workers' figures** (commit latency, marks, recovery work, batch sizes, storage
  errors: what only a worker sees) arrive as counter *deltas* in the workers' reports
  (workercounters.py encodes them) and are added to :attr:`FrontStats.worker_totals`, so
  that a worker that dies and is replaced loses at most its last second of figures and
  never makes a counter go down.  Gauges about logs (how many, in which state, regions
  in sync) are taken from each worker's latest report as it stands.
- **At scrape time** :class:`FrontCollector` builds metric families from all of it, in
  the HTTP server's thread.  It reads ints and lists that the loop thread writes; the GIL
  makes each read whole, and a scrape that sees one counter a request ahead of another
  is harmless.  The loop never waits for the scrape.

Cardinality: every family has a fixed, small label set (request types x results, a few
reasons, worker indexes) except the per-log sync progress, two series per log instance
with a ``uuid`` label (``--metrics-per-log off`` drops them on hosts with thousands of
logs).
"""

from __future__ import annotations

import errno
import logging
import platform
import socket
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from . import __version__
from .protocol import REPLY_ERROR, REPLY_ERROR_OFFSET, RequestType
from .workercounters import WORKER_METRICS, parse_key

log = logging.getLogger(__name__)

# Request types by their raw value; anything else is counted as "unknown".
_TYPE_NAMES = {t.value: t.name.lower() for t in RequestType}
_TYPE_COUNT = 256  # raw types are counted by their low byte
_reply_error = REPLY_ERROR.unpack_from
_ERROR_AT = slice(REPLY_ERROR_OFFSET, REPLY_ERROR_OFFSET + REPLY_ERROR.size)
_NO_ERROR = bytes(REPLY_ERROR.size)

# Request latency, from the datagram's arrival to its reply leaving: a reply to anything
# but a committing FLUSH takes tens of microseconds, a FLUSH an msync (~0.1 ms) or an
# fdatasync of a log device (milliseconds), and the kernel gives up after 15 s.  Bucket i
# holds elapsed nanoseconds whose ``(ns >> LATENCY_SHIFT).bit_length()`` is i: below
# 2**(LATENCY_SHIFT + i) ns.  (An observation of exactly a bound lands one bucket up: 1 ns.)
LATENCY_SHIFT = 14  # 2**14 ns = 16.4 µs, the first bound
LATENCY_BOUNDS = tuple(2 ** (LATENCY_SHIFT + i) / 1e9 for i in range(21))  # to 17.2 s
_SLOTS = 64  # per type: room for any bit_length of a 64-bit count of nanoseconds

# Why a datagram was dropped (or answered by the front itself) instead of being routed.
DROP_REASONS = ("forged_sender", "malformed", "not_for_us")

# The front remembers requests it answered -EAGAIN this long, to recognise their re-sends
# (the kernel re-sends at once), and at most this many.
RESEND_WINDOW_NS = 5_000_000_000
RESEND_WATCH_LIMIT = 65536


def result_name(error: int) -> str:
    """``ok`` for 0, else the errno's name in lower case (``esrch``, ``eio``...)."""
    if not error:
        return "ok"
    return errno.errorcode.get(-error, f"e{-error}").lower()


class FrontStats:
    """What the front has counted since it started, and the workers' counter totals."""

    def __init__(self, workers: int = 0) -> None:
        self.requests = [0] * _TYPE_COUNT  # received, by raw request type (the low byte)
        self.worker_requests = [0] * workers  # routed to each worker slot
        # Answered: ok[type], and the others by results[type << 12 | -error] (an errno is
        # below 4096).
        self.ok = [0] * _TYPE_COUNT
        self.results: dict[int, int] = {}
        self.latency_buckets = [0] * (_TYPE_COUNT * _SLOTS)  # [type << 6 | bucket]
        self.latency_sum_ns = [0] * _TYPE_COUNT
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.enobufs = 0  # the socket's receive buffer overflowed: requests were lost
        self.send_errors = 0
        self.eagain_replies = 0  # requests lost with a worker, answered -EAGAIN
        self.resent_requests = 0  # re-sends of requests answered -EAGAIN, seen arriving
        self.worker_restarts = 0
        self.worker_totals: dict[str, float] = {}  # the workers' deltas, added up
        # Bodies of requests answered -EAGAIN → until when a re-send is expected.
        self.resend_watch: dict[bytes, int] = {}
        self.resend_until = 0  # no entry of resend_watch is watched past this (ns)

    def answered(self, sent: Iterable[tuple[tuple, bytes]], now_ns: int) -> None:
        """Count replies that left at ``now_ns``: ``(request, reply)`` pairs, a request
        being the front's ``(seq, raw type, arrival ns, datagram)`` and a reply a full
        reply datagram (its error field is read here)."""
        ok, buckets, sums = self.ok, self.latency_buckets, self.latency_sum_ns
        error_at, no_error, results = _ERROR_AT, _NO_ERROR, self.results
        for (_seq, request_type, arrived, _datagram), reply in sent:
            if reply[error_at] == no_error:
                ok[request_type] += 1
            else:
                key = request_type << 12 | -_reply_error(reply, REPLY_ERROR_OFFSET)[0]
                results[key] = results.get(key, 0) + 1
            elapsed = now_ns - arrived
            buckets[request_type << 6 | (elapsed >> LATENCY_SHIFT).bit_length()] += 1
            sums[request_type] += elapsed

    def lost(self, requests: Iterable[tuple], error: int, now_ns: int) -> None:
        """Count requests the front answered itself with ``error`` (-EAGAIN: their worker
        died)."""
        results, buckets, sums = self.results, self.latency_buckets, self.latency_sum_ns
        for _seq, request_type, arrived, _datagram in requests:
            key = request_type << 12 | -error
            results[key] = results.get(key, 0) + 1
            elapsed = now_ns - arrived
            buckets[request_type << 6 | (elapsed >> LATENCY_SHIFT).bit_length()] += 1
            sums[request_type] += elapsed

    def add_worker_deltas(self, deltas: dict[str, float]) -> None:
        totals = self.worker_totals
        for key, delta in deltas.items():
            totals[key] = totals.get(key, 0) + delta

    # -- re-sent requests --------------------------------------------------------------------

    def expect_resend(self, datagram: bytes, now_ns: int) -> None:
        """A request answered -EAGAIN: the kernel re-sends it at once with a new seq."""
        watch = self.resend_watch
        if len(watch) >= RESEND_WATCH_LIMIT:
            for key in [k for k, until in watch.items() if until < now_ns]:
                del watch[key]
            if len(watch) >= RESEND_WATCH_LIMIT:
                return
        until = now_ns + RESEND_WINDOW_NS
        watch[resend_key(datagram)] = until
        self.resend_until = until  # the latest deadline: entries are added in time order

    def check_resend(self, datagram: bytes, now_ns: int) -> None:
        """Called for arrivals while :attr:`resend_watch` is not empty."""
        if now_ns > self.resend_until:
            # Every re-send that could still come is overdue: stop watching, so that a
            # re-send that never came does not tax every later request.
            self.resend_watch.clear()
            return
        until = self.resend_watch.pop(resend_key(datagram), None)
        if until is not None and until >= now_ns:
            self.resent_requests += 1


def resend_key(datagram: bytes) -> bytes:
    """A request without its seqs: the kernel's re-send differs from the first send only
    there (a new seq in the connector header and in dm_ulog_request)."""
    return datagram[36:184] + datagram[188:]


class FrontCollector(Collector):
    """Metric families built from :class:`FrontStats` and the workers' latest reports at
    scrape time."""

    def __init__(self, stats: FrontStats, gauges: Callable[[], dict],
                 per_log: bool = True):
        self.stats = stats
        # Live values from the front: {"workers": [(index, up, in_flight)],
        # "logs": [LogStatus, ...] from the latest reports}.
        self.gauges = gauges
        self.per_log = per_log

    def collect(self) -> Iterator:
        yield from self._requests()
        yield from self._front_counters()
        live = self.gauges()
        yield from self._workers(live.get("workers", ()))
        yield from self._worker_totals()
        yield from self._logs(live.get("logs", ()))
        info = GaugeMetricFamily("shardlog_build_info", "shardlog's version, as a label",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

    def _requests(self) -> Iterator:
        stats = self.stats
        received = CounterMetricFamily(
            "shardlog_requests_received", "Requests received from the kernel, by type",
            labels=["type"])
        for value, count in enumerate(stats.requests):
            if count:
                received.add_metric([_TYPE_NAMES.get(value, "unknown")], count)
        yield received
        answered = CounterMetricFamily(
            "shardlog_requests", "Requests answered, by type and result (ok or the errno)",
            labels=["type", "result"])
        results = dict(stats.results)
        for value, count in enumerate(stats.ok):
            if count:
                results[value << 12] = count
        for key, count in sorted(results.items()):
            answered.add_metric([_TYPE_NAMES.get(key >> 12, "unknown"),
                                 result_name(-(key & 0xFFF))], count)
        yield answered
        latency = HistogramMetricFamily(
            "shardlog_request_duration_seconds",
            "Time from a request's arrival to its reply leaving the front, by type",
            labels=["type"])
        buckets, sums = stats.latency_buckets, stats.latency_sum_ns
        bounds = len(LATENCY_BOUNDS)
        for value in range(_TYPE_COUNT):
            slots = buckets[value * _SLOTS:(value + 1) * _SLOTS]
            if any(slots):
                counts = [*slots[:bounds], sum(slots[bounds:])]  # the rest: past every bound
                latency.add_metric([_TYPE_NAMES.get(value, "unknown")],
                                   _cumulative(LATENCY_BOUNDS, counts), sums[value] / 1e9)
        yield latency

        routed = CounterMetricFamily(
            "shardlog_worker_requests", "Requests routed to each worker slot",
            labels=["worker"])
        for index, count in enumerate(stats.worker_requests):
            routed.add_metric([str(index)], count)
        yield routed

    def _front_counters(self) -> Iterator:
        stats = self.stats
        dropped = CounterMetricFamily(
            "shardlog_datagrams_dropped",
            "Datagrams not routed to a worker, by reason (malformed ones are answered "
            "-EINVAL when the kernel waits for them)", labels=["reason"])
        for reason, count in stats.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        for name, value, text in (
            ("enobufs", stats.enobufs,
             "Receive buffer overflows (the kernel re-sends lost requests after 15 s)"),
            ("send_errors", stats.send_errors, "Replies the socket refused"),
            ("eagain_replies", stats.eagain_replies,
             "Requests lost with a dead worker and answered -EAGAIN"),
            ("resent_requests", stats.resent_requests,
             "Re-sends seen of requests answered -EAGAIN"),
            ("worker_restarts", stats.worker_restarts, "Workers respawned after dying"),
        ):
            yield CounterMetricFamily(f"shardlog_{name}", text, value=value)

    def _workers(self, workers: Iterable[tuple[int, bool, int]]) -> Iterator:
        up = GaugeMetricFamily("shardlog_worker_up", "1 while the worker serves",
                               labels=["worker"])
        in_flight = GaugeMetricFamily("shardlog_worker_requests_in_flight",
                                      "Requests handed to the worker and not yet answered",
                                      labels=["worker"])
        total_up = total_in_flight = 0
        for index, ready, count in workers:
            up.add_metric([str(index)], 1 if ready else 0)
            in_flight.add_metric([str(index)], count)
            total_up += bool(ready)
            total_in_flight += count
        yield up
        yield in_flight
        yield GaugeMetricFamily("shardlog_workers_up", "Workers serving", value=total_up)
        yield GaugeMetricFamily("shardlog_requests_in_flight",
                                "Requests handed to workers and not yet answered",
                                value=total_in_flight)

    def _worker_totals(self) -> Iterator:
        families = {}
        for name, spec in WORKER_METRICS.items():
            family = CounterMetricFamily if spec.kind == "counter" else HistogramMetricFamily
            families[name] = family(f"shardlog_{name}", spec.help, labels=spec.labels)
        totals: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        for flat, total in sorted(self.stats.worker_totals.items()):
            name, labels = parse_key(flat)
            spec = WORKER_METRICS.get(name)
            if spec is None:
                continue  # unknown to this front: nothing to say about it
            values = tuple(labels.get(label, "") for label in spec.labels)
            totals.setdefault((name, values), {})[labels.get("bucket", "")] = total
        for name, spec in WORKER_METRICS.items():
            for values in spec.always:
                totals.setdefault((name, values), {})
        for (name, values), entry in sorted(totals.items()):
            spec = WORKER_METRICS[name]
            if spec.kind == "counter":
                families[name].add_metric(values, entry.get("", 0))
            else:
                counts = [entry.get(str(index), 0) for index in range(len(spec.bounds) + 1)]
                families[name].add_metric(values, _cumulative(spec.bounds, counts),
                                          entry.get("sum", 0))
        yield from families.values()

    def _logs(self, logs: Iterable) -> Iterator:
        logs = list(logs)
        by_state = GaugeMetricFamily("shardlog_logs", "Log instances by type and state",
                                     labels=["log_type", "state"])
        counts: dict[tuple[str, str], int] = {}
        for status in logs:
            key = (status.log_type, status.state)
            counts[key] = counts.get(key, 0) + 1
        for log_type in ("core", "disk"):
            for state in ("pending", "resumed", "suspended"):
                by_state.add_metric([log_type, state], counts.get((log_type, state), 0))
        yield by_state
        regions = GaugeMetricFamily(
            "shardlog_regions", "Regions of every log instance: all of them, those in "
            "sync, those marked dirty", labels=["kind"])
        regions.add_metric(["total"], sum(s.region_count for s in logs))
        regions.add_metric(["in_sync"], sum(s.in_sync for s in logs))
        regions.add_metric(["dirty"], sum(s.dirty for s in logs))
        yield regions
        unhealthy = GaugeMetricFamily(
            "shardlog_logs_failed", "Log instances whose storage failed (status D or F)",
            labels=["health"])
        for health in ("D", "F"):
            unhealthy.add_metric([health], sum(1 for s in logs if s.health == health))
        yield unhealthy
        if not self.per_log:
            return
        total = GaugeMetricFamily("shardlog_log_regions", "Regions of one log instance",
                                  labels=["uuid", "luid"])
        in_sync = GaugeMetricFamily("shardlog_log_regions_in_sync",
                                    "Regions of one log instance in sync",
                                    labels=["uuid", "luid"])
        for status in logs:
            labels = [status.uuid, f"{status.luid:x}"]
            total.add_metric(labels, status.region_count)
            in_sync.add_metric(labels, status.in_sync)
        yield total
        yield in_sync


def _cumulative(bounds: Iterable[float], counts: list) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one past every bound) as Prometheus's cumulative
    ``(le, count)`` pairs."""
    out, running = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


def serve_metrics(address: str, collector: Collector):
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns the HTTP server
    (its socket must not leak into forked workers)."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    server, _thread = start_http_server(port, host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → ``(host, port)``; ValueError if not."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_samples(text: str) -> dict[str, float]:
    """Every sample of a /metrics page (text format), keyed by its name with labels, as
    ``shardlog_requests_total{type="flush"}``: for tests and tools that scrape the server."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now: for a metrics endpoint (or a Prometheus)
    that tests, benchmarks and the capacity tool start beside their own server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
