"""Prometheus metrics of the server, counted as plain integers on the hot path.

Theory of operation
-------------------
The front owns the only registry; no metric object exists until Prometheus scrapes.

- **Requests** are counted where they are answered, in the workers, as plain ints
  (requeststats.py: by type, result and latency, in power-of-two nanosecond buckets,
  16.4 µs ... 17.2 s, one shift and ``int.bit_length`` per reply), and shipped as
  *deltas* in the workers' reports; the front adds them to :class:`FrontStats`, beside
  its own figures (-EAGAIN answers for dead workers, restarts).  prometheus-client's own
  ``Counter.inc`` takes a lock per call, and its multiprocess mode leaves per-pid files
  behind and is ~3x slower per increment (design.md).
- **The workers' other figures** (commit latency, marks, recovery work, batch sizes,
  storage errors) arrive the same way, as counter deltas (workercounters.py encodes
  them), added to :attr:`FrontStats.worker_totals`, so that a worker that dies and is
  replaced loses at most its last second of figures and never makes a counter go down.
  Gauges about logs (how many, in which state, regions in sync) are taken from each
  worker's latest report as it stands.
- **At scrape time** :class:`FrontCollector` builds metric families from all of it, in
  the HTTP server's thread.  It reads ints and lists that the loop thread writes; the GIL
  makes each read whole, and a scrape that sees one counter a request ahead of another
  is harmless.  The loop never waits for the scrape.

Cardinality: every family has a fixed, small label set (request types x results, a few
reasons, worker indexes) except the per-log sync progress, two series per log instance
with a ``uuid`` label (``--per-log-metrics off`` drops them on hosts with thousands of
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

from shardlog import __version__
from shardlog.observability.requeststats import LATENCY_BOUNDS, SLOTS, TYPE_COUNT, RequestStats
from shardlog.observability.workercounters import WORKER_METRICS, parse_key
from shardlog.wire.protocol import RequestType

log = logging.getLogger(__name__)

# Request types by their raw value; anything else is counted as "unknown".
_TYPE_NAMES = {t.value: t.name.lower() for t in RequestType}


def result_name(error: int) -> str:
    """``ok`` for 0, else the errno's name in lower case (``esrch``, ``eio``...)."""
    if not error:
        return "ok"
    return errno.errorcode.get(-error, f"e{-error}").lower()


class FrontStats(RequestStats):
    """The workers' request counts added up (their deltas), the front's own figures, and
    the workers' other counter totals."""

    def __init__(self, workers: int = 0) -> None:
        super().__init__()
        self.worker_requests = [0] * workers  # received by each worker slot
        self.eagain_replies = 0  # requests lost with a worker, answered -EAGAIN
        self.worker_restarts = 0
        self.worker_totals: dict[str, float] = {}  # the workers' deltas, added up

    def add_worker_deltas(self, deltas: dict[str, float]) -> None:
        totals = self.worker_totals
        for key, delta in deltas.items():
            totals[key] = totals.get(key, 0) + delta


class FrontCollector(Collector):
    """Metric families built from :class:`FrontStats` and the workers' latest reports at
    scrape time."""

    def __init__(self, stats: FrontStats, gauges: Callable[[], dict],
                 per_log: bool = True, refresh: Callable[[], None] | None = None):
        self.stats = stats
        # Called first at every scrape: the front has its workers report their counts.
        self.refresh = refresh
        # Live values from the front: {"workers": [(index, up, in_flight)],
        # "logs": [LogStatus, ...] from the latest reports}.
        self.gauges = gauges
        self.per_log = per_log

    def collect(self) -> Iterator:
        if self.refresh is not None:
            self.refresh()
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
            "Time from a request's arrival in its worker to its reply leaving, by type",
            labels=["type"])
        buckets, sums = stats.latency_buckets, stats.latency_sum_ns
        bounds = len(LATENCY_BOUNDS)
        for value in range(TYPE_COUNT):
            slots = buckets[value * SLOTS:(value + 1) * SLOTS]
            if any(slots):
                counts = [*slots[:bounds], sum(slots[bounds:])]  # the rest: past every bound
                latency.add_metric([_TYPE_NAMES.get(value, "unknown")],
                                   _cumulative(LATENCY_BOUNDS, counts), sums[value] / 1e9)
        yield latency

        routed = CounterMetricFamily(
            "shardlog_worker_requests",
            "Requests the kernel routed to each worker slot (its shard socket's filter)",
            labels=["worker"])
        for index, count in enumerate(stats.worker_requests):
            routed.add_metric([str(index)], count)
        yield routed

    def _front_counters(self) -> Iterator:
        stats = self.stats
        dropped = CounterMetricFamily(
            "shardlog_datagrams_dropped",
            "Datagrams not served as requests, by reason (malformed ones are answered "
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
                                      "Requests the worker has read and not yet answered",
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
                                "Requests the workers have read and not yet answered",
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
        # core and disk always (a zero is a reading); the clustered types when present.
        for log_type in sorted({"core", "disk"} | {log_type for log_type, _ in counts}):
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
