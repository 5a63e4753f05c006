#!/usr/bin/env python3
"""fio on real dm-mirror devices: the in-kernel ``core`` and ``disk`` logs against
shardlog's ``userspace`` log, with and without ``integrated_flush``, in one boot.

Run from the checkout: ``.venv/bin/python scripts/bench_kernel.py`` boots the guest
(shardlog.harness.kernelvm) and runs this same script inside it with ``--here`` (which also runs
directly on a host whose kernel has dm-log-userspace, as root).  Every mirror has two
64 MiB legs on loop devices over the guest's tmpfs, 512 KiB regions, ``nosync``;
shardlog runs with ``--workers 2`` and its state directory on tmpfs, its ``disk`` log on
a loop device.  Each workload runs on every log type in turn, round after round
(``--rounds``), so a noisy neighbour hits all of them alike; ratios are taken within a
round against two baselines, and the median over rounds is printed:

- the in-kernel ``disk`` log, the bar shardlog's users compare with;
- the *lean responder* (shardlog.harness.kernelvm.lean): one process answering the kernel from
  memory with ``struct`` alone, the least any userspace log can cost per request.  What
  shardlog costs beyond it is its own code and process shape.

Each round first runs the logs that need no shardlog server (the kernel's, the lean
responder, ``--one-process``), then starts ``shardlog serve`` for its own logs and stops
it: only one userspace server is ever in group 7.

Workloads (fio, libaio, O_DIRECT): 4 KiB random writes at iodepth 1 and 16, 64 KiB
sequential writes at iodepth 4.

Where a write's time goes: the server runs with its metrics on (as by default), and for
each shardlog run the benchmark reads ``shardlog_request_duration_seconds`` before and
after fio.  It prints the requests the kernel sent per write and their mean time inside
shardlog (from the datagram's arrival in a worker to its reply leaving), beside fio's
mean write latency: the rest is the kernel, its wakeups of shardlog and the I/O itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from shardlog.harness.kernelvm import guest
from shardlog.harness.netns import loopback_up
from shardlog.observability.metrics import parse_samples
from shardlog.server.nlsocket import group7_listeners

LEG_SIZE = 64 << 20
REGION_SECTORS = 1024
WORKLOADS = {
    "randwrite-4k-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "randwrite-4k-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "write-64k-qd4": ["--rw=write", "--bs=64k", "--iodepth=4"],
}
LEAN = "lean responder"
# name -> (log type, a userspace log?, integrated_flush)
LOGS = {
    "kernel core": ("core", False, False),
    "kernel disk": ("disk", False, False),
    "shardlog core": ("core", True, False),
    "shardlog core+iflush": ("core", True, True),
    "shardlog disk+iflush": ("disk", True, True),
    LEAN: ("core", True, False),
}
# Diagnostic (--one-process): shardlog's own log table answering on the connector socket
# in one process, no front and no workers: what the process shape costs.
ONE_PROCESS = {"1-process core": ("core", True, False),
               "1-process core+iflush": ("core", True, True)}
# Responders run by the benchmark itself, each in a process of its own while it is
# measured: the command line after this script's path.
RESPONDERS = {LEAN: ["--lean"], **{name: ["--respond"] for name in ONE_PROCESS}}
BASELINE = "kernel disk"
BASELINES = (BASELINE, LEAN)
METRICS_ADDR = "127.0.0.1:9783"  # the guest's loopback
RAMP_SECONDS = 1


def respond(state_dir: Path) -> None:
    """The --one-process diagnostic: requests answered in this one process by shardlog's
    log table, FLUSHes committed before their reply, as a worker does."""
    from shardlog.log.logtable import LogTable
    from shardlog.server.nlsocket import open_connector_socket
    from shardlog.wire import protocol

    state_dir.mkdir(parents=True, exist_ok=True)
    table = LogTable(state_dir)
    sock = open_connector_socket(receive_buffer=32 << 20, join_group_7=True)
    while True:
        raw, (port, _groups) = sock.recvfrom(65536)
        if port != 0:
            continue
        try:
            reply = table.answer(protocol.decode_datagram(raw))
        except protocol.ProtocolError as exc:
            reply = exc.reply
        if reply:
            sock.sendto(reply, (0, 0))


def main() -> int:
    if sys.argv[1:2] == ["--respond"]:
        respond(Path(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--lean"]:
        from shardlog.harness.kernelvm import lean

        lean.serve()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--here", action="store_true",
                        help="run on this kernel (inside the guest, or a host with "
                             "dm-log-userspace) instead of booting the guest")
    parser.add_argument("--runtime", type=float, default=8.0, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of " + ", ".join(WORKLOADS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workers", type=int, default=2, help="shardlog serve --workers")
    parser.add_argument("--server-cpu", type=int,
                        help="pin shardlog's front and workers (and the --one-process "
                             "responder) to this CPU")
    parser.add_argument("--one-process", action="store_true",
                        help="also measure " + ", ".join(ONE_PROCESS) + " (diagnostic)")
    parser.add_argument("--vm-cpus", type=int, default=2, help="the guest's vCPUs")
    parser.add_argument("--logs", default=",".join(LOGS),
                        help="comma-separated subset of: " + ", ".join(LOGS) +
                             f" ({' and '.join(map(repr, BASELINES))} are always measured)")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    logs = [*BASELINES, *(name for name in args.logs.split(",") if name not in BASELINES)]
    if args.one_process:
        LOGS.update(ONE_PROCESS)
        logs += list(ONE_PROCESS)
    if set(logs) - set(LOGS):
        parser.error(f"unknown logs: {', '.join(sorted(set(logs) - set(LOGS)))}")
    if args.here:
        results = measure(workloads, logs, args)
    else:
        results = measure_in_vm(args)
        if results is None:
            return 1
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def measure_in_vm(args: argparse.Namespace) -> dict | None:
    from shardlog.harness.kernelvm import runner

    with tempfile.TemporaryDirectory(prefix="shardlog-bench-vm-") as share:
        command = shlex.join(["python", "scripts/bench_kernel.py", "--here", *sys.argv[1:]])
        command += " --json $SHARE/results.json"
        timeout = 120 + len(LOGS) * args.rounds * len(args.workloads.split(",")) * (
            args.runtime + 15)
        result = runner.boot(command, Path(share), timeout=timeout, echo=sys.stderr,
                             cpus=args.vm_cpus)
        path = Path(share) / "results.json"
        if result.exit_code != 0 or not path.exists():
            print(f"bench_kernel: {result.describe()}", file=sys.stderr)
            return None
        return json.loads(path.read_text())


def measure(workloads: list[str], logs: list[str], args: argparse.Namespace) -> dict:
    """{"runs": [{round, workload, log, iops, p50_us, p99_us}], ...}"""
    runs = []
    runtime, rounds = args.runtime, args.rounds
    with tempfile.TemporaryDirectory(prefix="shardlog-bench-") as root_name:
        root = Path(root_name)
        loopback_up()  # the guest's, for the metrics endpoint
        loops: list[guest.Loop] = []
        without_server = [name for name in logs if not LOGS[name][1] or name in RESPONDERS]
        with_server = [name for name in logs if name not in without_server]
        try:
            for round_number in range(rounds):
                for name in without_server:
                    with responding(name, root, args.server_cpu):
                        runs += measure_log(root, loops, name, workloads, round_number, args)
                if not with_server:
                    continue
                server = guest.start_server(root / "state", workers=args.workers,
                                            extra=("--metrics-addr", METRICS_ADDR))
                try:
                    if args.server_cpu is not None:
                        for pid in [server.process.pid, *server.worker_pids()]:
                            os.sched_setaffinity(pid, {args.server_cpu})
                    for name in with_server:
                        runs += measure_log(root, loops, name, workloads, round_number, args)
                finally:
                    server.close()
        finally:
            for loop in loops:
                loop.detach()
    return {"runtime": runtime, "rounds": rounds, "runs": runs, "workers": args.workers,
            "cpus": os.cpu_count(),
            "server_cpu": args.server_cpu,
            "kernel": subprocess.run(["uname", "-r"], capture_output=True,
                                     text=True).stdout.strip()}


@contextlib.contextmanager
def responding(name: str, root: Path, cpu: int | None):
    """The benchmark's own responder for ``name`` in group 7 meanwhile, if it has one."""
    if name not in RESPONDERS:
        yield
        return
    extra = [str(root / "one")] if RESPONDERS[name] == ["--respond"] else []
    responder = subprocess.Popen([sys.executable, __file__, *RESPONDERS[name], *extra])
    try:
        if cpu is not None:
            os.sched_setaffinity(responder.pid, {cpu})
        deadline = time.monotonic() + 60  # it joins group 7 (slowly, under emulation)
        while not group7_listeners():
            if responder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not join connector group 7")
            time.sleep(0.1)
        yield
    finally:
        responder.kill()
        responder.wait()


def measure_log(root: Path, loops: list[guest.Loop], name: str, workloads: list[str],
                round_number: int, args: argparse.Namespace) -> list[dict]:
    """One round of every workload on one log."""
    log, userspace, iflush = LOGS[name]
    runs = []
    for workload in workloads:
        run = one_run(root, loops, name, log, userspace, iflush, workload, args.runtime,
                      timed=userspace and name not in RESPONDERS)
        run["round"] = round_number
        runs.append(run)
        print(f"round {round_number} {workload:<18} {name:<22} "
              f"{run['iops']:>8.0f} IOPS  p50 {run['p50_us']:>7.0f} µs  "
              f"p99 {run['p99_us']:>7.0f} µs", file=sys.stderr, flush=True)
    return runs


def one_run(root: Path, loops: list[guest.Loop], name: str, log: str, userspace: bool,
            iflush: bool, workload: str, runtime: float, timed: bool = False) -> dict:
    legs = [guest.Loop.create(root / f"leg{i}.img", LEG_SIZE) for i in range(2)]
    log_device = guest.Loop.create(root / "log.img", 1 << 20) if log == "disk" else None
    made = legs + ([log_device] if log_device else [])
    loops.extend(made)
    table = guest.mirror_table(
        LEG_SIZE // guest.SECTOR, [str(leg.path) for leg in legs], log=log,
        log_device=log_device.number if log_device else None,
        region_sectors=REGION_SECTORS, nosync=True,
        uuid=f"bench-{time.monotonic_ns()}" if userspace else None, integrated_flush=iflush)
    mirror = guest.Mirror("bench", table).create()
    try:
        before = server_time() if timed else None
        output = guest.run("fio", "--name=bench", f"--filename={mirror.path}",
                           "--ioengine=libaio", "--direct=1", "--time_based",
                           f"--runtime={runtime}", f"--ramp_time={RAMP_SECONDS}", "--norandommap",
                           "--randrepeat=0", "--output-format=json",
                           *WORKLOADS[workload])
        after = server_time() if timed else None
    finally:
        mirror.remove()
        for loop in made:
            loop.detach()
            loops.remove(loop)
    write = json.loads(output[output.index("{"):])["jobs"][0]["write"]
    percentiles = write["clat_ns"].get("percentile", {})
    run = {"workload": workload, "log": name, "iops": write["iops"],
           "p50_us": percentiles.get("50.000000", 0) / 1000,
           "p99_us": percentiles.get("99.000000", 0) / 1000,
           "mean_us": write["lat_ns"]["mean"] / 1000}
    if before is not None and after is not None:
        requests, seconds = after[0] - before[0], after[1] - before[1]
        # fio's figures leave out its ramp, the server's include it.
        writes = write["iops"] * (runtime + RAMP_SECONDS)
        run["requests_per_write"] = requests / writes if writes else 0.0
        run["server_us"] = seconds / requests * 1e6 if requests else 0.0
    return run


def server_time() -> tuple[float, float]:
    """(requests answered, seconds they spent inside shardlog) so far, all types."""
    with urllib.request.urlopen(f"http://{METRICS_ADDR}/metrics", timeout=10) as page:
        samples = parse_samples(page.read().decode())
    count = sum(value for name, value in samples.items()
                if name.startswith("shardlog_request_duration_seconds_count"))
    total = sum(value for name, value in samples.items()
                if name.startswith("shardlog_request_duration_seconds_sum"))
    return count, total


def report(results: dict) -> None:
    runs = results["runs"]
    pinned = "" if results["server_cpu"] is None else f", pinned to CPU {results['server_cpu']}"
    print(f"fio on dm-mirror, kernel {results['kernel']}, {results['rounds']} round(s) of "
          f"{results['runtime']:.0f} s per run, {results['cpus']} CPUs, shardlog --workers "
          f"{results['workers']}{pinned}; ratios = IOPS / IOPS of the in-kernel disk log "
          "(vs disk) and of the lean responder (vs lean) in the same round, median over "
          "rounds\n")
    print(f"{'workload':<18} {'log':<22} {'IOPS':>8} {'p50 µs':>8} {'p99 µs':>8} "
          f"{'vs disk':>8} {'vs lean':>8}")
    for workload, name, mine in by_workload_and_log(runs):
        ratios = [ratio(runs, mine, workload, baseline) for baseline in BASELINES]
        print(f"{workload:<18} {name:<22} "
              f"{statistics.median(r['iops'] for r in mine):>8.0f} "
              f"{statistics.median(r['p50_us'] for r in mine):>8.0f} "
              f"{statistics.median(r['p99_us'] for r in mine):>8.0f} "
              + " ".join(f"{value:>7.2f}x" for value in ratios))
    timed = [run for run in runs if "server_us" in run]
    if timed:
        print("\nwhere a shardlog write's time goes (medians over rounds): the kernel's "
              "requests per write, their mean time inside shardlog (arrival in a worker "
              "to reply leaving), and fio's mean write latency\n")
        print(f"{'workload':<18} {'log':<22} {'req/write':>9} {'in shardlog':>12} "
              f"{'x req/write':>12} {'write mean':>11}")
        for workload, name, mine in by_workload_and_log(timed):
            per_write = statistics.median(r["requests_per_write"] for r in mine)
            inside = statistics.median(r["server_us"] for r in mine)
            print(f"{workload:<18} {name:<22} {per_write:>9.1f} {inside:>9.0f} µs "
                  f"{per_write * inside:>9.0f} µs "
                  f"{statistics.median(r['mean_us'] for r in mine):>8.0f} µs")


def ratio(runs: list[dict], mine: list[dict], workload: str, baseline: str) -> float:
    """The median over rounds of a log's IOPS over the baseline's in the same round."""
    ratios = []
    for run in mine:
        base = next((r for r in runs if r["workload"] == workload and
                     r["log"] == baseline and r["round"] == run["round"]), None)
        if base is not None and base["iops"]:
            ratios.append(run["iops"] / base["iops"])
    return statistics.median(ratios) if ratios else float("nan")


def by_workload_and_log(runs: list[dict]):
    """(workload, log, its runs over the rounds), in the order they were measured."""
    for workload in dict.fromkeys(run["workload"] for run in runs):
        for name in LOGS:
            mine = [r for r in runs if r["workload"] == workload and r["log"] == name]
            if mine:
                yield workload, name, mine


if __name__ == "__main__":
    sys.exit(main())
