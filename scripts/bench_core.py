#!/usr/bin/env python3
"""Benchmark: the cost of answering one request in-process, against a minimal echo.

The baseline, measured in the same run, is the least any responder must do: split the
datagram's headers with one ``struct`` call and echo the 160-byte request header back
with an 8-byte answer.  shardlog's path is a worker's (worker.py) minus the sockets and
the counting: decode and validate the datagram, decide its outcome in the log table
(a FLUSH that stages a commit is a batch of one: committed at once), encode the exact
reply.
The FLUSH with a new mark is a core log's, which commits with no syscall (design.md).

    .venv/bin/python scripts/bench_core.py [--seconds S] [--state-dir DIR]

Prints per-request times and their ratios to the baseline; these machines are noisy, so
only the ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shardlog.log.logtable import LogTable
from shardlog.log.outcome import encode
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

UUID = "bench-uuid-0001"
REGIONS = 65536
TARGET = 4.0  # issue 12: each request type at most 4x the minimal echo


def timed(fn: Callable[[], object], seconds: float, batch: int) -> float:
    """Median seconds per call over repeated batches."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--state-dir", type=Path, help="default: a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.state_dir) as state:
        run(Path(state), args.seconds)


def run(state_dir: Path, seconds: float) -> None:
    table = LogTable(state_dir)
    seq = iter(range(1, 1 << 31))

    def request(request_type: T, data: bytes = b"") -> bytes:
        return protocol.encode_request(request_type, seq=next(seq), uuid=UUID, luid=1, data=data)

    for raw in (request(T.CTR, f"{REGIONS * 8} core 8 nosync".encode()), request(T.RESUME)):
        assert protocol.decode_reply(table.answer(protocol.decode_datagram(raw))).error == 0

    headers = struct.Struct("=IHHIIIIIIHH")
    answer = protocol.pack_bool(True)

    def minimal_echo(raw: bytes) -> bytes:
        headers.unpack_from(raw, 0)
        return raw[:16] + raw[16:36] + raw[36:196] + answer

    decode, decide, commit_staged = protocol.decode_datagram, table.decide, table.commit_staged

    def shardlog_path(raw: bytes) -> bytes:
        request = decode(raw)
        outcome = decide(request)
        if outcome is None:
            (outcome,) = commit_staged()
        return encode(request, outcome)

    in_sync = request(T.IN_SYNC, protocol.pack_u64(77))
    mark = request(T.MARK_REGION, protocol.pack_regions([77]))
    clear = request(T.CLEAR_REGION, protocol.pack_regions([77]))
    empty_flush = request(T.FLUSH)
    baseline = timed(lambda: minimal_echo(in_sync), seconds, 20000)
    print(f"baseline (minimal echo, in-process):   {baseline * 1e6:7.2f} µs")
    def mark_then_clear() -> None:  # each one changes a bit: neither is a no-op
        shardlog_path(mark)
        shardlog_path(clear)

    rows = [
        ("IN_SYNC", lambda: shardlog_path(in_sync), 20000, 1),
        ("MARK_REGION / CLEAR_REGION", mark_then_clear, 10000, 2),
        ("FLUSH, nothing new", lambda: shardlog_path(empty_flush), 20000, 1),
    ]
    for name, fn, batch, requests in rows:
        cost = timed(fn, seconds, batch) / requests
        print(f"shardlog {name:<28}  {cost * 1e6:7.2f} µs  {cost / baseline:5.1f}x baseline")

    # A FLUSH that carries a new mark: a core log commits it with no syscall (design.md).
    # Every one marks a region not marked before, built ahead so that the timing holds
    # only what the server does.
    flushes = iter([request(T.FLUSH, protocol.pack_regions([r])) for r in range(REGIONS)])
    flush = timed(lambda: shardlog_path(next(flushes)), min(seconds, REGIONS * baseline / 8),
                  200)
    print(f"shardlog {'FLUSH with a new mark (core)':<28}  {flush * 1e6:7.2f} µs  "
          f"{flush / baseline:5.1f}x baseline")
    print(f"\ntarget: IN_SYNC, MARK, CLEAR and an empty FLUSH each <= {TARGET:g}x baseline")


if __name__ == "__main__":
    main()
