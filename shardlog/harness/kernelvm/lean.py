"""The lean responder: the least a dirty-log server can do per request, as a baseline.

One process in connector group 7 answers the real kernel from memory with nothing but
``struct``: one unpack of the header, a dict lookup, a bit of a ``bytearray``, one pack of
the reply.  No files, no codec, no checks beyond what it needs, no metrics: a FLUSH is
durable in nothing.  It serves ``core`` logs (``nosync`` or not: recovery hands out no
work, every region reports in sync) — enough for fio on a mirror.  What shardlog costs
on top of this, in the same boot, is what shardlog's own code and process shape cost
(scripts/bench_kernel.py); the in-kernel ``disk`` log is the other yardstick.

Never a server: it answers only the kernel (netlink port 0) and trusts every request.
"""

from __future__ import annotations

import struct

from shardlog.server.nlsocket import open_connector_socket
from shardlog.wire.protocol import RequestType as T

_NL_CN = 36  # nlmsghdr + cn_msg
# dm_ulog_request: luid, uuid[129] (+3 pad), version, error, seq, request_type, data_size
_HEADER = struct.Struct("=Q129s3xIiIII")
_HEADER_END = _NL_CN + _HEADER.size
_U64 = struct.Struct("=Q")
_NL = struct.Struct("=IHHII")
_CN = struct.Struct("=IIIIHH")
_TAIL = struct.Struct("=iIII")  # error, seq, request_type, data_size
_TAIL_AT = _NL_CN + 8 + 132 + 4  # after luid, uuid and version


class _Log:
    __slots__ = ("clean", "region_count", "region_size")

    def __init__(self, ctr: bytes):
        words = ctr.rstrip(b"\0").split()
        sectors, self.region_size = int(words[0]), int(words[2])
        self.region_count = -(-sectors // self.region_size)
        self.clean = bytearray(b"\1") * self.region_count


def _regions(data: bytes) -> tuple[int, ...]:
    return struct.unpack_from(f"={len(data) // 8}Q", data)


def answer(logs: dict, datagram: bytes) -> bytes:
    """The reply to one request datagram."""
    luid, uuid, _version, _error, seq, request_type, size = _HEADER.unpack_from(
        datagram, _NL_CN)
    data = datagram[_HEADER_END:_HEADER_END + size]
    key = (uuid, luid)
    payload = b""
    if request_type == T.CTR:
        logs[key] = _Log(data)
    elif request_type == T.DTR:
        logs.pop(key, None)
    else:
        log = logs[key]
        if request_type == T.IN_SYNC:
            payload = _U64.pack(1)
        elif request_type == T.MARK_REGION or request_type == T.FLUSH:
            for region in _regions(data):
                log.clean[region] = 0
        elif request_type == T.CLEAR_REGION:
            for region in _regions(data):
                log.clean[region] = 1
        elif request_type == T.IS_CLEAN:
            payload = _U64.pack(log.clean[_U64.unpack(data)[0]])
        elif request_type == T.GET_REGION_SIZE:
            payload = _U64.pack(log.region_size)
        elif request_type == T.GET_SYNC_COUNT:
            payload = _U64.pack(log.region_count)
        elif request_type == T.GET_RESYNC_WORK:
            payload = bytes(16)
        elif request_type == T.IS_REMOTE_RECOVERING:
            payload = _U64.pack(0) + _U64.pack(log.region_count)
        elif request_type in (T.STATUS_INFO, T.STATUS_TABLE):
            payload = b"1 lean\0"
    length = _HEADER.size + len(payload)
    return b"".join((_NL.pack(_NL_CN + length, 3, 0, 0, 0),
                     _CN.pack(7, 1, seq, 0, length, 0),
                     datagram[_NL_CN:_TAIL_AT],
                     _TAIL.pack(0, seq, request_type, len(payload)), payload))


def serve() -> None:
    """Answer the kernel until killed."""
    sock = open_connector_socket(receive_buffer=32 << 20, join_group_7=True)
    logs: dict = {}
    buffer = bytearray(4096)
    view = memoryview(buffer)
    while True:
        count, (port, _groups) = sock.recvfrom_into(buffer)
        if port == 0:
            sock.sendto(answer(logs, bytes(view[:count])), (0, 0))
