#!/usr/bin/env python3
"""Benchmark: how long the kernel's requests wait while a server is taken over.

What is measured
----------------
In a private network namespace, ``shardlog serve --workers 2`` serves N ``core`` logs
(created and resumed first), and a simulated-kernel load (``kernelsim.load.run_load``:
the kernel's write path, IN_SYNC x2, MARK, FLUSH, CLEAR, FLUSH, with up to 64 logs'
requests in flight) runs against it without a pause while ``shardlog serve --take-over``
replaces it (handover.py).  Requests that arrive while the old workers commit and exit
and the new ones start wait queued in the shard sockets; each new worker restores a log
from its files at the log's first request.  Reported per log count:

- **longest wait**: the longest any request of the load waited for its reply, over a
  window that holds the whole take-over and the restores after it (every request,
  every take-over; the worst of the rounds, and their median);
- **normal round trip**: the load's p50 and p99 in the same run, before the take-over,
  beside it (the numbers are absolute: a stall is a stall whatever the machine's speed);
- **hand-over**: from starting the new server to the pid file naming it (a Python
  start-up included: requests are served by the old server during most of it);
- resends (a request unanswered for 5 s, re-sent: none expected) and error replies.

With ``--switch-to M`` the take-overs alternate between 2 and M workers (2 → M → 2 ...):
the new server switches to sockets of its own, the old sockets' leftovers handed across
(handover.py), and every log moves to the shard of its new count.

    .venv/bin/python scripts/bench_takeover.py [--logs 10,1000,10000] [--rounds 3]
                                               [--switch-to M] [--state-dir DIR]

Needs root (a private network namespace).  DIR (default: a temporary directory under the
current one) should be on the filesystem the state directory would be on.  The exit code
is 0 whatever the figures; non-zero only when the benchmark itself fails (a take-over
refused, a server that does not start, a request answered with an error).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

from shardlog.harness.kernelsim import LoadResult, log_streams, run_load
from shardlog.harness.kernelsim.connector import RawLink
from shardlog.harness.kernelsim.serveprocess import ServeProcess
from shardlog.harness.netns import enter_or_say_why
from shardlog.server.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

LOAD_PORT = 0x7A6B
WORKERS = 2
IN_FLIGHT = 64
CTR = "8192 core 8 nosync"  # 1,024 regions: a small instance file per log
BEFORE = 1.0  # seconds of load before the take-over starts
AFTER = 2.0  # seconds of load after the old server exited (the restores happen here)


class BenchError(Exception):
    pass


def open_logs(sock, uuids: list[str]) -> None:
    """CTR and RESUME for every log, a window of them in flight at once."""
    sock.settimeout(10.0)
    seq, window = 1 << 31, 256
    pending: dict[int, tuple[T, str]] = {}
    todo = [(T.CTR, uuid, CTR.encode()) for uuid in uuids]
    resumes = [(T.RESUME, uuid, b"") for uuid in uuids]
    for batch in (todo, resumes):
        queue = list(batch)
        while queue or pending:
            while queue and len(pending) < window:
                request_type, uuid, data = queue.pop()
                with suppress(ConnectionRefusedError):
                    sock.sendto(protocol.encode_request(request_type, seq=seq, uuid=uuid,
                                                        luid=1, data=data),
                                (0, GROUP_7_MASK))
                pending[seq] = (request_type, uuid)
                seq += 1
            try:
                reply = protocol.decode_reply(sock.recv(65536))
            except TimeoutError as exc:
                raise BenchError(f"{len(pending)} requests unanswered while opening logs") \
                    from exc
            what = pending.pop(reply.seq, None)
            if what is not None and reply.error:
                raise BenchError(f"{what[0].name} for {what[1]}: error {reply.error}")


def longest_ms(result: LoadResult) -> float:
    return max((ns for values in result.latencies_ns.values() for ns in values),
               default=0) / 1e6


def one_size(base: Path, logs: int, rounds: int, switch_to: int | None = None) -> dict:
    run_dir = base / f"logs-{logs}"
    run_dir.mkdir()
    server = ServeProcess(run_dir / "state", workers=WORKERS, test_peer=LOAD_PORT,
                          log_level="warning", run_dir=run_dir).start()
    sock = open_connector_socket(LOAD_PORT, receive_buffer=32 << 20)
    servers = [server]
    try:
        uuids = [f"bench-{n}" for n in range(logs)]
        opened = time.monotonic()
        open_logs(sock, uuids)
        print(f"  {logs} logs created and resumed in {time.monotonic() - opened:.1f} s",
              flush=True)
        streams = log_streams([(uuid, 1) for uuid in uuids], "write")
        in_flight = min(IN_FLIGHT, logs)
        # One seq counter for the whole run, as the kernel's: a take-over to another
        # worker count drops a request whose seq repeats a leftover's as its copy.
        link = RawLink(sock, 0)
        baseline = run_load(link, streams, in_flight=in_flight, duration=1.0)
        waits, hand_overs, resends, errors = [], [], 0, 0
        for round_number in range(1, rounds + 1):
            window = _LoadWindow(link, streams, in_flight)
            window.start()
            time.sleep(BEFORE)
            started = time.monotonic()
            # With --switch-to, odd rounds go to the other count and even ones back.
            workers = switch_to if switch_to is not None and round_number % 2 else WORKERS
            successor = server.take_over(extra=("--workers", str(workers)))
            servers.append(successor)
            code = server.process.wait(60)
            hand_over = time.monotonic() - started
            if code != 0:
                raise BenchError(f"the old server exited {code}:\n{server.log[-2000:]}")
            server = successor
            time.sleep(AFTER)
            result = window.finish()
            wait = longest_ms(result)
            waits.append(wait)
            hand_overs.append(hand_over * 1e3)
            resends += result.resends
            errors += sum(result.errors.values())
            print(f"  round {round_number}/{rounds}: longest wait {wait:7.1f} ms, "
                  f"hand-over {hand_over * 1e3:6.0f} ms, {result.requests} requests, "
                  f"{result.resends} resends, {sum(result.errors.values())} errors",
                  flush=True)
        return {"logs": logs, "longest_ms": max(waits), "median_longest_ms":
                statistics.median(waits), "p50_us": baseline.p50(), "p99_us": baseline.p99(),
                "hand_over_ms": statistics.median(hand_overs), "resends": resends,
                "errors": errors}
    finally:
        sock.close()
        for each in servers:
            each.close()


class _LoadWindow:
    """run_load in a thread for as long as the take-over takes: it runs in slices of
    0.2 s back to back (each slice waits for its last replies), and the slices' results
    are merged, so that the window ends when asked, not at a guessed duration."""

    SLICE = 0.2

    def __init__(self, link: RawLink, streams, in_flight: int):
        self.link, self.streams, self.in_flight = link, streams, in_flight
        self.results: list[LoadResult] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.results.append(run_load(self.link, self.streams,
                                             in_flight=self.in_flight,
                                             duration=self.SLICE))
        except BaseException as exc:  # re-raised by finish()
            self.failure = exc

    def finish(self) -> LoadResult:
        self.stop.set()
        self.thread.join(120)
        if self.failure is not None:
            raise BenchError(f"the load failed: {self.failure}") from self.failure
        merged: dict[str, list[int]] = {}
        errors: dict[str, int] = {}
        for result in self.results:
            for name, values in result.latencies_ns.items():
                merged.setdefault(name, []).extend(values)
            for name, count in result.errors.items():
                errors[name] = errors.get(name, 0) + count
        return LoadResult(merged, sum(r.requests for r in self.results),
                          sum(r.elapsed for r in self.results), errors,
                          resends=sum(r.resends for r in self.results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", default="10,1000,10000",
                        help="log counts, comma-separated (default 10,1000,10000)")
    parser.add_argument("--rounds", type=int, default=3, help="take-overs per log count")
    parser.add_argument("--state-dir", type=Path, help="where the runs' directories go")
    parser.add_argument("--switch-to", type=int, metavar="M",
                        help=f"alternate between {WORKERS} and M workers at each take-over")
    args = parser.parse_args()
    if not enter_or_say_why("bench_takeover"):
        return 1
    base = Path(tempfile.mkdtemp(prefix="bench-takeover-", dir=args.state_dir or Path.cwd()))
    rows = []
    try:
        for logs in (int(n) for n in args.logs.split(",")):
            counts = (f"{WORKERS} <-> {args.switch_to}" if args.switch_to is not None
                      else f"{WORKERS}")
            print(f"{logs} logs, {counts} workers, write path, up to {IN_FLIGHT} in flight:",
                  flush=True)
            rows.append(one_size(base, logs, args.rounds, args.switch_to))
    except BenchError as exc:
        print(f"bench_takeover: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'logs':>6} {'longest wait':>13} {'median of rounds':>17} "
          f"{'normal p50':>11} {'normal p99':>11} {'hand-over':>10} {'resends':>8}")
    for row in rows:
        print(f"{row['logs']:>6} {row['longest_ms']:>10.1f} ms {row['median_longest_ms']:>14.1f}"
              f" ms {row['p50_us']:>8.0f} us {row['p99_us']:>8.0f} us "
              f"{row['hand_over_ms']:>7.0f} ms {row['resends']:>8}")
    if any(row["errors"] for row in rows):
        print("bench_takeover: requests were answered with errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
