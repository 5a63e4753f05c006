"""Fuzz shardlog: inputs through the codec and the log table in one process, then through a
live `shardlog serve` in a private network namespace.

What is sent and what counts as a defect: shardlog/fuzzing.py.  Prints inputs/s, the
answers by errno and every defect with its datagram in hex; exits 1 if there was any.

    sudo .venv/bin/python scripts/fuzz.py                    # 1,000,000 + 50,000 inputs
    sudo .venv/bin/python scripts/fuzz.py --inputs 2000 --live 300 --seed 7

The in-process part needs no privileges; the live part needs root (a private network
namespace, where the server takes requests from the fuzzer's port: --test-peer).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

from shardlog.harness.fuzzing import Inputs, LiveFuzzer, TableFuzzer, format_tally
from shardlog.harness.kernelsim.serveprocess import ServeProcess
from shardlog.harness.netns import enter_or_say_why
from shardlog.server.nlsocket import open_connector_socket

PEER_PORT = 0x7E57


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000,
                        help="inputs through the codec and the log table (default 1,000,000)")
    parser.add_argument("--live", type=int, default=50_000,
                        help="inputs through a live server (default 50,000; 0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="the live server's workers")
    parser.add_argument("--state-dir", type=Path,
                        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the temporary state directories go (default /dev/shm: "
                             "what is fuzzed is logic, not the disk's speed)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="shardlog-fuzz-", dir=args.state_dir))
    try:
        device = scratch / "logdev"  # disk logs' device: a file of 1 MiB
        device.write_bytes(bytes(1 << 20))
        defects = 0
        if args.inputs:
            (scratch / "table").mkdir()
            fuzzer = TableFuzzer(scratch / "table", Inputs(random.Random(args.seed), device))
            try:
                tally = fuzzer.run(args.inputs)
            finally:
                fuzzer.close()
            print(format_tally("codec + log table, in process", tally), flush=True)
            defects += tally.defect_count
        if args.live:
            tally = run_live(args, scratch, device)
            if tally is None:
                return 1
            print(format_tally(f"live `shardlog serve --workers {args.workers}`", tally))
            defects += tally.defect_count
        print(f"seed {args.seed}: {defects} defects")
        return 1 if defects else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_live(args: argparse.Namespace, scratch: Path, device: Path):
    if not enter_or_say_why("fuzz.py (the live part; --live 0 skips it)"):
        return None
    server = ServeProcess(scratch / "served", workers=args.workers, test_peer=PEER_PORT,
                          log_level="warning").start()
    sock = open_connector_socket(PEER_PORT, receive_buffer=4 << 20)
    try:
        fuzzer = LiveFuzzer(sock, Inputs(random.Random(args.seed + 1), device),
                            server_alive=lambda: server.process.poll() is None,
                            server_log=lambda: server.log)
        return fuzzer.run(args.live)
    finally:
        sock.close()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
