"""The ``shardlog`` command.

- ``shardlog serve``: the server the kernel talks to (front process and workers, in the
  foreground; see server/arbiter.py).  Needs root.  ``--take-over`` takes a running server's
  sockets over with no stall (handover.py); ``--background`` returns once it serves
  (systemd's ExecReload).
- ``shardlog replay [CAPTURE]``: answer the requests of a recorded kernel session with the
  real codec and a real log table (instance files in a temporary or given state
  directory) and show what a correct log answers.  Without an argument it replays the
  embedded default: the requests a Debian 6.1 kernel sent while resyncing a 128-region
  mirror.  Log devices named in the capture are never opened: scratch files stand in.
- ``shardlog decode [FILE]``: print datagrams (hex, one per line, or capture JSON lines)
  field by field, through the pyroute2 message class.

Exit codes: 0 success, 1 a replayed request was refused or the server failed, 2 bad
input or usage.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import TextIO

from shardlog import __version__
from shardlog.log.logtable import LogTable
from shardlog.server import control
from shardlog.server.arbiter import (
    RECEIVE_BUFFER,
    WORKER_TIMEOUT,
    Arbiter,
    ServeConfig,
    ServeError,
)
from shardlog.tools import adopt, inspection, status, top, tracing
from shardlog.tools.argtypes import positive_int, positive_seconds
from shardlog.tools.describe import describe_answer, describe_payload
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from shardlog.wire import protocol
from shardlog.wire.ctrargs import CtrArgsError, parse_ctr_string
from shardlog.wire.protocol import ProtocolError, Request, RequestType

DEFAULT_CAPTURE = "kernel-6.1-resync.hex.gz"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = args.log_level or args.default_log_level
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        # The pid tells the front and each worker apart (the front logs workers' pids).
        format="%(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): not an error worth a trace
        return EXIT_OK
    except (OSError, ValueError) as exc:
        print(f"shardlog: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardlog", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shardlog {__version__}")
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", choices=levels, help="default: info for serve, "
                        "warning otherwise")
    parser.set_defaults(default_log_level="warning")
    commands = parser.add_subparsers(required=True, metavar="COMMAND",
                                     parser_class=_CommandParser)

    serve = commands.add_parser("serve", help="serve the kernel's dirty logs (root)")
    serve.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                       help="worker processes (default: the number of CPUs)")
    serve.add_argument("--state-dir", type=Path, default=Path("/var/lib/shardlog"),
                       help="instance files and CTR records (default: /var/lib/shardlog)")
    serve.add_argument("--metrics-addr", default="127.0.0.1:9783", metavar="HOST:PORT",
                       help="serve Prometheus metrics here (default 127.0.0.1:9783; "
                            "'' turns them off)")
    serve.add_argument("--per-log-metrics", choices=["on", "off"], default="on",
                       help="sync progress per log instance, two series each with a uuid "
                            "label (default on; off for hosts with thousands of logs)")
    serve.add_argument("--pid-file", type=Path,
                       help="written once the socket is subscribed and every worker is up")
    serve.add_argument("--receive-buffer", type=positive_int, default=RECEIVE_BUFFER,
                       metavar="BYTES", help="the netlink socket's receive buffer (default "
                       f"{RECEIVE_BUFFER >> 20} MiB): requests that overflow it are lost and "
                       "re-sent by the kernel only after 15 s")
    serve.add_argument("--worker-timeout", type=positive_seconds, default=WORKER_TIMEOUT,
                       metavar="SECONDS", help="kill and replace a worker that answers "
                       f"nothing this long while it holds requests (default {WORKER_TIMEOUT:.0f};"
                       " the kernel retries after 15)")
    serve.add_argument("--control-socket", default=str(control.DEFAULT_PATH), metavar="PATH",
                       help="the operators' socket: status, trace, top (default "
                            f"{control.DEFAULT_PATH}; '' turns it off)")
    serve.add_argument("--take-over", action="store_true",
                       help="take over from the server answering at --control-socket: its "
                            "workers hand their sockets over, the kernel sees no restart "
                            "(the same --state-dir, routing hash and file formats; another "
                            "--workers moves the logs between shards; refused otherwise, "
                            "exit 1)")
    serve.add_argument("--background", action="store_true",
                       help="run the server in a new session and exit 0 once it serves "
                            "(after --take-over: once the old server is gone), 1 if it "
                            "fails")
    serve.add_argument("--log-level", choices=levels, default=argparse.SUPPRESS)
    serve.add_argument("--test-peer", type=int, metavar="PORT",
                       help="also take requests from this netlink port, and reply to it: "
                            "for a simulated kernel in a private network namespace only")
    serve.set_defaults(run=_serve, default_log_level="info")

    replay = commands.add_parser("replay", help="answer a recorded kernel session")
    replay.add_argument("capture", nargs="?", type=Path,
                        help="capture (hex or JSON lines, may be gzipped); "
                             "default: the embedded kernel 6.1 resync session")
    replay.add_argument("--state-dir", type=Path,
                        help="where logs keep their instance files (default: a temporary "
                             "directory, removed afterwards)")
    replay.add_argument("--all", action="store_true", help="show every request, not a sample")
    replay.set_defaults(run=_replay)

    demo = commands.add_parser("demo", help="mirrors on shardlog in the real kernel (root; "
                               "boots a VM where the kernel lacks dm-log-userspace)")
    demo.set_defaults(run=lambda args: _kernelvm_demo().main())

    # The harness is imported only when this command is parsed: `shardlog serve`, the
    # production path, must not load the development harness.
    commands.add_parser(
        "capacity", help="capacity test: drive a server with a described load (root)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        load_arguments=_capacity_arguments)

    decode = commands.add_parser("decode", help="print datagrams field by field")
    decode.add_argument("file", nargs="?", type=Path, help="hex or JSON lines (default: stdin)")
    decode.set_defaults(run=_decode)
    for tool in (status, inspection, tracing, top):
        tool.add_parser(commands)
    adopt.add_parsers(commands)
    return parser


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose arguments may come from a module imported only when the
    command is parsed (``load_arguments``: called once with the parser)."""

    def __init__(self, *args, load_arguments: Callable[[argparse.ArgumentParser], None]
                 | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_arguments = load_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self.load_arguments is not None:
            load, self.load_arguments = self.load_arguments, None
            load(self)
        return super().parse_known_args(args, namespace)


def _capacity_arguments(parser: argparse.ArgumentParser) -> None:
    from shardlog.harness.capacity import command

    parser.description = command.DESCRIPTION
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


def _serve(args: argparse.Namespace) -> int:
    config = ServeConfig(workers=args.workers, state_dir=args.state_dir,
                         metrics_addr=args.metrics_addr or None, pid_file=args.pid_file,
                         test_peer=args.test_peer, receive_buffer=args.receive_buffer,
                         worker_timeout=args.worker_timeout,
                         control_socket=Path(args.control_socket) if args.control_socket
                         else None,
                         per_log_metrics=args.per_log_metrics == "on",
                         take_over=args.take_over)
    if args.background:
        ready_r, ready_w = os.pipe()
        if os.fork():
            # The parent: 0 once the server says it serves, 1 if it ended first (it
            # said why on the stderr both share).
            os.close(ready_w)
            ready = os.read(ready_r, 1)
            return EXIT_OK if ready else EXIT_ERROR
        os.close(ready_r)
        os.setsid()
        config.ready_fd = ready_w
    try:
        return Arbiter(config).run()
    except ServeError as exc:
        print(f"shardlog serve: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _kernelvm_demo():
    from shardlog.harness.kernelvm import demo

    return demo


# -- input ---------------------------------------------------------------------------------------


def read_datagrams(path: Path | None) -> Iterator[bytes]:
    """Datagrams from a capture: one per line, as hex or as a JSON object with ``raw_hex``;
    ``#`` lines are comments.  ``None`` is the embedded default capture."""
    with _open_capture(path) as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                text = json.loads(line)["raw_hex"] if line.startswith("{") else line
                yield bytes.fromhex(text)
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"line {number}: neither a hex datagram nor a JSON object "
                                 "with raw_hex") from None


def _open_capture(path: Path | None) -> TextIO:
    if path is None:
        embedded = resources.files("shardlog.data").joinpath(DEFAULT_CAPTURE).open("rb")
        return gzip.open(embedded, "rt")
    if path.suffix == ".gz":
        return gzip.open(path, "rt")
    return open(path)


# -- replay --------------------------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    if args.state_dir is not None:
        return _replay_into(args, args.state_dir)
    with tempfile.TemporaryDirectory(prefix="shardlog-replay-") as state_dir:
        return _replay_into(args, Path(state_dir))


def _replay_into(args: argparse.Namespace, state_dir: Path) -> int:
    table = LogTable(state_dir)
    scratch = _ScratchDevices(state_dir / "replay-devices")
    lines: list[str] = []
    results: Counter[str] = Counter()
    refused = 0
    for raw in read_datagrams(args.capture):
        try:
            request = scratch.substitute(protocol.decode_datagram(raw))
        except ProtocolError as exc:
            lines.append(f"{'-':>6}  malformed: {exc.reason}")
            results["malformed"] += 1
            continue
        reply = protocol.decode_reply(table.answer(request))
        error, data = reply.error, reply.data
        refused += error != 0
        results[f"{request.name} {'ok' if error == 0 else error}"] += 1
        answer = describe_answer(request.request_type, error, data)
        lines.append(f"{request.seq:>6}  {request.uuid:<20} {request.name:<20} "
                     f"{describe_payload(request):<14} -> {answer}")
    source = args.capture or f"embedded {DEFAULT_CAPTURE}"
    print(f"shardlog replay of {source}: {sum(results.values())} requests, state in {state_dir}")
    for device, stand_in in scratch.replaced.items():
        print(f"log device {device} of the capture replaced by the scratch file {stand_in}")
    if args.all or len(lines) <= 40:
        print("\n".join(lines))
    else:
        print("\n".join(lines[:24]))
        print(f"{'':>6}  … {len(lines) - 36} more (--all shows them) …")
        print("\n".join(lines[-12:]))
    print("answers:", ", ".join(f"{key} x{n}" for key, n in sorted(results.items())))
    return EXIT_ERROR if refused else EXIT_OK


class _ScratchDevices:
    """Stand-ins for the log devices a capture names.

    A capture's ``7:2`` was a device in the machine that recorded it; on this host that
    number may be somebody's disk, which a replayed RESUME would write to.  So every disk
    log's device becomes a zeroed scratch file (new bits: all out of sync, as on a fresh
    log device), the same file for the same device name.
    """

    SIZE = 4 << 20  # enough for 24 million regions' bits, like the captures' log device

    def __init__(self, directory: Path):
        self.directory = directory
        self.replaced: dict[str, Path] = {}

    def substitute(self, request: Request) -> Request:
        if request.request_type is not RequestType.CTR:
            return request
        try:
            config = parse_ctr_string(request.ctr_string)
        except CtrArgsError:
            return request  # the log table refuses it, and says why
        if config.device is None:
            return request
        tokens = request.ctr_string.split()
        tokens[2] = str(self._stand_in(config.device))  # "<sectors> <type> <device> …"
        data = " ".join(tokens).encode() + (b"\0" if request.reconnect else b"")
        return protocol.decode_datagram(protocol.encode_request(
            RequestType.CTR, seq=request.seq, uuid=request.uuid, luid=request.luid,
            data=data, version=request.version))

    def _stand_in(self, device: str) -> Path:
        if device not in self.replaced:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"device-{len(self.replaced)}"
            with open(path, "wb") as f:
                f.truncate(self.SIZE)
            self.replaced[device] = path
        return self.replaced[device]


# -- decode --------------------------------------------------------------------------------------


def _decode(args: argparse.Namespace) -> int:
    # Imported here: pyroute2 takes more than half of the command's start-up, which every
    # `shardlog serve` would otherwise pay (seconds under the VM's emulation).
    from shardlog.wire import nlmessages

    source = args.file if args.file is not None else Path("/dev/stdin")
    malformed = 0
    for raw in read_datagrams(source):
        try:
            print(json.dumps(nlmessages.decode(raw)))
        except ProtocolError as exc:
            malformed += 1
            print(json.dumps({"malformed": exc.reason, "raw_hex": raw.hex()}))
    return EXIT_USAGE if malformed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
