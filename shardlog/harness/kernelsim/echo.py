"""The minimal echo peer: the cost of any server at all, as a baseline for measurements.

One forked process in connector group 7 answers every request with a full reply of its
type's exact size (zero payload, error 0), patched into its receive buffer in place: no
decoding, no state, no files.  A figure measured against shardlog means little on these
noisy machines; the same load against this peer, in the same run, turns it into a ratio
(the server benchmark and the capacity tool both do that).

Only one server may be a member of group 7 while a load runs (the load would take the
first reply of either): :func:`running_echo_peer` checks that the peer is the only one,
and that it has gone when the block ends.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from shardlog.server.nlsocket import group7_listeners, open_connector_socket
from shardlog.wire import protocol

RCVBUF = 32 << 20

# Where a datagram holds what the echo peer reads or patches (protocol.py's layout):
# nlmsghdr (16) | cn_msg (20) | dm_ulog_request header (160) | data.
_NL_LEN, _NL_SEQ, _CN_LEN = slice(0, 4), slice(8, 12), slice(32, 34)
_ULOG_ERROR, _ULOG_DATA_SIZE = slice(180, 184), slice(192, 196)
_ULOG_TYPE_AT = 188
_HEADERS = 196


class PeerError(Exception):
    """The echo peer did not start, or group 7 does not hold the one server expected."""


def _reply_patches() -> list[tuple[bytes, bytes, bytes, bytes, int] | None]:
    """Per request type byte: nlmsg_len, cn_msg.len, data_size, payload, datagram size."""
    patches: list[tuple[bytes, bytes, bytes, bytes, int] | None] = [None] * 256
    for request_type, size in protocol.REPLY_SIZES.items():
        size = size or 0  # variable-size replies (CTR, STATUS_*): empty
        total = _HEADERS + size
        patches[request_type] = (total.to_bytes(4, "little"),
                                 (total - 36).to_bytes(2, "little"),
                                 size.to_bytes(4, "little"), bytes(size), total)
    return patches


def echo_peer(reply_port: int, ready_fd: int) -> None:
    """The echo peer's process: join group 7, answer everything, until killed.

    The reply is the request itself, patched: nlmsg_len, nlmsg_seq (0, as shardlog's),
    cn_msg.len, error 0, data_size, and a zero payload of the type's reply size."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = open_connector_socket(receive_buffer=RCVBUF, join_group_7=True)
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    patches = _reply_patches()
    buf = bytearray(65536)
    view = memoryview(buf)
    recv_into, sendto, destination = sock.recv_into, sock.sendto, (reply_port, 0)
    zero4 = bytes(4)
    while True:
        size = recv_into(buf)
        if size < _HEADERS:
            continue
        patch = patches[buf[_ULOG_TYPE_AT]]
        if patch is None:
            continue
        nl_len, cn_len, data_size, payload, total = patch
        buf[_NL_LEN] = nl_len
        buf[_NL_SEQ] = zero4
        buf[_CN_LEN] = cn_len
        buf[_ULOG_ERROR] = zero4
        buf[_ULOG_DATA_SIZE] = data_size
        if payload:
            buf[_HEADERS:total] = payload
        sendto(view[:total], destination)


@contextmanager
def running_echo_peer(reply_port: int) -> Iterator[int]:
    """An echo peer answering to ``reply_port`` (the load's socket) for the block; its pid.
    PeerError unless it is the only member of group 7 (``reply_port`` aside)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        try:
            os.close(ready_r)
            echo_peer(reply_port, ready_w)
        except BaseException as exc:
            print(f"echo peer: {exc!r}", file=sys.stderr)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"r":
            raise PeerError("the echo peer did not start")
        expect_listeners("echo peer", reply_port)
        yield pid
    finally:
        os.close(ready_r)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        wait_for_no_listener(reply_port)


def expect_listeners(what: str, load_port: int, count: int = 1) -> None:
    """PeerError unless exactly ``count`` sockets but the load's are in group 7 (the echo
    peer has one; shardlog one per shard)."""
    members = group7_listeners(exclude_port=load_port)
    if len(members) != count:
        raise PeerError(f"{what}: expected {count} members of connector group 7, found "
                        f"{len(members)} (ports {members})")


def wait_for_no_listener(load_port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while group7_listeners(exclude_port=load_port):
        if time.monotonic() > deadline:
            raise PeerError("a server is still subscribed to group 7")
        time.sleep(0.01)
