"""``shardlog capacity``: the command line of a capacity run (the logic is in the modules
beside this one; ``scripts/capacity.py`` is the same command)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from shardlog.harness.capacity.progress import Progress
from shardlog.harness.capacity.results import Run, read_json, summary, write_csv, write_json
from shardlog.harness.capacity.runner import measure_point
from shardlog.harness.capacity.servers import AttachedServer, CapacityError, Server, SpawnedServer
from shardlog.harness.capacity.spec import SWEEPABLE, WORKLOADS, LoadSpec, SpecError, parse_sweep
from shardlog.harness.hostinfo import filesystem_of, machine
from shardlog.harness.kernelsim.connector import DEFAULT_PORT
from shardlog.harness.kernelsim.echo import PeerError
from shardlog.harness.netns import enter_private_netns
from shardlog.server.nlsocket import kernel_connector_reachable

DESCRIPTION = """\
Drive shardlog through the simulated kernel over real netlink sockets with a described
load, optionally sweeping one parameter, and write results.json, results.csv,
summary.txt and PNG plots.  Every figure is set against the minimal echo peer, measured
with the same streams in the same run.

By default the tool enters a private network namespace and starts a fresh
`shardlog serve` for each point (root needed).  To drive a server that is already
running, run the tool in that server's private network namespace and give --attach
PORT: the server must have been started there with `--test-peer PORT` (the simulated
kernel cannot use the kernel's netlink port 0, so the server has to be told which port
plays the kernel), and --pid-file (its memory and workers are read from /proc).  Never
against a real kernel's connector: the tool refuses where one answers."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("the load (at each point)")
    load.add_argument("--workload", choices=WORKLOADS, default="random-write",
                      help="default random-write")
    load.add_argument("--mirrors", type=int, default=100, help="logs (default 100)")
    load.add_argument("--regions", type=int, default=1024,
                      help="regions per log (default 1024)")
    load.add_argument("--region-size", type=int, default=1024, metavar="SECTORS",
                      help="default 1024 (512 KiB)")
    load.add_argument("--integrated-flush", action="store_true",
                      help="marks travel in the FLUSH (dm-log-userspace integrated_flush)")
    load.add_argument("--workers", type=int, default=2,
                      help="server workers (default 2; a started server only)")
    load.add_argument("--in-flight", type=int, default=64,
                      help="mirrors with a request outstanding at most (default 64)")
    load.add_argument("--rate", type=float,
                      help="offered requests/s (default: as fast as the server answers)")
    load.add_argument("--duration", type=float, default=5.0, metavar="SECONDS",
                      help="load per point (default 5)")
    load.add_argument("--reply-timeout", type=float, default=10.0, metavar="SECONDS",
                      help="a request unanswered this long fails the run: the load was not "
                           "delivered (default 10; the kernel's own retry is 15)")
    load.add_argument("--sweep", metavar="NAME=V1,V2,...",
                      help=f"sweep one parameter: {', '.join(SWEEPABLE)} "
                           "(e.g. mirrors=1,10,100,1000,10000)")
    load.add_argument("--restart", action="store_true",
                      help="after each point's load, SIGKILL the server, start it again and "
                           "time until every log answered from its restored state")
    out = parser.add_argument_group("results")
    out.add_argument("--out", type=Path, help="results directory (default: "
                     "./capacity-<time>)")
    out.add_argument("--flush-p99-limit", type=float, default=10.0, metavar="MS",
                     help="the knee: the largest load whose FLUSH p99 stays under this "
                          "(default 10 ms)")
    out.add_argument("--no-progress", action="store_true", help="no progress output")
    out.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                     help="measure nothing: draw the plots and summary of an earlier run "
                          "again (into --out, default beside the file)")
    server = parser.add_argument_group("the server")
    server.add_argument("--state-dir", type=Path, default=Path("."),
                        help="where a started server's state directories go (default: the "
                             "current directory; disk-backed, not tmpfs, for real page faults "
                             "and disk-log syncs)")
    server.add_argument("--attach", type=int, metavar="PORT",
                        help="drive the running server that takes requests from netlink "
                             "port PORT (its --test-peer)")
    server.add_argument("--pid-file", type=Path, help="the attached server's pid file")
    server.add_argument("--metrics-url", help="the attached server's /metrics, to "
                        "cross-check per-worker counts (e.g. http://127.0.0.1:9783/metrics)")
    server.add_argument("--peer-port", type=int, default=DEFAULT_PORT,
                        help=f"the load's netlink port for a started server (default "
                             f"{DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    if args.replot is not None:
        return _replot(args.replot, args.out or args.replot.parent)
    try:
        base = LoadSpec(mirrors=args.mirrors, regions=args.regions,
                        region_size=args.region_size, workload=args.workload,
                        integrated_flush=args.integrated_flush, workers=args.workers,
                        in_flight=args.in_flight, rate=args.rate, duration=args.duration,
                        reply_timeout=args.reply_timeout)
        parameter, values = parse_sweep(args.sweep) if args.sweep else (None, [None])
        specs = [base if value is None else base.with_value(parameter, value)
                 for value in values]
        _check_mode(args, parameter)
    except SpecError as exc:
        print(f"shardlog capacity: {exc}", file=sys.stderr)
        return 2
    try:
        if args.attach is None:
            enter_private_netns()
        elif kernel_connector_reachable():
            print("shardlog capacity: a kernel connector answers here: --attach works only "
                  "inside the server's private network namespace (unshare -n)",
                  file=sys.stderr)
            return 2
    except OSError as exc:
        print(f"shardlog capacity: cannot enter a private network namespace "
              f"({exc.strerror}): run as root", file=sys.stderr)
        return 2

    out_dir = args.out or Path(f"capacity-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not args.no_progress)
    filesystem = filesystem_of(args.state_dir)
    if args.attach is None and filesystem in ("tmpfs", "ramfs"):
        print("warning: the state directory is on tmpfs: its page faults and syncs cost "
              "nothing there", file=sys.stderr)
    points: list = []

    def run_of(points: list) -> Run:
        return Run(command=sys.orig_argv, machine=machine(),
                   filesystem=filesystem if args.attach is None else "?",
                   parameter=parameter, flush_p99_limit_ms=args.flush_p99_limit,
                   points=points)

    with tempfile.TemporaryDirectory(prefix="capacity-", dir=args.state_dir) as scratch:
        server: Server = (SpawnedServer(Path(scratch), args.peer_port) if args.attach is None
                          else AttachedServer(args.attach, args.pid_file, args.metrics_url))
        try:
            for spec, value in zip(specs, values, strict=True):
                label = f"{parameter}={value:g}" if parameter else "point"
                point = measure_point(server, spec, label, value, restart=args.restart,
                                      progress=progress)
                points.append(point)
                _write(out_dir, run_of(points))  # as they come: a later failure keeps them
                load = point.load
                print(f"{label}: {load['requests_per_second']:,.0f} req/s, p99 "
                      f"{load['p99_us']:.0f} us (echo {point.baseline['requests_per_second']:,.0f}"
                      f" req/s, p99 {point.baseline['p99_us']:.0f} us)", flush=True)
        except (CapacityError, PeerError) as exc:
            print(f"shardlog capacity: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            kept = (f"the {len(points)} finished points are in {out_dir}" if points
                    else "no point finished, nothing written")
            print(f"shardlog capacity: interrupted; {kept}", file=sys.stderr)
            return 130
        finally:
            server.close()
    from shardlog.harness.capacity.plots import draw  # matplotlib only when plotting

    draw(run_of(points), out_dir)
    print()
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"\nresults in {out_dir}/: results.json, results.csv, summary.txt, *.png")
    return 0


def _replot(results: Path, out_dir: Path) -> int:
    from shardlog.harness.capacity.plots import draw

    try:
        run = read_json(results)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"shardlog capacity: {results}: not a capacity results.json ({exc})",
              file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.txt").write_text(summary(run))
    for path in draw(run, out_dir):
        print(path)
    return 0


def _write(out_dir: Path, run: Run) -> None:
    write_json(run, out_dir / "results.json")
    write_csv(run, out_dir / "results.csv")
    (out_dir / "summary.txt").write_text(summary(run))


def _check_mode(args: argparse.Namespace, parameter: str | None) -> None:
    if args.attach is not None:
        if args.pid_file is None:
            raise SpecError("--attach needs --pid-file: the server's memory and workers are "
                            "read from /proc")
        if parameter == "workers":
            raise SpecError("an attached server has the workers it has: sweep workers with "
                            "a server the tool starts")
        if args.restart:
            raise SpecError("--restart SIGKILLs the server: only for a server the tool starts")
    if args.restart and args.workload == "churn":
        raise SpecError("--restart with churn: its logs change instance under the load; "
                        "measure restarts with another workload")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capacity", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
