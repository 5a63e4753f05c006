#!/usr/bin/env python3
"""Benchmark: where a worker's CPU per request goes, against the lean responder.

``bench_kernel.py`` measures shardlog against the lean responder
(shardlog.harness.kernelvm.lean) under fio in the guest, where only IOPS can be read.
This takes the difference apart.  The simulated kernel's serial load (IN_SYNC, one
request in flight: a mirror's requests come one at a time from its one kernel thread)
runs in a private network namespace against, in alternating rounds:

- **lean**: the lean responder's loop — a blocking read, ``lean.answer`` from memory,
  the reply;
- **lean + clock**: the same loop with the two clock reads a worker makes around a
  request (its arrival and its reply, for the latency histogram);
- **lean + wait and clock**: and an epoll wait before the read, as a worker waits
  (it also watches its control pipe);
- **lean + codec and table**: the same loop with shardlog's own decision in place of
  ``lean.answer``: the codec's validating decode, ``LogTable.decide``, the encode;
- **shardlog**: ``shardlog serve --workers 1``: its one worker (the front is idle).

For each it prints the responder process's CPU per request (user + system, from /proc)
and the round trip's p50, and both against lean's in the same round (medians over
rounds).  Run it in the guest too, where bench_kernel's ratios come from and every
instruction costs 20-50x (its clock is the HPET, so each read is a system call):

    .venv/bin/python scripts/bench_responders.py [--rounds N] [--seconds S]
    scripts/kernel-vm run '.venv/bin/python scripts/bench_responders.py'

Needs root (a private network namespace).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_server import (
    LOAD_PORT,
    LOADS,
    LOG_DEVICE,
    LOG_REGIONS,
    UUID_PREFIX,
    Server,
    open_load_socket,
    open_logs,
    streams_for,
)

from shardlog.harness.kernelsim import run_load
from shardlog.harness.kernelsim.echo import expect_listeners, wait_for_no_listener
from shardlog.harness.kernelvm import lean
from shardlog.harness.netns import enter_or_say_why
from shardlog.harness.procstat import cpu_seconds
from shardlog.log.logtable import LogTable
from shardlog.log.outcome import encode
from shardlog.server.nlsocket import group7_listeners, open_connector_socket
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

LOGS = 128
CTR = f"{LOG_REGIONS * 8} core 8 nosync".encode()  # bench_server's core logs
SERIAL = next(load for load in LOADS if load.key == "serial")
CONTENDERS = ("lean", "lean + clock", "lean + wait and clock", "lean + codec and table",
              "shardlog")


def log_names() -> list[str]:
    return [f"{UUID_PREFIX}-{n:04d}" for n in range(LOGS)]  # bench_server's names


def lean_answerer(logs: list[str]) -> Callable[[bytes], bytes]:
    """lean.answer, its logs created."""
    table: dict = {}
    for uuid in logs:
        lean.answer(table, protocol.encode_request(T.CTR, seq=1, uuid=uuid, luid=1, data=CTR))
    return lambda datagram: lean.answer(table, datagram)


def shardlog_answerer(logs: list[str], state_dir: Path) -> Callable[[bytes], bytes]:
    """What a worker does for a request between its read and its reply, sockets and
    bookkeeping aside: decode, decide, encode."""
    table = LogTable(state_dir)
    for uuid in logs:
        for request_type, data in ((T.CTR, CTR), (T.RESUME, b"")):
            table.answer(protocol.decode_datagram(protocol.encode_request(
                request_type, seq=1, uuid=uuid, luid=1, data=data)))
    decode, decide = protocol.decode_datagram, table.decide

    def answer(datagram: bytes) -> bytes:
        request = decode(datagram)
        return encode(request, decide(request))

    return answer


def respond(contender: str, logs: list[str], state_dir: Path) -> None:
    """The responder process: answer the load until killed (its logs are made before it
    joins group 7, which is how its parent knows it is ready)."""
    if contender == "lean + codec and table":
        answer = shardlog_answerer(logs, state_dir)
    else:
        answer = lean_answerer(logs)
    sock = open_connector_socket(receive_buffer=32 << 20, join_group_7=True)
    buffer = bytearray(4096)
    view = memoryview(buffer)
    address = (LOAD_PORT, 0)
    clock = time.monotonic_ns
    if contender == "lean + clock":
        while True:
            count, _sender = sock.recvfrom_into(buffer)
            clock()
            sock.sendto(answer(bytes(view[:count])), address)
            clock()
    if contender != "lean + wait and clock":
        while True:
            count, _sender = sock.recvfrom_into(buffer)
            sock.sendto(answer(bytes(view[:count])), address)
    control_read, _control_write = os.pipe()  # watched, as a worker watches its orders
    wakeup = select.epoll()
    wakeup.register(sock.fileno(), select.EPOLLIN)
    wakeup.register(control_read, select.EPOLLIN)
    sock.setblocking(False)
    while True:
        wakeup.poll(-1)
        count, _sender = sock.recvfrom_into(buffer)
        clock()
        sock.sendto(answer(bytes(view[:count])), address)
        clock()


@contextmanager
def responding(contender: str, logs: list[str], run_dir: Path, load) -> Iterator[int]:
    """The contender in group 7 (the only member) meanwhile: its responding pid."""
    if contender == "shardlog":
        server = Server(run_dir, 1, LOAD_PORT).start()
        try:
            open_logs(load, logs, server.state_dir / LOG_DEVICE)
            yield server.pids()["workers"][0]
            server.stop()
        finally:
            server.kill()
        return
    pid = os.fork()
    if pid == 0:
        try:
            respond(contender, logs, run_dir)
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 60  # slow under emulation
        while not group7_listeners(exclude_port=LOAD_PORT):
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                raise RuntimeError(f"{contender} did not join connector group 7")
            time.sleep(0.05)
        expect_listeners(contender, LOAD_PORT)
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        wait_for_no_listener(LOAD_PORT)


def measure(rounds: int, seconds: float, base_dir: Path) -> dict[str, list[tuple]]:
    """Per contender, one (CPU µs per request, p50 µs) per round."""
    logs = log_names()
    streams = streams_for(SERIAL, logs, 0)
    results: dict[str, list[tuple]] = {name: [] for name in CONTENDERS}
    load = open_load_socket()
    try:
        for number in range(1, rounds + 1):
            for index, contender in enumerate(CONTENDERS):
                run_dir = base_dir / f"round-{number}-{index}"
                run_dir.mkdir()
                with responding(contender, logs, run_dir, load) as pid:
                    run_load(load, streams, in_flight=1, count=500)  # warm-up
                    before = cpu_seconds({"r": [pid]})["r"]
                    result = run_load(load, streams, in_flight=1, duration=seconds)
                    cpu = cpu_seconds({"r": [pid]})["r"] - before
                if result.errors or result.resends:
                    raise RuntimeError(f"{contender}: errors {result.errors}, "
                                       f"{result.resends} resends")
                measured = (cpu * 1e6 / result.requests, result.p50())
                results[contender].append(measured)
                print(f"  round {number}/{rounds} {contender:<24} CPU {measured[0]:7.1f} µs"
                      f"  p50 {measured[1]:7.1f} µs", flush=True)
    finally:
        load.close()
    return results


def report(results: dict[str, list[tuple]]) -> None:
    lean_rounds = results["lean"]
    print("\nserial IN_SYNC, medians over rounds (ratios: each round against lean's)")
    print(f"{'responder':<24} {'CPU/request':>12} {'vs lean':>8} {'p50':>10} {'vs lean':>8}")
    for contender in CONTENDERS:
        rounds = results[contender]
        cpu = statistics.median(r[0] for r in rounds)
        p50 = statistics.median(r[1] for r in rounds)
        cpu_ratio = statistics.median(r[0] / b[0] for r, b in zip(rounds, lean_rounds,
                                                                  strict=True))
        p50_ratio = statistics.median(r[1] / b[1] for r, b in zip(rounds, lean_rounds,
                                                                  strict=True))
        print(f"{contender:<24} {cpu:>9.1f} µs {cpu_ratio:>7.2f}x {p50:>7.1f} µs "
              f"{p50_ratio:>7.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per contender and round")
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the runs' state directories go (default: the "
                             "temporary directory)")
    args = parser.parse_args()
    if not enter_or_say_why("bench_responders"):
        return 1
    with tempfile.TemporaryDirectory(dir=args.state_dir) as base:
        report(measure(args.rounds, args.seconds, Path(base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
