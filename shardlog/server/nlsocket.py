"""Connector sockets: the one way every part of shardlog opens a netlink socket.

The server's front, the simulated kernel, the benchmark's echo peer and the tests all need
the same few steps, with constants Python's socket module does not export: a
NETLINK_CONNECTOR datagram socket bound to a port (0: the kernel picks), a receive buffer
above ``rmem_max`` (SO_RCVBUFFORCE, root; SO_RCVBUF, capped, otherwise) because a datagram
dropped for want of room costs a 15 s retry, and membership of connector group 7, joined
by *number* with NETLINK_ADD_MEMBERSHIP — ``nl_groups`` in ``bind`` is a bitmask, and 7
there would join groups 1-3 (protocol.md §1.1).  A shard's socket also gets its routing
filter (shardlog.server.routing), attached and locked before the socket is bound or joins group
7, so that no datagram of another shard is ever queued on it.

Two questions about the namespace live here too, because the server asks them as well as the
tools and the harness: who is in group 7 (:func:`group7_listeners`, what ``shardlog adopt``
checks before it points a mirror at the server), and whether a kernel's connector answers
(:func:`kernel_connector_reachable`, which keeps ``--test-peer`` out of a real kernel's way).
"""

from __future__ import annotations

import errno
import socket

from shardlog.server.routing import attach_filter
from shardlog.wire.protocol import CN_IDX_DM, NETLINK_CONNECTOR

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
SO_RCVBUFFORCE = 33
#: ``nl_groups`` bit of group 7, for ``sendto`` (the kernel's multicast) and /proc/net/netlink.
GROUP_7_MASK = 1 << (CN_IDX_DM - 1)


def open_connector_socket(port: int = 0, *, receive_buffer: int | None = None,
                          join_group_7: bool = False,
                          shard: tuple[int, int] | None = None) -> socket.socket:
    """A bound connector socket; with ``shard=(shard, shards)``, one that receives only
    that shard's datagrams (routing.compile_filter).  Raises OSError (PermissionError
    when joining group 7 needs a CAP_NET_ADMIN this process lacks); the socket is closed
    then."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        if shard is not None:
            attach_filter(sock, *shard)
        if receive_buffer is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((port, 0))
        if join_group_7:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, CN_IDX_DM)
    except OSError:
        sock.close()
        raise
    return sock


def leave_group_7(sock: socket.socket) -> None:
    sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, CN_IDX_DM)


def group7_listeners(exclude_port: int | None = None) -> list[int]:
    """Ports of the NETLINK_CONNECTOR sockets in group 7 in this network namespace.

    ``/proc/net/netlink`` lists every netlink socket of the namespace with its protocol
    ("Eth"), port ("Pid") and the first 32 groups as a hex mask: the data the kernel's
    ``netlink_has_listeners`` reads."""
    ports = []
    with open("/proc/net/netlink") as table:
        next(table)
        for line in table:
            fields = line.split()
            protocol_number, port, groups = int(fields[1]), int(fields[2]), int(fields[3], 16)
            if (protocol_number == NETLINK_CONNECTOR and groups & GROUP_7_MASK
                    and port != exclude_port):
                ports.append(port)
    return ports


def kernel_connector_reachable() -> bool:
    """Whether a datagram to netlink port 0 (the kernel) is accepted here.

    A zero-length connector message is harmless to a real kernel (the connector drops
    messages shorter than a cn_msg); in a private namespace the send is refused."""
    with open_connector_socket() as sock:
        nlmsghdr = (16).to_bytes(4, "little") + bytes(12)
        try:
            sock.sendto(nlmsghdr, (0, 0))
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return False
            raise
        return True
