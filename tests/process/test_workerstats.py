"""The worker → front stats channel in a served worker (a private network namespace:
root): reports of a worker's logs and counters."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from shardlog.log.logtable import LogTable, StatusListing
from shardlog.observability.workercounters import key
from shardlog.observability.workerstats import LogStatus, Reporter, WorkerReport
from shardlog.server import worker
from shardlog.server.inflight import InFlight
from shardlog.server.nlsocket import open_connector_socket
from shardlog.server.outbox import Outbox
from shardlog.wire import frames, protocol
from shardlog.wire.frames import FrameReader, Kind
from shardlog.wire.protocol import RequestType as T

UUID = "LVM-stats"
PEER_PORT = 0x7E58
CTR = b"2048 core 256 nosync"  # 8 regions of 256 sectors, in sync


class ServedWorker:
    """A worker's loop (worker.ShardWorker) in a thread, on a real connector socket in the
    private namespace and real pipes, with a LogTable in a temporary directory; the test
    plays the kernel from a peer socket."""

    def __init__(self, state_dir, interval: float) -> None:
        self.control_r, self.control_w = os.pipe()
        self.events_r, self.events_w = os.pipe()
        self.peer = open_connector_socket(PEER_PORT)
        self.shard = open_connector_socket()
        self.in_flight = InFlight()
        self.table = LogTable(state_dir)
        self.reader = FrameReader()
        self.seq = 0
        self.worker = worker.ShardWorker(self.table, self.shard, self.in_flight,
                                         worker.Peer(PEER_PORT), Reporter(interval),
                                         Outbox(self.events_w))
        self.failure: BaseException | None = None  # what ended the loop, if it raised
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.serve(self.control_r)
        except BaseException as exc:
            self.failure = exc
            raise

    def send(self, kind: Kind, payload: bytes = b"", tag: int = 0) -> None:
        os.write(self.control_w, frames.pack(kind, tag, payload))

    def request(self, request_type: T, data: bytes = b"") -> None:
        """Send a request and wait for its reply, as the kernel does: what is asked of
        the worker after it is then answered (a worker need not read all that is queued
        in one wakeup)."""
        self.seq += 1
        self.peer.sendto(protocol.encode_request(
            request_type, seq=self.seq, uuid=UUID, luid=7, data=data),
            (self.shard.getsockname()[0], 0))
        self.peer.settimeout(10)
        while protocol.decode_reply(self.peer.recv(1 << 16)).seq != self.seq:
            pass

    def next_frame(self, kind: Kind, timeout: float = 10.0) -> bytes | None:
        """The payload of the next frame of ``kind`` within ``timeout`` (None: none came)."""
        while select.select([self.events_r], [], [], timeout)[0]:
            for got, _tag, payload in self.reader.read(self.events_r):
                if got == kind:
                    return payload
        return None

    def front_dies(self) -> None:
        """Close the front's ends of both pipes, as its death does."""
        os.close(self.control_w)
        os.close(self.events_r)
        self.control_w = self.events_r = -1

    def close(self) -> None:
        if self.control_w >= 0:
            os.close(self.control_w)
        self.thread.join(10)
        self.table.close()
        for fd in (self.control_r, self.events_r, self.events_w):
            if fd >= 0:
                os.close(fd)
        self.peer.close()
        self.shard.close()
        self.in_flight.close()


@pytest.fixture
def served(tmp_path, private_netns):
    served = ServedWorker(tmp_path, interval=0.2)
    yield served
    served.close()


def test_a_report_asked_for_describes_every_log(served):
    served.request(T.CTR, CTR)
    served.request(T.RESUME)
    served.request(T.MARK_REGION, protocol.pack_regions([1, 5]))
    served.request(T.FLUSH)
    served.request(T.GET_RESYNC_WORK)
    served.send(Kind.SEND_REPORT)
    report = WorkerReport.decode(served.next_frame(Kind.WORKER_REPORT))
    (status,) = report.logs
    assert (status.uuid, status.luid, status.log_type, status.state) == (
        UUID, 7, "core", "resumed")
    assert (status.region_size, status.region_count) == (256, 8)
    # In sync from the start: the marks are the only dirty regions, recovery has nothing.
    assert (status.in_sync, status.dirty, status.recovering, status.sync_search) == (
        8, 2, None, 8)
    assert status.requests == 4  # the CTR is not an instance's request
    assert status.health == "A"
    # And the requests it answered, by type, for the front's metrics.
    received = dict(report.requests["received"])
    assert received == {T.CTR: 1, T.RESUME: 1, T.MARK_REGION: 1, T.FLUSH: 1,
                        T.GET_RESYNC_WORK: 1}
    assert dict(report.requests["ok"]) == received
    assert sum(count for _bucket, count in report.requests["latency"]) == 5
    # And the sizes of the batches they came in (however the socket grouped them).
    assert report.counters[key("worker_batch_size", bucket="sum")] == 5


def test_a_worker_that_goes_idle_reports_its_last_counts_unasked_but_not_its_logs(served):
    served.request(T.CTR, CTR)
    first = WorkerReport.decode(served.next_frame(Kind.WORKER_REPORT))
    assert dict(first.requests["received"]) == {T.CTR: 1}
    served.request(T.RESUME)
    second = WorkerReport.decode(served.next_frame(Kind.WORKER_REPORT))
    assert dict(second.requests["received"]) == {T.RESUME: 1}
    # Listing the logs stalls the requests queued meanwhile, and the worker cannot tell
    # going idle from a pause between two requests: only a report asked for lists them.
    assert first.logs is None and second.logs is None
    # Nothing happened since: no more reports, until one is asked for.
    assert served.next_frame(Kind.WORKER_REPORT, timeout=0.6) is None
    served.send(Kind.SEND_REPORT)
    asked = WorkerReport.decode(served.next_frame(Kind.WORKER_REPORT))
    assert [status.state for status in asked.logs] == ["resumed"]


def test_a_report_asked_for_is_listed_between_requests_and_answers_its_order(
        served, monkeypatch):
    # The table's logs, made here while the worker waits in its poll (it touches them
    # only when a request or an order wakes it).
    for n in range(200):
        for request_type, data in ((T.CTR, CTR), (T.RESUME, b"")):
            served.table.answer(protocol.decode_datagram(protocol.encode_request(
                request_type, seq=1, uuid=f"LVM-{n}", luid=1, data=data)))
    # One log a slice, each slice 2 ms: a listing of at least 0.4 s.
    monkeypatch.setattr(worker, "LIST_SLICE", 1)
    take = StatusListing.take

    def slow_take(listing: StatusListing, count: int) -> list[LogStatus]:
        time.sleep(0.002)
        return take(listing, count)

    monkeypatch.setattr(StatusListing, "take", slow_take)
    served.request(T.CTR, CTR)
    served.request(T.RESUME)
    while served.next_frame(Kind.WORKER_REPORT, timeout=0.6) is not None:
        pass  # the periodic reports of what was just done
    os.write(served.control_w, frames.pack(Kind.SEND_REPORT, 7)
             + frames.pack(Kind.SEND_REPORT, 8))  # two orders, read at once
    # A request sent after the order is answered while the logs are being listed.
    served.request(T.IN_SYNC, protocol.pack_u64(0))
    assert served.next_frame(Kind.WORKER_REPORT, timeout=0) is None
    frame = None
    while frame is None and select.select([served.events_r], [], [], 10)[0]:
        frame = next((frame for frame in served.reader.read(served.events_r)
                      if frame[0] == Kind.WORKER_REPORT), None)
    _kind, tag, payload = frame
    report = WorkerReport.decode(payload)
    assert tag == 8  # the later order: one listing, begun after both
    assert len(report.logs) == 201
    assert dict(report.requests["received"]) == {T.IN_SYNC: 1}


def test_a_worker_whose_front_does_not_read_drops_its_traces_and_says_how_many(
        served, monkeypatch):
    """A front that stops reading (stopped, hung) while someone traces: the worker keeps
    answering, its TRACE frames stop queueing past TRACE_BACKLOG (reports still queue),
    and its first frame once the front reads again counts what it dropped."""
    monkeypatch.setattr(worker, "TRACE_BACKLOG", 16 << 10)
    served.request(T.CTR, CTR)
    served.request(T.RESUME)
    served.send(Kind.TRACING, tag=1)
    deadline = time.monotonic() + 10
    while not served.worker.tracing and time.monotonic() < deadline:
        time.sleep(0.01)  # the order read (else the first request can beat it)
    traced = 600  # ~370 bytes a frame: over the 64 KiB pipe and the backlog together
    for _ in range(traced):
        served.request(T.IN_SYNC, protocol.pack_u64(1))
    # The pipe is full and nobody reads it: the outbox stopped growing at the bound (a
    # frame past it, and the periodic reports, which are never dropped and pile up on a
    # slow host), well below the ~190 KiB that the traces alone would be without it.
    assert served.worker.outbox.backlog < 96 << 10

    entries, untraced = 0, 0

    def take_frames(until=lambda: False) -> None:
        """Read frames as the front does, until ``until()`` or 0.5 s with none (10 s
        at most: the worker flushes its outbox as the pipe takes it, on a slow host
        with pauses)."""
        nonlocal entries, untraced
        deadline = time.monotonic() + 10
        while not until() and time.monotonic() < deadline and select.select(
                [served.events_r], [], [], 0.5)[0]:
            for kind, tag, payload in served.reader.read(served.events_r):
                if kind == Kind.TRACE:
                    entries += len(worker.decode_trace(payload))
                    untraced += tag

    take_frames()  # the front reads again: what was queued comes, nothing says more yet
    assert entries < traced and untraced == 0
    served.request(T.IN_SYNC, protocol.pack_u64(1))  # the next frame says what was dropped
    take_frames(until=lambda: untraced and entries + untraced >= traced + 1)
    assert untraced > 0
    assert entries + untraced == traced + 1  # every request traced or counted as dropped


def test_a_worker_whose_front_dies_with_frames_unsent_stops_as_ordered(served):
    """The front stopped reading (its events pipe full, a report waiting in the outbox),
    then died: the worker drops what nobody will read and ends as for STOP (which answers
    what its socket holds), rather than die of the broken pipe with requests queued."""
    served.request(T.CTR, CTR)
    served.request(T.RESUME)
    while True:  # the pipe filled, as by reports the front did not read
        try:
            os.write(served.events_w, bytes(1 << 16))
        except BlockingIOError:
            break
    served.send(Kind.SEND_REPORT, tag=1)
    deadline = time.monotonic() + 10
    while not served.worker.outbox.pending and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker reads the order and lists its log
    assert served.worker.outbox.pending
    served.front_dies()
    served.thread.join(10)
    assert not served.thread.is_alive()
    assert served.failure is None, repr(served.failure)
    assert served.worker.outbox.reader_gone
