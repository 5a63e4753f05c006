"""A shard's slot in the arbiter: what outlives its workers, and the worker serving it now.

A shard is a filtered group-7 socket (routing.py) and an in-flight ring (inflight.py); both
stay with the arbiter across the lives of the workers that read the socket, so that a
successor continues where a dead worker stopped.  :class:`WorkerSlot` holds them together
with the current worker's process, the arbiter's ends of its pipes, what the arbiter has
seen of its progress and its latest report.  The arbiter alone changes a slot; the control
commands (commands.py) read it through the properties below.
"""

from __future__ import annotations

import select
import signal
import socket
from dataclasses import dataclass, field

import multiprocess

from shardlog.observability.workerstats import LogStatus, WorkerReport
from shardlog.server.inflight import InFlight
from shardlog.wire.frames import FrameReader


@dataclass(eq=False)
class WorkerSlot:
    """One shard: its socket and in-flight ring (kept across its workers' lives), the
    worker process serving it now and the arbiter's ends of that worker's pipes."""

    index: int
    sock: socket.socket  # the shard's group-7 socket, filtered to its requests
    in_flight: InFlight  # what the worker holds, readable here once it is dead
    process: multiprocess.Process
    control_fd: int  # arbiter → worker (orders; EOF: stop), non-blocking; -1 once closed
    events_fd: int  # worker → arbiter (readiness, reports, trace lines)
    started: float  # monotonic
    ready: bool = False
    out: bytearray = field(default_factory=bytearray)  # frames not yet taken by the pipe
    waiting_for_pipe: bool = False
    reader: FrameReader = field(default_factory=FrameReader)
    quick_deaths: int = 0
    # The ring's batch counter when last seen to move (or to hold nothing), and when
    # (monotonic): a worker with work whose count stays put this long is hung.
    batches_seen: int = -1
    batches_moved_at: float = 0.0
    killed_as_hung: bool = False
    report: WorkerReport | None = None  # its latest (workerstats.py); None until the first
    report_time: float = 0.0  # when it came (monotonic)
    logs: list[LogStatus] = field(default_factory=list)  # from the latest report with logs
    # Orders for a report sent to this shard's workers, numbered from 1, and the number
    # of the latest that a report answered: a status waits for the one it sent.
    reports_asked: int = 0
    reports_answered: int = 0
    restarts: int = 0  # workers that took this slot after one died
    handing_over: bool = False  # ordered to HAND_OVER: it exits for another server

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def port(self) -> int:
        """The shard socket's netlink port, as /proc/net/netlink lists it."""
        return self.sock.getsockname()[0]

    @property
    def held(self) -> int:
        """Requests the worker has read and not answered."""
        return self.in_flight.held

    @property
    def takes_orders(self) -> bool:
        """Whether the worker is up and its order pipe open: it will answer SEND_REPORT."""
        return self.ready and self.control_fd >= 0

    def has_work(self) -> bool:
        """Whether the worker holds requests or some wait in its socket."""
        return bool(self.in_flight.held) or self.socket_readable()

    def socket_readable(self) -> bool:
        """Whether a datagram waits in the shard socket (polled, never read: it is the
        worker's)."""
        return bool(select.select([self.sock], [], [], 0)[0])


def exit_reason(code: int | None) -> str:
    """A worker's exit code, for the log."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
