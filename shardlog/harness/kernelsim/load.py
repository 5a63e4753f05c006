"""A lean load generator: many logs' request streams, as the kernel would send them.

Theory of operation
-------------------
A mirror's I/O path runs in its single kmirrord work item, so one log never has more than
one request of that path outstanding: per log, throughput is 1/RTT, and the host's load is
the number of mirrors busy at once (protocol.md §1.5).  :func:`run_load` reproduces that
shape with as little Python as possible between two datagrams, so that it measures the
server rather than itself:

- every log is a :class:`Stream`, the cycle of requests its mirror repeats, encoded once;
  sending patches the new seq into the three places the kernel puts it
  (``nlmsghdr``, ``cn_msg``, ``dm_ulog_request``) with ``struct.pack_into``;
- at most ``in_flight`` logs have a request outstanding; when a reply comes, its log goes to
  the back of the idle queue and the log at its front sends its next request, so every log
  takes turns;
- with a ``rate``, a request is never sent before its turn on a fixed schedule (the n-th
  at ``start + n / rate``): an offered load, the same whatever the server; without, the
  next is sent as soon as a reply frees a slot (a closed loop: the server sets the pace);
- one thread, one blocking socket, latencies from ``time.perf_counter_ns``; replies are
  matched by seq exactly as the kernel does (``dm_ulog_request.seq``, or ``cn_msg.seq`` for
  an ACK), and an unanswered request is resent with a new seq after ``reply_timeout``.

It drives a :class:`~shardlog.harness.kernelsim.connector.Connector` (borrowing its socket and seq
counter, so that logs constructed through it are the ones loaded) or any bound connector
socket (a benchmark's own peer).  Build streams for logs already constructed and resumed
with :func:`log_streams`.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shardlog.harness.kernelsim.connector import Connector, RawLink
from shardlog.server.nlsocket import GROUP_7_MASK
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

# Where each copy of the seq sits in a request datagram, and where a reply says what.
_SEQ = struct.Struct("=I")
_NLMSG_SEQ_AT = 8
_CN_SEQ_AT = 16 + 8
_ULOG_SEQ_AT = 36 + 148
_CN_ACK_LEN_AT = 16 + 12
_CN_ACK_LEN = struct.Struct("=IH")  # cn_msg.ack, cn_msg.len
_ULOG_ERROR_SEQ = struct.Struct("=iI")  # dm_ulog_request error, seq at 36 + 144


@dataclass
class Stream:
    """One log's repeating request cycle: ``(request type, datagram)`` pairs."""

    uuid: str
    luid: int
    requests: list[tuple[RequestType, bytearray]]

    @classmethod
    def build(cls, uuid: str, luid: int,
              cycle: Iterable[tuple[RequestType, bytes]]) -> Stream:
        requests = [(request_type, bytearray(protocol.encode_request(
            request_type, seq=0, uuid=uuid, luid=luid, data=data)))
            for request_type, data in cycle]
        if not requests:
            raise ValueError("a stream needs at least one request")
        return cls(uuid, luid, requests)


def write_cycle(regions: Sequence[int] = (0,), *,
                integrated: bool = False) -> list[tuple[RequestType, bytes]]:
    """The requests one write to a quiet region costs a mirror that is in sync:
    IN_SYNC twice (``dm_rh_get_state``, then ``__rh_alloc``), the mark and its commit
    (MARK_REGION + FLUSH, or one FLUSH carrying the region), then, once the write has
    completed, the next worker pass's CLEAR_REGION and FLUSH (integrated mode sends no
    FLUSH for a clear: the next write's FLUSH commits it)."""
    cycle: list[tuple[RequestType, bytes]] = []
    for region in regions:
        one = protocol.pack_u64(region)
        cycle += [(RequestType.IN_SYNC, one), (RequestType.IN_SYNC, one)]
        if integrated:
            cycle += [(RequestType.FLUSH, one), (RequestType.CLEAR_REGION, one)]
        else:
            cycle += [(RequestType.MARK_REGION, one), (RequestType.FLUSH, b""),
                      (RequestType.CLEAR_REGION, one), (RequestType.FLUSH, b"")]
    return cycle


def read_cycle(regions: Sequence[int] = (0,)) -> list[tuple[RequestType, bytes]]:
    """Reads: one IN_SYNC per read of a region not in the region hash."""
    return [(RequestType.IN_SYNC, protocol.pack_u64(region)) for region in regions]


def log_streams(logs: Iterable[tuple[str, int]], kind: str = "write", *,
                regions: Sequence[int] = (0,)) -> list[Stream]:
    """Streams for ``(uuid, luid)`` logs already constructed and resumed; ``kind`` is
    ``write``, ``write-integrated`` or ``read``."""
    cycles = {
        "write": lambda: write_cycle(regions),
        "write-integrated": lambda: write_cycle(regions, integrated=True),
        "read": lambda: read_cycle(regions),
    }
    if kind not in cycles:
        raise ValueError(f"kind {kind!r} is not one of {sorted(cycles)}")
    cycle = cycles[kind]()
    return [Stream.build(uuid, luid, cycle) for uuid, luid in logs]


def _overdue(outstanding: dict[int, tuple[int, int, int]], sent_before: int) -> bool:
    """Whether a request sent before ``sent_before`` (ns) is still unanswered."""
    return any(sent_at < sent_before for _index, _type, sent_at in outstanding.values())


@dataclass
class LoadResult:
    """Latencies (ns) per request type name, and the totals."""

    latencies_ns: dict[str, list[int]]
    requests: int
    elapsed: float  # seconds
    errors: dict[str, int] = field(default_factory=dict)  # replies with error != 0
    resends: int = 0  # requests resent with a new seq after reply_timeout
    unanswered: int = 0  # requests given up on after reply_timeout (resend=False)
    stray_replies: int = 0  # replies matching no outstanding seq
    completed_by_stream: list[int] = field(default_factory=list)  # replies, per stream

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def percentile_us(self, q: float, request_type: str | None = None) -> float:
        """The ``q``-th percentile (0-100, nearest rank) latency in microseconds, of one
        request type or of all."""
        if request_type is None:
            samples = sorted(ns for values in self.latencies_ns.values() for ns in values)
        else:
            samples = sorted(self.latencies_ns.get(request_type, ()))
        return percentile_us(samples, q)

    def p50(self, request_type: str | None = None) -> float:
        return self.percentile_us(50, request_type)

    def p99(self, request_type: str | None = None) -> float:
        return self.percentile_us(99, request_type)


def percentile_us(ordered: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of sorted nanoseconds, in
    microseconds (NaN for none)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1] / 1000


def run_load(target: Connector | socket.socket | RawLink, streams: Sequence[Stream], *,
             in_flight: int, count: int | None = None, duration: float | None = None,
             reply_timeout: float = 5.0, rate: float | None = None,
             cycles: int | None = None, resend: bool = True) -> LoadResult:
    """Send ``count`` requests (or for ``duration`` seconds, or each stream's cycle
    ``cycles`` times) with at most ``in_flight`` logs waiting for a reply, and no faster
    than ``rate`` requests per second if given; wait for the last replies; return the
    latencies.  A request unanswered for ``reply_timeout`` is re-sent with a new seq, as
    the kernel does, or with ``resend=False`` ends the run (a tool that must not hang on
    a server that is gone).  A bare socket's seqs start at 0 on every call; a RawLink
    carries them from one call to the next, as the kernel's one counter does."""
    if sum(bound is not None for bound in (count, duration, cycles)) != 1:
        raise ValueError("give exactly one of count, duration and cycles")
    if not streams or in_flight < 1:
        raise ValueError("run_load needs streams and in_flight >= 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    if isinstance(target, Connector):
        with target.exclusive() as link:
            return _run(link, streams, in_flight, count, duration, reply_timeout, rate,
                        cycles, resend)
    link = target if isinstance(target, RawLink) else RawLink(target, 0)
    return _run(link, streams, in_flight, count, duration, reply_timeout,
                rate, cycles, resend)


def _run(link: RawLink, streams: Sequence[Stream], in_flight: int, count: int | None,
         duration: float | None, reply_timeout: float, rate: float | None,
         cycles: int | None, resend: bool) -> LoadResult:
    sock = link.sock
    old_timeout = sock.gettimeout()
    sock.settimeout(reply_timeout)
    pack_seq = _SEQ.pack_into
    sendto = sock.sendto
    now_ns = time.perf_counter_ns
    destination = (0, GROUP_7_MASK)
    latencies: list[list[int]] = [[] for _ in range(256)]
    errors = [0] * 256
    positions = [0] * len(streams)
    completed_by_stream = [0] * len(streams)
    idle = deque(range(len(streams)))
    outstanding: dict[int, tuple[int, int, int]] = {}  # seq -> stream, type, sent at
    buf = bytearray(65536)
    seq = link.seq
    sent = completed = resends = stray = unanswered = 0
    start = now_ns()
    deadline = start + int(duration * 1e9) if duration is not None else None
    interval_ns = int(1e9 / rate) if rate is not None else 0
    reply_timeout_ns = int(reply_timeout * 1e9)

    def send(index: int) -> None:
        nonlocal seq
        stream_requests = streams[index].requests
        request_type, datagram = stream_requests[positions[index]]
        pack_seq(datagram, _NLMSG_SEQ_AT, seq)
        pack_seq(datagram, _CN_SEQ_AT, seq)
        pack_seq(datagram, _ULOG_SEQ_AT, seq)
        outstanding[seq] = (index, request_type, now_ns())
        seq = (seq + 1) & 0xFFFFFFFF
        # Not contextlib.suppress: this is the hot path.
        try:  # noqa: SIM105
            sendto(datagram, destination)
        except ConnectionRefusedError:
            pass  # multicast delivered; no kernel at port 0 in a private namespace

    def pump() -> int | None:
        """Send what may be sent now; with a rate, when the next one falls due (ns)."""
        nonlocal sent
        while idle and len(outstanding) < in_flight:
            now = now_ns()
            if (count is not None and sent >= count) or (
                    deadline is not None and now >= deadline):
                return None
            if interval_ns:
                due = start + sent * interval_ns
                if due > now:
                    return due
            send(idle.popleft())
            sent += 1
        return None

    try:
        due = pump()
        while outstanding or due is not None:
            if interval_ns:
                # Wait for a reply, but no longer than until the next request is due:
                # replies are read as they come, never held up by the pacing.
                wait = reply_timeout_ns if due is None else min(reply_timeout_ns,
                                                                due - now_ns())
                sock.settimeout(max(wait, 1000) / 1e9)  # 0 would mean non-blocking
            try:
                size = sock.recv_into(buf)
            except TimeoutError:
                if interval_ns and not _overdue(outstanding, now_ns() - reply_timeout_ns):
                    due = pump()
                    continue
                if not resend:
                    unanswered = len(outstanding)
                    break
                # As the kernel does: resend what went unanswered, with new seqs.
                lost = list(outstanding.values())
                outstanding.clear()
                for index, _type, _at in lost:
                    send(index)
                resends += len(lost)
                continue
            received_at = now_ns()
            if size < 36:
                stray += 1
                continue
            ack, cn_len = _CN_ACK_LEN.unpack_from(buf, _CN_ACK_LEN_AT)
            if cn_len == 0:
                reply_seq = _SEQ.unpack_from(buf, _CN_SEQ_AT)[0]
                error = -ack
            elif size >= 36 + 160:
                error, reply_seq = _ULOG_ERROR_SEQ.unpack_from(buf, 36 + 144)
            else:
                stray += 1
                continue
            entry = outstanding.pop(reply_seq, None)
            if entry is None:
                stray += 1
                continue
            index, request_type, sent_at = entry
            latencies[request_type].append(received_at - sent_at)
            if error:
                errors[request_type] += 1
            completed += 1
            completed_by_stream[index] += 1
            positions[index] = (positions[index] + 1) % len(streams[index].requests)
            if cycles is None or positions[index] or (
                    completed_by_stream[index] < cycles * len(streams[index].requests)):
                idle.append(index)
            due = pump()
        elapsed = (now_ns() - start) / 1e9
    finally:
        link.seq = seq
        sock.settimeout(old_timeout)
    names = {int(t): t.name for t in RequestType}
    return LoadResult(
        latencies_ns={names.get(t, str(t)): values
                      for t, values in enumerate(latencies) if values},
        requests=completed,
        elapsed=elapsed,
        errors={names.get(t, str(t)): n for t, n in enumerate(errors) if n},
        resends=resends,
        unanswered=unanswered,
        stray_replies=stray,
        completed_by_stream=completed_by_stream,
    )
