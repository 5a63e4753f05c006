"""What a worker tells the front about itself: its logs' state and its counters.

Only a worker knows its logs (their state, how many regions are in sync or dirty, where
recovery stands) and what its requests cost below the front (commits, marks, errors).  The
front serves the metrics and the operator tools, so each worker sends it a
:class:`WorkerReport` as a ``Kind.WORKER_REPORT`` frame on its events pipe:

- at most once per :data:`REPORT_INTERVAL` while it has done anything since its last
  report, including once more within that interval after it goes idle, so that a
  counter's last increments always arrive;
- at once when the front asks with a ``Kind.SEND_REPORT`` frame (``shardlog status`` and a
  Prometheus scrape want figures that are current, not a second old).

Only a report that was asked for carries the worker's logs, listed a slice at a time
with the worker's socket answered between two slices (describing 5,000 logs and encoding
them took 40-90 ms at once, which every request queued meanwhile waited for).  The
report carries back the number the front gave the order (the frame's tag), so that a
status waits for the answer to its own order, not for a report that crossed it; an
order that comes while a listing is under way is answered by a listing begun after it.
The periodic reports carry the counters alone (``logs`` None: the front keeps the last
list it had), the one sent as the worker goes idle included: a worker cannot tell going
idle from a pause between two requests at the moment its report falls due, and when it
listed its logs there, a 10,000-log capacity run at 5,000 requests/s stalled each worker
about once every two seconds, and that stall was most of its p99.

A report carries every log the worker serves (a full snapshot: the front keeps the last
one per worker and has nothing to merge), and the counters' and the requests' increments
since the previous report (deltas: a respawned worker starts from zero and the front's
totals never go back).
It is JSON: at one report a second, a few thousand logs cost a few milliseconds, and a
format any tool can read is worth more than the bytes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from operator import attrgetter

from shardlog.observability.requeststats import RequestStats

REPORT_INTERVAL = 1.0  # seconds between reports of a busy worker


@dataclass(frozen=True, slots=True)
class LogStatus:
    """One log instance as its worker sees it."""

    uuid: str
    luid: int
    log_type: str  # core, disk (clustered-* as given)
    state: str  # pending, resumed, suspended
    region_size: int  # sectors
    region_count: int
    in_sync: int  # regions in sync
    dirty: int  # regions marked (not clean) in the log
    recovering: int | None  # the region handed out by GET_RESYNC_WORK, until it is synced
    sync_search: int  # where the next GET_RESYNC_WORK looks for an out-of-sync region
    requests: int  # requests answered for this instance since the worker started
    health: str  # A (alive), D (device failed), F (flush failed): the kernel's letters


LOG_FIELDS = tuple(spec.name for spec in fields(LogStatus))
# A log's row, in field order: dataclasses.astuple deep-copies every field, ~30 times
# slower (100 ms a report of 10,000 logs).
log_row = attrgetter(*LOG_FIELDS)
_COMPACT = (",", ":")


class LogRows:
    """A report's logs, encoded a slice at a time as they are listed: between two slices
    a worker keeps text, not thousands of objects that its collector would walk, and
    the report's last step is a join, not the encoding of every log at once."""

    def __init__(self, statuses: list[LogStatus] | None = None) -> None:
        self._slices: list[str] = []
        if statuses is not None:
            self.add(statuses)

    def add(self, statuses: list[LogStatus]) -> None:
        if statuses:
            rows = json.dumps([log_row(status) for status in statuses], separators=_COMPACT)
            self._slices.append(rows[1:-1])  # the rows without their list's brackets

    def json(self) -> str:
        return "[" + ",".join(self._slices) + "]"


@dataclass(slots=True)
class WorkerReport:
    """A worker's logs, and its counters' increments since its previous report.

    Counter names are flat strings chosen by the code that counts (metrics.py knows how to
    read them); a value is an increment, never a total."""

    logs: list[LogStatus] | None = field(default_factory=list)  # None: not in this one
    counters: dict[str, float] = field(default_factory=dict)
    # Requests received and answered since the previous report (RequestStats.take_deltas).
    requests: dict = field(default_factory=dict)

    def encode(self, rows: LogRows | None = None) -> bytes:
        """The report as JSON; ``rows``: its logs, encoded already as they were listed
        (then ``logs`` is not read)."""
        # Logs as rows, not objects: thousands of them repeat no field names.
        if rows is None and self.logs is not None:
            rows = LogRows(self.logs)
        rest = json.dumps({"counters": self.counters, "requests": self.requests},
                          separators=_COMPACT)
        return ('{"logs":' + ("null" if rows is None else rows.json()) + ","
                + rest[1:]).encode()

    @classmethod
    def decode(cls, payload: bytes) -> WorkerReport:
        """The report in a WORKER_REPORT frame's payload (ValueError if it is not one)."""
        try:
            document = json.loads(payload)
            rows = document["logs"]
            logs = None if rows is None else [LogStatus(*row) for row in rows
                                               if len(row) == len(LOG_FIELDS)]
            counters = {str(name): float(value)
                        for name, value in document["counters"].items()}
            requests = document.get("requests", {})
            if not isinstance(requests, dict):
                raise TypeError("requests is not an object")
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a worker report: {exc}") from exc
        return cls(logs, counters, requests)


class Reporter:
    """A worker's side of the channel: the counters since the last report, and when the
    next one is due."""

    def __init__(self, interval: float = REPORT_INTERVAL,
                 clock=time.monotonic) -> None:
        self.interval = interval
        self.counters: Counter[str] = Counter()  # increments since the last report
        self.requests = RequestStats()  # the requests it answered, since the last report
        self.active = False  # something happened since the last report
        self._clock = clock
        self._last = clock()

    def count(self, name: str, amount: float = 1) -> None:
        self.counters[name] += amount

    # ``now``: the clock's time if the caller has just read it (a worker reads it for its
    # requests' latency anyway, and a clock read is not free under emulation).

    def due(self, now: float | None = None) -> bool:
        if not self.active:
            return False
        return (self._clock() if now is None else now) - self._last >= self.interval

    def wait(self, now: float | None = None) -> float | None:
        """How long the worker may block for requests before a report is due (None:
        for ever, there is nothing to report)."""
        if not self.active:
            return None
        return max(0.0, self.interval - ((self._clock() if now is None else now) - self._last))

    def report(self, logs: list[LogStatus] | None) -> WorkerReport:
        """The report to send now, with ``logs`` (None: a periodic report, or one whose
        logs a worker encoded as it listed them: WorkerReport.encode's ``rows``); the
        counters start again from zero."""
        report = WorkerReport(logs, dict(self.counters), self.requests.take_deltas())
        self.counters.clear()
        self.active = False
        self._last = self._clock()
        return report
