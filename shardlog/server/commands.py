"""The control socket's commands in the server: ``status`` and ``trace``.

Theory of operation
-------------------
control.py moves lines; the commands here answer them.  They see the server through
:class:`ServerView` — its figures, its shard slots (read through slots.WorkerSlot's
properties), and two requests: have every worker report now, start or stop tracing — and
never through its internals; the arbiter wires :meth:`StatusCommand.on_report` and
:meth:`StatusCommand.expire` into its loop.  Everything runs in the arbiter's loop and
never blocks it: a request that must wait waits in a list.

**status.**  Only the workers know their logs; they report them to the arbiter
(workerstats.py) about once a second while busy.  A ``status`` request must not show
figures a second old, so the command asks every live worker for a report and answers once
each of them has reported since — or after :data:`FRESH_TIMEOUT`, with what it has (a
hung worker must not hang the tool; its ``report_age_s`` then says how old its figures
are).  Requests per second per log come from two reports of its worker at least
:data:`RATE_WINDOW` apart (``LogStatus.requests`` is cumulative): the recent rate, 0 for
a log gone idle; per worker they are the sum over its logs.  The worker's pid, restarts
and requests in flight come from the arbiter itself.

**trace.**  Each worker answers the kernel itself, so the workers time their requests:
while nobody traces, a worker pays one attribute test per request.  When a client
subscribes (``{"cmd": "trace", "uuid": [...], "type": [...], "sample": N}``), the server
gets a :class:`Tracer` and tells every worker to trace: after each batch a worker sends
one TRACE frame with each request's arrival, its latency and both datagrams (worker.py).
The tracer matches each request against the subscriptions — on the raw uuid bytes and
type number — and sends one line to each subscriber that wants it: the time, the worker,
the latency and both datagrams in hex.  Decoding them is the client's work, in its own
process (shardlog.tools.tracing): formatted by hand, a line costs the arbiter a few
microseconds, where decoding and ``json.dumps`` cost it several times that.  Lines go out
once per wakeup of the loop; a subscriber that cannot keep up loses lines, counted and
reported to it (control.Connection.send_line): a tracer never blocks the server, and the
server never blocks a worker.  Nor does a worker grow without bound for a front that
stopped reading: past worker.TRACE_BACKLOG it drops its TRACE frames, and its next one
says how many requests went untraced, which every subscriber is told
(``{"untraced": N, "worker": W}``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from shardlog.observability.metrics import FrontStats
from shardlog.observability.workerstats import LOG_FIELDS, LogStatus, WorkerReport, log_row
from shardlog.server.control import Connection
from shardlog.server.slots import WorkerSlot
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

FRESH_TIMEOUT = 1.0  # seconds a status waits for the workers' fresh reports
RATE_WINDOW = 0.5  # seconds: the shortest span a log's requests/s is measured over
NOTE_WORKER_DIED = "worker died: answered -EAGAIN"

_TYPE_NAMES = {t.value: t.name for t in RequestType}


class ServerView(Protocol):
    """What the commands see of the server (the arbiter is one)."""

    stats: FrontStats  # the request counts and the arbiter's own figures
    started: float  # wall clock
    serving: bool
    stopping: bool
    state_dir: Path
    tracer: Tracer | None
    slots: list[WorkerSlot]  # the shards being served, in shard order

    def request_reports(self) -> None:
        """Ask every live worker for a report now (they arrive through on_report)."""

    def set_tracer(self, tracer: Tracer | None) -> None:
        """Start (a tracer) or stop (None) tracing."""


# -- status -------------------------------------------------------------------------------


class StatusCommand:
    """The control socket's ``status`` (and SIGUSR1's dump)."""

    def __init__(self, server: ServerView):
        self.server = server
        # (what to do with the snapshot, deadline, slot -> the number of the order for a
        # report it still owes an answer to)
        self._waiting: list[tuple[Callable[[], None], float, dict[WorkerSlot, int]]] = []
        # (uuid, luid) → (time, requests) at its worker's previous report, and the rate
        self._previous: dict[tuple[str, int], tuple[float, int]] = {}
        self._rates: dict[tuple[str, int], float] = {}
        self._keys_of_slot: dict[int, set[tuple[str, int]]] = {}

    def answer(self, client: Connection, message: dict) -> None:
        def send(snapshot: dict) -> None:
            client.send(snapshot)
            client.finish()

        self.when_fresh(send)

    def when_fresh(self, callback: Callable[[dict], None]) -> None:
        """Call ``callback`` with a snapshot once every live worker has reported anew
        (or after FRESH_TIMEOUT): from the loop, never blocking it."""
        self.when_reported(lambda: callback(self.snapshot()))

    def when_reported(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every live worker has sent the report this asks for
        (or after FRESH_TIMEOUT): from the loop, never blocking it."""
        if self.server.stopping or not any(slot.takes_orders for slot in self.server.slots):
            callback()
            return
        self.server.request_reports()
        owed = {slot: slot.reports_asked for slot in self.server.slots if slot.takes_orders}
        self._waiting.append((callback, time.monotonic() + FRESH_TIMEOUT, owed))

    def on_report(self, slot: WorkerSlot, report: WorkerReport) -> None:
        """A worker reported (the arbiter calls this for every report)."""
        if report.logs is None:
            return  # a periodic report, perhaps sent before the worker read the order
        self._rate_logs(slot, report.logs)
        # A report answers its order and every earlier one (a worker asked again while it
        # was listing its logs lists them again: workerstats.py).
        for _callback, _deadline, owed in self._waiting:
            if owed.get(slot, 0) <= slot.reports_answered:
                owed.pop(slot, None)
        self._call_ready(lambda deadline, owed: not owed)

    def expire(self) -> None:
        """Answer what waited FRESH_TIMEOUT (the arbiter calls this after every wakeup)."""
        if self._waiting:
            now = time.monotonic()
            self._call_ready(lambda deadline, owed: now >= deadline)

    def _rate_logs(self, slot: WorkerSlot, logs: list[LogStatus]) -> None:
        now = time.monotonic()
        keys = set()
        for status in logs:
            key = (status.uuid, status.luid)
            keys.add(key)
            before = self._previous.get(key)
            if before is None:
                self._previous[key] = (now, status.requests)
            elif now - before[0] >= RATE_WINDOW:
                # Not from two reports a few ms apart (a periodic one, then one asked for).
                self._rates[key] = max(0.0, (status.requests - before[1]) / (now - before[0]))
                self._previous[key] = (now, status.requests)
        for gone in self._keys_of_slot.get(slot.index, set()) - keys:
            self._previous.pop(gone, None)  # destroyed, or its worker was replaced
            self._rates.pop(gone, None)
        self._keys_of_slot[slot.index] = keys

    def _call_ready(self, ready) -> None:
        due = [entry for entry in self._waiting if ready(entry[1], entry[2])]
        if due:
            self._waiting = [entry for entry in self._waiting if entry not in due]
            for callback, _deadline, _owed in due:
                callback()

    def snapshot(self) -> dict:
        server, now = self.server, time.monotonic()
        workers, logs = [], []
        for slot in server.slots:
            statuses = slot.logs
            rates = [self._rates.get((s.uuid, s.luid), 0.0) for s in statuses]
            workers.append({
                "index": slot.index, "pid": slot.pid, "ready": slot.ready,
                "restarts": slot.restarts, "logs": len(statuses),
                "in_flight": slot.held,
                "requests_per_s": round(sum(rates), 1),
                "report_age_s": round(now - slot.report_time, 3) if slot.report else None,
            })
            for log_status, rate in zip(statuses, rates, strict=True):
                logs.append(_log_row(log_status, slot.index, rate))
        stats = server.stats
        requests = {_TYPE_NAMES.get(value, str(value)): count
                    for value, count in enumerate(stats.requests) if count}
        return {
            "server": {
                "pid": os.getpid(), "uptime_s": round(time.time() - server.started, 1),
                "serving": server.serving, "stopping": server.stopping,
                # The shard sockets' netlink ports, as /proc/net/netlink lists them.
                "ports": [slot.port for slot in server.slots],
                "state_dir": str(server.state_dir), "workers": len(server.slots),
                "requests": requests, "requests_total": sum(requests.values()),
                "eagain_replies": stats.eagain_replies,
                "worker_restarts": stats.worker_restarts,
                "dropped": stats.dropped["forged_sender"] + stats.dropped["not_for_us"],
                "malformed": stats.dropped["malformed"], "enobufs": stats.enobufs,
                "tracing": server.tracer is not None,
            },
            "workers": workers,
            "logs": logs,
        }


def _log_row(status: LogStatus, worker: int, rate: float) -> dict:
    row = dict(zip(LOG_FIELDS, log_row(status), strict=True))
    row["type"] = row.pop("log_type")
    row["worker"] = worker
    row["requests_per_s"] = round(rate, 1)
    return row


# -- trace --------------------------------------------------------------------------------


class Subscription:
    """What one tracing client asked to see."""

    def __init__(self, client: Connection, uuids: list[str], types: list[str],
                 sample: int = 1):
        self.client = client
        self.uuids = {uuid.encode("ascii") for uuid in uuids} or None
        try:
            self.types = {RequestType[name.upper()].value for name in types} or None
        except KeyError as exc:
            raise ValueError(f"unknown request type {exc.args[0]}; known: "
                             f"{', '.join(t.name for t in RequestType)}") from None
        if sample < 1:
            raise ValueError(f"sample must be at least 1, not {sample}")
        self.sample = sample  # every sample-th request that matches (top's latencies)
        self._matched = 0

    def wants(self, uuid_field: bytes, request_type: int) -> bool:
        if not ((self.uuids is None or uuid_field in self.uuids)
                and (self.types is None or request_type in self.types)):
            return False
        self._matched += 1
        return self._matched % self.sample == 0


class TraceCommand:
    """The control socket's ``trace``: subscribes a client; the server traces while
    anyone is subscribed, and stops (``set_tracer(None)``) when the last one leaves."""

    def __init__(self, server: ServerView):
        self.server = server

    def subscribe(self, client: Connection, message: dict) -> None:
        uuids, types = message.get("uuid", []), message.get("type", [])
        if not all(isinstance(x, str) for x in [*uuids, *types]):
            raise TypeError("uuid and type are lists of strings")
        subscription = Subscription(client, uuids, types, int(message.get("sample", 1)))
        if self.server.tracer is None:
            self.server.set_tracer(Tracer())
        self.server.tracer.subscriptions.append(subscription)
        client.on_close.append(lambda: self._unsubscribe(subscription))
        client.send({"subscribed": {"uuid": uuids, "type": types,
                                    "sample": subscription.sample}})

    def _unsubscribe(self, subscription: Subscription) -> None:
        tracer = self.server.tracer
        if tracer is None:
            return
        tracer.subscriptions.remove(subscription)
        if not tracer.subscriptions:
            self.server.set_tracer(None)


class Tracer:
    """The server's side of tracing: the subscriptions, and the lines for them."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []

    def traced(self, worker: int, arrived: float, latency: float, datagram: bytes,
               reply: bytes, note: str | None = None) -> None:
        """A request a worker answered (``reply``; empty: it got none), which arrived at
        ``arrived`` (wall clock) and was answered ``latency`` seconds later."""
        routing = protocol.peek_request(datagram)
        uuid_field, request_type = (routing[0], routing[2] & 0xFF) if routing else (b"", -1)
        wanted = [s for s in self.subscriptions if s.wants(uuid_field, request_type)]
        if not wanted:
            return
        # Numbers and hex only, formatted by hand: json.dumps and the decoders would cost
        # the arbiter several times more per traced request; the client decodes.
        line = (f'{{"time": {arrived + latency:.6f}, "worker": {worker}, "latency_us": '
                f'{latency * 1e6:.1f}, "request": "{datagram.hex()}", "reply": '
                f'"{reply.hex()}"{_NOTES.get(note, "")}}}\n').encode()
        for subscription in wanted:
            if not subscription.client.closed:
                subscription.client.send_line(line)

    def untraced(self, worker: int, count: int) -> None:
        """``count`` requests that ``worker`` answered while tracing but did not send,
        the front having left its events pipe unread too long (worker.TRACE_BACKLOG):
        every subscriber is told, whatever it asked to see.  Streamed like the traced
        lines, after those already queued: a client found gone is closed at the end of
        the wakeup, not while the front is still handing on a worker's frame."""
        line = f'{{"untraced": {count}, "worker": {worker}}}\n'.encode()
        for subscription in self.subscriptions:
            if not subscription.client.closed:
                subscription.client.send_line(line, droppable=False)


_NOTES = {NOTE_WORKER_DIED: f', "note": {json.dumps(NOTE_WORKER_DIED)}'}
