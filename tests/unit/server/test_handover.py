"""Take-over's decision, directly: what a new server's fingerprint covers, and which
differences refuse a take-over; the leftovers of a switch to another worker count, routed
and deduplicated (take-overs of running servers: tests/process/test_take_over.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from shardlog.server import handover, routing
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T


def test_the_fingerprint_covers_routing_and_formats():
    mine = handover.fingerprint()
    assert set(mine) == {"version", "protocol", "routing", "formats"}
    # Another version (an upgrade) is welcome; another routing hash is not.
    upgrade = {**mine, "version": "99.0"}
    assert handover.refusal({"fingerprint": upgrade, "workers": 2, "state_dir": "/x",
                             "test_peer": None}, workers=2, state_dir=Path("/x"),
                            test_peer=None) is None
    assert handover.refusal({"fingerprint": mine, "workers": 2, "state_dir": "/x",
                             "test_peer": None}, workers=2, state_dir=Path("/x"),
                            test_peer=None) is None
    # Another worker count is welcome (the logs move between shards); no count is not.
    assert handover.refusal({"fingerprint": mine, "workers": 3, "state_dir": "/x",
                             "test_peer": None}, workers=2, state_dir=Path("/x"),
                            test_peer=None) is None
    for nonsense in (0, None, "3", True):
        assert "not a worker count" in handover.refusal(
            {"fingerprint": mine, "workers": nonsense, "state_dir": "/x",
             "test_peer": None}, workers=2, state_dir=Path("/x"), test_peer=None)


# -- another worker count: the leftovers routed and their copies dropped ------------------


def request_datagram(seq: int, uuid: str) -> bytes:
    return protocol.encode_request(T.IS_CLEAN, seq=seq, uuid=uuid, luid=1,
                                   data=protocol.pack_u64(0))


def seq_of(datagram: bytes) -> int:
    peeked = protocol.peek_request(datagram)
    assert peeked is not None
    return peeked[1]


def test_leftovers_drop_each_copy_once_and_forget_after_a_later_seq():
    leftovers = handover.Leftovers([request_datagram(seq, "log-a")
                                    for seq in (10, 12, 11)])
    assert leftovers.seqs == {10, 11, 12} and not leftovers.done
    assert len(leftovers.datagrams) == 3  # answered first, in this order
    leftovers.datagrams.clear()
    assert leftovers.duplicate(request_datagram(11, "log-a"))
    assert not leftovers.duplicate(request_datagram(11, "log-a"))  # one copy at most
    assert not leftovers.duplicate(b"not a request")
    assert not leftovers.duplicate(request_datagram(10, "log-b"))  # same seq, not a copy
    assert leftovers.duplicate(memoryview(request_datagram(10, "log-a")))
    # A seq sent after the newest leftover: no copy can follow, the seqs are forgotten.
    assert not leftovers.duplicate(request_datagram(13, "log-a"))
    assert leftovers.done and not leftovers.duplicate(request_datagram(12, "log-a"))
    # Across the wrap of the kernel's u32 seq: 2 was sent after 0xFFFFFFFE.
    wrapped = handover.Leftovers([request_datagram(seq, "log-a")
                                  for seq in (0xFFFFFFFE, 0xFFFFFFFF, 1)])
    assert not wrapped.duplicate(request_datagram(0, "log-a"))  # never a leftover
    assert not wrapped.done
    assert wrapped.duplicate(request_datagram(0xFFFFFFFF, "log-a"))
    assert not wrapped.duplicate(request_datagram(2, "log-a"))
    assert wrapped.seqs == frozenset()
    # A successor worker drops the same copies and answers nothing.
    first = handover.Leftovers([request_datagram(5, "log-a")])
    successor = first.seqs_only()
    assert not successor.datagrams and successor.seqs == {5}
    assert successor.duplicate(request_datagram(5, "log-a"))


def test_leftovers_go_where_the_new_filters_send_them_in_arrival_order():
    uuids = [f"log-{n}" for n in range(20)]
    old_sockets = [[], []]
    for seq in range(200):
        uuid = uuids[seq % len(uuids)]
        old_sockets[routing.shard_of_uuid(uuid, 2)].append(request_datagram(seq, uuid))
    routed = handover.route_leftovers(old_sockets, 3)
    assert sum(len(each.datagrams) for each in routed) == 200
    for shard, leftovers in enumerate(routed):
        by_log: dict[bytes, list[int]] = {}
        for datagram in leftovers.datagrams:
            assert routing.shard_of_datagram(datagram, 3) == shard
            uuid, seq, _type = protocol.peek_request(datagram)
            by_log.setdefault(uuid, []).append(seq)
        assert all(seqs == sorted(seqs) for seqs in by_log.values())  # each log in order
        assert leftovers.seqs == {seq_of(d) for d in leftovers.datagrams}


def test_more_shard_sockets_than_one_message_may_carry_are_all_handed_over():
    """The kernel passes at most 253 descriptors in one message (SCM_MAX_FD), and a
    server has as many shard sockets as workers (by default one per CPU): 300 of them,
    and the control socket's listener, reach the new server in their order."""
    old, new = socket.socketpair()
    shards = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(300)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[int] = []
    try:
        inodes = [os.fstat(sock.fileno()).st_ino for sock in [*shards, listener]]
        sender = threading.Thread(target=handover.send_sockets, args=(old, shards, listener))
        sender.start()
        message, received = handover._receive_line_and_fds(new, time.monotonic() + 10)
        sender.join(10)
        assert message is not None and message["sockets"] == 300 and message["control"]
        assert [os.fstat(fd).st_ino for fd in received] == inodes
    finally:
        for fd in received:
            os.close(fd)
        for sock in (old, new, listener, *shards):
            sock.close()
