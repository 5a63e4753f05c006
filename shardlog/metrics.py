"""Prometheus metrics of the front process, counted as plain integers on the hot path.

The front owns one registry.  Counters are plain ``int`` attributes of
:class:`FrontStats`, bumped inline (tens of nanoseconds), and a collector turns them into
metric families only when Prometheus scrapes: prometheus-client's own ``Counter.inc``
takes a lock per call, and its multiprocess mode leaves per-pid files behind and is ~3x
slower per increment (design.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .protocol import RequestType

log = logging.getLogger(__name__)

# Request types by their raw value; anything else is counted as "unknown".
_TYPE_NAMES = {t.value: t.name.lower() for t in RequestType}


class FrontStats:
    """What the front has counted since it started."""

    def __init__(self, workers: int = 0) -> None:
        self.requests = [0] * 256  # by raw request type (the low byte)
        self.worker_requests = [0] * workers  # routed to each worker slot
        self.dropped_sender = 0  # from a netlink port that is not the kernel
        self.dropped_not_for_us = 0  # another connector id or message type
        self.malformed = 0  # answered -EINVAL by the front itself
        self.enobufs = 0  # the socket's receive buffer overflowed: requests were lost
        self.send_errors = 0
        self.eagain_replies = 0  # requests lost with a worker, answered -EAGAIN
        self.worker_restarts = 0


class FrontCollector(Collector):
    """Metric families built from :class:`FrontStats` at scrape time."""

    def __init__(self, stats: FrontStats, gauges: Callable[[], dict[str, float]]):
        self.stats = stats
        self.gauges = gauges  # live values: workers up, requests in flight

    def collect(self) -> Iterator:
        stats = self.stats
        requests = CounterMetricFamily(
            "shardlog_requests", "Requests received from the kernel, by type", labels=["type"])
        for value, count in enumerate(stats.requests):
            if count:
                requests.add_metric([_TYPE_NAMES.get(value, "unknown")], count)
        yield requests
        routed = CounterMetricFamily(
            "shardlog_worker_requests", "Requests routed to each worker slot",
            labels=["worker"])
        for index, count in enumerate(stats.worker_requests):
            routed.add_metric([str(index)], count)
        yield routed
        dropped = CounterMetricFamily(
            "shardlog_requests_dropped", "Datagrams dropped unanswered, by reason",
            labels=["reason"])
        dropped.add_metric(["sender"], stats.dropped_sender)
        dropped.add_metric(["not_for_us"], stats.dropped_not_for_us)
        yield dropped
        for name, value, text in (
            ("malformed_requests", stats.malformed, "Malformed requests answered -EINVAL"),
            ("enobufs", stats.enobufs,
             "Receive buffer overflows (the kernel re-sends lost requests after 15 s)"),
            ("send_errors", stats.send_errors, "Replies the socket refused"),
            ("eagain_replies", stats.eagain_replies,
             "Requests lost with a dead worker and answered -EAGAIN"),
            ("worker_restarts", stats.worker_restarts, "Workers respawned after dying"),
        ):
            yield CounterMetricFamily(f"shardlog_{name}", text, value=value)
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"shardlog_{name}", name.replace("_", " "), value=value)


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
