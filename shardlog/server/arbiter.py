"""The arbiter (the front process): the shard sockets, and the supervision of their workers.

Theory of operation
-------------------
The kernel multicasts every request to the sockets in connector group 7, runs each
member's socket filter first, and takes the first reply per seq (protocol.md §1.1).  The
arbiter opens one socket per shard, each with a BPF filter that accepts only the requests
whose uuid hashes to that shard (routing.py: the hash is computed by the kernel), and
forks one worker per shard, which inherits its socket, reads it and replies to the
kernel itself (worker.py).  So a request wakes exactly one process, and the arbiter is off
the request path.  Its loop is gunicorn's Arbiter's (:meth:`Arbiter._loop`): sleep on one
epoll (eventloop.py: each worker's events pipe, a self-pipe for signals — queued, never
handled inline — and the control socket), reap the workers that ended, kill the hung;
the start, stop and restart policies are each a method of their own.  A shard's socket,
ring and current worker are its slot (slots.py).

- **Reports**: each worker sends, on its events pipe, a report of its logs and counters,
  the requests it answered included (workerstats.py), about once a second while busy, or
  when the front asks (:meth:`Arbiter.request_reports`).  The front keeps each slot's
  latest and hands every report to its ``report_listeners`` (the metrics, the operator
  tools).
- **Operators** (control.py): a Unix socket served from this same loop, never
  blocking it, answers ``status`` (the slots and the workers' latest reports, fresh:
  commands.py) and streams ``trace`` events (commands.py: while anyone traces, the workers
  send the requests they answered, timed, in TRACE frames; the front matches them against
  the subscriptions; while nobody traces the workers pay one attribute test per request).
- **Supervision**: the front keeps every shard socket open and never reads it, so a
  worker that dies costs only what it held: requests queued in its socket wait there for
  its successor, which inherits the same socket, and requests it had read but not
  answered — its in-flight ring in shared memory (inflight.py) — are answered -EAGAIN
  here (a connector ACK: a full reply would zero the kernel's reply size for the
  re-send), which makes the kernel re-send them at once with a new seq.  The successor
  restores the logs from their files as their requests come (records.py); the other
  shards serve throughout.  A worker that holds requests and finishes no batch for
  ``--worker-timeout`` seconds (the ring's progress counter) is killed and replaced the
  same way.  A worker that dies again and again right after starting stops the server
  instead (the kernel then sees no server, and waits for the next one via its reconnect
  loop).
- **SIGUSR1** writes what ``shardlog status`` shows to the log, as cmirrord's debug
  dump did (once the workers have reported: never blocking the loop).
- **Stop** (SIGTERM, SIGINT): leave group 7 on every shard socket first, so that the
  kernel's next request finds no server (-ESRCH, its reconnect loop) instead of a socket
  nobody reads; order every worker to STOP; they answer what is queued in their
  sockets, commit every log and exit; the front exits 0 once they all have.
- **Take-over** (handover.py): a new server asks on the control socket for the shard
  sockets; the workers HAND_OVER (commit, close, exit, the sockets left in group 7), the
  front passes the sockets and the control socket's listener with SCM_RIGHTS and exits 0
  once the new server says it serves — or, if the new one fails at any step, respawns
  its workers on the same sockets and serves on.  ``--take-over`` is the other side: a
  front that starts from the sockets it is handed instead of opening its own — or, for
  another worker count, switches from them to sockets of its own and hands what was
  queued in them to its new shards (handover.py).

The sockets are set up with the standard library: pyroute2 0.9's NetlinkSocket drives its
file descriptor from an asyncio endpoint, while the workers need plain descriptors that
survive a fork.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import multiprocess

from shardlog.log.outcome import LOST_WITH_WORKER, lost_with_worker
from shardlog.observability.metrics import FrontCollector, FrontStats, serve_metrics
from shardlog.observability.workerstats import WorkerReport
from shardlog.server import handover, statustext, worker
from shardlog.server.commands import (
    FRESH_TIMEOUT,
    NOTE_WORKER_DIED,
    StatusCommand,
    TraceCommand,
    Tracer,
)
from shardlog.server.control import Connection, ControlServer, ControlSetupError
from shardlog.server.eventloop import EventLoop
from shardlog.server.inflight import InFlight
from shardlog.server.nlsocket import (
    NETLINK_ADD_MEMBERSHIP,
    SOL_NETLINK,
    kernel_connector_reachable,
    leave_group_7,
    open_connector_socket,
)
from shardlog.server.slots import WorkerSlot, exit_reason
from shardlog.server.worker import Peer, decode_trace
from shardlog.storage import statedir
from shardlog.storage.statedir import write_atomically
from shardlog.wire import frames, protocol
from shardlog.wire.frames import FrameError, Kind

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 32 << 20  # a multicast dropped for want of room costs the mirror 15 s
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
QUICK_DEATH = 1.0  # seconds: a worker that dies sooner after its start failed to start
QUICK_DEATHS_TO_GIVE_UP = 5
STOP_TIMEOUT = 60.0
START_TIMEOUT = 30.0
# Below the kernel's 15 s retry: a hung worker's requests are answered -EAGAIN (once it
# is dead) before the kernel would time them out and wait again.
WORKER_TIMEOUT = 10.0
HANG_CHECK_INTERVAL = 0.5
# A shard whose next worker could not be started (fork or pipe failed: out of memory, of
# processes, of descriptors) is tried again this often, its requests waiting meanwhile in
# its socket: one shard waits, rather than the whole server going down.
RESPAWN_RETRY = 1.0
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


class ServeError(Exception):
    """The server cannot start; the message says why, in one line."""


@dataclass
class ServeConfig:
    workers: int
    state_dir: Path
    metrics_addr: str | None = None
    pid_file: Path | None = None
    test_peer: int | None = None  # a netlink port allowed to play the kernel (tests)
    receive_buffer: int = RECEIVE_BUFFER
    worker_timeout: float = WORKER_TIMEOUT  # a worker silent this long with work is killed
    control_socket: Path | None = None  # the operators' socket (control.py); None: none
    per_log_metrics: bool = True  # two series per log instance (a uuid label)
    take_over: bool = False  # take the sockets of the server at control_socket over
    ready_fd: int | None = None  # written (one byte) and closed once serving (--background)


@dataclass(eq=False)
class Giving:
    """A take-over of this server by another, under way (handover.py)."""

    client: Connection  # the new server's control connection
    pid: int
    started: float  # monotonic
    sent: bool = False  # the sockets are handed over: only "serving" or EOF remain


class Arbiter:
    """The server's main process (the front): the arbiter of the shard workers."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.stats = FrontStats(config.workers)
        self.slots: list[WorkerSlot] = []
        self.loop = EventLoop()
        # Slots whose worker ended (its events pipe's EOF), reaped after the wakeup.
        self.ended: list[WorkerSlot] = []
        # Slots whose next worker could not be started, and when to try again (monotonic):
        # out of self.slots until one is.
        self.vacant: list[tuple[WorkerSlot, float]] = []
        self.peer = Peer(config.test_peer)
        self.metrics_server = None
        self.control: ControlServer | None = None
        # Set while someone traces (commands.py): the workers send TRACE frames then.
        self.tracer: Tracer | None = None
        self.started = time.time()
        self.on_tick: list[Callable[[], None]] = []  # called after every wakeup (≤ 1 s)
        # Called with (slot, report) for every worker report, in the loop: they must not
        # block.  The metrics add the report's counters to the front's totals.
        self.report_listeners: list[Callable[[WorkerSlot, WorkerReport], None]] = []
        self.report_listeners.append(self._add_report_counts)
        self.stopping = False
        self.exit_code = 0
        self.serving = False
        self._signal_r, self._signal_w = socket.socketpair()
        # A scrape (in the metrics thread) wakes the loop here to have the workers report.
        self._scrape_r, self._scrape_w = socket.socketpair()
        self._scrapes: deque[threading.Event] = deque()
        self._shard_sockets: list[socket.socket] = []
        self._stop_deadline = 0.0
        self._next_hang_check = 0.0
        self._loop_thread = threading.main_thread()  # the one that runs run()
        self.status = StatusCommand(self)  # the control socket's and SIGUSR1's
        self.report_listeners.append(self.status.on_report)
        self.on_tick.append(self.status.expire)
        # Take-over (handover.py), as the old server: the request under way, the slots
        # whose workers have handed over, whether the new server serves (then we exit).
        self.giving: Giving | None = None
        self.handed: list[WorkerSlot] = []
        self.taken_over = False
        self._stop_after_giving = False  # a SIGTERM that came while handing over
        # As the new server: what the old one handed over, and whether it is gone.
        self.received: handover.Received | None = None
        self.took_over = False

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    # -- start -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; the exit code."""
        self._loop_thread = threading.current_thread()
        try:
            self._start()
            self._loop()
        finally:
            self._close()
        return self.exit_code

    def _start(self) -> None:
        check_privileges()
        config = self.config
        if config.test_peer is not None and kernel_connector_reachable():
            raise ServeError("--test-peer is for a private network namespace (unshare -n): "
                             "here the real kernel would wait for replies sent to the peer")
        try:
            statedir.logs_directory(config.state_dir).mkdir(parents=True, exist_ok=True)
            if config.take_over:
                _probe_writable(statedir.logs_directory(config.state_dir))
        except OSError as exc:
            raise ServeError(f"state directory {config.state_dir}: {exc.strerror}") from exc
        if config.take_over:
            # Everything this server can check alone is checked: from here on the old
            # server's workers stop for this one.
            self.received = self._request_sockets()
        for sock in (self._signal_r, self._signal_w, self._scrape_r, self._scrape_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, _note_signal)
        self.loop.watch(self._signal_r.fileno(), self._on_signal)
        self.loop.watch(self._scrape_r.fileno(), self._on_scrape)
        if config.metrics_addr and self.received is None:
            try:
                self._open_metrics()
            except (OSError, ValueError) as exc:
                raise ServeError(f"metrics address {config.metrics_addr}: {exc}") from exc
        if config.control_socket is not None:
            self.control = ControlServer(config.control_socket, self.loop, {
                "status": self.status.answer,
                "trace": TraceCommand(self).subscribe,
                "take-over": self._on_take_over_request,
                "serving": self._on_new_server_serving,
            })
            try:
                if self.received is not None and self.received.control_listener:
                    self.control.adopt(self.received.control_listener)
                else:
                    self.control.open()
            except ControlSetupError as exc:
                raise ServeError(str(exc)) from exc
            self.on_tick.append(self.control.flush_streams)
        if self.received is not None:
            # The old server's sockets: filtered, in group 7, holding what the kernel
            # sent since its workers stopped reading.
            sockets = self._shard_sockets = self.received.sockets
            self.loop.watch(self.received.conn.fileno(), self._on_old_server_gone)
        else:
            # Every socket is filtered and in group 7 before any worker reads: from the
            # first request on, each is accepted by exactly one socket.
            sockets = self._shard_sockets = self._open_shard_sockets()
        for index, sock in enumerate(sockets):
            self.slots.append(self._spawn(index, sock, InFlight()))
        if config.metrics_addr and self.received is not None:
            # Once the workers read: off the path of the requests queued meanwhile.  The
            # old server frees the port as it hands over, perhaps a moment later.
            self._open_metrics_after_old(time.monotonic() + handover.METRICS_PORT_WAIT)
        peer = f", test peer {config.test_peer}" if config.test_peer is not None else ""
        log.info("starting %d workers, state in %s, netlink ports %s%s", config.workers,
                 config.state_dir, ", ".join(str(s.getsockname()[0]) for s in sockets), peer)

    def _open_metrics(self) -> None:
        config = self.config
        assert config.metrics_addr
        self.metrics_server = serve_metrics(
            config.metrics_addr,
            FrontCollector(self.stats, self._gauges, config.per_log_metrics,
                           refresh=self._refresh_for_scrape))

    def _open_metrics_after_old(self, deadline: float) -> None:
        while True:
            try:
                self._open_metrics()
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise ServeError(f"metrics address {self.config.metrics_addr}: "
                                     f"{exc}") from exc
            except ValueError as exc:
                raise ServeError(f"metrics address {self.config.metrics_addr}: "
                                 f"{exc}") from exc
            time.sleep(0.01)

    def _request_sockets(self) -> handover.Received:
        config = self.config
        if config.control_socket is None:
            raise ServeError("--take-over asks the running server on its control socket: "
                             "give --control-socket")
        log.info("taking over from the server at %s", config.control_socket)
        try:
            received = handover.request_sockets(
                config.control_socket, workers=config.workers, state_dir=config.state_dir,
                test_peer=config.test_peer, receive_buffer=config.receive_buffer,
                allowed_ports=self.peer.allowed_ports)
        except handover.TakeOverError as exc:
            raise ServeError(f"take-over refused, the running server serves on: {exc}") \
                from exc
        log.info("pid %d handed %d shard sockets over %.1f ms after the request",
                 received.old_pid, received.handed,
                 (received.received_at - received.asked_at) * 1e3)
        return received

    def _open_shard_sockets(self) -> list[socket.socket]:
        shards = self.config.workers
        sockets: list[socket.socket] = []
        try:
            for index in range(shards):
                sockets.append(open_connector_socket(
                    receive_buffer=self.config.receive_buffer, join_group_7=True,
                    shard=(index, shards)))
        except PermissionError as exc:
            for sock in sockets:
                sock.close()
            raise ServeError(f"cannot join connector group 7 ({exc.strerror}): "
                             "shardlog serve needs root") from exc
        return sockets

    def _spawn(self, index: int, sock: socket.socket, in_flight: InFlight,
               quick_deaths: int = 0, restarts: int = 0) -> WorkerSlot:
        control_r, control_w = os.pipe()
        try:
            events_r, events_w = os.pipe()
        except OSError:
            os.close(control_r)
            os.close(control_w)
            raise
        with contextlib.suppress(OSError):  # the default 64 KiB works, with more wakeups
            fcntl.fcntl(events_w, F_SETPIPE_SZ, PIPE_SIZE)
        inherited = [control_w, events_r, self.loop, self._signal_r, self._signal_w,
                     self._scrape_r, self._scrape_w]
        if self.metrics_server is not None:
            inherited.append(self.metrics_server.socket)
        # Every other shard's socket, those of workers not spawned yet included.
        inherited += [other for other in self._shard_sockets if other is not sock]
        for slot in self.slots:
            if slot.index != index:
                inherited += [slot.control_fd, slot.events_fd]
        if self.control is not None:
            inherited += self.control.descriptors()
        if self.config.ready_fd is not None:
            inherited.append(self.config.ready_fd)
        # While this server takes over, its workers hold the connection to the old one:
        # that server serves on only once every process of this one is gone.
        take_over_conn = None
        if self.received is not None and not self.took_over:
            take_over_conn = self.received.conn
        if self.giving is not None:
            inherited.append(self.giving.client.sock)
        process = multiprocess.get_context("fork").Process(
            target=worker.run, name=f"shardlog-worker-{index}",
            args=(index, sock, control_r, events_w, self.config.state_dir, in_flight,
                  self.peer, self.stats.resend_watch, inherited, take_over_conn,
                  self.received.leftovers_for(index) if self.received is not None else None))
        try:
            process.start()
        finally:
            os.close(control_r)
            os.close(events_w)
            if process.pid is None:  # not started: no worker holds the other ends
                os.close(control_w)
                os.close(events_r)
        os.set_blocking(control_w, False)
        slot = WorkerSlot(index, sock, in_flight, process, control_w, events_r,
                          time.monotonic(), quick_deaths=quick_deaths, restarts=restarts)
        self.loop.watch(events_r, lambda: self._on_events(slot))
        if self.tracer is not None:
            self._order(slot, Kind.TRACING, 1)
        log.info("worker %d started (pid %d)", index, process.pid)
        return slot

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """Sleep (the handlers run: signals, worker events, the control socket), reap
        the workers that ended (each replaced or not by the restart policy), kill the
        hung ones, until the server is done."""
        start_deadline = time.monotonic() + START_TIMEOUT
        while not self._done(start_deadline):
            self.loop.run_once(HANG_CHECK_INTERVAL)
            self._reap_workers()
            self._fill_vacancies()
            self._murder_hung_workers()
            for tick in self.on_tick:
                tick()

    def _done(self, start_deadline: float) -> bool:
        """Whether the loop ends (ServeError if the workers never came up); the server
        serves from the moment every worker is up."""
        if not self.serving and not self.stopping and all(s.ready for s in self.slots):
            self._now_serving()
        if (self.stopping and not self.slots) or self.taken_over:
            return True
        if self.stopping and time.monotonic() > self._stop_deadline:
            log.error("%d workers did not stop within %.0f s: killed", len(self.slots),
                      STOP_TIMEOUT)
            self.exit_code = 1
            return True
        if not self.serving and not self.stopping and time.monotonic() > start_deadline:
            raise ServeError(f"workers did not start within {START_TIMEOUT:.0f} s")
        return False

    def _reap_workers(self) -> None:
        """Every worker whose events pipe closed this wakeup: joined, what it held
        answered, its slot given to the restart, stop or take-over policy."""
        while self.ended:
            self._worker_ended(self.ended.pop(0))

    def _murder_hung_workers(self) -> None:
        """A worker that has work — requests it holds, or requests waiting in its socket
        — and has finished no batch for ``worker_timeout`` seconds is killed: what it
        held is then answered -EAGAIN, what waits in its socket is answered by a new
        worker, which restores its logs, where the kernel would wait 15 s per try, for
        ever."""
        now = time.monotonic()
        if now < self._next_hang_check:
            return
        self._next_hang_check = now + HANG_CHECK_INTERVAL
        for slot in self.slots:
            batches = slot.in_flight.progress
            # Handing over, a worker commits every log and reads nothing: its socket
            # fills while it works, which is no sign of a hang.
            timeout = (handover.HAND_OVER_TIMEOUT if slot.handing_over
                       else self.config.worker_timeout)
            if batches != slot.batches_seen or not slot.has_work():
                slot.batches_seen, slot.batches_moved_at = batches, now
            elif not slot.killed_as_hung and now - slot.batches_moved_at > timeout:
                log.error("worker %d (pid %d) answered nothing for %.0f s with %d requests "
                          "in hand and its socket %s: killing it", slot.index,
                          slot.process.pid, now - slot.batches_moved_at, slot.in_flight.held,
                          "not empty" if slot.socket_readable() else "empty")
                slot.killed_as_hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGKILL)

    def _now_serving(self) -> None:
        self.serving = True
        if self.config.pid_file is not None:
            try:
                _write_pid_file(self.config.pid_file)
            except OSError as exc:
                raise ServeError(f"cannot write pid file {self.config.pid_file}: "
                                 f"{exc.strerror}") from exc
        log.info("serving: %d shard sockets in connector group 7, %d workers up",
                 len(self.slots), len(self.slots))
        if self.received is None:
            self._signal_ready()
            return
        try:
            handover.announce_serving(self.received.conn)
        except OSError as exc:
            log.warning("the old server is gone already (%s)", exc.strerror)
        log.info("took over from pid %d: the kernel's requests waited at most %.1f ms "
                 "(from the request to all workers up)", self.received.old_pid,
                 (time.monotonic() - self.received.asked_at) * 1e3)
        self._signal_ready()

    def _on_old_server_gone(self) -> None:
        """EOF on the take-over connection: the old server exited (or, before this one
        serves, died).  Its sockets are this server's alone now."""
        received = self.received
        assert received is not None
        with contextlib.suppress(OSError):
            if received.conn.recv(4096, socket.MSG_DONTWAIT):
                return  # nothing is expected from it; EOF is what counts
        self.loop.unwatch(received.conn.fileno())
        received.conn.close()
        self.took_over = True
        for slot in self.slots:
            self._order(slot, Kind.TAKEN_OVER)
        log.info("the old server (pid %d) is gone: take-over complete", received.old_pid)
        if self.serving:
            self._signal_ready()

    def _signal_ready(self) -> None:
        """Tell a waiting ``--background`` parent that the server serves (and, after a
        take-over, that the old one is gone)."""
        if self.config.ready_fd is not None and (self.received is None or self.took_over):
            with contextlib.suppress(OSError):
                os.write(self.config.ready_fd, b"1")
            os.close(self.config.ready_fd)
            self.config.ready_fd = None

    def _on_events(self, slot: WorkerSlot) -> None:
        try:
            received = slot.reader.read(slot.events_fd)
        except BlockingIOError:
            return
        except FrameError as exc:
            log.error("worker %d sent a corrupt frame (%s): replacing it", slot.index, exc)
            slot.process.kill()
            received = None
        for kind, tag, payload in received or ():
            if kind == Kind.WORKER_REPORT:
                self._on_report(slot, tag, payload)
            elif kind == Kind.TRACE:
                tracer = self.tracer  # the one whose lines these are, even if it stops now
                if tracer is not None:
                    if tag:  # traced requests the worker dropped while we did not read
                        tracer.untraced(slot.index, tag)
                    for arrived, latency, datagram, reply in decode_trace(payload):
                        tracer.traced(slot.index, arrived, latency, datagram, reply)
            elif kind == Kind.READY:
                slot.ready = True
        if received is None:
            self.loop.unwatch(slot.events_fd)
            self.ended.append(slot)  # reaped after this wakeup's handlers

    def _on_report(self, slot: WorkerSlot, tag: int, payload: bytes) -> None:
        """``tag``: the number of the order the report answers (0: a periodic one)."""
        try:
            report = WorkerReport.decode(payload)
        except ValueError as exc:
            log.error("worker %d sent a bad report: %s", slot.index, exc)
            return
        slot.report = report
        if report.logs is not None:  # else a periodic report: the logs as they were
            slot.logs = report.logs
            slot.reports_answered = max(slot.reports_answered, tag)
        slot.report_time = time.monotonic()
        for listener in self.report_listeners:
            listener(slot, report)

    def _add_report_counts(self, slot: WorkerSlot, report: WorkerReport) -> None:
        self.stats.add_worker_deltas(report.counters)
        try:
            self.stats.worker_requests[slot.index] += self.stats.add_deltas(report.requests)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            log.error("worker %d sent bad request counts: %s", slot.index, exc)

    def _refresh_for_scrape(self) -> None:
        """In the metrics thread: have every worker report what it counted, and wait for
        that (at most ``commands.FRESH_TIMEOUT``), so that a scrape sees every request
        answered before it, not the workers' figures of up to a second ago."""
        if (not self.serving or self.stopping
                or threading.current_thread() is self._loop_thread):
            # Registration's first collect (the loop itself cannot wait for its own
            # wakeup: metrics reopened after a failed take-over), or workers going away.
            return
        done = threading.Event()
        self._scrapes.append(done)
        with contextlib.suppress(OSError):  # full: a wakeup is on its way already
            self._scrape_w.send(b"s")
        done.wait(FRESH_TIMEOUT + HANG_CHECK_INTERVAL)

    def _on_scrape(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._scrape_r.recv(4096)
        waiting = []
        while self._scrapes:
            waiting.append(self._scrapes.popleft())
        if waiting:
            self.status.when_reported(lambda: [event.set() for event in waiting])

    def request_reports(self) -> None:
        """Ask every live worker for a report now (they arrive through the loop), each
        order numbered by its slot (``reports_asked``), as its report will be."""
        for slot in self.slots:
            if slot.takes_orders:
                slot.reports_asked += 1
                self._order(slot, Kind.SEND_REPORT, slot.reports_asked)

    def set_tracer(self, tracer: Tracer | None) -> None:
        """Start (a tracer) or stop (None) tracing: the workers send TRACE frames while
        one is set."""
        if (tracer is None) != (self.tracer is None):
            for slot in self.slots:
                self._order(slot, Kind.TRACING, 0 if tracer is None else 1)
        self.tracer = tracer

    def _order(self, slot: WorkerSlot, kind: Kind, tag: int = 0, *,
               force: bool = False) -> None:
        """Queue an order for the worker; while stopping, only the stop itself
        (``force``), written at once as far as the pipe takes it: the pipe closes next,
        and a worker that misses the order for a full pipe stops at its EOF the same
        way."""
        if slot.control_fd < 0 or (self.stopping and not force):
            return
        slot.out += frames.pack(kind, tag)
        if force:
            with contextlib.suppress(OSError):
                os.write(slot.control_fd, slot.out)
            slot.out.clear()
            return
        self._write_orders(slot)

    def _write_orders(self, slot: WorkerSlot) -> None:
        try:
            written = os.write(slot.control_fd, slot.out)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            return  # it died: its events pipe's EOF is on the way
        del slot.out[:written]
        if slot.out and not slot.waiting_for_pipe:
            slot.waiting_for_pipe = True
            self.loop.watch(slot.control_fd, lambda: self._write_orders(slot), select.EPOLLOUT)
        elif not slot.out and slot.waiting_for_pipe:
            slot.waiting_for_pipe = False
            self.loop.unwatch(slot.control_fd)

    # -- supervision -------------------------------------------------------------------------

    def _worker_ended(self, slot: WorkerSlot) -> None:
        code, lost = self._bury(slot)
        if slot.handing_over:
            self._worker_handed_over(slot, code, lost)
        elif self.stopping:
            self._worker_stopped(slot, code)
        else:
            self._restart(slot, code, lost)

    def _bury(self, slot: WorkerSlot) -> tuple[int | None, int]:
        """Close a dead worker's pipes, join it and answer -EAGAIN what it held: its
        exit code and the number of requests answered."""
        self.loop.unwatch(slot.events_fd)
        os.close(slot.events_fd)
        self._close_control(slot)
        slot.process.join(5.0)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        return slot.process.exitcode, self._answer_eagain(slot)

    def _worker_stopped(self, slot: WorkerSlot, code: int | None) -> None:
        """The stop policy: a worker that ends while the server stops is not replaced."""
        self.slots.remove(slot)
        slot.sock.close()
        if code != 0:
            log.error("worker %d exited with %s while stopping", slot.index, code)
            self.exit_code = 1

    def _restart(self, slot: WorkerSlot, code: int | None, lost: int) -> None:
        """The restart policy: a worker that died is replaced on the same socket and ring,
        unless it keeps dying right after its start — then the server stops."""
        log.error("worker %d (pid %d) died (%s); %d requests in flight answered -EAGAIN",
                  slot.index, slot.process.pid, exit_reason(code), lost)
        quick = time.monotonic() - slot.started < QUICK_DEATH
        quick_deaths = slot.quick_deaths + 1 if quick else 0
        if quick_deaths >= QUICK_DEATHS_TO_GIVE_UP:
            log.critical("worker %d died %d times right after starting: stopping",
                         slot.index, quick_deaths)
            self.slots.remove(slot)
            slot.sock.close()
            self.exit_code = 1
            self._stop()
            return
        self.stats.worker_restarts += 1
        self.slots.remove(slot)
        self._start_successor(slot, quick_deaths, slot.restarts + 1)

    def _start_successor(self, slot: WorkerSlot, quick_deaths: int = 0,
                         restarts: int = 0) -> WorkerSlot | None:
        """A new worker on ``slot``'s socket and ring, put among the slots; None if it
        could not be started now: the shard is then vacant, tried again every
        RESPAWN_RETRY seconds (:meth:`_fill_vacancies`)."""
        try:
            successor = self._spawn(slot.index, slot.sock, slot.in_flight, quick_deaths,
                                    restarts)
        except OSError as exc:
            log.error("cannot start a worker for shard %d (%s): its requests wait in its "
                      "socket; trying again in %.0f s", slot.index, exc, RESPAWN_RETRY)
            slot.quick_deaths, slot.restarts = quick_deaths, restarts
            self.vacant.append((slot, time.monotonic() + RESPAWN_RETRY))
            return None
        self.slots.append(successor)
        self.slots.sort(key=lambda each: each.index)
        return successor

    def _fill_vacancies(self) -> None:
        """Try again to start a worker for every vacant shard whose time has come."""
        if not self.vacant or self.stopping:
            return
        now = time.monotonic()
        due = [slot for slot, when in self.vacant if when <= now]
        if due:
            self.vacant = [(slot, when) for slot, when in self.vacant if when > now]
            for slot in due:
                if self._start_successor(slot, slot.quick_deaths, slot.restarts):
                    log.info("shard %d has a worker again", slot.index)

    # -- take-over, as the old server (handover.py) --------------------------------------------

    def _on_take_over_request(self, client: Connection, message: dict) -> None:
        """The control command ``take-over``: refuse (nothing happens) or order every
        worker to hand over."""
        pid = message.get("pid")
        if self.giving is not None:
            reason = f"a take-over by pid {self.giving.pid} is under way"
        elif self.stopping:
            reason = "this server is stopping"
        elif not self.serving:
            reason = "this server is still starting"
        elif self.vacant:
            reason = (f"shard {self.vacant[0][0].index} has no worker (one could not be "
                      "started)")
        elif copies := [slot.index for slot in self.slots if slot.in_flight.dropping_copies]:
            # Its socket may still hold copies of requests it answered from the last
            # take-over's leftovers: handed on now, they would be answered again.
            reason = (f"worker {copies[0]} is still reading past the copies the last "
                      "take-over left in its socket: try again in a moment")
        elif self.received is not None and not self.took_over:
            reason = "this server is itself still taking over"
        else:
            reason = handover.refusal(message, workers=self.config.workers,
                                      state_dir=self.config.state_dir,
                                      test_peer=self.config.test_peer)
        if reason is not None:
            log.warning("take-over by pid %s refused: %s", pid, reason)
            client.send({"error": reason})
            client.finish()
            return
        log.info("take-over by pid %s: the workers hand over their %d shard sockets", pid,
                 len(self.slots))
        self.giving = Giving(client, int(pid) if isinstance(pid, int) else 0,
                             time.monotonic())
        client.on_close.append(self._on_giving_connection_closed)
        for slot in self.slots:
            slot.handing_over = True
            self._order(slot, Kind.HAND_OVER)
        if self.metrics_server is not None:
            # Its port is the new server's to bind.  In a thread: shutdown() waits for the
            # server's poll interval (0.5 s), which must not hold the loop.
            server, self.metrics_server = self.metrics_server, None
            threading.Thread(target=_close_metrics, args=(server,), daemon=True,
                             name="metrics-close").start()

    def _worker_handed_over(self, slot: WorkerSlot, code: int | None, lost: int) -> None:
        if code != 0:
            log.error("worker %d (pid %d) ended handing over (%s); %d requests in flight "
                      "answered -EAGAIN", slot.index, slot.process.pid, exit_reason(code),
                      lost)
        self.slots.remove(slot)
        slot.handing_over = False
        if self.giving is None:  # the take-over failed meanwhile: serve on
            successor = self._start_successor(slot, restarts=slot.restarts)
            if successor is not None and self.stopping:
                # And the server stops: what is queued is answered, no more.
                self._order(successor, Kind.STOP, force=True)
                self._close_control(successor)
            return
        self.handed.append(slot)
        if not any(other.handing_over for other in self.slots):
            self._give_sockets()

    def _give_sockets(self) -> None:
        """Every worker has handed over: pass the sockets (handover.py step 3)."""
        giving = self.giving
        assert giving is not None
        listener = self.control.pause_accepting() if self.control is not None else None
        self.handed.sort(key=lambda slot: slot.index)
        try:
            handover.send_sockets(giving.client.sock, [slot.sock for slot in self.handed],
                                  listener)
        except OSError as exc:
            log.error("take-over by pid %d: cannot pass the sockets (%s)", giving.pid, exc)
            giving.client.close()  # → _on_giving_connection_closed: serve on
            return
        giving.sent = True
        log.info("take-over by pid %d: %d shard sockets handed over %.1f ms after its "
                 "request", giving.pid, len(self.handed),
                 (time.monotonic() - giving.started) * 1e3)

    def _on_new_server_serving(self, client: Connection, message: dict) -> None:
        """The control command ``serving``, from the server taking over: exit 0."""
        giving = self.giving
        if giving is None or client is not giving.client or not giving.sent:
            client.send({"error": "no take-over by this connection is under way"})
            return
        log.info("pid %d serves the kernel now (%.1f ms after its request): exiting",
                 giving.pid, (time.monotonic() - giving.started) * 1e3)
        self.taken_over = True

    def _on_giving_connection_closed(self) -> None:
        """The new server's connection closed — and with it every process of the new
        server that held it — before it said it serves: the take-over failed, and
        this server serves on, from its own sockets."""
        giving = self.giving
        if giving is None or self.taken_over:
            return
        self.giving = None
        log.error("take-over by pid %d failed (its connection closed %s): serving on",
                  giving.pid, "after the hand-over" if giving.sent else "before the hand-over")
        for slot in self.handed:
            # A worker of the new server that left group 7 left it for this socket too, and
            # a new server switching to another worker count took it out of group 7.
            with contextlib.suppress(OSError):
                slot.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, protocol.CN_IDX_DM)
            self._start_successor(slot, restarts=slot.restarts)
        self.handed.clear()
        if self.control is not None:
            self.control.resume_accepting()
        if self.config.metrics_addr and self.metrics_server is None:
            try:
                self._open_metrics()
            except (OSError, ValueError) as exc:
                log.error("metrics address %s: %s: serving without metrics",
                          self.config.metrics_addr, exc)
        if self._stop_after_giving:
            self._stop()

    def _answer_eagain(self, slot: WorkerSlot) -> int:
        """Answer -EAGAIN every request a dead worker had read and not answered; the
        number answered.  As a connector ACK: a full reply with -EAGAIN would also set
        the kernel's reply size to 0 (fill_pkg), and the answer to its re-send would then
        fail with -ENOSPC.  The ACK path keeps the size for exactly this retry."""
        arrived = slot.in_flight.batch_started
        now_ns = time.monotonic_ns()
        lost = []
        # The successor watches for re-sends of these alone: an earlier death's requests
        # (re-sent and counted by then, or another shard's) would be counted again.
        self.stats.resend_watch.clear()
        for datagram in slot.in_flight.unanswered():
            routing = protocol.peek_request(datagram)
            if routing is None:
                continue  # not a request: nobody waits for it
            _uuid, seq, request_type = routing
            ack = lost_with_worker(seq)
            try:
                slot.sock.sendto(ack, self.peer.reply_address)
            except OSError as exc:
                self.stats.send_errors += 1
                log.warning("an -EAGAIN answer was refused: %s", exc.strerror)
            self.stats.eagain_replies += 1
            self.stats.expect_resend(datagram, now_ns)
            lost.append((request_type & 0xFF, arrived))
            if self.tracer is not None:
                self.tracer.traced(slot.index, time.time() - (now_ns - arrived) / 1e9,
                                   (now_ns - arrived) / 1e9, datagram, ack,
                                   note=NOTE_WORKER_DIED)
        self.stats.lost(lost, LOST_WITH_WORKER, now_ns)
        slot.in_flight.reset()
        return len(lost)

    # -- stop --------------------------------------------------------------------------------

    def _on_signal(self) -> None:
        try:
            received = self._signal_r.recv(64)
        except BlockingIOError:
            return
        if signal.SIGUSR1 in received:
            log.warning("SIGUSR1: dumping every log and worker once they report")
            self.status.when_fresh(_log_dump)
        if any(signum in (signal.SIGTERM, signal.SIGINT) for signum in received):
            if self.giving is not None:
                # Leaving group 7 now would take the sockets from the server taking
                # over: stop only if that fails (else it serves, and this one exits).
                log.warning("stop (signal) deferred: a take-over by pid %d is under way",
                            self.giving.pid)
                self._stop_after_giving = True
                return
            if not self.stopping:
                log.info("stopping (signal): committing every log")
            self._stop()

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        # Still taking over: the old server holds these sockets too and serves on once
        # this server is gone, so they stay in group 7 and the workers just end (EOF:
        # they answer what is queued).  Else the server stops for good.
        for_good = self.received is None or self.took_over
        shards = self.slots + [slot for slot, _when in self.vacant]
        for slot in shards if for_good else ():
            try:
                leave_group_7(slot.sock)
            except OSError as exc:
                log.warning("cannot leave connector group 7: %s", exc)
        for slot in self.slots:
            if for_good:
                self._order(slot, Kind.STOP, force=True)
            self._close_control(slot)  # the worker answers what is queued, then exits
        self._stop_deadline = time.monotonic() + STOP_TIMEOUT

    def _close_control(self, slot: WorkerSlot) -> None:
        if slot.control_fd < 0:
            return
        if slot.waiting_for_pipe:
            self.loop.unwatch(slot.control_fd)
            slot.waiting_for_pipe = False
        os.close(slot.control_fd)
        slot.control_fd = -1

    def _close(self) -> None:
        if self.received is not None and not self.took_over:
            self._abandon_take_over()
        if self.control is not None:
            # Another server answers at the path when it took over, or when this one
            # failed to (the old one serves on): the path is theirs.
            self.control.close(unlink=not (self.taken_over or (self.received is not None
                                           and not self.took_over)))
        for slot in self.slots:
            if slot.process.is_alive():
                slot.process.kill()
            slot.sock.close()
        for slot in self.handed:  # handed over: closed here, never left
            slot.sock.close()
        for slot, _when in self.vacant:
            slot.sock.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        signal.set_wakeup_fd(-1)
        while self._scrapes:
            self._scrapes.popleft().set()
        self.loop.close()
        if self.config.pid_file is not None and self.serving:
            _remove_pid_file(self.config.pid_file)

    def _abandon_take_over(self) -> None:
        """This server failed while taking over: end its workers so that they leave the
        sockets in group 7 (EOF, no STOP: they answer what is queued), answer -EAGAIN
        what a dead one held, and close the connection last: the old server serves on
        once every holder of it is gone."""
        received = self.received
        assert received is not None
        log.error("take-over abandoned: the old server (pid %d) serves on",
                  received.old_pid)
        for slot in self.slots:
            self._close_control(slot)
        deadline = time.monotonic() + STOP_TIMEOUT
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            self._answer_eagain(slot)
            slot.sock.close()
        self.slots.clear()
        for sock in received.sockets:
            sock.close()
        if received.control_listener is not None and self.control is None:
            received.control_listener.close()
        with contextlib.suppress(OSError):
            self.loop.unwatch(received.conn.fileno())
        received.conn.close()

    # -- helpers -----------------------------------------------------------------------------

    def _gauges(self) -> dict:
        """Live figures for a scrape (called in the metrics thread: reads only)."""
        return {
            "workers": [(slot.index, slot.ready, slot.in_flight.held)
                        for slot in list(self.slots)],
            "logs": [status for slot in list(self.slots) for status in slot.logs],
        }


def _close_metrics(server) -> None:
    server.shutdown()
    server.server_close()


def _probe_writable(directory: Path) -> None:
    """OSError unless a file can be made in ``directory``: a server taking over must
    not find out at its first log's restore that it cannot write its state."""
    probe = directory / f".take-over-probe-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(probe)


def check_privileges() -> None:
    """ServeError unless this process may join group 7 and have its replies taken."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    effective = int(fields["CapEff"], 16)
    missing = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN),
                                      ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not effective >> bit & 1]
    if missing:
        raise ServeError(f"shardlog serve needs root: {' and '.join(missing)} missing "
                         "(CAP_NET_ADMIN to join connector group 7, CAP_SYS_ADMIN for the "
                         "kernel to accept replies)")


def _log_dump(snapshot: dict) -> None:
    """cmirrord's SIGUSR1 dump, to the log: what ``shardlog status`` prints."""
    for line in statustext.format_text(snapshot).splitlines():
        log.warning("dump: %s", line)


def _note_signal(signum, frame) -> None:
    """Nothing to do here: the wakeup fd carries the signal to the loop."""


def _write_pid_file(path: Path) -> None:
    # 0o666: readable by all, as any pid file (the umask still applies).
    write_atomically(path, f"{os.getpid()}\n".encode(), mode=0o666)


def _remove_pid_file(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass
