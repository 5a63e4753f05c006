"""Frames between the front process and its workers: raw bytes over pipes, no pickling.

Every frame is a 5-byte header (body length, kind) and its body.  A request travels as the
kernel's datagram itself, a reply as the datagram to send back; both carry the front's
``tag`` for the request, so that the front knows which requests a worker still holds
(answered -EAGAIN if it dies) and replies may return in any order (a worker answers a
batch's FLUSHes after their group commit, everything else at once).

Pickling costs ~38 µs a round trip and multiprocess's Connection framing 11-17 µs against
~7 µs for a raw pipe (design.md); a struct header and one ``os.write`` per batch keep the
hop near the raw cost.
"""

from __future__ import annotations

import struct
from enum import IntEnum

HEADER = struct.Struct("=IB")  # body length, kind
TAG = struct.Struct("=I")  # leads the body of REQUEST and REPLY frames
MAX_BODY = 1 << 20  # far above any datagram: a larger length means a corrupt stream


class Kind(IntEnum):
    REQUEST = 1  # front → worker: tag + the kernel's datagram
    REPLY = 2  # worker → front: tag + the datagram to send (empty: nothing to send)
    READY = 3  # worker → front: started, its logs table is up


class FrameError(Exception):
    """A stream that cannot be parsed: the peer is broken, not one request."""


def pack(kind: Kind, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind) + body


def pack_tagged(kind: Kind, tag: int, datagram: bytes) -> bytes:
    return HEADER.pack(TAG.size + len(datagram), kind) + TAG.pack(tag) + datagram


def split_tag(body: bytes) -> tuple[int, bytes]:
    return TAG.unpack_from(body)[0], body[TAG.size :]


class FrameReader:
    """Reassembles frames from pipe reads (a read may end in the middle of one)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every whole frame in what was read so far, as ``(kind, body)``."""
        frames = []
        buf = self._pending + data if self._pending else data
        offset, end = 0, len(buf)
        header_size = HEADER.size
        while end - offset >= header_size:
            length, kind = HEADER.unpack_from(buf, offset)
            if length > MAX_BODY:
                raise FrameError(f"frame of {length} bytes (kind {kind})")
            start = offset + header_size
            if end - start < length:
                break
            offset = start + length
            frames.append((kind, buf[start:offset]))
        self._pending = buf[offset:]
        return frames

    @property
    def partial(self) -> bool:
        """Whether a frame was cut off (at EOF: the writer died mid-frame)."""
        return bool(self._pending)
