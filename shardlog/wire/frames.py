"""Frames between the front process and its workers: raw bytes over pipes, no pickling.

Every frame is a 9-byte header (payload length, kind, tag) and its payload.  Requests
and replies never travel here: each worker reads its shard's netlink socket and replies
to the kernel itself (server/arbiter.py).  The pipes carry what is off the request path: a
worker's readiness, its reports (workerstats.py), the requests it traced while someone
traces, and the front's orders (report now, trace or stop tracing, stop or hand over).

Pickling costs ~38 µs a round trip and multiprocess's Connection framing 11-17 µs against
~7 µs for a raw pipe (design.md); a struct header and one ``os.write`` per batch keep a
frame near the raw cost.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum

HEADER = struct.Struct("=IBI")  # payload length, kind, tag
# Far above any datagram or report (a worker with 10,000 logs reports ~1.5 MB): a larger
# length means a corrupt stream.
MAX_PAYLOAD = 64 << 20
READ_SIZE = 1 << 20  # what one read takes


class Kind(IntEnum):
    READY = 3  # worker → front: started, its logs table is up (tag 0, no payload)
    # worker → front: a workerstats.WorkerReport; tag: the SEND_REPORT it answers (it lists
    # the logs), 0 for a periodic one
    WORKER_REPORT = 4
    # front → worker: send a WORKER_REPORT listing the logs (tag: the order's number,
    # which the report carries back; no payload)
    SEND_REPORT = 5
    TRACING = 6  # front → worker: tag 1, send TRACE frames from now on; tag 0, stop
    TRACE = 7  # worker → front: the requests of one batch and their replies (server/commands.py)
    # front → worker, the ways a worker ends (handover.py): STOP, for good — leave group
    # 7, answer what is queued, commit, exit; HAND_OVER, for a successor — read nothing
    # more, commit, close the files and exit, the socket left in group 7 for the next
    # server's worker.  TAKEN_OVER tells a worker of a server that took over that the
    # old server is gone (it closes its copy of the take-over connection).
    STOP = 8
    HAND_OVER = 9
    TAKEN_OVER = 10


class FrameError(Exception):
    """A stream that cannot be parsed: the peer is broken, not one request."""


def pack(kind: Kind, tag: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind, tag) + payload


class FrameReader:
    """Reads frames from a pipe and reassembles them (a read may end inside one).

    Reads go into one buffer allocated up front: ``os.read(fd, n)`` allocates ``n``
    bytes on every call, and at the sizes a batch needs that is an mmap and munmap per
    wakeup, which cost more than the whole request.
    """

    def __init__(self, size: int = READ_SIZE) -> None:
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._pending = b""

    def read(self, fd: int) -> list[tuple[int, int, bytes]] | None:
        """Every whole frame one read brings, as ``(kind, tag, payload)``; None at EOF."""
        count = os.readv(fd, [self._buffer])
        if not count:
            return None
        return self.feed(self._view[:count])

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int, bytes]]:
        """Every whole frame in what was read so far, as ``(kind, tag, payload)``."""
        frames = []
        buf = self._pending + bytes(data) if self._pending else data
        offset, end = 0, len(buf)
        header_size, unpack = HEADER.size, HEADER.unpack_from
        while end - offset >= header_size:
            length, kind, tag = unpack(buf, offset)
            if length > MAX_PAYLOAD:
                raise FrameError(f"frame of {length} bytes (kind {kind})")
            start = offset + header_size
            if end - start < length:
                break
            offset = start + length
            frames.append((kind, tag, bytes(buf[start:offset])))
        self._pending = bytes(buf[offset:])
        return frames

    @property
    def partial(self) -> bool:
        """Whether a frame was cut off (at EOF: the writer died mid-frame)."""
        return bool(self._pending)
