"""What a worker counts for the front's metrics: the names, and their flat string keys.

Theory of operation
-------------------
Only a worker sees a FLUSH's commit, the regions it marks, the recovery work it hands
out, its batches and its storage failures.  It counts them with its reporter's ``count``
(plain dict increments) and ships what changed since its last report in the report's
``counters`` (workerstats.py), as *deltas*: the front adds them up (metrics.py), so a
worker that dies and is replaced never makes a total go down, and nothing is kept on
disk per process (prometheus-client's multiprocess mode would leave per-pid files).

A key is the metric's name without the ``shardlog_`` prefix, then ``|label=value`` per
label (:func:`key`, :func:`parse_key`).  A histogram (:func:`observe`) ships one key per
bucket with a ``bucket`` label (the index of its upper bound in :attr:`MetricSpec.bounds`,
the last one past them all) and one with ``bucket=sum``: per-bucket deltas add up like
any counter.
:data:`WORKER_METRICS` says what every name is, for the front's collector.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    bounds: tuple[float, ...] = ()  # a histogram's bucket upper bounds
    # Label values whose series are exported (at 0) before anything was counted: a
    # dashboard or an alert on rate() needs the series to exist.
    always: tuple[tuple[str, ...], ...] = ((),)


# A FLUSH's commit: nothing written for a core log (microseconds), an O_DIRECT write +
# fdatasync of a disk log's device (milliseconds, more on a busy disk).
COMMIT_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                 50e-3, 100e-3, 250e-3, 1.0, 5.0)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

WORKER_METRICS: dict[str, MetricSpec] = {
    "flush_commit_seconds": MetricSpec(
        "histogram", "Commits of a log's staged marks (a disk log's device write + "
        "fdatasync itself; a core log's writes nothing), by log type", ("log_type",),
        COMMIT_BOUNDS, (("core",), ("disk",))),
    "worker_batch_size": MetricSpec(
        "histogram", "Requests a worker read and answered in one batch", (), BATCH_BOUNDS),
    "region_marks": MetricSpec(
        "counter", "Regions marked (MARK_REGION and integrated FLUSH), answered ok"),
    "region_clears": MetricSpec("counter", "Regions cleared (CLEAR_REGION), answered ok"),
    "recovery_handed_out": MetricSpec(
        "counter", "Regions handed out for recovery (GET_RESYNC_WORK answered with one)"),
    "recovery_completed": MetricSpec(
        "counter", "Regions reported recovered (SET_REGION_SYNC in sync, answered ok)"),
    "reconnect_ctrs": MetricSpec(
        "counter", "Reconnect CTRs (the kernel's reconnect loop after a server restart)"),
    "logs_restored": MetricSpec(
        "counter", "Logs re-created from their CTR record for a request after a restart"),
    "storage_errors": MetricSpec(
        "counter", "Failures of instance files (state_file) and log devices (log_device)",
        ("kind",), always=(("state_file",), ("log_device",))),
}


def key(name: str, **labels: str) -> str:
    """The flat key of one series: ``name|label=value|...`` (labels in the given order)."""
    return name + "".join(f"|{label}={value}" for label, value in labels.items())


def parse_key(flat: str) -> tuple[str, dict[str, str]]:
    name, *pairs = flat.split("|")
    return name, dict(pair.partition("=")[::2] for pair in pairs)


Count = Callable[[str, float], None]  # workerstats.Reporter.count, or nothing


def count_nothing(_key: str, _amount: float = 1) -> None:
    """A Count for a LogTable outside a worker (replay, tests): nobody reads it."""


def observe(count: Count, name: str, value: float, times: int = 1, **labels: str) -> None:
    """``times`` observations of ``value`` in the histogram ``name``: its bucket and its
    sum."""
    bounds, bucket_keys, sum_key = _histogram_keys(name, tuple(labels.items()))
    count(bucket_keys[bisect_left(bounds, value)], times)
    count(sum_key, value * times)


@cache
def _histogram_keys(name: str, labels: tuple[tuple[str, str], ...],
                    ) -> tuple[tuple[float, ...], list[str], str]:
    """A histogram's bounds, its buckets' keys and its sum's key, made once: observe()
    runs on the request path (a worker's every batch)."""
    bounds = WORKER_METRICS[name].bounds
    buckets = [key(name, **dict(labels), bucket=str(index))
               for index in range(len(bounds) + 1)]
    return bounds, buckets, key(name, **dict(labels), bucket="sum")


# Keys counted on a worker's request path, made once.
REGION_MARKS = key("region_marks")
REGION_CLEARS = key("region_clears")
RECOVERY_HANDED_OUT = key("recovery_handed_out")
RECOVERY_COMPLETED = key("recovery_completed")
RECONNECT_CTRS = key("reconnect_ctrs")
LOGS_RESTORED = key("logs_restored")
