"""The arbiter's supervision decisions, with its workers stood in for (the real ones:
tests/process)."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from shardlog.observability.requeststats import resend_key
from shardlog.server import arbiter, handover
from shardlog.server.arbiter import Arbiter, Giving, ServeConfig
from shardlog.server.control import Connection, ControlServer
from shardlog.server.inflight import DROPPING_COPIES, InFlight
from shardlog.server.slots import WorkerSlot
from shardlog.wire import protocol
from shardlog.wire.frames import FrameReader, Kind
from shardlog.wire.protocol import RequestType as T


def front_with_client(tmp_path: Path) -> tuple[Arbiter, Connection, socket.socket]:
    """A front of one worker, not started, and a control client connected to it: the
    connection as the front holds it, and the client's own end."""
    front = Arbiter(ServeConfig(workers=1, state_dir=tmp_path))
    control = ControlServer(None, front.loop, {})
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = Connection(control, ours)
    control.clients[client.fd] = client
    return front, client, theirs

def test_a_worker_that_hands_over_after_a_failed_take_over_while_stopping_is_told_to_stop(
        tmp_path, monkeypatch):
    """SIGTERM during a take-over, then the new server's connection closes while one
    worker still hands over: that worker's successor answers what is queued in its
    socket and stops with the rest, rather than serve on an order pipe nobody closes
    (which held the stop up for STOP_TIMEOUT, then killed it)."""
    front = Arbiter(ServeConfig(workers=2, state_dir=tmp_path))
    spawned: list[tuple[int, WorkerSlot]] = []  # each worker's order pipe, read here
    sockets: list[socket.socket] = []

    def spawn(index, sock, in_flight, quick_deaths=0, restarts=0) -> WorkerSlot:
        read_end, write_end = os.pipe()
        slot = WorkerSlot(index, sock, in_flight, None, control_fd=write_end, events_fd=-1,
                          started=0.0)
        spawned.append((read_end, slot))
        return slot

    monkeypatch.setattr(front, "_spawn", spawn)
    monkeypatch.setattr(front, "_bury", lambda slot: (0, 0))
    monkeypatch.setattr(arbiter, "leave_group_7", lambda sock: None)
    for index in range(2):
        sockets.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        slot = spawn(index, sockets[-1], None)
        slot.handing_over = True
        front.slots.append(slot)
    first, second = front.slots
    front.serving = True
    front.giving = Giving(client=None, pid=1234, started=0.0)
    front._stop_after_giving = True  # SIGTERM came during the take-over
    try:
        front._worker_ended(first)  # handed over
        front._on_giving_connection_closed()  # the take-over failed: serve on, then stop
        assert front.stopping
        front._worker_ended(second)  # handed over only now
        successor = front.slots[-1]
        assert successor.index == 1 and successor.control_fd == -1  # its pipe closed
        read_end = spawned[-1][0]
        orders = FrameReader().read(read_end)
        assert [kind for kind, _tag, _payload in orders] == [Kind.STOP]
        assert FrameReader().read(read_end) is None  # then EOF
    finally:
        for read_end, slot in spawned:
            os.close(read_end)
            if slot.control_fd >= 0:  # not closed by the arbiter
                os.close(slot.control_fd)
        for sock in sockets:
            sock.close()


def test_a_worker_that_cannot_be_replaced_leaves_its_shard_vacant_and_tried_again(
        tmp_path, monkeypatch, caplog):
    """The fork of a dead worker's successor fails (out of processes, of memory): that
    shard waits, its requests queued in its socket, and is tried again; the server and
    the other shards serve on, where the OSError used to end the front."""
    front = Arbiter(ServeConfig(workers=2, state_dir=tmp_path))
    sockets = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    failures = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]

    def spawn(index, sock, in_flight, quick_deaths=0, restarts=0) -> WorkerSlot:
        if failures:
            raise failures.pop()
        return WorkerSlot(index, sock, in_flight, SimpleNamespace(pid=2000 + index),
                          control_fd=-1, events_fd=-1, started=0.0, restarts=restarts)

    monkeypatch.setattr(front, "_spawn", spawn)
    monkeypatch.setattr(front, "_bury", lambda slot: (-9, 0))
    front.slots = [WorkerSlot(index, sock, None, SimpleNamespace(pid=1000 + index),
                              control_fd=-1, events_fd=-1, started=0.0)
                   for index, sock in enumerate(sockets)]
    front.serving = True
    try:
        dead = front.slots[1]
        front._worker_ended(dead)  # SIGKILLed; its successor cannot be started
        assert [slot.index for slot in front.slots] == [0]
        assert [slot for slot, _when in front.vacant] == [dead]
        assert "cannot start a worker for shard 1" in caplog.text
        front._fill_vacancies()  # not yet due: nothing is tried
        assert len(front.vacant) == 1 and len(front.slots) == 1
        front.vacant = [(slot, 0.0) for slot, _when in front.vacant]  # due now
        front._fill_vacancies()
        assert not front.vacant
        assert [(slot.index, slot.process.pid) for slot in front.slots] == [(0, 1000),
                                                                           (1, 2001)]
        successor = front.slots[1]
        assert successor.sock is sockets[1] and successor.restarts == 1
    finally:
        for sock in sockets:
            sock.close()


def test_a_collect_in_the_loops_own_thread_does_not_wait_for_the_loop(tmp_path):
    """Metrics reopened after a failed take-over: registering the collector collects
    once, in the loop's own thread, which cannot wait for a wakeup of its own (it waited
    out the scrape timeout, 1.5 s of handling nothing).  A scrape's thread still waits."""
    front = Arbiter(ServeConfig(workers=1, state_dir=tmp_path))
    front.serving = True
    try:
        front._refresh_for_scrape()  # the loop's thread
        assert not front._scrapes  # nothing left waiting for a wakeup that cannot come
        scrape = threading.Thread(target=front._refresh_for_scrape)
        scrape.start()
        deadline = time.monotonic() + 10
        while not front._scrapes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(front._scrapes) == 1 and scrape.is_alive()  # waits for the workers
        front._scrapes.popleft().set()  # as the loop does once they reported
        scrape.join(10)
        assert not scrape.is_alive()
    finally:
        front._close()


def test_workers_respawned_when_a_take_over_fails_do_not_inherit_its_connection(
        tmp_path, monkeypatch):
    """The new server's connection closes (it died): the old front respawns its workers
    from the close's callback, and the connection must be closed by then, or every
    successor would hold it for life (and a new front waiting on it would never see its
    end)."""
    front, client, theirs = front_with_client(tmp_path)
    front.serving = True
    front.giving = Giving(client=client, pid=1234, started=0.0)
    client.on_close.append(front._on_giving_connection_closed)
    held = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    front.handed.append(WorkerSlot(0, held, None, None, control_fd=-1, events_fd=-1,
                                   started=0.0))
    open_at_spawn = []

    def spawn(index, sock, in_flight, quick_deaths=0, restarts=0) -> WorkerSlot:
        open_at_spawn.append(client.sock.fileno() != -1)  # what a fork now would inherit
        return WorkerSlot(index, sock, in_flight,
                          SimpleNamespace(pid=2000, is_alive=lambda: False),
                          control_fd=-1, events_fd=-1, started=0.0)

    monkeypatch.setattr(front, "_spawn", spawn)
    try:
        client.close()  # as at the new server's EOF
        assert open_at_spawn == [False]
        assert front.giving is None and [slot.index for slot in front.slots] == [0]
    finally:
        theirs.close()
        held.close()
        front._close()


def test_a_take_over_waits_until_the_workers_have_read_past_the_last_ones_copies(
        tmp_path):
    """Right after a take-over from another worker count, a worker's socket may still
    hold copies of requests it answered from the leftovers (its own drops them).  A
    take-over then would hand them on as unanswered, to be answered again, after newer
    ones: refused until the worker has read past them."""
    front, client, theirs = front_with_client(tmp_path)
    ring = InFlight()
    front.slots = [WorkerSlot(0, None, ring, SimpleNamespace(pid=1000), control_fd=-1,
                              events_fd=-1, started=0.0)]
    front.serving = True
    request = {"cmd": "take-over", "pid": 4321, "workers": 2, "state_dir": str(tmp_path),
               "test_peer": None, "fingerprint": handover.fingerprint()}
    try:
        ring.counters[DROPPING_COPIES] = 1  # as the worker's run() sets it
        front._on_take_over_request(client, request)
        answer = json.loads(theirs.recv(4096))
        assert "worker 0 is still reading past the copies" in answer["error"]
        assert front.giving is None
    finally:
        theirs.close()
        ring.close()
        front.slots = []
        front._close()


def test_a_successor_watches_for_re_sends_of_its_predecessors_requests_only(tmp_path):
    """Two deaths in a row on one shard: the second successor must not count again a
    re-send the first one counted (a GET_SYNC_COUNT is the same request each time, seq
    aside), so it watches for what its own predecessor held, not for every death's."""
    front = Arbiter(ServeConfig(workers=1, state_dir=tmp_path))
    ring = InFlight()
    slot = WorkerSlot(0, SimpleNamespace(sendto=lambda data, address: len(data)), ring,
                      SimpleNamespace(pid=1000), control_fd=-1, events_fd=-1, started=0.0)
    held_first = protocol.encode_request(T.GET_SYNC_COUNT, seq=7, uuid="log-a", luid=1)
    held_next = protocol.encode_request(T.IN_SYNC, seq=9, uuid="log-a", luid=1,
                                        data=protocol.pack_u64(3))
    try:
        ring.entries[0][:len(held_first)] = held_first  # held when the worker died
        assert front._answer_eagain(slot) == 1
        assert list(front.stats.resend_watch) == [resend_key(held_first)]
        ring.entries[0][:len(held_next)] = held_next  # its successor died holding this
        assert front._answer_eagain(slot) == 1
        assert list(front.stats.resend_watch) == [resend_key(held_next)]
    finally:
        ring.close()
        front._close()
