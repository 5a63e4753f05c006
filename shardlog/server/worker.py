"""A worker: the logs of one shard, read from its own netlink socket and answered there.

Theory of operation
-------------------
The front opens one connector socket per shard, joined to group 7 with a BPF filter
that accepts only the requests whose uuid hashes to that shard (routing.py), and forks
one worker per shard, which inherits its socket.  The kernel runs the filters, so each
request wakes exactly one process, and every instance of a log (a reload's old and new
luid: same uuid) meets in one worker, in order, with no locking between processes.  A
worker owns a :class:`~shardlog.log.logtable.LogTable` and the instance files of its logs.

Each wakeup it drains its socket (at most :data:`inflight.CAPACITY` datagrams) straight
into its :class:`~shardlog.server.inflight.InFlight` ring, which the front can read if the
worker dies, drops whatever does not come from the kernel's port (or the test peer's),
and answers the batch.  Draining means a readiness poll before each further read, which
finds nothing when the kernel has one request in flight — the common case: a mirror's
requests come one at a time from its one kernel thread.  So after a batch of one the
next wakeup reads one datagram and answers it (three syscalls: wait, read, reply), and
drains only after a batch that found more, every :data:`PROBE_EVERY`-th time, or when
its request is a FLUSH whose commit writes a device (step 2: that commit is shared
with whatever else is queued by then).  A datagram left queued costs nothing but the next wakeup.
The clock is read twice a batch, as the first datagram is held (its arrival, and the
batch's start for the front's hang check) and once the replies are sent (their
latency, and whether a report is due):

1. every request is decoded and its outcome decided by the log table
   (:meth:`LogTable.decide <shardlog.log.logtable.LogTable.decide>`), encoded once and
   sent at once — all but a FLUSH that left something to commit;
2. those FLUSHes only staged their marks: the batch's logs are then committed one after
   another (a disk log's device write + fdatasync; a core log needs none: design.md)
   and only then are their replies sent.  Under load a batch holds the FLUSHes of many
   logs, and none waits for a commit it does not need: a reply never precedes its own
   log's commit.  What the metrics count of a request (its result, the regions it
   marked...) is read from its outcome, never from the reply's bytes;
3. at most once a second while it is busy it sends the front a report of its counters,
   requests included, on its events pipe; when the front asks, a report of its logs too,
   listed :data:`LIST_SLICE` logs at a time with the socket answered between two slices
   (workerstats.py); while someone traces, one TRACE frame per batch (commands.py).

A malformed datagram gets the -EINVAL reply the codec prepared, or is dropped when it
was not a request (only the designated shard's filter accepts such datagrams).  Nothing a
request does can end the loop: LogTable answers every failure with an errno.

How a worker ends is an order of the front's (frames.Kind), never a guess:

- **STOP** (the server stops for good): leave group 7 (so that the kernel's next request
  finds no server and reconnects, rather than waiting on a socket nobody reads), answer
  what is still queued, commit every log (clears included) and close the files, which
  stay for the next server.
- **HAND_OVER** (a new server takes the socket over: handover.py): read nothing more,
  commit every log, close the files and exit *without* leaving group 7: requests that
  arrive now wait queued in the socket for the successor, which inherits the same socket.
- **EOF** on the control pipe with no order: the front died.  Outside a take-over the
  worker stops as for STOP.  A worker of a server that is still taking over (it holds
  the take-over connection, ``take_over_conn``) does not leave group 7: the old server,
  which holds the same sockets, serves on once every holder of that connection is gone.
  TAKEN_OVER ends that state (the old server is gone; the connection is closed).

A worker of a server that took over from one with another worker count starts with
**leftovers** (handover.py: what the old sockets held, routed to this shard): it answers
them before it reads its socket, and drops the copies of them its socket queued while
both servers' sockets were in group 7 (same seq), counted as dropped "duplicate".

It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or systemd's stop reaches the whole
process group, and the front orders the shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardlog.log.logtable import LogTable, StatusListing
from shardlog.log.outcome import encode
from shardlog.observability.workercounters import Count, count_nothing, key, observe
from shardlog.observability.workerstats import LogRows, Reporter
from shardlog.server.handover import Leftovers
from shardlog.server.inflight import (
    CAPACITY,
    DROPPING_COPIES,
    ENTRY_SIZE,
    PROGRESS,
    STARTED,
    InFlight,
)
from shardlog.server.nlsocket import leave_group_7
from shardlog.server.outbox import Outbox
from shardlog.wire import frames
from shardlog.wire.frames import FrameReader, Kind
from shardlog.wire.protocol import ProtocolError
from shardlog.wire.protocol import decode_datagram as decode

log = logging.getLogger(__name__)

# How a worker ends (module docstring): stopped for good; handed over to a successor; its
# front died while taking over (answer what is queued, stay in group 7).
STOP, HAND_OVER, ORPHANED = "stop", "hand over", "orphaned"

# A batch of one is not followed by a look for more (module docstring: "Each wakeup"),
# except every PROBE_EVERY-th such batch, so that a load that builds up is found.
PROBE_EVERY = 8

# Logs described between two looks at the socket while a report asked for is listed:
# about 0.7 ms of the 20-50 ms that 5,000 logs take, so that a scrape holds a worker's
# requests up that long at a time (workerstats.py; 250 measured 2 ms a slice and a p99
# half as good again under a scrape a second).
LIST_SLICE = 100

# One traced request in a TRACE frame: arrival (wall clock, s), latency (s), the sizes of
# the request and the reply, then both datagrams.
TRACE_ENTRY = struct.Struct("=ddHH")

# What may wait in the outbox for a front that does not read (stopped, hung) before a
# batch's TRACE frame is dropped instead of queued: a traced request is ~400 bytes, so a
# busy worker would otherwise grow by megabytes a second.  Reports are never dropped
# (their counters are increments); the next TRACE frame sent carries, as its tag, how
# many traced requests were dropped before it, and the tracers are told (commands.py).
TRACE_BACKLOG = 4 << 20


class Peer:
    """Who may drive the worker and where replies go: the kernel (netlink port 0), or in
    tests a named port in a private namespace (``--test-peer``)."""

    def __init__(self, test_peer: int | None = None) -> None:
        self.allowed_ports = frozenset({0} if test_peer is None else {0, test_peer})
        self.reply_address = (test_peer or 0, 0)


def run(index: int, shard: socket.socket, control_fd: int, events_fd: int,
        state_dir: Path, in_flight: InFlight, peer: Peer, resend_watch: dict[bytes, int],
        inherited: list, take_over_conn: socket.socket | None = None,
        leftovers: Leftovers | None = None) -> None:
    """The worker process's main function (the target of its multiprocess.Process).

    ``inherited`` are the front's descriptors (numbers, or objects with ``close()``) that
    the fork copied here and this worker must not hold: above all the other shards'
    sockets, which would otherwise stay in group 7 after the front and their workers
    died, so that the kernel would wait 15 s on sockets nobody reads instead of
    reconnecting; and the other workers' pipes, whose EOF would never come.
    ``resend_watch`` are the requests a dead predecessor held, answered -EAGAIN by the
    front: their re-sends are counted (requeststats.py).  ``take_over_conn``: the
    connection to the server this one is taking over, held until TAKEN_OVER;
    ``leftovers``: what to answer before reading the socket, and drop from it (module
    docstring)."""
    for item in inherited:
        _close_quietly(item)
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reporter = Reporter()
    table = LogTable(state_dir, reporter.count)
    if resend_watch:
        reporter.requests.resend_watch = dict(resend_watch)
        reporter.requests.resend_until = max(resend_watch.values())
    worker = ShardWorker(table, shard, in_flight, peer, reporter, Outbox(events_fd))
    worker.take_over_conn = take_over_conn
    worker.take_leftovers(leftovers)  # None too: a dead predecessor's flag is cleared
    try:
        worker.outbox.send(frames.pack(Kind.READY))
        while leftovers is not None and leftovers.datagrams:
            worker.answer_batch()  # the leftovers, before anything of the socket
        worker.forget_leftovers_once_done()  # no copies to drop: nothing left of them
        worker.serve(control_fd)
    finally:
        count = len(table.logs)
        table.close()
        log.debug("worker %d: stopped, %d logs committed", index, count)


@dataclass
class AskedReport:
    """A report the front asked for (``tag``: its number for the order, which the report
    carries back), while its logs are listed a slice at a time between batches."""

    tag: int
    listing: StatusListing
    rows: LogRows = field(default_factory=LogRows)  # the logs listed so far, encoded
    asked_again: int | None = None  # a later order, come while this one was listed

    def list_some(self, count: int) -> bool:
        """List the next ``count`` logs; whether the report is complete."""
        self.rows.add(self.listing.take(count))
        return self.listing.done


class ShardWorker:
    """One shard's request loop: its socket, its logs, its in-flight ring."""

    def __init__(self, table: LogTable, sock: socket.socket, in_flight: InFlight,
                 peer: Peer, reporter: Reporter, outbox: Outbox) -> None:
        self.table = table
        self.sock = sock
        self.in_flight = in_flight
        self.peer = peer
        self.reporter = reporter
        self.outbox = outbox  # the events pipe to the front
        self.tracing = False
        self._traced = bytearray()  # this batch's TRACE entries, while tracing
        self._traced_count = 0  # how many entries _traced holds
        self._untraced = 0  # traced requests dropped since the last TRACE frame sent
        # Batches by size since the last report: a list, one add per batch.
        self._batch_sizes = [0] * (CAPACITY + 1)
        self._drain = True  # look for more after the first datagram of a wakeup
        self._lone_batches = 0  # batches of one in a row
        self._arrived = 0  # when the batch held now was read (monotonic ns)
        self.replied = 0  # when the last batch's replies had all left (monotonic ns)
        self._last_warning: dict[str, float] = {}
        # What every batch uses, bound once: a batch of one is a few dozen lines, and
        # under emulation each attribute chain or bound method it skips is worth having
        # skipped (bench_core.py, "from read to reply").
        self._decide, self._count = table.decide, reporter.count
        self._stats = reporter.requests
        self._recvfrom_into, self._sendto = sock.recvfrom_into, sock.sendto
        self._entries, self._headers = in_flight.entries, in_flight.headers
        self._counters = in_flight.counters
        sock.setblocking(False)
        readable = select.poll()  # whether the socket holds a datagram now
        readable.register(sock, select.POLLIN)
        self._poll = readable.poll
        # Held while the front is taking over from another server: EOF then must not
        # take this shard's socket, which the old server still holds, out of group 7.
        self.take_over_conn: socket.socket | None = None
        # After a take-over from another worker count: to answer first, then to drop.
        self.leftovers: Leftovers | None = None

    def serve(self, control_fd: int) -> None:
        """Answer the shard's requests until the front's STOP or HAND_OVER order, or EOF
        on ``control_fd`` (module docstring); report to the front through the outbox."""
        reporter, outbox = self.reporter, self.outbox
        reader = FrameReader(1 << 12)
        poller = select.epoll()
        sock_fd = self.sock.fileno()
        poller.register(sock_fd, select.EPOLLIN)
        poller.register(control_fd, select.EPOLLIN)
        watching_pipe = False  # for the events pipe to take what waits in the outbox
        now = None  # the clock in seconds, as the last batch read it; None: read it
        report = None  # the report asked for, while its logs are being listed
        try:
            while True:
                if outbox.pending != watching_pipe:
                    watching_pipe = outbox.pending
                    if watching_pipe:
                        poller.register(outbox.fd, select.EPOLLOUT)
                    else:
                        poller.unregister(outbox.fd)
                # While listing, only look for requests between two slices.
                wait = 0 if report is not None else reporter.wait(now)
                events = poller.poll(-1 if wait is None else wait)
                if len(events) > 1:
                    # Orders first: one given before a request was sent (tracing on for a
                    # tracer told it is subscribed) applies to that request.
                    events.sort(key=lambda event: event[0] != control_fd)
                asked, ending, now = None, None, None
                for fd, _mask in events:
                    if fd == sock_fd:
                        if self.answer_batch(readable=True):
                            if self._traced:
                                self._after_batch()
                            now = self.replied / 1e9
                    elif fd == control_fd:
                        asked, ending = self._on_control(reader, control_fd)
                    else:
                        outbox.flush()
                if ending == HAND_OVER:
                    # Read nothing more: what is queued now is the successor's.  The
                    # logs are committed and closed by run() on the way out.
                    self._send_last_report()
                    return
                if ending is not None:
                    self._stop(leave=ending == STOP)
                    return
                if asked is not None:
                    if report is None:
                        report = AskedReport(asked, self.table.listing())
                    else:  # listed next: the one under way began before this order
                        report.asked_again = asked
                if report is not None:
                    if report.list_some(LIST_SLICE):
                        outbox.send(self._stats_frame(report.tag, report.rows))
                        again = report.asked_again
                        report = None if again is None else AskedReport(
                            again, self.table.listing())
                        now = None
                elif not events or reporter.due(now):
                    # Due (the poll's timeout is when): a periodic report, without the
                    # logs even when the worker seems idle (workerstats.py).
                    outbox.send(self._stats_frame())
                    now = None
        finally:
            poller.close()

    def _on_control(self, reader: FrameReader,
                    control_fd: int) -> tuple[int | None, str | None]:
        """The front's orders: (the number of the latest order for a report, None if
        none came; how the worker ends: STOP, HAND_OVER, ORPHANED, or None: not yet)."""
        received = reader.read(control_fd)
        if received is None:  # the front died
            return None, STOP if self.take_over_conn is None else ORPHANED
        asked = None
        for kind, tag, _payload in received:
            if kind == Kind.SEND_REPORT:
                asked = tag
            elif kind == Kind.TRACING:
                self.tracing = bool(tag)
            elif kind == Kind.STOP:
                return asked, STOP  # the last order: nothing after it is read
            elif kind == Kind.HAND_OVER:
                return asked, HAND_OVER
            elif kind == Kind.TAKEN_OVER:
                if self.take_over_conn is not None:
                    _close_quietly(self.take_over_conn)
                    self.take_over_conn = None
            else:
                log.error("unexpected frame kind %d from the front, ignored", kind)
        return asked, None

    def _stop(self, *, leave: bool = True) -> None:
        """Leave group 7 (the front did, unless it died) unless told not to, then answer
        what is queued; the last report, and everything still for the front, written."""
        if leave:
            with contextlib.suppress(OSError):
                leave_group_7(self.sock)
        while self.answer_batch():
            self._after_batch()
        self._send_last_report()

    def _after_batch(self) -> None:
        """The batch's TRACE frame, or, while the front leaves more than TRACE_BACKLOG
        unread, its entries counted as dropped (the next frame's tag says how many)."""
        if self._traced:
            if self.outbox.backlog > TRACE_BACKLOG:
                self._untraced += self._traced_count
            else:
                self.outbox.send(frames.pack(Kind.TRACE, self._untraced, bytes(self._traced)))
                self._untraced = 0
            self._traced.clear()
            self._traced_count = 0

    def answer_batch(self, readable: bool = False) -> int:
        """Read what the socket holds (up to the ring's capacity) and answer it all;
        the number of datagrams held.  ``readable``: the socket is known to hold one."""
        held: list[int] = []  # the sizes of the datagrams held, entry by entry
        drained = self._receive(held, readable)
        if not held:
            return 0
        arrived, stats = self._arrived, self._stats
        self.reporter.active = True
        decide, count, sendto, address = (self._decide, self._count, self._sendto,
                                          self.peer.reply_address)
        requests_seen, resend_watch = stats.requests, stats.resend_watch
        entries, headers, tracing = self._entries, self._headers, self.tracing
        sent = []  # (type, arrival, error): counted once the batch is answered
        deferred = []  # (entry, request): FLUSHes staged, answered after the commit
        start = 0
        while True:
            for index in range(start, len(held)):
                datagram = bytes(entries[index][:held[index]])
                try:
                    request = decode(datagram)
                except ProtocolError as exc:
                    self._malformed(index, datagram, exc)
                    continue
                request_type = request.request_type
                requests_seen[request_type] += 1
                if resend_watch:
                    stats.check_resend(datagram, arrived)
                outcome = decide(request)
                if outcome is None:
                    deferred.append((index, request))
                    continue
                reply = encode(request, outcome)
                try:  # inline: a call less per request
                    sendto(reply, address)
                except OSError as exc:
                    self._send_refused(exc)
                headers[index] = 0  # answered: the ring's entry is free (inflight.py)
                error, _payload, counted, amount = outcome
                sent.append((request_type, arrived, error))
                if counted is not None:
                    count(counted, amount)
                if tracing:
                    self._trace(datagram, reply, arrived)
            if deferred and not drained and self.table.staged_writes_device():
                # A device commit to make, in a batch read without draining: what is
                # queued by now joins the batch, and shares the commit.
                start, drained = len(held), True
                self._receive(held, False)
                if len(held) > start:
                    continue
            break
        now = time.monotonic_ns()
        if sent:
            stats.answered(sent, now)
        if deferred:
            sent = []
            for (index, request), outcome in zip(deferred, self.table.commit_staged(),
                                                 strict=True):
                reply = encode(request, outcome)
                try:
                    sendto(reply, address)
                except OSError as exc:
                    self._send_refused(exc)
                if tracing:  # before the entry is freed: freeing zeroes its header
                    self._trace(entries[index][:held[index]].tobytes(), reply, arrived)
                headers[index] = 0
                error, _payload, counted, amount = outcome
                sent.append((request.request_type, arrived, error))
                if counted is not None:
                    count(counted, amount)
            now = time.monotonic_ns()
            stats.answered(sent, now)
        self.replied = now
        self._counters[PROGRESS] += 1  # the batch is done (the hang check)
        held_count = len(held)
        self._batch_sizes[held_count] += 1  # a histogram of them at the next report
        if held_count > 1:
            self._drain, self._lone_batches = True, 0
        else:
            self._lone_batches = lone = self._lone_batches + 1
            self._drain = not lone % PROBE_EVERY
        return held_count

    def _receive(self, sizes: list[int], readable: bool) -> bool:
        """Read the socket into the ring's next entries, appending the sizes of the
        datagrams held to ``sizes``; whether the socket was drained (or the ring filled)
        rather than left after one datagram (module docstring).  ``readable``: the socket
        is known to hold a datagram.

        Each read but a first one known to succeed is preceded by a zero-timeout poll
        rather than ended by the BlockingIOError of an empty socket: raising and catching
        that exception costs about as much as a whole round trip with the kernel
        (measured: 15 µs against under 1 µs for the poll)."""
        receive, allowed, poll = self._recvfrom_into, self.peer.allowed_ports, self._poll
        entries, headers, stats = self._entries, self._headers, self._stats
        leftovers = self.leftovers
        if leftovers is not None:
            if leftovers.datagrams:
                self._hold_leftovers(leftovers, sizes)
                return True
            if self.forget_leftovers_once_done():
                leftovers = None
        held = len(sizes)
        # Only a wakeup's first read may stop after one datagram: the others drain.
        drain = self._drain or held or not readable
        while held < CAPACITY and (readable or poll(0)):
            readable = False
            try:
                size, (port, _groups) = receive(entries[held])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    # Nothing else is expected of a netlink receive; whatever it is, the
                    # worker must stay up for the next wakeup.
                    self._warn("receive", "receiving from the shard socket: %s", exc)
                    break
                stats.enobufs += 1
                self._warn("enobufs", "receive buffer overflowed: requests were lost; the "
                           "kernel re-sends them after 15 s (%d so far)", stats.enobufs)
                continue
            if port not in allowed:
                headers[held] = 0  # dropped: the entry holds nothing (inflight.py)
                self.reporter.active = True
                stats.dropped["forged_sender"] += 1
                self._warn("sender", "dropped a datagram from netlink port %d: only the "
                           "kernel may drive shardlog", port)
                continue
            if leftovers is not None:
                copy = leftovers.duplicate(entries[held][:size])
                if self.forget_leftovers_once_done():  # read past the last copy
                    leftovers = None
                if copy:
                    headers[held] = 0
                    self.reporter.active = True
                    stats.dropped["duplicate"] += 1  # its leftover was answered
                    continue
            # Held since the receive wrote it: a kill from here on leaves it for the front.
            if not held:
                self._counters[STARTED] = self._arrived = time.monotonic_ns()
            sizes.append(size)
            held += 1
            if not drain:
                return False
        return True

    def take_leftovers(self, leftovers: Leftovers | None) -> None:
        """What to answer before reading the socket, and drop from it (None: nothing);
        the front is told (it refuses a take-over until they are forgotten: inflight.py)."""
        self.leftovers = leftovers
        self._counters[DROPPING_COPIES] = leftovers is not None

    def forget_leftovers_once_done(self) -> bool:
        """Forget the leftovers once nothing of them is left to answer or to drop, and
        tell the front (it refuses a take-over until then: inflight.py); whether they
        were forgotten now."""
        if self.leftovers is None or not self.leftovers.done:
            return False
        self.leftovers = None
        self._counters[DROPPING_COPIES] = 0
        return True

    def _hold_leftovers(self, leftovers: Leftovers, sizes: list[int]) -> None:
        """A batch of leftovers, put in the ring as if received (so that the front
        answers -EAGAIN what a dying worker held of them: the copy's own header holds
        the entry, inflight.py)."""
        entries = self.in_flight.entries
        self.in_flight.counters[STARTED] = self._arrived = time.monotonic_ns()
        while leftovers.datagrams and len(sizes) < CAPACITY:
            datagram = leftovers.datagrams.popleft()[:ENTRY_SIZE]
            entries[len(sizes)][:len(datagram)] = datagram
            sizes.append(len(datagram))

    def _malformed(self, index: int, datagram: bytes, exc: ProtocolError) -> None:
        stats = self.reporter.requests
        if exc.reply is None:
            stats.dropped["not_for_us"] += 1
            self._warn("not_for_us", "dropped a datagram not for dm-log-userspace: %s",
                       exc.reason)
        else:
            stats.dropped["malformed"] += 1
            self._warn("malformed", "malformed request answered -EINVAL: %s", exc.reason)
            self._send(exc.reply)
        self.in_flight.answered(index)
        if self.tracing:
            self._trace(datagram, exc.reply or b"", time.monotonic_ns())

    def _send(self, reply: bytes) -> None:
        try:
            self.sock.sendto(reply, self.peer.reply_address)
        except OSError as exc:
            self._send_refused(exc)

    def _send_refused(self, exc: OSError) -> None:
        stats = self.reporter.requests
        stats.send_errors += 1
        self._warn("send", "a reply was refused: %s (%d so far)", exc.strerror,
                   stats.send_errors)

    def _trace(self, datagram: bytes, reply: bytes, arrived_ns: int) -> None:
        latency = (time.monotonic_ns() - arrived_ns) / 1e9
        self._traced += TRACE_ENTRY.pack(time.time() - latency, latency, len(datagram),
                                         len(reply))
        self._traced += datagram
        self._traced += reply
        self._traced_count += 1

    def _send_last_report(self) -> None:
        """Every log, listed at once, and everything for the front written, however long
        it takes: the worker is ending and nothing waits for it any more."""
        self.outbox.send(self._stats_frame(0, LogRows(self.table.statuses())))
        self.outbox.drain()

    def _stats_frame(self, tag: int = 0, rows: LogRows | None = None) -> bytes:
        """A report of the counters, and of the logs if ``rows`` are given (``tag``: the
        order it answers, 0 for none); without them, a periodic report."""
        count = self.reporter.count
        for source, failures in self.table.storage_failures.take().items():
            count(key("storage_errors", kind=source), failures)
        sizes = self._batch_sizes
        for size, batches in enumerate(sizes):
            if batches:
                observe(count, "worker_batch_size", size, batches)
        sizes[:] = [0] * len(sizes)
        report = self.reporter.report(None)
        return frames.pack(Kind.WORKER_REPORT, tag, report.encode(rows))

    def _warn(self, kind: str, message: str, *args) -> None:
        """A warning at most once a second per kind: a flood must not flood the log."""
        now = time.monotonic()
        if now - self._last_warning.get(kind, -1.0) >= 1.0:
            self._last_warning[kind] = now
            log.warning(message, *args)


def decode_trace(payload: bytes) -> list[tuple[float, float, bytes, bytes]]:
    """A TRACE frame's entries: ``(arrival time, latency s, datagram, reply)``."""
    entries, offset = [], 0
    while offset + TRACE_ENTRY.size <= len(payload):
        arrived, latency, request_size, reply_size = TRACE_ENTRY.unpack_from(payload, offset)
        offset += TRACE_ENTRY.size
        datagram = payload[offset:offset + request_size]
        reply = payload[offset + request_size:offset + request_size + reply_size]
        offset += request_size + reply_size
        entries.append((arrived, latency, datagram, reply))
    return entries


def answer(table: LogTable, datagram: bytes, count: Count = count_nothing) -> bytes:
    """The reply to one datagram answered on its own, as a batch of one (a FLUSH is
    committed first; empty: a datagram that gets no reply); what it did is counted with
    ``count`` (workercounters.py), from its outcome."""
    try:
        request = decode(datagram)
    except ProtocolError as exc:
        log.warning("malformed request: %s", exc.reason)
        return exc.reply or b""
    outcome = table.decide(request)
    if outcome is None:
        outcome = table.commit_staged()[-1]  # staged last
    if outcome.counted is not None:
        count(outcome.counted, outcome.amount)
    return encode(request, outcome)


def _close_quietly(item) -> None:
    try:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()
    except OSError:
        pass
