"""Take-over: a new server takes a running one's shard sockets, and the kernel never knows.

Why
---
A server that stops leaves group 7: the kernel's next request finds no server, sleeps
2 s, re-sends CTR (reconnect) and RESUME for every log and retries, and every mirrored
write on the host waits.  A take-over (``shardlog serve --take-over``, the systemd
unit's ``ExecReload``) replaces the server with the kernel's requests merely waiting, a
few milliseconds, queued in the very sockets that will be read next.

The sequence (same worker count)
--------------------------------
The shard sockets are the continuity: each is filtered to its shard's requests
(routing.py) and in group 7, and a socket in group 7 queues what the kernel sends
whoever reads it.  So no socket is ever opened, closed or left in between: the new
server's workers inherit the *same* sockets.

1. The new server checks what it can alone (root, its state directory writable), then
   connects to the running server's control socket and sends one line::

       {"cmd": "take-over", "pid": ..., "workers": N, "state_dir": ..., "test_peer": ...,
        "fingerprint": {"version": ..., "routing": ..., "formats": ...}}

   The old server refuses — ``{"error": why}``, and nothing has happened — unless the
   fingerprint (:func:`fingerprint`: a digest of the routing hash over sample uuids and
   of the socket filters, the instance-file and record formats, this protocol's number;
   the package version is only logged, an upgrade being the point), the state
   directory and the test peer are its own, the worker count is a count, it is serving,
   no other take-over or stop is under way, every shard has a worker, and none is still
   reading past the copies the last take-over from another worker count left in its
   socket (inflight.py: handed on, they would be answered twice).  The worker count may
   differ (below).
2. The old front orders HAND_OVER to every worker (frames.Kind): each finishes the batch
   it holds, reads nothing more, commits every log, closes its files and exits, *without*
   leaving group 7.  From here requests wait queued in the sockets.
3. Once every worker has exited, the old front stops its accept loop (its metrics
   server is already closing, for the new one to bind its port) and sends one line,
   ``{"sockets": N, "control": bool, "pid": ...}``, with the N shard sockets (and the
   control socket's listening socket, so that the control path never goes dark) as
   SCM_RIGHTS.
4. The new front forks its workers on those sockets.  Each restores a log from its
   instance file and CTR record at the log's first request (logtable.py: as after a
   restart, but the kernel sees neither -ESRCH nor a reconnect), and starts reading:
   the queued requests are answered.  Once all are up the new front writes the pid
   file and sends ``{"cmd": "serving", "pid": ...}``.
5. The old front exits 0 (its sockets closed, not left: they are the new server's now);
   the new front sees the connection's EOF and tells its workers (TAKEN_OVER).

Failure at any step leaves the old server serving.  Before step 3 the old front simply
respawns its workers on its sockets.  After it, the old front still holds every socket,
and resumes — rejoins group 7 (a no-op unless a dying new worker left it), accepts on the
control socket again, respawns its workers — as soon as the take-over connection closes
without "serving".  The new server's first workers inherit that connection and keep it
until TAKEN_OVER, so it closes only once the new front *and all its workers* are gone:
never can two servers' workers read one socket.  A new worker whose front died in the
middle answers what is queued and exits without leaving group 7; a new front that fails
(a worker that cannot start, a pid file it cannot write) stops its workers the same way
before it exits 1.

A different worker count
------------------------
With M new workers for the N old shard sockets (M != N) the logs move between shards:
the old sockets' filters route by ``hash % N``, the new workers need ``hash % M``.  So
the new front cannot inherit the sockets; it switches to sockets of its own
(:func:`switch_sockets`, inside :func:`request_sockets`, between steps 3 and 4), and no
request may be accepted by no socket (the kernel would think no server runs) nor be
answered twice or out of its log's order.

a. Steps 1-3 are as above: the old workers stop reading and exit, the old front passes
   its N sockets.  Everything in them is unanswered from here on.
b. The new front opens its M sockets, each with its filter (attached and locked) and its
   receive buffer, and joins them to group 7.  From the first join every request is
   queued twice: in one old socket and in one new one.  Any failure so far (opening,
   filters, joining, an old socket that will not leave) closes the new sockets and ends
   the take-over: every request is still in an old socket, and the old server serves on
   (step 5's failure path).
c. Every old socket leaves group 7 (NETLINK_DROP_MEMBERSHIP: nothing new is queued in
   it; the kernel serializes deliveries against membership changes), then is drained
   to the last datagram, without waiting, and closed.  What it held (the
   **leftovers**, from the port allowed to drive the server only) goes to the new shard
   whose filter takes it (:func:`route_leftovers`: routing.shard_of_datagram(…, M)), in
   arrival order.  A log's requests were all in one old socket, so each log keeps its
   order.
d. Each new worker is given its shard's :class:`Leftovers` at its fork and answers them
   before it reads its socket (through its in-flight ring, as if received: a worker
   that dies holding them has them answered -EAGAIN by the front), then reads its
   socket and drops every datagram with a leftover's seq and bytes (a copy queued in b-c;
   counted in ``shardlog_datagrams_dropped_total{reason="duplicate"}``).  The kernel
   sends one request at a time under one seq counter, so a socket queues seqs in
   increasing order: once the worker reads a seq sent after its newest leftover
   (serial arithmetic: the u32 wraps), no copy can follow and the seqs are forgotten.
   A datagram that is not a request has no seq: it was dropped or answered -EINVAL
   and nobody waits for it, so a copy of it is not looked for.
e. As in step 4, each worker restores a log from its instance file and CTR record at its
   first request, whichever old worker last had it (they all committed and exited in
   step 2): no reconnect.  Steps 4-5 follow unchanged.

Failure after c, where the leftovers live in the new server only: a new front that
fails (a worker that cannot start, a pid file it cannot write) ends its workers as in
the same-count case; they answer their leftovers first, then what is queued, and exit;
the new sockets close, and the old server, seeing the connection close, rejoins group 7
with its old sockets and serves on.  Between the new sockets' close and that rejoin the
kernel finds no server (it reconnects: safe, merely slow), and a request queued in a new
socket after its worker's last read is lost (the kernel re-sends it after its timeout).
A new front killed between c and its workers' fork loses the leftovers the same way.  A
new worker that dies still answering its leftovers loses the ones it had not taken into
its ring yet; its successor is given the seqs only, so that nothing is answered twice.
Nothing else differs: with the same count the sockets are inherited, as above.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shardlog import __version__
from shardlog.server import routing
from shardlog.server.control import ControlError, connect
from shardlog.server.inflight import ENTRY_SIZE
from shardlog.server.nlsocket import (
    NETLINK_ADD_MEMBERSHIP,
    SOL_NETLINK,
    leave_group_7,
    open_connector_socket,
)
from shardlog.storage import layout, records, statedir
from shardlog.wire import protocol

log = logging.getLogger(__name__)

#: How long the new server waits for the old one to hand its sockets over: its workers
#: commit every log first (a disk log's device write and fdatasync each).
HAND_OVER_TIMEOUT = 60.0
#: The take-over's own messages (this docstring's), changed whenever they change.
PROTOCOL = 1
#: How long the new server retries binding the metrics port the old one is closing.
METRICS_PORT_WAIT = 5.0
#: The most descriptors one hand-over carries: the shard sockets and the control socket.
MAX_FDS = 1024
#: The most descriptors one message may carry (the kernel's SCM_MAX_FD): more go in
#: several, each with a blank the JSON line ignores, the line itself with the last.
FDS_PER_MESSAGE = 253
_LINE_LIMIT = 1 << 16


class TakeOverError(Exception):
    """The take-over did not happen; the message says why, in one line.  The old server
    serves on."""


def fingerprint() -> dict:
    """What must be the same in both servers for one to continue the other's logs: the
    routing hash (the sockets' filters were compiled by the old one), the instance file's
    and the CTR record's formats, and this hand-over's own protocol.  The package
    version goes along for the logs, and may differ: an upgrade is what a take-over is
    for."""
    samples = [f"fingerprint-{n}" for n in range(64)]
    route = hashlib.sha256()
    for shards in (2, 3, 7):
        route.update(bytes(routing.shard_of_uuid(uuid, shards) for uuid in samples))
        route.update(routing.compile_filter(shards - 1, shards))
    # The formats, as what they produce: the image headers' magics and versions, the
    # instance files' names (a long uuid's is hashed) and a CTR record's first line.
    names = [statedir.instance_file_path(Path("/"), uuid, 1).name
             for uuid in ("fingerprint", "x" * protocol.DM_UUID_LEN)]
    formats = hashlib.sha256(
        f"mirror {layout.MIRROR_MAGIC:#x}/{layout.MIRROR_DISK_VERSION} "
        f"sync {layout.SYNC_MAGIC:#x}/{layout.SYNC_VERSION} {names} "
        f"{records.SUFFIX} {records.FIRST_LINE!r}".encode()).hexdigest()[:16]
    return {"version": __version__, "protocol": PROTOCOL,
            "routing": route.hexdigest()[:16], "formats": formats}


def refusal(request: dict, *, workers: int, state_dir: Path,
            test_peer: int | None) -> str | None:
    """Why the running server must refuse this take-over request, or None."""
    theirs, ours = request.get("fingerprint"), fingerprint()
    if not isinstance(theirs, dict):
        return "the request has no fingerprint"
    for key, value in ours.items():
        if key != "version" and theirs.get(key) != value:
            return (f"the new server's {key} differs ({theirs.get(key)!r}, running "
                    f"{value!r}): stop and start it instead")
    wanted = request.get("workers")
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        return f"the new server wants {wanted!r} workers: not a worker count"
    if Path(str(request.get("state_dir"))).resolve() != state_dir.resolve():
        return (f"the new server's state directory {request.get('state_dir')} is not "
                f"this one's ({state_dir})")
    if request.get("test_peer") != test_peer:
        return f"the new server's test peer {request.get('test_peer')} is not {test_peer}"
    return None


@dataclass
class Received:
    """What the old server handed over: its connection (held until it is gone), its shard
    sockets in shard order and its control socket's listening socket (or None)."""

    conn: socket.socket
    sockets: list[socket.socket]
    control_listener: socket.socket | None
    old_pid: int
    asked_at: float  # monotonic, when the request was sent
    received_at: float  # monotonic, when the sockets arrived
    handed: int = 0  # how many shard sockets the old server ran (its worker count)
    # Another worker count: per new shard, what was drained from the old sockets
    # (:func:`switch_sockets`); None when the sockets are the old server's own.
    leftovers: list[Leftovers] | None = None
    _spawned: set[int] = field(default_factory=set)

    def leftovers_for(self, shard: int) -> Leftovers | None:
        """What the worker spawned now for ``shard`` must answer before it reads its
        socket, and drop from it.  The first worker of a shard gets the datagrams; a
        successor (the first died) only the seqs, to drop: what the first one read was
        answered, by it or -EAGAIN by the front, and must not be answered again."""
        if self.leftovers is None:
            return None
        leftovers = self.leftovers[shard]
        if shard in self._spawned:
            return leftovers.seqs_only()
        self._spawned.add(shard)
        return leftovers


def request_sockets(control_path: Path, *, workers: int, state_dir: Path,
                    test_peer: int | None, receive_buffer: int | None = None,
                    allowed_ports: frozenset[int] = frozenset({0}),
                    timeout: float = HAND_OVER_TIMEOUT) -> Received:
    """Ask the server at ``control_path`` for its sockets (steps 1-3 of the module
    docstring), and, when it runs another number of workers than ``workers``, switch to
    sockets of this server's own (:func:`switch_sockets`: ``receive_buffer`` is theirs,
    ``allowed_ports`` who may drive the server).  TakeOverError if the running server
    refuses, does not answer or is not there, or if the new sockets cannot be set up:
    the running server serves on then."""
    try:
        conn = connect(control_path, timeout)
    except ControlError as exc:
        raise TakeOverError(str(exc)) from None
    asked_at = time.monotonic()
    try:
        conn.sendall(json.dumps({
            "cmd": "take-over", "pid": os.getpid(), "workers": workers,
            "state_dir": str(state_dir), "test_peer": test_peer,
            "fingerprint": fingerprint()}).encode() + b"\n")
        message, fds = _receive_line_and_fds(conn, asked_at + timeout)
    except TimeoutError:
        conn.close()
        raise TakeOverError(f"the server at {control_path} handed nothing over within "
                            f"{timeout:.0f} s") from None
    except OSError as exc:
        conn.close()
        raise TakeOverError(f"talking to the server at {control_path}: "
                            f"{exc.strerror or exc}") from None
    received_at = time.monotonic()
    try:
        if message is None:
            raise TakeOverError(f"the server at {control_path} closed the connection")
        if "error" in message:
            raise TakeOverError(f"the running server refused: {message['error']}")
        count = message.get("sockets")
        has_control = bool(message.get("control"))
        if (not isinstance(count, int) or count < 1
                or len(fds) != count + has_control):
            raise TakeOverError(f"the running server sent {len(fds)} descriptors for "
                                f"{count} sockets: not a take-over answer")
    except TakeOverError:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise
    sockets = [socket.socket(fileno=fd) for fd in fds[:count]]
    listener = socket.socket(fileno=fds[count]) if has_control else None
    received = Received(conn, sockets, listener, int(message.get("pid", 0)), asked_at,
                        received_at, handed=count)
    if count != workers:
        try:
            received.sockets, received.leftovers = switch_sockets(
                sockets, workers, receive_buffer=receive_buffer,
                allowed_ports=allowed_ports)
        except TakeOverError:
            for sock in sockets:
                sock.close()
            if listener is not None:
                listener.close()
            conn.close()
            raise
    conn.settimeout(None)
    return received


def _receive_line_and_fds(conn: socket.socket,
                          deadline: float) -> tuple[dict | None, list[int]]:
    """One JSON line and whatever descriptors came with it; (None, []) at EOF."""
    data, fds = b"", []
    while b"\n" not in data:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk, more, _flags, _address = socket.recv_fds(conn, _LINE_LIMIT, MAX_FDS)
        fds += more
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        data += chunk
        if len(data) > _LINE_LIMIT:
            raise OSError(f"an answer line longer than {_LINE_LIMIT} bytes")
    try:
        message = json.loads(data.partition(b"\n")[0])
    except ValueError:
        message = {"error": f"not an answer: {data[:200]!r}"}
    if not isinstance(message, dict):
        message = {"error": f"not an answer: {data[:200]!r}"}
    return message, fds


def send_sockets(conn: socket.socket, sockets: list[socket.socket],
                 control_listener: socket.socket | None) -> None:
    """The old server's step 3: the shard sockets, in shard order, then the control
    socket's listener, with one line that says what they are (OSError if the connection
    is gone)."""
    line = json.dumps({"sockets": len(sockets), "control": control_listener is not None,
                       "pid": os.getpid()}).encode() + b"\n"
    fds = [sock.fileno() for sock in sockets]
    if control_listener is not None:
        fds.append(control_listener.fileno())
    conn.setblocking(True)
    try:
        while len(fds) > FDS_PER_MESSAGE:
            socket.send_fds(conn, [b" "], fds[:FDS_PER_MESSAGE])
            fds = fds[FDS_PER_MESSAGE:]
        sent = socket.send_fds(conn, [line], fds)
        if sent < len(line):
            conn.sendall(line[sent:])
    finally:
        conn.setblocking(False)


def announce_serving(conn: socket.socket) -> None:
    """The new server's step 4: tell the old one to go (OSError if it is gone)."""
    conn.sendall(json.dumps({"cmd": "serving", "pid": os.getpid()}).encode() + b"\n")



# -- another worker count: the socket switch (module docstring) ----------------------------

_SEQ_MASK = 0xFFFFFFFF  # the kernel's seq is a u32 and wraps


def seq_after(seq: int, other: int) -> bool:
    """Whether ``seq`` was sent after ``other`` (serial number arithmetic: the kernel's
    one seq counter wraps at 2**32, and the seqs compared here are close together)."""
    return 0 < (seq - other) & _SEQ_MASK < 1 << 31


class Leftovers:
    """One new worker's share of what the old sockets held: the datagrams it answers
    before it reads its own socket (in the order the kernel sent them: they came from
    one old socket per log), and, by seq, their bytes, to drop the copies of them that
    its socket queued while both sets of sockets were in group 7.

    A copy is the same multicast: same seq, same bytes.  Both are compared, so that a
    peer that reused a seq (the kernel never does within 2**31 requests) loses nothing.
    The kernel sends one request at a time under one seq counter, so every socket
    queues seqs in increasing order: once the worker's socket yields a seq sent after
    the newest leftover, no copy can follow, and the leftovers are forgotten (the check
    then costs nothing)."""

    def __init__(self, datagrams: Iterable[bytes] = ()) -> None:
        self.datagrams: deque[bytes] = deque(datagrams)
        self._by_seq: dict[int, bytes] | None = {}
        self._newest = 0
        for datagram in self.datagrams:
            self._remember(datagram)
        if not self._by_seq:
            self._by_seq = None

    def _remember(self, datagram: bytes) -> None:
        peeked = protocol.peek_request(datagram)
        if peeked is None:
            return  # not a request: it gets no answer the kernel waits for
        seq = peeked[1]
        assert self._by_seq is not None
        if not self._by_seq or seq_after(seq, self._newest):
            self._newest = seq
        self._by_seq[seq] = datagram

    @property
    def seqs(self) -> frozenset[int]:
        """The seqs whose copies are still dropped (empty once forgotten)."""
        return frozenset(self._by_seq or ())

    @property
    def done(self) -> bool:
        """Nothing left to answer and nothing left to drop: the worker can forget it."""
        return not self.datagrams and self._by_seq is None

    def duplicate(self, datagram: bytes | memoryview) -> bool:
        """Whether ``datagram``, read from the worker's own socket, is a copy of a
        leftover (answered already: drop it)."""
        if self._by_seq is None:
            return False
        peeked = protocol.peek_request(datagram)
        if peeked is None:
            return False
        seq = peeked[1]
        leftover = self._by_seq.get(seq)
        if leftover is not None and leftover == datagram:
            del self._by_seq[seq]  # one copy at most: the kernel sent it once
            if not self._by_seq:
                self._by_seq = None
            return True
        if seq_after(seq, self._newest):
            self._by_seq = None  # everything from here on was sent after the switch
        return False

    def seqs_only(self) -> Leftovers:
        """The same copies to drop, with nothing to answer (for a successor worker)."""
        successor = Leftovers()
        if self._by_seq:
            successor._by_seq, successor._newest = dict(self._by_seq), self._newest
        return successor


def route_leftovers(drained: Iterable[Iterable[bytes]], shards: int) -> list[Leftovers]:
    """Each new shard's leftovers, from what each old socket held in arrival order: a
    datagram goes where the new sockets' filters send it (routing.shard_of_datagram), so
    that its copy, if the new sockets queued one, is in the same worker's socket.  A log's
    requests were all in one old socket, so each log's order is kept."""
    routed: list[list[bytes]] = [[] for _ in range(shards)]
    for old_socket_datagrams in drained:
        for datagram in old_socket_datagrams:
            routed[routing.shard_of_datagram(datagram, shards)].append(datagram)
    return [Leftovers(datagrams) for datagrams in routed]


def drain(sock: socket.socket, allowed_ports: frozenset[int]) -> list[bytes]:
    """Everything ``sock`` holds, in arrival order, without waiting; what comes from a
    port not allowed to drive the server is dropped (a worker would drop it too)."""
    datagrams: list[bytes] = []
    sock.setblocking(False)
    while True:
        try:
            datagram, (port, _groups) = sock.recvfrom(ENTRY_SIZE)
        except BlockingIOError:
            return datagrams
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                # Requests were lost before the switch: the kernel re-sends them after
                # its timeout, as it would to a worker.
                log.warning("an old shard socket overflowed: requests were lost")
                continue
            log.error("draining an old shard socket: %s", exc)
            return datagrams
        if port in allowed_ports:
            datagrams.append(datagram)
        else:
            log.warning("dropped a datagram from netlink port %d in an old shard socket",
                        port)


def switch_sockets(old_sockets: list[socket.socket], shards: int, *,
                   receive_buffer: int | None,
                   allowed_ports: frozenset[int]) -> tuple[list[socket.socket],
                                                           list[Leftovers]]:
    """Replace the old server's shard sockets, whose workers have stopped reading, by
    ``shards`` new ones: (the new sockets, in group 7, and each one's leftovers).  The
    old sockets are closed here.

    Everything that can fail is done first: open, filter, bind and join every new socket
    (TakeOverError, the new ones closed: the old sockets were never touched and the old
    server serves on).  From the first join a request is queued twice, in one old and
    one new socket; then every old socket leaves group 7 (nothing new arrives in it)
    and is drained to the last datagram: what it held goes to the new workers as
    leftovers, and the copies in the new sockets are dropped by seq (:class:`Leftovers`).
    A request is thus accepted at every instant, and answered once."""
    new_sockets: list[socket.socket] = []
    try:
        for index in range(shards):
            new_sockets.append(open_connector_socket(receive_buffer=receive_buffer,
                                                     shard=(index, shards)))
        for sock in new_sockets:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, protocol.CN_IDX_DM)
        # Before anything is drained: should one old socket refuse to leave, every old
        # socket still holds all it was sent, and the old server can serve on.
        for sock in old_sockets:
            leave_group_7(sock)
    except OSError as exc:
        for sock in new_sockets:
            sock.close()  # a copy queued there is still in its old socket
        for sock in old_sockets:  # rejoined by the old server too, should it resume
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, protocol.CN_IDX_DM)
        raise TakeOverError(f"cannot set up {shards} new shard sockets: "
                            f"{exc.strerror or exc}") from None
    # No going back from here: the old sockets' leftovers are in this process only.
    drained = []
    for sock in old_sockets:
        drained.append(drain(sock, allowed_ports))
        sock.close()
    leftovers = route_leftovers(drained, shards)
    log.info("switched from %d shard sockets to %d: %d requests handed on (%s)",
             len(old_sockets), shards, sum(len(each.datagrams) for each in leftovers),
             ", ".join(str(len(each.datagrams)) for each in leftovers))
    return new_sockets, leftovers
