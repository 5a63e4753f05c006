"""The worker's events pipe: what the pipe does not take waits, in order, and the worker
is never blocked by it until its last frames."""

from __future__ import annotations

import fcntl
import os
import threading

from shardlog.server.outbox import Outbox

F_SETPIPE_SZ = 1031


def small_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    return read_end, write_end


def read_all(fd: int, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return bytes(data)


def test_what_the_pipe_does_not_take_waits_and_follows_in_order():
    read_end, write_end = small_pipe()
    try:
        outbox = Outbox(write_end)
        frames = [bytes([n]) * 3000 for n in range(1, 11)]  # 30 KB into 4 KiB
        for frame in frames:
            outbox.send(frame)  # returns at once: the pipe is full after the second
        assert outbox.pending
        received = bytearray()
        while outbox.pending:
            received += os.read(read_end, 1 << 16)
            outbox.flush()
        received += read_all(read_end, len(b"".join(frames)) - len(received))
        assert bytes(received) == b"".join(frames)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_drain_waits_for_the_reader():
    read_end, write_end = small_pipe()
    try:
        outbox = Outbox(write_end)
        outbox.send(b"x" * 20000)
        assert outbox.pending
        got = []
        reader = threading.Thread(target=lambda: got.append(read_all(read_end, 20000)))
        reader.start()
        outbox.drain()
        reader.join(10)
        assert not outbox.pending and got == [b"x" * 20000]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_once_the_front_is_gone_what_waits_is_dropped_and_nothing_raises():
    read_end, write_end = small_pipe()
    try:
        outbox = Outbox(write_end)
        outbox.send(b"r" * 10000)  # more than the pipe takes: the rest waits
        assert outbox.pending
        os.close(read_end)  # the front died
        outbox.flush()  # its pipe turned writable (EPOLLERR) and the worker wrote
        assert outbox.reader_gone and not outbox.pending and outbox.backlog == 0
        outbox.send(b"last report")
        outbox.drain()  # a worker's last frames, as it stops
        assert not outbox.pending
    finally:
        os.close(write_end)
