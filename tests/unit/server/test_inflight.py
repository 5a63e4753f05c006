"""The in-flight ring: what a worker holds is exactly what the front finds once it died."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from shardlog.server.inflight import CAPACITY, ENTRY_SIZE, PROGRESS, InFlight


def datagram(seq: int, size: int = 64, *, nlmsg_len: int | None = None) -> bytes:
    """Bytes that begin as a netlink message does: nlmsg_len first (the rest: the seq)."""
    header = struct.pack("=IHHII", size if nlmsg_len is None else nlmsg_len, 3, 0, seq, 0)
    return header + bytes(size - len(header))


@pytest.fixture
def ring():
    in_flight = InFlight()
    yield in_flight
    in_flight.close()


@pytest.fixture
def pair():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_an_empty_ring_holds_nothing(ring):
    assert ring.held == 0
    assert list(ring.unanswered()) == []


def test_the_receive_itself_holds_the_entry(ring, pair):
    sender, receiver = pair
    sent = [datagram(1), datagram(2, 128)]
    for index, data in enumerate(sent):
        sender.send(data)
        assert receiver.recv_into(ring.entries[index]) == len(data)
    assert ring.held == 2
    assert list(ring.unanswered()) == sent


def test_a_worker_killed_right_after_its_receive_leaves_the_request_to_the_front(ring, pair):
    """The window the layout closes: no store of the worker's own stands between the
    receive and the request being held (a kill there once left the kernel waiting)."""
    sender, receiver = pair
    sent = datagram(7, 200)
    sender.send(sent)
    child = os.fork()
    if child == 0:  # the worker: receive, and die before any other statement
        try:
            receiver.recv_into(ring.entries[3])
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # only if the kill did not happen
    _pid, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert ring.held == 1
    assert list(ring.unanswered()) == [sent]


def test_an_answered_entry_is_free_and_the_others_stay_held(ring, pair):
    sender, receiver = pair
    sent = [datagram(seq) for seq in range(4)]
    for index, data in enumerate(sent):
        sender.send(data)
        receiver.recv_into(ring.entries[index])
    ring.answered(1)
    ring.headers[2] = 0  # the worker's inline form of the same store
    assert ring.held == 2
    assert list(ring.unanswered()) == [sent[0], sent[3]]


def test_a_request_is_as_long_as_its_nlmsg_len_without_the_kernels_padding(ring, pair):
    sender, receiver = pair
    sent = datagram(5, 68, nlmsg_len=65)  # nlmsg_put pads 65 bytes to 68
    sender.send(sent)
    receiver.recv_into(ring.entries[0])
    assert list(ring.unanswered()) == [sent[:65]]


def test_a_bad_nlmsg_len_is_cut_at_the_entry(ring):
    ring.entries[CAPACITY - 1][:16] = datagram(9, 16, nlmsg_len=1 << 20)[:16]
    (held,) = ring.unanswered()
    assert len(held) == ENTRY_SIZE


def test_reset_frees_every_entry_and_keeps_the_batch_counter(ring, pair):
    sender, receiver = pair
    for index in (0, 100, CAPACITY - 1):
        sender.send(datagram(index))
        receiver.recv_into(ring.entries[index])
    ring.counters[PROGRESS] += 5
    assert ring.held == 3
    ring.reset()
    assert ring.held == 0
    assert list(ring.unanswered()) == []
    assert ring.progress == 5


def test_the_ring_is_shared_with_a_forked_worker(ring):
    child = os.fork()
    if child == 0:
        ring.entries[0][:32] = datagram(11, 32)
        ring.counters[PROGRESS] += 1
        os._exit(0)
    os.waitpid(child, 0)
    assert list(ring.unanswered()) == [datagram(11, 32)]
    assert ring.progress == 1
