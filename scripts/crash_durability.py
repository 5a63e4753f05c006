"""Crash durability at scale: SIGKILL a whole `shardlog serve` at random moments under load,
and check every acknowledged mark in the files and after each restart.

How (shardlog/harness/kernelsim/crashload.py): core and disk logs, each with a request in flight
at all times (integrated FLUSHes, MARK + FLUSH, CLEARs); at a random moment the front and
every worker are SIGKILLed at once; every mark an answered FLUSH covered (and no CLEAR
since) must be dirty in the instance file or on the log device, and answered dirty
(IS_CLEAN 0) by the restarted server, with no resync forced.  Exits 1 on any problem.

    sudo .venv/bin/python scripts/crash_durability.py                # 100 kills
    sudo .venv/bin/python scripts/crash_durability.py --kills 3 --logs 4

Needs root: the server runs in a private network namespace with --test-peer.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shardlog.harness.kernelsim.crashload import CrashCampaign
from shardlog.harness.netns import enter_or_say_why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs (default 100)")
    parser.add_argument("--logs", type=int, default=8,
                        help="logs under load, every fourth a disk log (default 8)")
    parser.add_argument("--regions", type=int, default=4096, help="regions per log")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-load-seconds", type=float, default=1.0,
                        help="the kill comes 0.05 s to this long into each round's load")
    parser.add_argument("--state-dir", type=Path, default=Path("."),
                        help="where the temporary state directory goes (default: the "
                             "current directory)")
    args = parser.parse_args()
    if not enter_or_say_why("crash_durability.py"):
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="shardlog-crash-", dir=args.state_dir))
    started = time.monotonic()
    try:
        campaign = CrashCampaign(run_dir, logs=args.logs, workers=args.workers,
                                 regions=args.regions, seed=args.seed,
                                 progress=lambda line: print(line, flush=True))
        result = campaign.run(args.kills, load_seconds=(0.05, args.max_load_seconds))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{result.rounds} SIGKILLs of the whole server under load in "
          f"{time.monotonic() - started:.0f} s ({result.requests:,} requests): "
          f"{result.acknowledged:,} marks acknowledged by FLUSH replies; "
          f"{result.checked_in_files:,} checks of an acknowledged mark in the files and "
          f"{result.checked_after_restart:,} after a restart passed; "
          f"{len(result.problems)} problems")
    for problem in result.problems[:20]:
        print(f"  {problem}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
