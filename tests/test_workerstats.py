"""The worker → front stats channel: reports of a worker's logs and counters."""

from __future__ import annotations

import os
import select
import threading

import pytest

from shardlog import frames, protocol, worker
from shardlog.frames import FrameReader, Kind
from shardlog.logtable import LogTable
from shardlog.protocol import RequestType as T
from shardlog.workerstats import LogStatus, Reporter, WorkerReport

UUID = "LVM-stats"
CTR = b"2048 core 256 nosync"  # 8 regions of 256 sectors, in sync


class ServedWorker:
    """worker.serve in a thread, on real pipes, with a LogTable in a temporary directory."""

    def __init__(self, state_dir, interval: float) -> None:
        self.requests_r, self.requests_w = os.pipe()
        self.replies_r, self.replies_w = os.pipe()
        self.table = LogTable(state_dir)
        self.reader = FrameReader()
        self.seq = 0
        self.thread = threading.Thread(target=worker.serve, args=(
            self.table, self.requests_r, self.replies_w, Reporter(interval)))
        self.thread.start()

    def send(self, kind: Kind, payload: bytes = b"") -> None:
        os.write(self.requests_w, frames.pack(kind, self.seq, payload))

    def request(self, request_type: T, data: bytes = b"") -> None:
        self.seq += 1
        self.send(Kind.REQUEST, protocol.encode_request(
            request_type, seq=self.seq, uuid=UUID, luid=7, data=data))

    def next_frame(self, kind: Kind, timeout: float = 10.0) -> bytes | None:
        """The payload of the next frame of ``kind`` within ``timeout`` (None: none came)."""
        while select.select([self.replies_r], [], [], timeout)[0]:
            for got, _tag, payload in self.reader.read(self.replies_r):
                if got == kind:
                    return payload
        return None

    def close(self) -> None:
        os.close(self.requests_w)
        self.thread.join(10)
        self.table.close()
        for fd in (self.requests_r, self.replies_r, self.replies_w):
            os.close(fd)


@pytest.fixture
def served(tmp_path):
    served = ServedWorker(tmp_path, interval=0.2)
    yield served
    served.close()


def test_a_report_asked_for_describes_every_log(served):
    served.request(T.CTR, CTR)
    served.request(T.RESUME)
    served.request(T.MARK_REGION, protocol.pack_regions([1, 5]))
    served.request(T.FLUSH)
    served.request(T.GET_RESYNC_WORK)
    served.send(Kind.REPORT)
    report = WorkerReport.decode(served.next_frame(Kind.STATS))
    (status,) = report.logs
    assert (status.uuid, status.luid, status.log_type, status.state) == (
        UUID, 7, "core", "resumed")
    assert (status.region_size, status.region_count) == (256, 8)
    # In sync from the start: the marks are the only dirty regions, recovery has nothing.
    assert (status.in_sync, status.dirty, status.recovering, status.sync_search) == (
        8, 2, None, 8)
    assert status.requests == 4  # the CTR is not an instance's request
    assert status.health == "A"


def test_a_worker_that_goes_idle_reports_its_last_activity_unasked(served):
    served.request(T.CTR, CTR)
    first = WorkerReport.decode(served.next_frame(Kind.STATS))
    assert [status.state for status in first.logs] == ["pending"]
    served.request(T.RESUME)
    second = WorkerReport.decode(served.next_frame(Kind.STATS))
    assert [status.state for status in second.logs] == ["resumed"]
    # Nothing happened since: no more reports.
    assert served.next_frame(Kind.STATS, timeout=0.6) is None


def test_counters_are_increments_since_the_previous_report():
    clock = [0.0]
    reporter = Reporter(interval=1.0, clock=lambda: clock[0])
    table = LogTable.__new__(LogTable)
    table.logs = {}
    reporter.count("flushes")
    reporter.count("flushes")
    reporter.active = True
    assert not reporter.due() and reporter.wait() == 1.0
    clock[0] = 1.0
    assert reporter.due()
    assert reporter.report(table).counters == {"flushes": 2}
    assert reporter.wait() is None  # nothing new: the worker may sleep for ever
    reporter.count("flushes", 3)
    assert reporter.report(table).counters == {"flushes": 3}


def test_a_report_survives_its_encoding():
    status = LogStatus("LVM-x", 1 << 40, "disk", "suspended", 1024, 16384, 16000, 3,
                       None, 16384, 99, "D")
    report = WorkerReport([status], {"marks": 12.0})
    assert WorkerReport.decode(report.encode()) == report


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"logs": 1}', b'{"logs": []}', b"\xff"])
def test_a_payload_that_is_not_a_report_is_refused(payload):
    with pytest.raises(ValueError, match="not a worker report"):
        WorkerReport.decode(payload)
