#!/usr/bin/env python3
"""Benchmark: the whole server (`shardlog serve`) against a minimal netlink echo peer.

What is measured
----------------
Both servers are driven over a real connector socket by the same simulated-kernel load
(``shardlog.harness.kernelsim.load.run_load``), in a private network namespace:

- **echo peer** — the cost of any server at all: one forked process in connector group
  7 that answers every request with a full reply of its type's exact size (zero payload,
  error 0), patched into the receive buffer in place;
- **shardlog** — ``python -m shardlog.cli serve --workers 2`` with its state directory
  on disk, 128 ``core`` logs (nosync) and one ``disk`` log (its log device a regular
  file in the state directory) created and resumed before any timing.

Loads, the same for both:

(a) IN_SYNC, serial (1 in flight), across all logs: the request reads and writes ask
    most, and the latency target (p50 at most 1.3x the echo round trip);
(b) the kernel's write path (IN_SYNC x2, MARK, FLUSH, CLEAR, FLUSH per write) with 64
    logs' requests in flight: the throughput target (at least 0.8x the echo peer's);
(c) the read path (IN_SYNC) with 64 in flight: for information;
(d) integrated FLUSHes of a ``core`` log, serial, each carrying a region never marked
    before: p50 at most 1.3x the echo peer's (a core log's FLUSH makes no syscall:
    design.md);
(e) the same on the ``disk`` log, where every FLUSH writes and syncs its log device: at
    most 50 us over a *bare* write of one 4 KiB block + fdatasync of a file in the same
    state directory, measured in the same round around the load (the echo peer's
    FLUSH is shown, but is not the baseline).

Why ratios: these 2-core machines are noisy (other jobs, frequency changes) and a figure
in requests/s from one run says little about the next.  So every figure is set against
a baseline measured in the same run: the servers take turns for several rounds (echo
then shardlog, then shardlog then echo, ...), only one of them subscribed to group 7 at
a time, each round's ratio is taken against the same round's echo half, and the medians
of those ratios are reported, so that drift hits both sides.  A server run holds three
processes (front + 2 workers) and the load generator a fourth, on 2 cores: the
throughput ratio includes that contention.  On a VM the serial round trip itself is
bimodal: waking a process on an idle (halted) vCPU costs tens of microseconds, on a busy
one a few, so the serial ratio depends on what else the machine runs; the rounds show
it.

    .venv/bin/python scripts/bench_server.py [--quick] [--rounds N] [--seconds S]
        [--flushes N] [--logs N] [--workers N] [--state-dir DIR] [--json FILE] [--trace]

``--trace`` keeps a ``shardlog trace`` client attached to every shardlog round (its
output thrown away): the cost of tracing every request, the tracer's CPU included (its
own row, "tracer", in the CPU per request).

Needs root (a private network namespace).  DIR (default: a temporary directory under
the current one) must be on a disk-backed filesystem: on tmpfs fdatasync costs nothing
and the disk FLUSH comparison means little.  The exit code is 0 whether or not the targets are
met (this is a measurement, not a test); non-zero only when the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from shardlog.harness.hostinfo import describe, filesystem_of, machine
from shardlog.harness.kernelsim import LoadResult, Stream, log_streams, run_load
from shardlog.harness.kernelsim.echo import (
    PeerError,
    expect_listeners,
    running_echo_peer,
    wait_for_no_listener,
)
from shardlog.harness.kernelsim.serveprocess import ServeFailed, ServeProcess
from shardlog.harness.netns import enter_or_say_why
from shardlog.harness.procstat import cpu_seconds, server_processes
from shardlog.server.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

RCVBUF = 32 << 20
LOAD_PORT = 0x6B73  # the simulated kernel's socket; the server's --test-peer
UUID_PREFIX = "bench"
FLUSH_UUIDS = {"flush": "bench-flush", "diskflush": "bench-diskflush"}
LOG_REGIONS = 1024
FLUSH_REGIONS = 1 << 20  # room for every FLUSH of a round to mark a region of its own
LOG_DEVICE = "bench-log-device"  # the disk log's device: a file in the state directory
BLOCK = 4096


class BenchError(Exception):
    """The benchmark could not measure (not: a target was missed)."""


# --- the loads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    key: str
    title: str
    in_flight: int
    kind: str  # "read", "write", or "flush" / "diskflush" (FLUSH walking new regions)
    target: str  # what the ratio compares, see verdicts()


LOADS = (
    Load("serial", "(a) IN_SYNC, serial", 1, "read", "p50"),
    Load("write64", "(b) write path, 64 in flight", 64, "write", "throughput"),
    Load("read64", "(c) read path, 64 in flight", 64, "read", "info"),
    Load("flush", "(d) core FLUSH + new mark", 1, "flush", "p50"),
    Load("diskflush", "(e) disk FLUSH + new mark", 1, "diskflush", "bare sync"),
)
FLUSH_KINDS = ("flush", "diskflush")


@dataclass
class Settings:
    rounds: int
    seconds: float  # per timed load (a)-(c)
    warmup: int  # requests sent before each timed load, not counted
    flushes: int  # FLUSHes per round and log type (and as many bare syncs)
    logs: int
    workers: int
    trace: bool = False  # a `shardlog trace` client attached to every shardlog round


@dataclass
class Measured:
    """One load on one server in one round."""

    requests_per_second: float
    p50_us: float
    p99_us: float
    requests: int
    p50_by_type_us: dict[str, float] = field(default_factory=dict)
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)


def measured(result: LoadResult, cpu: dict[str, float]) -> Measured:
    if result.errors or result.resends:
        raise BenchError(f"the load saw errors {result.errors} and {result.resends} resends")
    return Measured(
        requests_per_second=result.requests_per_second,
        p50_us=result.p50(), p99_us=result.p99(), requests=result.requests,
        p50_by_type_us={name: result.p50(name) for name in sorted(result.latencies_ns)},
        cpu_us_per_request={name: seconds * 1e6 / result.requests
                            for name, seconds in cpu.items()})


def streams_for(load: Load, logs: Sequence[str], flushes: int) -> list[Stream]:
    if load.kind in FLUSH_KINDS:
        # One log, a FLUSH per region never marked before: every one must commit.
        cycle = [(T.FLUSH, protocol.pack_regions([region])) for region in range(flushes)]
        return [Stream.build(FLUSH_UUIDS[load.kind], 1, cycle)]
    # Every log its own region, so that the logs' bitmaps are not all alike.
    return [log_streams([(uuid, 1)], load.kind, regions=(index % LOG_REGIONS,))[0]
            for index, uuid in enumerate(logs)]


def run_one(sock: socket.socket, load: Load, streams: list[Stream], settings: Settings,
            cpu_of: Callable[[], dict[str, float]]) -> Measured:
    if load.kind in FLUSH_KINDS:
        # No warm-up: it would mark regions, and wrapping around would flush nothing new.
        cpu_before = cpu_of()
        result = run_load(sock, streams, in_flight=1, count=settings.flushes)
    else:
        run_load(sock, streams, in_flight=load.in_flight, count=settings.warmup)
        cpu_before = cpu_of()
        result = run_load(sock, streams, in_flight=load.in_flight, duration=settings.seconds)
    cpu_after = cpu_of()
    return measured(result, {name: cpu_after[name] - cpu_before.get(name, 0.0)
                             for name in cpu_after})


# --- shardlog --------------------------------------------------------------------------


class Server(ServeProcess):
    """``shardlog serve`` for one round: the only server in group 7 while it runs (one
    socket per worker)."""

    def __init__(self, run_dir: Path, workers: int, peer: int):
        super().__init__(run_dir / "state", workers=workers, test_peer=peer,
                         log_level="warning", run_dir=run_dir)
        self.workers = workers

    def start(self, timeout: float = 30.0) -> Server:
        super().start(timeout)
        expect_listeners("shardlog", LOAD_PORT, self.workers)
        return self

    def pids(self) -> dict[str, list[int]]:
        """The front and its workers (its children)."""
        assert self.process is not None
        return server_processes(self.process.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as systemd does; it must commit every log and exit 0."""
        code = super().stop(timeout)
        if code != 0:
            tail = "\n".join(self.log.splitlines()[-20:])
            raise BenchError(f"shardlog serve exited {code} after SIGTERM:\n{tail}")
        wait_for_no_listener(LOAD_PORT)
        return code


def ask(sock: socket.socket, seq: int, request_type: T, uuid: str,
        data: bytes = b"") -> None:
    """One request, outside any timing; its reply must say 0."""
    with suppress(ConnectionRefusedError):  # no kernel at port 0 in this namespace
        sock.sendto(protocol.encode_request(request_type, seq=seq, uuid=uuid, luid=1,
                                            data=data), (0, GROUP_7_MASK))
    while True:
        try:
            reply = protocol.decode_reply(sock.recv(65536))
        except TimeoutError as exc:
            raise BenchError(f"no reply to {request_type.name} for {uuid}") from exc
        if reply.seq == seq:
            if reply.error:
                raise BenchError(f"{request_type.name} for {uuid}: error {reply.error}")
            return


def open_logs(sock: socket.socket, logs: Sequence[str], log_device: Path) -> None:
    """The core logs, the core log of the FLUSH load and the disk log of the disk FLUSH
    load (its device a zeroed file: the kernel's disk log layout is written at RESUME)."""
    sock.settimeout(10.0)
    with open(log_device, "wb") as device:
        device.truncate(1 << 20)
    seq = 1 << 31  # far from run_load's seqs, which start at 0
    core = [(uuid, f"{LOG_REGIONS * 8} core 8 nosync") for uuid in logs]
    for uuid, ctr in [*core, (FLUSH_UUIDS["flush"], f"{FLUSH_REGIONS * 8} core 8 nosync"),
                      (FLUSH_UUIDS["diskflush"],
                       f"{FLUSH_REGIONS * 8} disk {log_device} 8 nosync")]:
        ask(sock, seq, T.CTR, uuid, ctr.encode())
        ask(sock, seq + 1, T.RESUME, uuid)
        seq += 2


# --- the bare sync -----------------------------------------------------------------------


def bare_sync_ns(directory: Path, count: int) -> list[int]:
    """Latencies of: write one 4 KiB block of a file, fdatasync it (what a disk log's
    FLUSH of one new mark must do when its device is a file on this filesystem)."""
    probe = directory / "sync-probe"
    with open(probe, "wb") as f:
        f.write(bytes(1 << 20))  # allocated, not sparse: as a log device
    fd = os.open(probe, os.O_RDWR)
    block = bytearray(BLOCK)
    try:
        now_ns = time.perf_counter_ns
        samples = []
        for n in range(count):
            start = now_ns()
            block[n % BLOCK] = (n & 0xFF) ^ 0x5A
            os.pwrite(fd, block, (n % 256) * BLOCK)
            os.fdatasync(fd)
            samples.append(now_ns() - start)
        return samples
    finally:
        os.close(fd)
        probe.unlink()


def percentile_us(samples_ns: list[int], q: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[max(1, -(-len(ordered) * q // 100)) - 1] / 1000


# --- one run -----------------------------------------------------------------------------


@dataclass
class Rounds:
    """Per server (and the bare sync), per load key: one Measured per round."""

    echo: dict[str, list[Measured]] = field(default_factory=dict)
    shardlog: dict[str, list[Measured]] = field(default_factory=dict)
    bare_sync: list[Measured] = field(default_factory=list)


def open_load_socket() -> socket.socket:
    return open_connector_socket(LOAD_PORT, receive_buffer=RCVBUF)


def measure(base_dir: Path, settings: Settings) -> Rounds:
    logs = [f"{UUID_PREFIX}-{n:04d}" for n in range(settings.logs)]
    streams = {load.key: streams_for(load, logs, settings.flushes) for load in LOADS}
    rounds = Rounds()
    sock = open_load_socket()
    try:
        for number in range(1, settings.rounds + 1):
            # The order alternates, so that a drift inside a round falls on both sides.
            halves = (echo_round, shardlog_round)
            for half in halves if number % 2 else reversed(halves):
                half(number, sock, streams, logs, settings, base_dir, rounds)
    finally:
        sock.close()
    return rounds


def echo_round(number: int, sock: socket.socket, streams: dict, logs: list[str],
               settings: Settings, base_dir: Path, rounds: Rounds) -> None:
    """One round's loads against the minimal echo peer."""
    with running_echo_peer(LOAD_PORT) as pid:
        results = {}
        for load in LOADS:
            results[load.key] = run_one(sock, load, streams[load.key], settings,
                                        partial(cpu_seconds, {"peer": [pid]}))
    record(rounds.echo, results)
    report_round(number, settings.rounds, "echo", results)


def shardlog_round(number: int, sock: socket.socket, streams: dict, logs: list[str],
                   settings: Settings, base_dir: Path, rounds: Rounds) -> None:
    """One round's loads against a fresh ``shardlog serve`` (and, around its disk FLUSH
    load, the bare syncs it is set against)."""
    run_dir = base_dir / f"round-{number}"
    run_dir.mkdir()
    server = Server(run_dir, settings.workers, LOAD_PORT)
    tracer = None
    try:
        server.start()
        open_logs(sock, logs, server.state_dir / LOG_DEVICE)
        processes = server.pids()
        if settings.trace:
            tracer = attach_tracer(server)
            processes["tracer"] = [tracer.pid]  # what tracing costs includes its client
        results = {}
        sync_ns: list[int] = []
        sync_cpu = 0.0
        for load in LOADS:
            bracketed = load.kind == "diskflush"  # between two runs of bare syncs
            if bracketed:
                sync_cpu -= cpu_seconds({})["load"]
                sync_ns += bare_sync_ns(server.state_dir, settings.flushes // 2)
                sync_cpu += cpu_seconds({})["load"]
            results[load.key] = run_one(sock, load, streams[load.key], settings,
                                        partial(cpu_seconds, processes))
            if bracketed:
                sync_cpu -= cpu_seconds({})["load"]
                sync_ns += bare_sync_ns(server.state_dir, settings.flushes // 2)
                sync_cpu += cpu_seconds({})["load"]
        server.stop()
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        server.kill()
    rounds.bare_sync.append(Measured(
        requests_per_second=len(sync_ns) / (sum(sync_ns) / 1e9),
        p50_us=percentile_us(sync_ns, 50), p99_us=percentile_us(sync_ns, 99),
        requests=len(sync_ns),
        cpu_us_per_request={"load": sync_cpu * 1e6 / len(sync_ns)}))
    record(rounds.shardlog, results)
    report_round(number, settings.rounds, "shardlog", results, rounds.bare_sync[-1])


def attach_tracer(server: Server) -> subprocess.Popen:
    """``shardlog trace --json`` on the server's control socket, its lines thrown away:
    what tracing every request costs (--trace), the tracer's own CPU included."""
    tracer = subprocess.Popen(
        [sys.executable, "-m", "shardlog.cli", "trace", "--json", "--socket",
         str(server.control_socket)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = tracer.stderr.readline()
    if "tracing the server" not in line:
        tracer.kill()
        raise BenchError(f"shardlog trace did not start: {line}{tracer.stderr.read()}")
    return tracer


def record(into: dict[str, list[Measured]], results: dict[str, Measured]) -> None:
    for key, result in results.items():
        into.setdefault(key, []).append(result)


def report_round(number: int, total: int, server: str, results: dict[str, Measured],
                 bare_sync: Measured | None = None) -> None:
    parts = [f"{key} {r.requests_per_second:,.0f}/s p50 {r.p50_us:.1f}"
             for key, r in results.items()]
    if bare_sync is not None:
        parts.append(f"bare sync p50 {bare_sync.p50_us:.1f}")
    print(f"  round {number}/{total} {server:<8} " + " | ".join(parts), flush=True)


# --- the report --------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Verdict:
    load: str
    what: str
    value: float
    per_round: list[float]
    target: str
    met: bool | None  # None: for information


def verdicts(rounds: Rounds) -> list[Verdict]:
    """Each round's shardlog figure against the baseline of the same round, then medians."""
    out = []
    for load in LOADS:
        echo, shard = rounds.echo[load.key], rounds.shardlog[load.key]
        if load.target == "p50":
            per_round = [s.p50_us / e.p50_us for e, s in zip(echo, shard, strict=True)]
            value = median(per_round)
            out.append(Verdict(load.key, "p50 shardlog/echo", value, per_round,
                               "<= 1.3x", value <= 1.3))
        elif load.target in ("throughput", "info"):
            per_round = [s.requests_per_second / e.requests_per_second
                         for e, s in zip(echo, shard, strict=True)]
            value = median(per_round)
            met = value >= 0.8 if load.target == "throughput" else None
            out.append(Verdict(load.key, "req/s shardlog/echo", value, per_round,
                               ">= 0.8x" if met is not None else "(info)", met))
        else:
            per_round = [s.p50_us - b.p50_us
                         for b, s in zip(rounds.bare_sync, shard, strict=True)]
            value = median(per_round)
            out.append(Verdict(load.key, "FLUSH p50 - bare sync p50 (us)", value, per_round,
                               "<= +50 us", value <= 50))
    return out


def summary(results: list[Measured]) -> Measured:
    """Medians over rounds, figure by figure."""
    return Measured(
        requests_per_second=median([r.requests_per_second for r in results]),
        p50_us=median([r.p50_us for r in results]),
        p99_us=median([r.p99_us for r in results]),
        requests=sum(r.requests for r in results),
        p50_by_type_us={name: median([r.p50_by_type_us.get(name, float("nan"))
                                      for r in results])
                        for name in results[0].p50_by_type_us},
        cpu_us_per_request={name: median([r.cpu_us_per_request.get(name, 0.0)
                                          for r in results])
                            for name in results[0].cpu_us_per_request})


def print_report(rounds: Rounds, checks: list[Verdict]) -> None:
    head = (f"{'load':<32} {'baseline':<6} {'req/s':>9} {'p50 us':>7} {'p99 us':>7}"
            f"   {'shardlog':>9} {'p50 us':>7} {'p99 us':>7}   {'ratio':>9}"
            f"  {'target':<9} verdict")
    print()
    print("medians over rounds (ratios: the median of each round's ratio):")
    print(head)
    print("-" * len(head))
    for load, check in zip(LOADS, checks, strict=True):
        shard = summary(rounds.shardlog[load.key])
        base, name = summary(rounds.echo[load.key]), "echo"
        if load.target == "bare sync":
            base, name = summary(rounds.bare_sync), "sync"
        ratio = (f"{check.value:+.1f} us" if load.target == "bare sync"
                 else f"{check.value:.2f}x")
        verdict = {True: "PASS", False: "MISS", None: "-"}[check.met]
        print(f"{load.title:<32} {name:<6} {base.requests_per_second:>9,.0f} "
              f"{base.p50_us:>7.1f} {base.p99_us:>7.1f}   "
              f"{shard.requests_per_second:>9,.0f} {shard.p50_us:>7.1f} {shard.p99_us:>7.1f}"
              f"   {ratio:>9}  {check.target:<9} {verdict}")
    echo_flush = summary(rounds.echo["diskflush"])
    print(f"{'    (echo peer answering FLUSH)':<32} {'echo':<6} "
          f"{echo_flush.requests_per_second:>9,.0f} {echo_flush.p50_us:>7.1f} "
          f"{echo_flush.p99_us:>7.1f}")
    print()
    print("per round:")
    for check in checks:
        values = ", ".join(f"{v:.2f}" for v in check.per_round)
        print(f"  {check.load:<8} {check.what:<28} {values}")
    print()
    print("CPU per request, us (of which in the kernel); 'load' is the simulated kernel:")
    for load in LOADS:
        echo = summary(rounds.echo[load.key]).cpu_us_per_request
        shard = summary(rounds.shardlog[load.key]).cpu_us_per_request
        print(f"  {load.key:<8} echo: {cpu_text(echo):<32} shardlog: {cpu_text(shard)}")
    sync_cpu = summary(rounds.bare_sync).cpu_us_per_request["load"]
    print(f"  bare sync (4 KiB write + fdatasync): {sync_cpu:.1f}")
    write = summary(rounds.shardlog["write64"]).p50_by_type_us
    echo_write = summary(rounds.echo["write64"]).p50_by_type_us
    print()
    print("write path p50 by request type (us), echo -> shardlog:")
    print("  " + ", ".join(f"{name} {echo_write.get(name, float('nan')):.0f} -> {v:.0f}"
                           for name, v in write.items()))


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.1f} ({cpu.get(f'{name} sys', 0.0):.1f})"
                     for name, us in cpu.items() if not name.endswith(" sys"))


# --- main --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run (about 20 s), for a smoke test")
    parser.add_argument("--rounds", type=int, help="echo/shardlog rounds (default 5; quick 3)")
    parser.add_argument("--seconds", type=float,
                        help="per timed load and round (default 3; quick 0.8)")
    parser.add_argument("--flushes", type=int,
                        help="FLUSHes per round and log type, as many bare syncs "
                             "(default 2000; quick 500)")
    parser.add_argument("--logs", type=int, default=128, help="core logs (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="shardlog workers (default 2)")
    parser.add_argument("--state-dir", type=Path, default=Path("."),
                        help="where the temporary state directory goes (default: the "
                             "current directory; must be disk-backed, not tmpfs)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the numbers here")
    parser.add_argument("--trace", action="store_true",
                        help="keep a `shardlog trace` client attached to shardlog: the cost "
                             "of tracing every request")
    args = parser.parse_args()
    settings = Settings(
        rounds=args.rounds or (3 if args.quick else 5),
        seconds=args.seconds or (0.8 if args.quick else 3.0),
        warmup=500 if args.quick else 2000,
        flushes=args.flushes or (500 if args.quick else 2000),
        logs=args.logs, workers=args.workers, trace=args.trace)
    if settings.logs < 64 or settings.rounds < 1 or settings.flushes < 2:
        parser.error("need --logs >= 64 (64 in flight), --rounds >= 1, --flushes >= 2")

    if not enter_or_say_why("bench_server"):
        return 2
    host = machine()
    args.state_dir.mkdir(parents=True, exist_ok=True)  # its filesystem is what is measured
    filesystem = filesystem_of(args.state_dir)
    print(f"machine: {describe(host)}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"settings: {settings.rounds} rounds x (echo, shardlog), {settings.seconds:g} s per "
          f"load, {settings.flushes} FLUSHes, {settings.logs} core logs and a disk log, "
          f"{settings.workers} workers; state on {filesystem} ({args.state_dir.resolve()})"
          + ("; shardlog traced by `shardlog trace`" if settings.trace else ""))
    if filesystem in ("tmpfs", "ramfs"):
        print("warning: the state directory is on tmpfs: fdatasync costs nothing there, so "
              "the disk FLUSH comparison means little", file=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_server-", dir=args.state_dir) as base:
        try:
            rounds = measure(Path(base), settings)
        except (BenchError, PeerError, ServeFailed) as exc:
            print(f"bench_server: {exc}", file=sys.stderr)
            return 1
    checks = verdicts(rounds)
    print_report(rounds, checks)
    print(f"\n{time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": host, "command": sys.orig_argv, "filesystem": filesystem,
            "settings": asdict(settings),
            "rounds": {"echo": {k: [asdict(m) for m in v] for k, v in rounds.echo.items()},
                       "shardlog": {k: [asdict(m) for m in v]
                                    for k, v in rounds.shardlog.items()},
                       "bare_sync": [asdict(m) for m in rounds.bare_sync]},
            "verdicts": [asdict(c) for c in checks],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
