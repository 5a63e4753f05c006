"""The status command's wait for fresh reports (what counts as the report it asked for),
and the trace command's subscribers as the front hands worker frames to them."""

from __future__ import annotations

import os
import time

from shardlog.observability.workerstats import LogStatus, WorkerReport
from shardlog.server import commands
from shardlog.server.commands import StatusCommand, TraceCommand
from shardlog.server.slots import WorkerSlot
from shardlog.server.worker import TRACE_ENTRY
from shardlog.wire import frames, protocol
from shardlog.wire.frames import Kind
from shardlog.wire.protocol import RequestType as T

from .test_arbiter import front_with_client

LOG = LogStatus(uuid="LVM-a", luid=1, log_type="core", state="resumed", region_size=1024,
                region_count=8, in_sync=8, dirty=0, recovering=None, sync_search=8,
                requests=3, health="A")


class Server:
    """The arbiter as the command sees it: two live workers, and the orders it sent."""

    def __init__(self) -> None:
        self.slots = [WorkerSlot(index, None, None, None, control_fd=10 + index,
                                 events_fd=20 + index, started=0.0, ready=True)
                      for index in range(2)]
        self.stopping = False
        self.asked = 0

    def request_reports(self) -> None:
        self.asked += 1
        for slot in self.slots:
            slot.reports_asked += 1


def report(slot: WorkerSlot, tag: int, logs: list[LogStatus] | None) -> WorkerReport:
    """A report as the arbiter hands it on: the slot marked with the order it answers."""
    if logs is not None:
        slot.reports_answered = max(slot.reports_answered, tag)
    return WorkerReport(logs=logs, counters={"x": 1.0})


def test_a_status_waits_for_the_reports_it_asked_for_not_for_periodic_ones():
    server = Server()
    status = StatusCommand(server)
    answered = []
    status.when_reported(lambda: answered.append(True))
    assert server.asked == 1
    # A periodic report (no logs) may have left each worker before it read the order:
    # its counters are from before the order, so it does not answer the wait.
    for slot in server.slots:
        status.on_report(slot, report(slot, 0, None))
    assert answered == []
    status.on_report(server.slots[0], report(server.slots[0], 1, [LOG]))
    assert answered == []
    status.on_report(server.slots[1], report(server.slots[1], 1, []))
    assert answered == [True]


def test_a_report_answering_an_earlier_order_does_not_answer_a_later_status():
    server = Server()
    status = StatusCommand(server)
    first, second = [], []
    status.when_reported(lambda: first.append(True))
    status.when_reported(lambda: second.append(True))  # orders number 1, then 2
    for slot in server.slots:
        status.on_report(slot, report(slot, 1, [LOG]))
    assert (first, second) == ([True], [])
    for slot in server.slots:
        status.on_report(slot, report(slot, 2, [LOG]))
    assert second == [True]


def test_a_status_is_answered_after_the_fresh_timeout_without_the_reports(monkeypatch):
    server = Server()
    status = StatusCommand(server)
    answered = []
    status.when_reported(lambda: answered.append(True))
    status.expire()
    assert answered == []
    later = time.monotonic() + commands.FRESH_TIMEOUT + 0.1
    monkeypatch.setattr(commands.time, "monotonic", lambda: later)
    status.expire()
    assert answered == [True]


def test_a_tracer_gone_while_a_worker_says_what_went_untraced_leaves_the_front_serving(
        tmp_path):
    """A worker's TRACE frame whose tag counts untraced requests, read in the wakeup in
    which the only tracing client has gone: the front tells the subscribers, then hands
    on the frame's traced requests, and neither step may find tracing stopped under it."""
    front, client, theirs = front_with_client(tmp_path)
    TraceCommand(front).subscribe(client, {"cmd": "trace"})
    assert front.tracer is not None
    theirs.close()  # the tracing tool was stopped; its EOF is not read yet
    events_r, events_w = os.pipe()
    slot = WorkerSlot(0, None, None, None, control_fd=-1, events_fd=events_r, started=0.0)
    request = protocol.encode_request(T.IN_SYNC, seq=1, uuid="LVM-a", luid=1,
                                      data=protocol.pack_u64(0))
    entry = TRACE_ENTRY.pack(time.time(), 1e-4, len(request), 0) + request
    os.write(events_w, frames.pack(Kind.TRACE, 7, entry))  # 7 requests went untraced
    try:
        front._on_events(slot)
        client.server.flush_streams()  # the end of the front's wakeup: the client is found gone
        assert client.closed and front.tracer is None
    finally:
        os.close(events_r)
        os.close(events_w)
        front._close()
