"""The worker → front stats channel, directly: counters as increments, reports through their
encoding (a served worker's reports: tests/process/test_workerstats.py)."""

from __future__ import annotations

import pytest

from shardlog.log.logtable import LogTable
from shardlog.observability.workerstats import LogRows, LogStatus, Reporter, WorkerReport


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
    periodic = reporter.report(None)  # a busy worker's periodic report
    assert periodic.counters == {"flushes": 2} and periodic.logs is None
    assert reporter.wait() is None  # nothing new: the worker may sleep for ever
    reporter.count("flushes", 3)
    assert reporter.report(table.statuses()).counters == {"flushes": 3}


def test_a_report_survives_its_encoding():
    status = LogStatus("LVM-x", 1 << 40, "disk", "suspended", 1024, 16384, 16000, 3,
                       None, 16384, 99, "D")
    report = WorkerReport([status], {"marks": 12.0})
    assert WorkerReport.decode(report.encode()) == report
    # A busy worker's periodic report: counters only, its logs left out.
    counters_only = WorkerReport(None, {"marks": 1.0}, {"received": [[8, 3]]})
    assert WorkerReport.decode(counters_only.encode()) == counters_only


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"logs": 1}', b'{"logs": []}', b"\xff"])
def test_a_payload_that_is_not_a_report_is_refused(payload):
    with pytest.raises(ValueError, match="not a worker report"):
        WorkerReport.decode(payload)


def test_logs_encoded_a_slice_at_a_time_decode_as_one_list():
    statuses = [LogStatus(uuid=f"LVM-{n}", luid=n, log_type="core", state="resumed",
                          region_size=1024, region_count=8, in_sync=8, dirty=n % 3,
                          recovering=None, sync_search=8, requests=n, health="A")
                for n in range(7)]
    rows = LogRows()
    for start in range(0, 7, 3):
        rows.add(statuses[start:start + 3])
    rows.add([])
    report = WorkerReport(None, {"commits": 2.0}, {"received": [[9, 4]]})
    decoded = WorkerReport.decode(report.encode(rows))
    assert decoded.logs == statuses
    assert decoded.counters == {"commits": 2.0}
    assert WorkerReport.decode(report.encode()).logs is None
    assert WorkerReport.decode(WorkerReport(statuses).encode()).logs == statuses
    assert WorkerReport.decode(WorkerReport([]).encode()).logs == []
