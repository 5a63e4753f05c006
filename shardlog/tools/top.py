"""``shardlog top``: a live view of a running server, for hosts without Grafana.

Theory of operation
-------------------
Everything comes from the control socket, nothing from the metrics endpoint: each
refresh asks for a ``status`` (fresh worker reports: server/commands.py) and turns the difference
between two answers into rates — requests per second by type from the front's totals,
per worker and per log from the workers' reports.  Latencies come from a ``trace``
subscription on a second connection that asks for one request in ``--sample`` (default
10), read by a thread: the front then sends a line for a tenth of the traffic (decoded
here), and a top that falls behind loses samples, never slows the server.

The screen is redrawn with two ANSI sequences (home, clear) when stdout is a terminal;
otherwise (a pipe, a test) each frame is printed after the last.  ``--once`` waits one
interval, prints one frame and exits.

Exit codes: 0 stopped (Ctrl-C, ``--once``, ``--count``), 1 error (server not running,
permission denied, the server went away), 2 usage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict

from shardlog.server import control
from shardlog.server.statustext import recovery, table
from shardlog.tools import dmdevices
from shardlog.tools.argtypes import positive_int, positive_seconds
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK
from shardlog.tools.tracing import decode_event

CLEAR = "\x1b[H\x1b[2J"
SHOWN_LOGS = 20  # the busiest; --json-free operators want a screenful
RESUBSCRIBE_AFTER = 0.5  # seconds: a trace the server ended is asked for again this soon

HELP = """\
A live terminal view of the running server: request rates and latencies by type, sync
progress of each log, worker health (pid, restarts, requests in flight). Reads the
control socket (root only); latencies come from a sampled trace (--sample).

exit codes: 0 stopped (Ctrl-C, --once, --count), 1 error (server not running, permission
denied, server gone), 2 usage
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    from shardlog.tools.tracing import control_socket_option

    parser = commands.add_parser(
        "top", help="a live view of the running server",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    control_socket_option(parser)
    parser.add_argument("--interval", type=positive_seconds, default=2.0, metavar="SECONDS",
                        help="between refreshes (default 2)")
    parser.add_argument("--once", action="store_true",
                        help="one frame after one interval, then exit (scripts, tests)")
    parser.add_argument("--count", type=positive_int, metavar="N", help="exit after N frames")
    parser.add_argument("--sample", type=positive_int, default=10, metavar="N",
                        help="time one request in N for latencies (default 10; 1: all)")
    parser.set_defaults(run=run)


class LatencySampler:
    """A thread reading a sampled trace: latencies by request type since the last take."""

    def __init__(self, socket_path, sample: int):
        self._lock = threading.Lock()
        self._latencies: dict[str, list[float]] = defaultdict(list)
        self.dropped = 0
        self.error: str | None = None
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(socket_path, sample),
                                        daemon=True, name="shardlog-top-trace")
        self._thread.start()

    def _read(self, socket_path, sample: int) -> None:
        while True:
            try:
                for event in control.stream(socket_path, {"cmd": "trace", "sample": sample},
                                            timeout=None):
                    if "subscribed" in event:
                        self.subscribed.set()
                        continue
                    with self._lock:
                        if "dropped" in event:
                            self.dropped += event["dropped"]
                        elif "untraced" in event:
                            # Requests the server did not trace (it stopped reading its
                            # workers): a gap in the sample, not top falling behind.
                            continue
                        else:
                            self._latencies[decode_event(event)["type"]].append(
                                event["latency_us"])
            except control.ControlError as exc:
                self.error = str(exc)
                return
            finally:
                self.subscribed.set()
            # The server ended the stream: it stopped (the next subscription fails and
            # says so), or another took it over (the next one samples the new server).
            time.sleep(RESUBSCRIBE_AFTER)

    def take(self) -> dict[str, list[float]]:
        with self._lock:
            taken, self._latencies = self._latencies, defaultdict(list)
        return taken


def run(args: argparse.Namespace) -> int:
    try:
        previous = control.ask(args.socket, {"cmd": "status"})
        sampler = LatencySampler(args.socket, args.sample)
        sampler.subscribed.wait(5.0)
        frames = 0
        redraw = sys.stdout.isatty() and not args.once  # --once prints a plain frame
        previous_time = time.monotonic()
        while True:
            time.sleep(args.interval)
            current = control.ask(args.socket, {"cmd": "status"})
            dmdevices.label_logs(current["logs"])
            now = time.monotonic()
            frame = render(previous, current, now - previous_time, sampler.take(),
                           args.sample, sampler.dropped, sampler.error)
            previous, previous_time = current, now
            print((CLEAR if redraw else "") + frame, flush=True)
            frames += 1
            if args.once or (args.count is not None and frames >= args.count):
                return EXIT_OK
    except control.ControlError as exc:
        print(f"shardlog top: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def render(previous: dict, current: dict, elapsed: float,
           latencies: dict[str, list[float]], sample: int, dropped: int,
           sampler_error: str | None = None) -> str:
    """One screen: the server line, requests by type, workers, the busiest logs."""
    server, before = current["server"], previous["server"]
    restarted = server["pid"] != before["pid"]
    total_rate = (0.0 if restarted else
                  (server["requests_total"] - before["requests_total"]) / elapsed)
    lines = [f"shardlog pid {server['pid']}  up {server['uptime_s']:.0f} s  "
             f"{server['workers']} workers  {len(current['logs'])} logs  "
             f"{total_rate:.1f} req/s  -EAGAIN {server['eagain_replies']}  "
             f"restarts {server['worker_restarts']}  {time.strftime('%H:%M:%S')}", ""]
    rows = []
    types = sorted(set(server["requests"]) | set(latencies))
    for name in types:
        count = server["requests"].get(name, 0) - (
            0 if restarted else before["requests"].get(name, 0))
        samples = latencies.get(name, [])
        rows.append([name, f"{count / elapsed:.1f}", len(samples),
                     _percentile(samples, 50), _percentile(samples, 99),
                     f"{max(samples):.0f}" if samples else "-"])
    lines += table(["Type", "Req/s", "Timed", "p50 µs", "p99 µs", "max µs"], rows,
                   right={1, 2, 3, 4, 5})
    note = f"latencies: 1 request in {sample}, from its arrival in its worker to the reply"
    lines.append(note + (f"; {dropped} samples lost (top fell behind)" if dropped else ""))
    if sampler_error:
        lines.append(f"latencies unavailable: {sampler_error}")
    lines.append("")
    lines += table(["Worker", "PID", "Ready", "Restarts", "Logs", "InFlight", "Req/s"],
                   [[w["index"], w["pid"], "yes" if w["ready"] else "NO", w["restarts"],
                     w["logs"], w["in_flight"], f"{w['requests_per_s']:.1f}"]
                    for w in current["workers"]], right={0, 1, 3, 4, 5, 6})
    lines.append("")
    logs = sorted(current["logs"], key=lambda x: (-x["requests_per_s"], x["uuid"]))
    if not logs:
        lines.append("no logs")
    else:
        devices = any(log.get("device") for log in logs)  # dmdevices.label_logs
        lines += table(["UUID"] + (["Device"] if devices else []) +
                       ["LUID", "Type", "State", "Sync", "Dirty", "Recovery", "Req/s",
                        "Health"],
                       [[log["uuid"]] + ([log.get("device") or "-"] if devices else []) +
                        [f"{log['luid']:x}", log["type"], log["state"], _progress(log),
                         log["dirty"], recovery(log), f"{log['requests_per_s']:.1f}",
                         log["health"]]
                        for log in logs[:SHOWN_LOGS]], right={5 + devices, 7 + devices})
        if len(logs) > SHOWN_LOGS:
            lines.append(f"... {len(logs) - SHOWN_LOGS} more logs (shardlog status)")
    return "\n".join(lines)


def _percentile(samples: list[float], percent: int) -> str:
    if not samples:
        return "-"
    if len(samples) == 1:
        return f"{samples[0]:.0f}"
    return f"{statistics.quantiles(samples, n=100, method='inclusive')[percent - 1]:.0f}"


def _progress(log: dict) -> str:
    count = log["region_count"] or 1
    share = log["in_sync"] / count
    filled = round(share * 10)
    return f"[{'#' * filled}{'.' * (10 - filled)}] {share * 100:5.1f}%"
