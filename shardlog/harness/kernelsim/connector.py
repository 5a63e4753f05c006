"""The kernel's transport: ``dm_consult_userspace`` over a real netlink connector socket.

Theory of operation
-------------------
dm-log-userspace-transfer.c sends every log operation as one connector message to group
``CN_IDX_DM`` (7) and sleeps until a reply with the same seq arrives (protocol.md §1.5,
§1.6).  :class:`Connector` is that module, played by a user process inside a private
network namespace (:mod:`shardlog.harness.netns`), where a NETLINK_CONNECTOR socket reaches
only the other sockets of the namespace and never a real kernel:

- **One seq counter for every log** (``dm_ulog_seq++``, wrapping at 2**32), taken under a
  lock together with the send, as ``dm_ulog_lock`` serialises the kernel's sends.
- **Sending** (``dm_ulog_sendto_server`` → ``cn_netlink_send``): the kernel refuses with
  -ESRCH when ``netlink_has_listeners(group 7)`` is false.  The model reads the same fact
  from ``/proc/net/netlink`` (a protocol-11 socket with bit 6 of its groups set) and then
  sends nothing.  Otherwise the datagram goes to ``(port 0, group 7)``: it is multicast to
  every member and the unicast to port 0 is refused (no kernel here), which is ignored.
- **Matching** (``cn_ulog_callback`` + ``fill_pkg``): one receiver thread reads every
  reply and hands it to the waiter registered under its seq: a full reply is matched on
  ``dm_ulog_request.seq``, a connector ACK (``cn_msg.len == 0``) on ``cn_msg.seq`` with
  result ``-ack``.  Replies nobody waits for (late ones) and incomplete ones
  (``0 < cn_msg.len < 160``) are dropped, and counted.  A full reply whose ``data_size``
  exceeds the caller's buffer gives -ENOSPC.  The buffer size is value-result, as in the
  kernel: a reply that fits sets it to its own size for a resend after -EAGAIN, so a
  *full* -EAGAIN reply with no data leaves room for none on the next try.
- **Retrying** (``dm_consult_userspace``): no reply within ``retry_timeout`` (15 s in the
  kernel) → a warning and a resend with a new seq, for ever; result -EAGAIN → a resend at
  once, with a new seq.
- **Reconnecting** (dm-log-userspace-base.c ``userspace_do_request``, here
  :meth:`Connector.userspace_do_request`): a result of -ESRCH, from the send or from the
  reply, makes the kernel sleep 2 s, re-send CTR with the saved constructor string (NUL
  counted, no reply buffer) until it returns 0, send RESUME, and retry the request.

Counters (:class:`ConnectorStats`) and a bounded history of every datagram sent let tests
assert exactly what the kernel would have done.  One ``Connector`` is one kernel module
instance, so it also holds the module's only other global: the rate limit of
``userspace_is_remote_recovering``, shared by all logs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from shardlog.server.nlsocket import (
    GROUP_7_MASK,
    group7_listeners,
    kernel_connector_reachable,
    open_connector_socket,
)
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

log = logging.getLogger(__name__)

DEFAULT_PORT = 0x6B73
_RECEIVE_POLL = 0.1  # how long the receiver blocks before it looks at the stop flag
_RCVBUF = 8 << 20
_RECEIVE_BUFFER = 65536  # above the connector's 16 KiB limit: nothing is cut short


class ConnectorClosed(RuntimeError):
    """The connector was closed while a request waited for its reply."""


@dataclass
class ConnectorStats:
    """What the simulated kernel did, for tests to assert."""

    requests_sent: int = 0  # datagrams multicast (every resend counts)
    timeouts: int = 0  # resends after retry_timeout ("Request timed out ... retrying")
    eagain_resends: int = 0  # resends after a result of -EAGAIN
    no_listener: int = 0  # sends refused with -ESRCH: nobody in group 7
    reconnect_ctrs: int = 0  # CTRs sent by the reconnect loop
    reconnects: int = 0  # reconnects completed (CTR returned 0, then RESUME sent)
    unmatched_replies: int = 0  # no waiter for that seq: late or duplicate (-ENOENT)
    dropped_replies: int = 0  # incomplete or undecodable replies


class SentRequest(NamedTuple):
    """One datagram the simulated kernel sent."""

    seq: int
    request_type: RequestType
    uuid: str
    luid: int
    data: bytes


@dataclass
class RawLink:
    """The connector's socket and seq counter, lent out for a hot loop (load.py)."""

    sock: socket.socket
    seq: int


@dataclass
class _Waiter:
    """The kernel's on-stack ``receiving_pkg``: one sleeping request."""

    seq: int
    capacity: int  # *rdata_size: room for reply data
    done: threading.Event = field(default_factory=threading.Event)
    error: int = 0
    data: bytes = b""


def multicast_to_group_7(sock: socket.socket, datagram: bytes) -> None:
    """Send ``datagram`` as ``cn_netlink_send`` does: to every member of group 7 (each
    member's socket filter deciding whether it takes it).  Raises OSError."""
    # ECONNREFUSED: the multicast went out; only the unicast to the absent kernel failed.
    with contextlib.suppress(ConnectionRefusedError):
        sock.sendto(datagram, (0, GROUP_7_MASK))


class Connector:
    """dm-log-userspace-transfer.c: requests out to group 7, replies matched by seq.

    Thread-safe: any number of threads may :meth:`consult` at once, as the kernel's
    callers (every mirror's kmirrord, status ioctls, delayed flushes) do.  It refuses to
    start where a kernel connector answers: its requests would reach the real kernel's
    connector as replies to real waiters.
    """

    def __init__(self, port: int = DEFAULT_PORT, *, retry_timeout: float = 15.0,
                 check_listeners: bool = True, reconnect_delay: float = 2.0,
                 remote_recovering_interval: float = 0.25, history: int = 4096):
        if kernel_connector_reachable():
            raise RuntimeError("a kernel connector answers here: the simulated kernel runs "
                               "only in a private network namespace (shardlog.harness.netns)")
        self.port = port
        self.retry_timeout = retry_timeout
        self.check_listeners = check_listeners
        self.reconnect_delay = reconnect_delay
        #: userspace_is_remote_recovering's static ``limit``: one for the whole module.
        self.remote_recovering_interval = remote_recovering_interval
        self.remote_recovering_limit = 0.0
        self.stats = ConnectorStats()
        self.history: deque[SentRequest] = deque(maxlen=history)
        self._seq = 0
        self._send_lock = threading.Lock()  # dm_ulog_lock: seq order = wire order
        self._lock = threading.Lock()  # receiving_list_lock, and the counters
        self._waiters: dict[int, _Waiter] = {}
        self._closed = False
        # A lost reply costs a retry_timeout stall: give replies plenty of room.
        self._sock = open_connector_socket(port, receive_buffer=_RCVBUF)
        self._receiver: threading.Thread | None = None
        self._stop_receiver = threading.Event()
        self._start_receiver()

    # --- dm_consult_userspace ------------------------------------------------------------

    def consult(self, uuid: str, luid: int, request_type: RequestType, data: bytes = b"",
                reply_size: int = 0) -> tuple[int, bytes]:
        """Send one request and wait for its result: ``(0 or -errno, reply data)``.

        Retries after a timeout and after -EAGAIN, each time with a new seq, for ever
        (until :meth:`close`, which raises :class:`ConnectorClosed` here)."""
        if len(data) > protocol.MAX_PAYLOAD:
            log.info("Size of tfr exceeds preallocated size")
            return -errno.EINVAL, b""
        capacity = reply_size
        while True:
            if self._closed:
                raise ConnectorClosed(f"{request_type.name} for {uuid}: connector closed")
            with self._send_lock:
                waiter = _Waiter(self._seq, capacity)
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                with self._lock:
                    self._waiters[waiter.seq] = waiter
                error = self._send(waiter.seq, uuid, luid, request_type, data)
            if error:
                with self._lock:
                    self._waiters.pop(waiter.seq, None)
                log.error("Unable to send log request [%u] to userspace: %d",
                          request_type, error)
                return error, b""
            if not waiter.done.wait(self.retry_timeout):
                with self._lock:
                    # Under the lock a reply either filled the waiter already or can
                    # no longer find it.
                    self._waiters.pop(waiter.seq, None)
                    timed_out = not waiter.done.is_set()
                    if timed_out:
                        self.stats.timeouts += 1
                if timed_out:
                    log.warning("[%s] Request timed out: [%u/%u] - retrying", uuid[-8:],
                                request_type, waiter.seq)
                    continue
            if self._closed and waiter.error == -errno.ESHUTDOWN:
                raise ConnectorClosed(f"{request_type.name} for {uuid}: connector closed")
            capacity = waiter.capacity
            if waiter.error == -errno.EAGAIN:
                with self._lock:
                    self.stats.eagain_resends += 1
                continue
            return waiter.error, waiter.data

    def _send(self, seq: int, uuid: str, luid: int, request_type: RequestType,
              data: bytes) -> int:
        if self.check_listeners and not group7_listeners(exclude_port=self.port):
            with self._lock:
                self.stats.no_listener += 1
            return -errno.ESRCH
        datagram = protocol.encode_request(request_type, seq=seq, uuid=uuid, luid=luid,
                                           data=data)
        try:
            multicast_to_group_7(self._sock, datagram)
        except OSError as exc:
            return -exc.errno
        self.history.append(SentRequest(seq, request_type, uuid, luid, data))
        with self._lock:
            self.stats.requests_sent += 1
        return 0

    # --- userspace_do_request ------------------------------------------------------------

    def userspace_do_request(self, uuid: str, luid: int, ctr_string: str,
                             request_type: RequestType, data: bytes = b"",
                             reply_size: int = 0) -> tuple[int, bytes]:
        """:meth:`consult`, plus the kernel's answer to -ESRCH: reconnect, then retry.

        ``ctr_string`` is the log's saved constructor string; the reconnect CTR sends it
        with its NUL and no reply buffer, every ``reconnect_delay`` seconds until it
        returns 0, then RESUME.  The region size is not asked again (the kernel caches it).
        """
        while True:
            result = self.consult(uuid, luid, request_type, data, reply_size)
            if result[0] != -errno.ESRCH:
                return result
            log.error(" Userspace log server not found.")
            while True:
                time.sleep(self.reconnect_delay)
                log.warning("Attempting to contact userspace log server...")
                with self._lock:
                    self.stats.reconnect_ctrs += 1
                error, _ = self.consult(uuid, luid, RequestType.CTR,
                                        ctr_string.encode("ascii") + b"\0", 0)
                if not error:
                    break
            log.info("Reconnected to userspace log server... DM_ULOG_CTR complete")
            with self._lock:
                self.stats.reconnects += 1
            error, _ = self.consult(uuid, luid, RequestType.RESUME)
            if error:
                log.error("Error trying to resume userspace log: %d", error)
                return -errno.ESRCH, b""

    # --- cn_ulog_callback / fill_pkg -------------------------------------------------------

    def _start_receiver(self) -> None:
        self._stop_receiver.clear()
        self._sock.settimeout(_RECEIVE_POLL)
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name=f"kernelsim-rx-{self.port:#x}")
        self._receiver.start()

    def _halt_receiver(self) -> None:
        if self._receiver is not None:
            self._stop_receiver.set()
            self._receiver.join()
            self._receiver = None

    def _receive_loop(self) -> None:
        buf = bytearray(_RECEIVE_BUFFER)
        while not self._stop_receiver.is_set():
            try:
                size = self._sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    return
                log.error("receiving replies: %s", exc)
                continue
            self._deliver(bytes(buf[:size]))

    def _deliver(self, datagram: bytes) -> None:
        try:
            reply = protocol.decode_reply(datagram)
        except protocol.ProtocolError as exc:
            log.error("Incomplete message received: %s", exc.reason)
            with self._lock:
                self.stats.dropped_replies += 1
            return
        with self._lock:
            waiter = self._waiters.pop(reply.seq, None)
            if waiter is None:
                self.stats.unmatched_replies += 1
                return
            if reply.ack:
                waiter.error = reply.error
                if reply.error != -errno.EAGAIN:
                    waiter.capacity = 0
            elif len(reply.data) > waiter.capacity:
                log.error("Insufficient space to receive package [seq %u] (%u vs %u)",
                          reply.seq, len(reply.data), waiter.capacity)
                waiter.error, waiter.capacity = -errno.ENOSPC, 0
            else:
                waiter.error, waiter.data = reply.error, reply.data
                waiter.capacity = len(reply.data)
            waiter.done.set()

    # --- lending the socket, closing ---------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[RawLink]:
        """Lend the socket and the seq counter to a single-threaded hot loop: the receiver
        thread stops meanwhile, so nothing may :meth:`consult` until the block ends."""
        with self._send_lock:
            with self._lock:
                if self._waiters:
                    raise RuntimeError("requests are outstanding on this connector")
            self._halt_receiver()
            link = RawLink(self._sock, self._seq)
            try:
                yield link
            finally:
                self._seq = link.seq & 0xFFFFFFFF
                if not self._closed:
                    self._start_receiver()

    def close(self) -> None:
        """Stop receiving; requests still waiting raise :class:`ConnectorClosed`."""
        if self._closed:
            return
        self._closed = True
        self._halt_receiver()
        with self._lock:
            for waiter in self._waiters.values():
                waiter.error = -errno.ESHUTDOWN
                waiter.done.set()
            self._waiters.clear()
        self._sock.close()

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
