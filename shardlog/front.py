"""The front process: the netlink socket, routing to workers, and their supervision.

Theory of operation
-------------------
The kernel multicasts every request to the sockets in connector group 7 and takes the
first reply per seq (protocol.md §1.1).  The front is the only member.  One event loop
(epoll) sleeps on the socket, on each worker's reply pipe, and on a self-pipe for
signals (gunicorn's Arbiter: signals are queued, never handled inline).

- **Requests.**  On each wakeup the front drains the socket, drops what does not come
  from the kernel (netlink port 0) or, in tests, the named peer, and routes each request
  by a CRC of its log's uuid to a worker: every instance of a log (a reload's two luids)
  meets in one worker, in order.  The datagram travels as it came, in a tagged frame
  (frames.py), one pipe write per worker per wakeup.  The front decodes nothing beyond
  the routing fields; a datagram too broken to route is answered here (-EINVAL when the
  kernel waits for it) or dropped when it was not a request for us.
- **Replies** come back tagged, in any order, and go to the kernel as they arrive.  Until
  then the front keeps each tag's request seq: that is what it needs if the worker dies;
  and its type and arrival time (one clock read per wakeup), for the metrics: each reply
  is counted by type and result, and its latency observed once the batch has been sent.
- **Reports**: each worker also sends, on its reply pipe, a report of its logs and
  counters (workerstats.py) about once a second while busy, or when the front asks
  (:meth:`Front.request_reports`).  The front keeps each slot's latest and hands every
  report to its ``report_listeners`` (the metrics, the operator tools).
- **Operators** (control.py): a Unix socket served from this same loop, never
  blocking it, answers ``status`` (the slots and the workers' latest reports, fresh:
  status.py) and streams ``trace`` events (tracing.py: the front times the requests it
  forwards and sends them in hex, the tracer decodes them; while nobody traces the cost
  is one ``is not None`` test per request and per reply).
- **Supervision**: a worker that dies (its reply pipe reaches EOF) costs only what it
  held: each such request is answered -EAGAIN (a connector ACK: a full reply would zero
  the kernel's reply size for the re-send), which makes the kernel re-send it at once
  with a new seq, and a new worker takes its place and restores its logs from their
  files as their requests come (records.py).  The others serve throughout.  A worker
  that dies again and again right after starting stops the server instead (the kernel
  then sees no server, and waits for the next one via its reconnect loop).
- **SIGUSR1** writes what ``shardlog status`` shows to the log, as cmirrord's debug
  dump did (once the workers have reported: never blocking the loop).
- **Stop** (SIGTERM, SIGINT): leave group 7 first, so that the kernel's next request
  finds no server (-ESRCH, its reconnect loop) instead of a socket nobody reads; forward
  what is already queued; close the workers' request pipes; they answer what they hold,
  commit every log and exit; the front sends their last replies and exits 0.

The socket is set up with the standard library: pyroute2 0.9's NetlinkSocket drives its
file descriptor from an asyncio endpoint, while the front needs a plain descriptor in
its own epoll loop and a process that can fork.
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
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import multiprocess

from . import frames, protocol, status, tracing, worker
from .control import ControlServer, ControlSetupError
from .frames import FrameError, FrameReader, Kind
from .metrics import FrontCollector, FrontStats, serve_metrics
from .netns import kernel_connector_reachable
from .nlsocket import leave_group_7, open_connector_socket
from .protocol import REPLY_ERROR, REPLY_ERROR_OFFSET
from .workerstats import WorkerReport

log = logging.getLogger(__name__)

KERNEL_PORT = 0
RECEIVE_BUFFER = 32 << 20  # a multicast dropped for want of room costs the mirror 15 s
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
DRAIN_LIMIT = 512  # datagrams per wakeup, so that replies are not starved by a flood
DATAGRAM_BUFFER = 1 << 16  # a request is at most 528 bytes; anything longer is cut
QUICK_DEATH = 1.0  # seconds: a worker that dies sooner after its start failed to start
QUICK_DEATHS_TO_GIVE_UP = 5
STOP_TIMEOUT = 60.0
START_TIMEOUT = 30.0
# Below the kernel's 15 s retry: a hung worker's requests are answered -EAGAIN (once it
# is dead) before the kernel would time them out and wait again.
WORKER_TIMEOUT = 10.0
HANG_CHECK_INTERVAL = 0.5
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
_REPLY_MIN = REPLY_ERROR_OFFSET + REPLY_ERROR.size  # a full reply, with its error field


def worker_index(uuid_key: bytes, workers: int) -> int:
    """The worker that serves a log: a CRC of its uuid's bytes (up to their NUL, as
    :func:`protocol.peek_request` gives them), modulo the number of workers.  Every
    instance of a log meets in one worker; tools that predict the balance call this."""
    return zlib.crc32(uuid_key) % workers


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


# A request handed to a worker: (seq, raw type, arrival ns, datagram) — its seq for the
# -EAGAIN a dead worker's requests get, its type and arrival for the metrics, and the
# datagram to know its re-send (metrics.FrontStats.expect_resend).  A plain tuple: a
# NamedTuple costs a Python-level call per request.
InFlight = tuple[int, int, int, bytes]


@dataclass(eq=False)
class WorkerSlot:
    """One worker position: the process serving it now and the front's ends of its pipes."""

    index: int
    process: multiprocess.Process
    request_fd: int  # front → worker, non-blocking
    reply_fd: int  # worker → front
    started: float
    ready: bool = False
    out: bytearray = field(default_factory=bytearray)  # frames not yet taken by the pipe
    waiting_for_pipe: bool = False
    # tag → what the front needs once the request is answered or lost with the worker.
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    reader: FrameReader = field(default_factory=FrameReader)
    quick_deaths: int = 0
    progress: float = 0.0  # when it last answered, or was handed work while idle
    killed_as_hung: bool = False
    report: WorkerReport | None = None  # its latest (workerstats.py); None until the first
    report_time: float = 0.0  # when it came (monotonic)
    restarts: int = 0  # workers that took this slot after one died


class Front:
    """The server's main process."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.stats = FrontStats(config.workers)
        # Nothing is measured when nobody can read it (--metrics-addr ''): the benchmark
        # compares the two.
        self.recording = bool(config.metrics_addr)
        self.slots: list[WorkerSlot] = []
        self.sock: socket.socket | None = None
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.allowed_ports = {KERNEL_PORT}
        self.reply_address = (KERNEL_PORT, 0)
        if config.test_peer is not None:
            self.allowed_ports.add(config.test_peer)
            self.reply_address = (config.test_peer, 0)
        self.metrics_server = None
        self.control: ControlServer | None = None
        # Set while someone traces (tracing.py); the hot path tests it against None.
        self.tracer: tracing.Tracer | None = None
        self.started = time.time()
        self.on_tick: list[Callable[[], None]] = []  # called after every wakeup (≤ 1 s)
        # Called with (slot, report) for every worker report, in the loop: they must not
        # block.  The metrics add the report's counters to the front's totals.
        self.report_listeners: list[Callable[[WorkerSlot, WorkerReport], None]] = []
        self.report_listeners.append(
            lambda _slot, report: self.stats.add_worker_deltas(report.counters))
        self.stopping = False
        self.exit_code = 0
        self.serving = False
        self._next_tag = 0
        self._signal_r, self._signal_w = socket.socketpair()
        self._last_warning: dict[str, float] = {}
        self._stop_deadline = 0.0
        self._next_hang_check = 0.0
        # One receive buffer for every datagram: recvfrom(n) would allocate n bytes each.
        self._receive_buffer = bytearray(DATAGRAM_BUFFER)
        self._receive_view = memoryview(self._receive_buffer)
        self.status = status.StatusCommand(self)  # the control socket's and SIGUSR1's

    # -- start -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; the exit code."""
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
            (config.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServeError(f"state directory {config.state_dir}: {exc.strerror}") from exc
        for sock in (self._signal_r, self._signal_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, _note_signal)
        self._watch(self._signal_r.fileno(), self._on_signal)
        if config.metrics_addr:
            try:
                self.metrics_server = serve_metrics(
                    config.metrics_addr,
                    FrontCollector(self.stats, self._gauges, config.per_log_metrics))
            except (OSError, ValueError) as exc:
                raise ServeError(f"metrics address {config.metrics_addr}: {exc}") from exc
        if config.control_socket is not None:
            self.control = ControlServer(config.control_socket, self.epoll, self.handlers, {
                "status": self.status.answer,
                "trace": tracing.TraceCommand(self).subscribe,
            })
            try:
                self.control.open()
            except ControlSetupError as exc:
                raise ServeError(str(exc)) from exc
            self.on_tick.append(self.control.flush_streams)
        self.sock = self._open_socket()
        self._watch(self.sock.fileno(), self._on_requests)
        for index in range(config.workers):
            self.slots.append(self._spawn(index))
        peer = f", test peer {config.test_peer}" if config.test_peer is not None else ""
        log.info("starting %d workers, state in %s, netlink port %d%s", config.workers,
                 config.state_dir, self.sock.getsockname()[0], peer)

    def _open_socket(self) -> socket.socket:
        try:
            sock = open_connector_socket(receive_buffer=self.config.receive_buffer,
                                         join_group_7=True)
        except PermissionError as exc:
            raise ServeError(f"cannot join connector group 7 ({exc.strerror}): "
                             "shardlog serve needs root") from exc
        sock.setblocking(False)
        return sock

    def _spawn(self, index: int, quick_deaths: int = 0, restarts: int = 0) -> WorkerSlot:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        for fd in (request_w, reply_w):
            with contextlib.suppress(OSError):  # the default 64 KiB works, with more wakeups
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        inherited = [request_w, reply_r, self.epoll, self._signal_r, self._signal_w]
        if self.sock is not None:
            inherited.append(self.sock)
        if self.metrics_server is not None:
            inherited.append(self.metrics_server.socket)
        for slot in self.slots:
            inherited += [slot.request_fd, slot.reply_fd]
        if self.control is not None:
            inherited += self.control.descriptors()
        process = multiprocess.get_context("fork").Process(
            target=worker.run, name=f"shardlog-worker-{index}",
            args=(index, request_r, reply_w, self.config.state_dir, inherited))
        process.start()
        os.close(request_r)
        os.close(reply_w)
        os.set_blocking(request_w, False)
        slot = WorkerSlot(index, process, request_w, reply_r, time.monotonic(),
                          quick_deaths=quick_deaths, restarts=restarts)
        self._watch(reply_r, lambda: self._on_replies(slot))
        log.info("worker %d started (pid %d)", index, process.pid)
        return slot

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        started = time.monotonic()
        while True:
            if not self.serving and not self.stopping and all(s.ready for s in self.slots):
                self._now_serving()
            if self.stopping and not self.slots:
                return
            if self.stopping and time.monotonic() > self._stop_deadline:
                log.error("%d workers did not stop within %.0f s: killed", len(self.slots),
                          STOP_TIMEOUT)
                self.exit_code = 1
                return
            if not self.serving and not self.stopping and (
                    time.monotonic() - started > START_TIMEOUT):
                raise ServeError(f"workers did not start within {START_TIMEOUT:.0f} s")
            for fd, _events in self.epoll.poll(1.0):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler()
            if time.monotonic() >= self._next_hang_check:
                self._next_hang_check = time.monotonic() + HANG_CHECK_INTERVAL
                self._kill_hung_workers()
            for tick in self.on_tick:
                tick()

    def _kill_hung_workers(self) -> None:
        """A worker that holds requests and has answered none for ``worker_timeout``
        seconds is killed: its requests are then answered -EAGAIN and a new worker
        restores its logs, where the kernel would wait 15 s per try, for ever."""
        now = time.monotonic()
        for slot in self.slots:
            if (slot.in_flight and not slot.killed_as_hung
                    and now - slot.progress > self.config.worker_timeout):
                log.error("worker %d (pid %d) answered nothing for %.0f s with %d requests "
                          "in hand: killing it", slot.index, slot.process.pid,
                          now - slot.progress, len(slot.in_flight))
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
        log.info("serving: subscribed to connector group 7, %d workers up", len(self.slots))

    def _on_requests(self) -> None:
        sock, stats, slots = self.sock, self.stats, self.slots
        allowed, nslots = self.allowed_ports, len(slots)
        touched: set[WorkerSlot] = set()
        buffer, view = self._receive_buffer, self._receive_view
        tracer = self.tracer
        now_ns = time.monotonic_ns()  # one arrival time for the whole wakeup's batch
        for _ in range(DRAIN_LIMIT):
            try:
                size, (port, _groups) = sock.recvfrom_into(buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    # Nothing else is expected of a netlink receive; whatever it is, the
                    # server must stay up for the next wakeup.
                    self._warn("receive", "receiving from the netlink socket: %s", exc)
                    break
                stats.enobufs += 1
                self._warn("enobufs", "receive buffer overflowed: requests were lost; the "
                           "kernel re-sends them after 15 s (%d so far)", stats.enobufs)
                continue
            if port not in allowed:
                stats.dropped["forged_sender"] += 1
                self._warn("sender", "dropped a datagram from netlink port %d: only the "
                           "kernel may drive shardlog (%d so far)", port,
                           stats.dropped["forged_sender"])
                continue
            datagram = bytes(view[:size])
            routing = protocol.peek_request(datagram)
            if routing is None:
                self._answer_unroutable(datagram)
                continue
            uuid_field, seq, request_type = routing
            request_type &= 0xFF
            stats.requests[request_type] += 1
            if stats.resend_watch:
                stats.check_resend(datagram, now_ns)
            index = worker_index(uuid_field, nslots)
            stats.worker_requests[index] += 1
            slot = slots[index]
            if not slot.in_flight:
                slot.progress = time.monotonic()
            tag = self._next_tag = (self._next_tag + 1) & 0xFFFFFFFF
            slot.in_flight[tag] = (seq, request_type, now_ns, datagram)
            slot.out += frames.pack(Kind.REQUEST, tag, datagram)
            if tracer is not None:
                tracer.request(tag, slot.index, uuid_field, request_type, datagram)
            touched.add(slot)
        for slot in touched:
            self._write_requests(slot)

    def _answer_unroutable(self, datagram: bytes) -> None:
        try:
            protocol.decode_datagram(datagram)
        except protocol.ProtocolError as exc:
            if exc.reply is None:
                self.stats.dropped["not_for_us"] += 1
                self._warn("not_for_us", "dropped a datagram not for dm-log-userspace: %s",
                           exc.reason)
                return
            self.stats.dropped["malformed"] += 1
            self._warn("malformed", "malformed request answered -EINVAL: %s", exc.reason)
            self._send(exc.reply)

    def _write_requests(self, slot: WorkerSlot) -> None:
        try:
            written = os.write(slot.request_fd, slot.out)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            return  # it died: its reply pipe's EOF is on the way
        del slot.out[:written]
        if slot.out and not slot.waiting_for_pipe:
            slot.waiting_for_pipe = True
            self.epoll.register(slot.request_fd, select.EPOLLOUT)
            self.handlers[slot.request_fd] = lambda: self._write_requests(slot)
        elif not slot.out and slot.waiting_for_pipe:
            slot.waiting_for_pipe = False
            self._unwatch(slot.request_fd)
        if not slot.out and self.stopping:
            self._close_requests(slot)

    def _on_replies(self, slot: WorkerSlot) -> None:
        try:
            received = slot.reader.read(slot.reply_fd)
        except BlockingIOError:
            return
        except FrameError as exc:
            log.error("worker %d sent a corrupt frame (%s): replacing it", slot.index, exc)
            slot.process.kill()
            received = None
        if received:
            slot.progress = time.monotonic()
        tracer = self.tracer  # None unless someone traces: one local test per reply
        sent = []  # (request, reply): counted once they have all left
        recording = self.recording
        for kind, tag, reply in received or ():
            if kind == Kind.REPLY:
                request = slot.in_flight.pop(tag, None)
                if reply:
                    self._send(reply)
                    if recording and request is not None and len(reply) >= _REPLY_MIN:
                        sent.append((request, reply))
                if tracer is not None:
                    tracer.reply(tag, reply)
            elif kind == Kind.STATS:
                self._on_report(slot, reply)
            elif kind == Kind.READY:
                slot.ready = True
        if sent:
            self.stats.answered(sent, time.monotonic_ns())
        if received is None:
            self._worker_ended(slot)

    def _on_report(self, slot: WorkerSlot, payload: bytes) -> None:
        try:
            report = WorkerReport.decode(payload)
        except ValueError as exc:
            log.error("worker %d sent a bad report: %s", slot.index, exc)
            return
        slot.report = report
        slot.report_time = time.monotonic()
        for listener in self.report_listeners:
            listener(slot, report)

    def request_reports(self) -> None:
        """Ask every live worker for a report now (they arrive through the loop)."""
        for slot in self.slots:
            if slot.request_fd >= 0 and not self.stopping:
                slot.out += frames.pack(Kind.REPORT)
                self._write_requests(slot)

    def _send(self, reply: bytes) -> None:
        try:
            self.sock.sendto(reply, self.reply_address)
        except OSError as exc:
            self.stats.send_errors += 1
            self._warn("send", "a reply was refused: %s (%d so far)", exc.strerror,
                       self.stats.send_errors)

    # -- supervision -------------------------------------------------------------------------

    def _worker_ended(self, slot: WorkerSlot) -> None:
        self._unwatch(slot.reply_fd)
        if slot.waiting_for_pipe:
            self._unwatch(slot.request_fd)
        os.close(slot.reply_fd)
        if slot.request_fd >= 0:
            os.close(slot.request_fd)
        slot.process.join(5.0)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        code = slot.process.exitcode
        for tag, (seq, _type, _arrived, _datagram) in slot.in_flight.items():
            # As a connector ACK: a full reply with -EAGAIN would also set the kernel's
            # reply size to 0 (fill_pkg), and the answer to its re-send would then fail
            # with -ENOSPC.  The ACK path keeps the size for exactly this retry.
            self.stats.eagain_replies += 1
            ack = protocol.encode_ack(seq, errno.EAGAIN)
            self._send(ack)
            if self.tracer is not None:
                self.tracer.reply(tag, ack, note=tracing.NOTE_WORKER_DIED)
        if self.recording and slot.in_flight:
            now_ns = time.monotonic_ns()
            self.stats.lost(slot.in_flight.values(), -errno.EAGAIN, now_ns)
            for _seq, _type, _arrived, datagram in slot.in_flight.values():
                self.stats.expect_resend(datagram, now_ns)
        lost = len(slot.in_flight)
        if self.stopping:
            self.slots.remove(slot)
            if code != 0:
                log.error("worker %d exited with %s while stopping", slot.index, code)
                self.exit_code = 1
            return
        log.error("worker %d (pid %d) died (%s); %d requests in flight answered -EAGAIN",
                  slot.index, slot.process.pid, _exit_reason(code), lost)
        quick = time.monotonic() - slot.started < QUICK_DEATH
        quick_deaths = slot.quick_deaths + 1 if quick else 0
        if quick_deaths >= QUICK_DEATHS_TO_GIVE_UP:
            log.critical("worker %d died %d times right after starting: stopping",
                         slot.index, quick_deaths)
            self.slots.remove(slot)
            self.exit_code = 1
            self._stop()
            return
        self.stats.worker_restarts += 1
        self.slots[self.slots.index(slot)] = self._spawn(slot.index, quick_deaths,
                                                          slot.restarts + 1)

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
            if not self.stopping:
                log.info("stopping (signal): committing every log")
            self._stop()

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.sock is not None:
            try:
                leave_group_7(self.sock)
            except OSError as exc:
                log.warning("cannot leave connector group 7: %s", exc)
            self._on_requests()  # what was queued before we left
            self._unwatch(self.sock.fileno())
        for slot in self.slots:
            if slot.out:
                self._write_requests(slot)  # closes the pipe when all is written
            else:
                self._close_requests(slot)
        self._stop_deadline = time.monotonic() + STOP_TIMEOUT

    def _close_requests(self, slot: WorkerSlot) -> None:
        """EOF to the worker once it has everything queued for it: it answers, commits
        every log and exits.  Until then the loop goes on writing (a worker that is slow
        to read must not block the front, which is still sending replies)."""
        if slot.request_fd < 0 or slot.out:
            return  # closed already, or _write_requests closes it once drained
        os.close(slot.request_fd)
        slot.request_fd = -1

    def _close(self) -> None:
        if self.control is not None:
            self.control.close()
        for slot in self.slots:
            if slot.process.is_alive():
                slot.process.kill()
        if self.sock is not None:
            self.sock.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        signal.set_wakeup_fd(-1)
        self.epoll.close()
        if self.config.pid_file is not None and self.serving:
            _remove_pid_file(self.config.pid_file)

    # -- helpers -----------------------------------------------------------------------------

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def _gauges(self) -> dict:
        """Live figures for a scrape (called in the metrics thread: reads only)."""
        return {
            "workers": [(slot.index, slot.ready, len(slot.in_flight))
                        for slot in list(self.slots)],
            "logs": [status for slot in list(self.slots) if slot.report is not None
                     for status in slot.report.logs],
        }

    def _warn(self, kind: str, message: str, *args) -> None:
        """A warning at most once a second per kind: a flood must not flood the log."""
        now = time.monotonic()
        if now - self._last_warning.get(kind, -1.0) >= 1.0:
            self._last_warning[kind] = now
            log.warning(message, *args)


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
    for line in status.format_text(snapshot).splitlines():
        log.warning("dump: %s", line)


def _note_signal(signum, frame) -> None:
    """Nothing to do here: the wakeup fd carries the signal to the loop."""


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _write_pid_file(path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{os.getpid()}\n")
    os.replace(temporary, path)


def _remove_pid_file(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass
