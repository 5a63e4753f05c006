"""A worker: the logs of one shard, served from request frames on a pipe.  No netlink.

Theory of operation
-------------------
The front process forks N workers and routes every request by a hash of its log's uuid,
so all instances of one log (a reload's old and new luid) meet in one worker, in order,
with no locking between processes.  A worker owns a :class:`~shardlog.logtable.LogTable`
and the instance files of its logs.

Each wakeup it reads everything the pipe holds and answers the batch:

1. every request is decoded and applied; replies to all but FLUSH go out at once, in one
   write;
2. the FLUSHes only staged their marks: the batch's logs are then committed one after
   another (msync / fdatasync) and only then are their replies written.  Under load a
   batch holds the FLUSHes of many logs, and none waits for a commit it does not need:
   a reply never precedes its own log's commit;
3. at most once a second while it is busy, and at once when the front asks, it sends the
   front a report of its logs and counters (workerstats.py) on the same pipe.

A malformed datagram gets the -EINVAL reply the codec prepared (the front forwards only
datagrams it could route, so there always is one).  Nothing a request does can end the
loop: LogTable answers every failure with an errno.

The worker ends at EOF on its request pipe — the front closed it to stop the server, or
the front died — by committing every log (clears included) and closing its files, which
stay for the next server.  It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or
systemd's stop reaches the whole process group, and the front orders the shutdown so
that the requests in flight are answered first.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from pathlib import Path

from . import frames, protocol
from .frames import FrameReader, Kind
from .logtable import LogTable
from .protocol import REPLY_DATA_OFFSET, REPLY_ERROR_OFFSET, ProtocolError
from .protocol import RequestType as T
from .regionmap import take_failures
from .workercounters import (
    RECONNECT_CTRS,
    RECOVERY_COMPLETED,
    RECOVERY_HANDED_OUT,
    REGION_CLEARS,
    REGION_MARKS,
    Count,
    count_nothing,
    key,
    observe,
)
from .workerstats import Reporter

log = logging.getLogger(__name__)


def run(index: int, requests_fd: int, replies_fd: int, state_dir: Path,
        inherited: list) -> None:
    """The worker process's main function (the target of its multiprocess.Process).

    ``inherited`` are the front's descriptors (numbers, or objects with ``close()``) that
    the fork copied here.  They are closed first: above all the netlink socket, which
    would otherwise stay subscribed to group 7 after the front died, so that the kernel
    would wait 15 s on a socket nobody reads instead of reconnecting; and the other
    workers' pipes, whose EOF would never come."""
    for item in inherited:
        _close_quietly(item)
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    table = LogTable(state_dir)
    try:
        _write(replies_fd, frames.pack(Kind.READY))
        serve(table, requests_fd, replies_fd)
    finally:
        count = len(table.logs)
        table.close()
        log.debug("worker %d: stopped, %d logs committed", index, count)


def serve(table: LogTable, requests_fd: int, replies_fd: int,
          reporter: Reporter | None = None) -> None:
    """Answer request frames until EOF on ``requests_fd``, and report to the front
    (workerstats.py): at most once a second while busy, and when asked."""
    reporter = reporter or Reporter()
    table.count = reporter.count
    reader = FrameReader()
    while True:
        if not _readable(requests_fd, reporter.wait()):
            _write(replies_fd, _stats_frame(reporter, table))  # gone idle: the last deltas
            continue
        received = reader.read(requests_fd)
        if received is None:
            if reader.partial:
                log.error("the front's last request frame was cut off")
            return
        now = bytearray()
        deferred_tags = []  # FLUSHes staged in this batch, in LogTable's order
        asked = False
        batch = 0
        for kind, tag, datagram in received:
            if kind == Kind.REQUEST:
                reporter.active = True
                batch += 1
                reply = answer(table, datagram, reporter.count)
                if reply is not None:
                    now += frames.pack(Kind.REPLY, tag, reply)
                else:
                    deferred_tags.append(tag)
            elif kind == Kind.REPORT:
                asked = True
            else:
                log.error("unexpected frame kind %d from the front, ignored", kind)
        if now:
            _write(replies_fd, now)
        if deferred_tags:
            replies = table.commit_deferred()
            _write(replies_fd, b"".join(
                frames.pack(Kind.REPLY, tag, reply)
                for tag, reply in zip(deferred_tags, replies, strict=True)))
        if batch:
            observe(reporter.count, "worker_batch_size", batch)
        if asked or reporter.due():
            _write(replies_fd, _stats_frame(reporter, table))


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` has something to read (or its EOF) within ``timeout`` seconds."""
    if timeout is None:
        return True  # nothing else to do: the read itself may block
    return bool(select.select([fd], [], [], timeout)[0])


def _stats_frame(reporter: Reporter, table: LogTable) -> bytes:
    for source, failures in take_failures().items():
        reporter.count(key("storage_errors", kind=source), failures)
    return frames.pack(Kind.STATS, 0, reporter.report(table).encode())


def answer(table: LogTable, datagram: bytes, count: Count = count_nothing) -> bytes | None:
    """The reply to one datagram, or None for a FLUSH whose commit is deferred; what it
    did is counted with ``count`` (workercounters.py)."""
    try:
        request = protocol.decode_datagram(datagram)
    except ProtocolError as exc:
        log.warning("malformed request: %s", exc.reason)
        return exc.reply or b""  # no reply possible: an empty frame settles the tag
    reply = table.answer(request, defer_commit=True)
    if request.request_type in _COUNTED and (
            reply is None or not _reply_error(reply, REPLY_ERROR_OFFSET)[0]):
        _count(count, request, reply)
    return reply


# What the metrics count of a request that succeeded (a deferred FLUSH staged its marks).
_COUNTED = frozenset({T.MARK_REGION, T.FLUSH, T.CLEAR_REGION, T.GET_RESYNC_WORK,
                      T.SET_REGION_SYNC, T.CTR})
_reply_error = protocol.REPLY_ERROR.unpack_from


def _count(count: Count, request: protocol.Request, reply: bytes | None) -> None:
    request_type = request.request_type
    if request_type is T.MARK_REGION or request_type is T.FLUSH:
        if request.regions:
            count(REGION_MARKS, len(request.regions))
    elif request_type is T.CLEAR_REGION:
        count(REGION_CLEARS, len(request.regions))
    elif request_type is T.GET_RESYNC_WORK:
        if reply is not None and protocol.S64.unpack_from(reply, REPLY_DATA_OFFSET)[0] == 1:
            count(RECOVERY_HANDED_OUT, 1)
    elif request_type is T.SET_REGION_SYNC:
        if request.in_sync:
            count(RECOVERY_COMPLETED, 1)
    elif request.reconnect:  # a CTR
        count(RECONNECT_CTRS, 1)


def _write(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _close_quietly(item) -> None:
    try:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()
    except OSError:
        pass
