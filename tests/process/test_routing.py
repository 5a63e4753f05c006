"""The shard sockets' filters in the real kernel, in a private network namespace (root):
each datagram reaches exactly the shard the Python hash names (tests/unit/server/
test_routing.py proves the hash and the filter program agree)."""

from __future__ import annotations

import errno
import random
import select
import socket
from collections import Counter

import pytest

from shardlog.harness.kernelsim.connector import multicast_to_group_7
from shardlog.server import routing
from shardlog.server.nlsocket import open_connector_socket
from shardlog.server.routing import shard_of_datagram

from ..unit.server.test_routing import mixed_datagrams


def drain(sock: socket.socket) -> list[bytes]:
    received = []
    while select.select([sock], [], [], 0)[0]:
        received.append(sock.recv(65536))
    return received


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
def test_the_kernel_delivers_each_datagram_to_exactly_the_shard_python_names(
        private_netns, shards):
    datagrams = mixed_datagrams(random.Random(shards), 10_000)
    expected = [Counter() for _ in range(shards)]
    for datagram in datagrams:
        expected[shard_of_datagram(datagram, shards)][datagram] += 1
    assert all(expected), "every shard should be named for some datagram"
    sockets = [open_connector_socket(receive_buffer=8 << 20, join_group_7=True,
                                     shard=(shard, shards)) for shard in range(shards)]
    received = [Counter() for _ in range(shards)]
    try:
        with open_connector_socket() as sender:
            for start in range(0, len(datagrams), 500):
                for datagram in datagrams[start:start + 500]:
                    multicast_to_group_7(sender, datagram)
                # Delivery to group members is synchronous: each batch is queued by now.
                for shard, sock in enumerate(sockets):
                    received[shard].update(drain(sock))
    finally:
        for sock in sockets:
            sock.close()
    assert sum(sum(c.values()) for c in received) == len(datagrams)
    for shard in range(shards):
        assert received[shard] == expected[shard], f"shard {shard} of {shards}"


def test_a_locked_filter_can_be_neither_detached_nor_replaced(private_netns):
    with open_connector_socket(join_group_7=True, shard=(1, 2)) as sock:
        with pytest.raises(OSError) as detached:
            sock.setsockopt(socket.SOL_SOCKET, routing.SO_DETACH_FILTER, 0)
        assert detached.value.errno == errno.EPERM
        with pytest.raises(OSError) as replaced:
            routing.attach_filter(sock, 0, 2)
        assert replaced.value.errno == errno.EPERM
        with pytest.raises(OSError) as unlocked:
            sock.setsockopt(socket.SOL_SOCKET, routing.SO_LOCK_FILTER, 0)
        assert unlocked.value.errno == errno.EPERM
