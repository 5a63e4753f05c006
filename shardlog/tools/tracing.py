"""``shardlog trace``: the requests a running server handles, one decoded line each.

Theory of operation
-------------------
Each worker answers the kernel itself (front.py), so the workers time their requests:
while nobody traces, a worker pays one attribute test per request.  When a client
subscribes (``{"cmd": "trace", "uuid": [...], "type": [...], "sample": N}`` on the control
socket), the front gets a :class:`Tracer` and tells every worker to trace: after each
batch a worker sends one TRACE frame with each request's arrival, its latency and both
datagrams (worker.py).  The front matches each request against the subscriptions — on
the raw uuid bytes and type number — and sends one line to each subscriber that wants it:
the time, the worker, the latency and both datagrams in hex.  Decoding them
(protocol.py, describe.py) is the tracer's work, in its own process
(:func:`decode_event`): formatted by hand, a line costs the front a few microseconds,
where decoding and ``json.dumps`` cost it several times that.  Lines go out once per
wakeup of the front's loop; a subscriber that cannot keep up loses lines, counted and
reported to it (control.Connection.send_line): a tracer never blocks the front, and the
front never blocks a worker.

Decoded events: ``time`` (wall clock, seconds), ``worker``, ``seq``, ``type``,
``uuid``, ``luid``, ``args``, ``errno`` (0 or a negative errno; None without a reply),
``result``, ``latency_us`` (from the datagram's arrival in its worker to the reply's
send), and ``note`` for requests the front answered itself (-EAGAIN for a worker that
died).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shardlog.server import control
from shardlog.tools.describe import describe_answer, describe_payload
from shardlog.wire import protocol
from shardlog.wire.protocol import ProtocolError, RequestType

if TYPE_CHECKING:
    from shardlog.server.front import Front

EXIT_OK, EXIT_ERROR = 0, 1


class Subscription:
    """What one tracing client asked to see."""

    def __init__(self, client: control.Connection, uuids: list[str], types: list[str],
                 sample: int = 1):
        self.client = client
        self.uuids = {uuid.encode("ascii") for uuid in uuids} or None
        try:
            self.types = {RequestType[name.upper()].value for name in types} or None
        except KeyError as exc:
            raise ValueError(f"unknown request type {exc.args[0]}; known: "
                             f"{', '.join(t.name for t in RequestType)}") from None
        if sample < 1:
            raise ValueError(f"sample must be at least 1, not {sample}")
        self.sample = sample  # every sample-th request that matches (top's latencies)
        self._matched = 0

    def wants(self, uuid_field: bytes, request_type: int) -> bool:
        if not ((self.uuids is None or uuid_field in self.uuids)
                and (self.types is None or request_type in self.types)):
            return False
        self._matched += 1
        return self._matched % self.sample == 0


class TraceCommand:
    """The control socket's ``trace``: subscribes a client; the server traces while
    anyone is subscribed, and stops (``Front.set_tracer(None)``) when the last one
    leaves."""

    def __init__(self, front: Front):
        self.front = front

    def subscribe(self, client: control.Connection, message: dict) -> None:
        uuids, types = message.get("uuid", []), message.get("type", [])
        if not all(isinstance(x, str) for x in [*uuids, *types]):
            raise TypeError("uuid and type are lists of strings")
        subscription = Subscription(client, uuids, types, int(message.get("sample", 1)))
        if self.front.tracer is None:
            self.front.set_tracer(Tracer())
        self.front.tracer.subscriptions.append(subscription)
        client.on_close.append(lambda: self._unsubscribe(subscription))
        client.send({"subscribed": {"uuid": uuids, "type": types,
                                    "sample": subscription.sample}})

    def _unsubscribe(self, subscription: Subscription) -> None:
        tracer = self.front.tracer
        if tracer is None:
            return
        tracer.subscriptions.remove(subscription)
        if not tracer.subscriptions:
            self.front.set_tracer(None)


class Tracer:
    """The front's side of tracing: the subscriptions, and the lines for them."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []

    def traced(self, worker: int, arrived: float, latency: float, datagram: bytes,
               reply: bytes, note: str | None = None) -> None:
        """A request a worker answered (``reply``; empty: it got none), which arrived at
        ``arrived`` (wall clock) and was answered ``latency`` seconds later."""
        routing = protocol.peek_request(datagram)
        uuid_field, request_type = (routing[0], routing[2] & 0xFF) if routing else (b"", -1)
        wanted = [s for s in self.subscriptions if s.wants(uuid_field, request_type)]
        if not wanted:
            return
        # Numbers and hex only, formatted by hand: json.dumps and the decoders would cost
        # the front several times more per traced request; the tracer decodes (event()).
        line = (f'{{"time": {arrived + latency:.6f}, "worker": {worker}, "latency_us": '
                f'{latency * 1e6:.1f}, "request": "{datagram.hex()}", "reply": '
                f'"{reply.hex()}"{_NOTES.get(note, "")}}}\n').encode()
        for subscription in wanted:
            if not subscription.client.closed:
                subscription.client.send_line(line)


NOTE_WORKER_DIED = "worker died: answered -EAGAIN"
_NOTES = {NOTE_WORKER_DIED: f', "note": {json.dumps(NOTE_WORKER_DIED)}'}


def decode_event(raw: dict) -> dict:
    """A trace line as the front sent it (time, worker, latency, the request and reply
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
permission denied), 2 usage
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
    parser.add_argument("--count", type=int, metavar="N", help="stop after N requests")
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
            return 2
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
            decoded = decode_event(event)
            print(json.dumps(decoded) if args.json else format_event(decoded), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
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
