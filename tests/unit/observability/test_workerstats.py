"""The worker → front stats channel, directly: counters as increments, reports through their
encoding (a served worker's reports: tests/process/test_workerstats.py)."""

from __future__ import annotations

import pytest

from shardlog.log.logtable import LogTable
from shardlog.observability.workerstats import LogStatus, Reporter, WorkerReport


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
