"""``shardlog status``: every log and every worker of a running server.

Theory of operation
-------------------
Only the workers know their logs; they report them to the front (workerstats.py) about
once a second while busy.  A ``status`` request on the control socket must not show
figures a second old, so the front asks every live worker for a report
(``Front.request_reports``) and answers once each of them has reported since — or after
:data:`FRESH_TIMEOUT`, with what it has (a hung worker must not hang the tool; its
``report_age_s`` then says how old its figures are).  All of this happens in the front's
loop: the request waits in a list, never in a blocking call.

Requests per second per log come from two reports of its worker at least
:data:`RATE_WINDOW` apart (``LogStatus.requests`` is cumulative): the recent rate, 0 for
a log gone idle; per worker they are the sum over its logs.  The
worker's pid, restarts and requests in flight come from the front itself.

Exit codes: 0 ok, 1 error (server not running, permission denied, no answer), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardlog.observability.workerstats import LOG_FIELDS, LogStatus, WorkerReport, log_row
from shardlog.server import control
from shardlog.tools import dmdevices
from shardlog.wire.protocol import RequestType

if TYPE_CHECKING:
    from shardlog.server.front import Front, WorkerSlot

EXIT_OK, EXIT_ERROR = 0, 1
FRESH_TIMEOUT = 1.0  # seconds a status waits for the workers' fresh reports
RATE_WINDOW = 0.5  # seconds: the shortest span a log's requests/s is measured over

_TYPE_NAMES = {t.value: t.name for t in RequestType}


class StatusCommand:
    """The control socket's ``status``, in the front."""

    def __init__(self, front: Front):
        self.front = front
        # (what to do with the snapshot, deadline, slots still owing a report)
        self._waiting: list[tuple[Callable[[], None], float, set[WorkerSlot]]] = []
        # (uuid, luid) → (time, requests) at its worker's previous report, and the rate
        self._previous: dict[tuple[str, int], tuple[float, int]] = {}
        self._rates: dict[tuple[str, int], float] = {}
        self._keys_of_slot: dict[int, set[tuple[str, int]]] = {}
        front.report_listeners.append(self._on_report)
        front.on_tick.append(self._expire)

    def answer(self, client: control.Connection, message: dict) -> None:
        def send(snapshot: dict) -> None:
            client.send(snapshot)
            client.finish()

        self.when_fresh(send)

    def when_fresh(self, callback: Callable[[dict], None]) -> None:
        """Call ``callback`` with a snapshot once every live worker has reported anew
        (or after FRESH_TIMEOUT): from the loop, never blocking it."""
        self.when_reported(lambda: callback(self.snapshot()))

    def when_reported(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every live worker has reported anew (or after
        FRESH_TIMEOUT): from the loop, never blocking it."""
        owed = {slot for slot in self.front.slots if slot.ready and slot.control_fd >= 0}
        if not owed or self.front.stopping:
            callback()
            return
        self._waiting.append((callback, time.monotonic() + FRESH_TIMEOUT, owed))
        self.front.request_reports()

    def _on_report(self, slot: WorkerSlot, report: WorkerReport) -> None:
        if report.logs is not None:
            self._rate_logs(slot, report.logs)
        for _callback, _deadline, owed in self._waiting:
            owed.discard(slot)
        self._call_ready(lambda deadline, owed: not owed)

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

    def _expire(self) -> None:
        if self._waiting:
            now = time.monotonic()
            self._call_ready(lambda deadline, owed: now >= deadline)

    def _call_ready(self, ready) -> None:
        due = [entry for entry in self._waiting if ready(entry[1], entry[2])]
        if due:
            self._waiting = [entry for entry in self._waiting if entry not in due]
            for callback, _deadline, _owed in due:
                callback()

    def snapshot(self) -> dict:
        front, now = self.front, time.monotonic()
        workers, logs = [], []
        for slot in front.slots:
            report = slot.report
            statuses = slot.logs
            rates = [self._rates.get((s.uuid, s.luid), 0.0) for s in statuses]
            workers.append({
                "index": slot.index, "pid": slot.process.pid, "ready": slot.ready,
                "restarts": slot.restarts, "logs": len(statuses),
                "in_flight": slot.in_flight.held,
                "requests_per_s": round(sum(rates), 1),
                "report_age_s": round(now - slot.report_time, 3) if report else None,
            })
            for log_status, rate in zip(statuses, rates, strict=True):
                logs.append(_log_row(log_status, slot.index, rate))
        stats = front.stats
        requests = {_TYPE_NAMES.get(value, str(value)): count
                    for value, count in enumerate(stats.requests) if count}
        return {
            "server": {
                "pid": os.getpid(), "uptime_s": round(time.time() - front.started, 1),
                "serving": front.serving, "stopping": front.stopping,
                # The shard sockets' netlink ports, as /proc/net/netlink lists them.
                "ports": [slot.sock.getsockname()[0] for slot in front.slots],
                "state_dir": str(front.config.state_dir), "workers": len(front.slots),
                "requests": requests, "requests_total": sum(requests.values()),
                "eagain_replies": stats.eagain_replies,
                "worker_restarts": stats.worker_restarts,
                "dropped": stats.dropped["forged_sender"] + stats.dropped["not_for_us"],
                "malformed": stats.dropped["malformed"], "enobufs": stats.enobufs,
                "tracing": front.tracer is not None,
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


# -- the client: shardlog status -------------------------------------------------------------

HELP = """\
Ask the running server (its control socket, root only) for every log — uuid, luid, type,
state, region size and count, regions in sync and dirty, recovery position, worker,
requests/s, health — and every worker: pid, logs, restarts, requests in flight. The
workers report fresh figures for it.

exit codes: 0 ok, 1 error (server not running, permission denied, no answer), 2 usage
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    from shardlog.tools.tracing import control_socket_option

    parser = commands.add_parser(
        "status", help="every log and worker of the running server",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    control_socket_option(parser)
    parser.add_argument("--json", action="store_true", help="the whole answer as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        answer = control.ask(args.socket, {"cmd": "status"})
    except control.ControlError as exc:
        print(f"shardlog status: {exc}", file=sys.stderr)
        return EXIT_ERROR
    dmdevices.label_logs(answer["logs"])
    print(json.dumps(answer, indent=2) if args.json else format_text(answer))
    return EXIT_OK


def recovery(log: dict) -> str:
    """Where resync stands: the region being recovered, the next one looked at, or done."""
    if log["in_sync"] >= log["region_count"]:
        return "done"
    if log["recovering"] is not None:
        return f"at {log['recovering']}"
    return f"next {log['sync_search']}"


def table(header: list[str], rows: list[list], right: set[int]) -> list[str]:
    """Plain columns, as lvs prints them: widths from the content, numbers right-aligned."""
    cells = [header] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join((cell.rjust(w) if i in right else cell.ljust(w))
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in cells]


def format_text(answer: dict) -> str:
    server = answer["server"]
    lines = [f"shardlog pid {server['pid']}, up {server['uptime_s']:.0f} s, "
             f"{server['workers']} workers, {len(answer['logs'])} logs, "
             f"{server['requests_total']} requests, state in {server['state_dir']}"
             + ("" if server["serving"] else " (not serving yet)")
             + (" (stopping)" if server["stopping"] else "")]
    lines.append("")
    lines += table(["Worker", "PID", "Logs", "Restarts", "InFlight", "Req/s", "Ready"],
                   [[w["index"], w["pid"], w["logs"], w["restarts"], w["in_flight"],
                     f"{w['requests_per_s']:.1f}", "yes" if w["ready"] else "no"]
                    for w in answer["workers"]], right={0, 1, 2, 3, 4, 5})
    lines.append("")
    if not answer["logs"]:
        lines.append("no logs")
    else:
        # Where this host has the log's device: its VG/LV or dm name (label_logs).
        devices = any(log.get("device") for log in answer["logs"])
        lines += table(
            ["UUID"] + (["Device"] if devices else []) +
            ["LUID", "Type", "State", "RegionSz", "Regions", "InSync", "Dirty", "Recovery",
             "Worker", "Req/s", "Health"],
            [[log["uuid"]] + ([log.get("device") or "-"] if devices else []) +
             [f"{log['luid']:x}", log["type"], log["state"],
              log["region_size"], log["region_count"], log["in_sync"], log["dirty"],
              recovery(log), log["worker"], f"{log['requests_per_s']:.1f}", log["health"]]
             for log in sorted(answer["logs"], key=lambda x: (x["uuid"], x["luid"]))],
            right={i + devices for i in (4, 5, 6, 7, 9, 10)})
    return "\n".join(lines)
