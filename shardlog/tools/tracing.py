"""``shardlog trace``: the requests a running server handles, one decoded line each.

The client: it subscribes on the server's control socket (``{"cmd": "trace", "uuid":
[...], "type": [...], "sample": N}``) and decodes the lines the server sends — the time,
the worker, the latency and both datagrams in hex — with protocol.py and describe.py, in
its own process (:func:`decode_event`): the server's side (shardlog.server.commands:
Tracer, TraceCommand) only matches and formats, so that tracing costs the server little.

Decoded events: ``time`` (wall clock, seconds), ``worker``, ``seq``, ``type``,
``uuid``, ``luid``, ``args``, ``errno`` (0 or a negative errno; None without a reply),
``result``, ``latency_us`` (from the datagram's arrival in its worker to the reply's
send), and ``note`` for requests the server answered itself (-EAGAIN for a worker that
died).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shardlog.server import control
from shardlog.tools.argtypes import positive_int
from shardlog.tools.describe import describe_answer, describe_payload
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from shardlog.wire import protocol
from shardlog.wire.protocol import ProtocolError, RequestType


def decode_event(raw: dict) -> dict:
    """A trace line as the server sent it (time, worker, latency, the request and reply
    in hex) decoded into the event the tool shows."""
    datagram, reply = bytes.fromhex(raw["request"]), bytes.fromhex(raw["reply"])
    event: dict = {"time": raw["time"], "worker": raw["worker"],
                   "latency_us": raw["latency_us"]}
    try:
        request = protocol.decode_datagram(datagram)
    except ProtocolError as exc:
        event.update(type="MALFORMED", seq=exc.seq, args=exc.reason)
        request = None
    else:
        event.update(seq=request.seq, type=request.name, uuid=request.uuid,
                     luid=request.luid, args=describe_payload(request))
    if not reply:
        event.update(errno=None, result="no reply")
    else:
        try:
            answer = protocol.decode_reply(reply)
        except ProtocolError as exc:
            event.update(errno=None, result=f"undecodable reply: {exc.reason}")
        else:
            request_type = request.request_type if request else None
            if answer.ack:
                result = "ack" if not answer.error else f"ack, error {answer.error}"
            else:
                result = describe_answer(request_type, answer.error, answer.data)
            event.update(errno=answer.error, result=result)
    if raw.get("note"):
        event["note"] = raw["note"]
    return event


# -- the client: shardlog trace --------------------------------------------------------------

HELP = """\
Show the requests a running server handles, one per line, as they are answered: time,
worker, type, uuid, luid, arguments, result, latency from arrival to reply. Nothing is
recorded while no one traces; a tracer that cannot keep up loses lines (counted and
shown), never slows the server.

exit codes: 0 stopped (Ctrl-C, --count reached), 1 error (server not running,
permission denied, the server ended the trace: it stopped or was taken over), 2 usage
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "trace", help="show the requests a running server handles",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    control_socket_option(parser)
    parser.add_argument("--uuid", action="append", default=[],
                        help="only this log (repeat for more)")
    parser.add_argument("--type", action="append", default=[], metavar="TYPE",
                        help="only this request type, e.g. FLUSH (repeat for more)")
    parser.add_argument("--count", type=positive_int, metavar="N",
                        help="stop after N requests")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(run=run)


def control_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=control.DEFAULT_PATH,
                        help=f"the server's control socket (default {control.DEFAULT_PATH})")


def run(args: argparse.Namespace) -> int:
    for name in args.type:
        if name.upper() not in RequestType.__members__:
            print(f"shardlog trace: unknown request type {name}; known: "
                  f"{', '.join(t.name for t in RequestType)}", file=sys.stderr)
            return EXIT_USAGE
    request = {"cmd": "trace", "uuid": args.uuid, "type": args.type}
    shown = 0
    try:
        for event in control.stream(args.socket, request, timeout=None):
            if "subscribed" in event:
                print(f"shardlog trace: tracing the server at {args.socket} (Ctrl-C stops)",
                      file=sys.stderr, flush=True)
                continue
            if "dropped" in event:
                print(f"... {event['dropped']} requests not shown: this terminal could not "
                      "keep up", file=sys.stderr, flush=True)
                continue
            if "untraced" in event:
                print(f"... {event['untraced']} requests of worker {event['worker']} not "
                      "traced: the server was not reading its workers", file=sys.stderr,
                      flush=True)
                continue
            decoded = decode_event(event)
            print(json.dumps(decoded) if args.json else format_event(decoded), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
        else:  # the server closed the stream: nothing more will come
            print(f"shardlog trace: the server at {args.socket} ended the trace (it "
                  "stopped, or another server took over: trace again)", file=sys.stderr)
            return EXIT_ERROR
    except control.ControlError as exc:
        print(f"shardlog trace: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def format_event(event: dict) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    fraction = f"{event['time'] % 1:.6f}"[1:]
    where = f"{event.get('uuid', '-')}@{event.get('luid', 0):x}"
    text = (f"{clock}{fraction} w{event['worker']} {event['type']:<20} {where:<28} "
            f"{event['args'] or '-':<14} -> {event['result']:<10} "
            f"{event['latency_us']:>9.1f} µs")
    if event.get("note"):
        text += f"  ({event['note']})"
    return text
