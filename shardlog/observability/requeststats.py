"""Requests counted where they are answered: by type, result and latency, as plain ints.

Theory of operation
-------------------
Each worker reads its shard's socket and replies to the kernel itself (server/arbiter.py), so the
requests are counted there, on the hot path, in fixed arrays of plain ints (tens of
nanoseconds a request): received by type, answered by type and result, latency from
the wakeup that read a request to its reply leaving, in power-of-two buckets (one shift
and ``int.bit_length`` per reply), datagrams dropped by reason, receive overflows,
refused sends, re-sends of requests answered -EAGAIN.

A worker ships what it counted since its last report as sparse *deltas*
(:meth:`RequestStats.take_deltas`, in its report: workerstats.py) and starts again from
zero; the front adds them to its own :class:`RequestStats` (:meth:`add_deltas`), which the
Prometheus collector reads (metrics.py).  A worker that dies loses at most its last
second of figures and never makes a total go down.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from shardlog.wire.protocol import RequestType

TYPE_COUNT = 256  # raw types are counted by their low byte
# What a type no request has is counted as: 0, no request's, one "unknown" series.  Only
# the front meets such types (a dead worker's ring holds whatever it read); a worker
# counts decoded requests alone.
UNKNOWN_TYPE = 0
_KNOWN_TYPES = frozenset(RequestType)
# Request latency: a reply to anything but a committing FLUSH takes tens of microseconds,
# a FLUSH of a disk log an fdatasync (milliseconds), and the kernel gives up after 15 s.
# Bucket i holds elapsed nanoseconds whose ``(ns >> LATENCY_SHIFT).bit_length()`` is i:
# below 2**(LATENCY_SHIFT + i) ns.  (An observation of exactly a bound lands one bucket
# up: 1 ns.)
LATENCY_SHIFT = 14  # 2**14 ns = 16.4 µs, the first bound
LATENCY_BOUNDS = tuple(2 ** (LATENCY_SHIFT + i) / 1e9 for i in range(21))  # to 17.2 s
SLOTS = 64  # per type: room for any bit_length of a 64-bit count of nanoseconds

# Why a datagram was dropped (or answered -EINVAL by the worker that received it)
# instead of being answered as a request; "duplicate": a copy of a request answered
# already, after a take-over from another worker count (handover.py).
DROP_REASONS = ("forged_sender", "malformed", "not_for_us", "duplicate")

# A re-send of a request answered -EAGAIN is recognised this long after the -EAGAIN (the
# kernel re-sends at once), and at most this many are watched.
RESEND_WINDOW_NS = 5_000_000_000
RESEND_WATCH_LIMIT = 65536

_NLMSG_LEN = struct.Struct("=I")  # a datagram's first field: the netlink message's length
_SCALARS = ("enobufs", "send_errors", "resent_requests")


class RequestStats:
    """Requests received and answered, and datagrams dropped, since the last reset."""

    def __init__(self) -> None:
        self._zero()
        # Bodies of requests answered -EAGAIN → until when a re-send is expected.
        self.resend_watch: dict[bytes, int] = {}
        self.resend_until = 0  # no entry of resend_watch is watched past this (ns)

    def _zero(self) -> None:
        self.requests = [0] * TYPE_COUNT  # received, by raw request type (the low byte)
        # Answered: ok[type], and the others by results[type << 12 | -error] (an errno is
        # below 4096).
        self.ok = [0] * TYPE_COUNT
        self.results: dict[int, int] = {}
        self.latency_buckets = [0] * (TYPE_COUNT * SLOTS)  # [type << 6 | bucket]
        self.latency_sum_ns = [0] * TYPE_COUNT
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.enobufs = 0  # the socket's receive buffer overflowed: requests were lost
        self.send_errors = 0
        self.resent_requests = 0  # re-sends of requests answered -EAGAIN, seen arriving

    # -- counting ------------------------------------------------------------------------------

    def answered(self, sent: Iterable[tuple[int, int, int]], now_ns: int) -> None:
        """Count replies that left at ``now_ns``: ``(raw type, arrival ns, error)``, the
        error of the request's outcome (0 or a negative errno)."""
        ok, buckets, sums = self.ok, self.latency_buckets, self.latency_sum_ns
        results = self.results
        for request_type, arrived, error in sent:
            if not error:
                ok[request_type] += 1
            else:
                key = request_type << 12 | -error
                results[key] = results.get(key, 0) + 1
            elapsed = now_ns - arrived
            buckets[request_type << 6 | (elapsed >> LATENCY_SHIFT).bit_length()] += 1
            sums[request_type] += elapsed

    def lost(self, requests: Iterable[tuple[int, int]], error: int, now_ns: int) -> None:
        """Count requests answered with ``error`` by someone else than their worker
        (-EAGAIN: it died): ``(raw type, arrival ns)``."""
        results, buckets, sums = self.results, self.latency_buckets, self.latency_sum_ns
        for raw_type, arrived in requests:
            request_type = raw_type if raw_type in _KNOWN_TYPES else UNKNOWN_TYPE
            key = request_type << 12 | -error
            results[key] = results.get(key, 0) + 1
            elapsed = max(0, now_ns - arrived)
            buckets[request_type << 6 | (elapsed >> LATENCY_SHIFT).bit_length()] += 1
            sums[request_type] += elapsed

    # -- re-sent requests ----------------------------------------------------------------------

    def expect_resend(self, datagram: bytes, now_ns: int) -> None:
        """A request answered -EAGAIN: the kernel re-sends it at once with a new seq."""
        watch = self.resend_watch
        if len(watch) >= RESEND_WATCH_LIMIT:
            for key in [k for k, until in watch.items() if until < now_ns]:
                del watch[key]
            if len(watch) >= RESEND_WATCH_LIMIT:
                return
        until = now_ns + RESEND_WINDOW_NS
        watch[resend_key(datagram)] = until
        self.resend_until = until  # the latest deadline: entries are added in time order

    def check_resend(self, datagram: bytes, now_ns: int) -> None:
        """Called for arrivals while :attr:`resend_watch` is not empty."""
        if now_ns > self.resend_until:
            # Every re-send that could still come is overdue: stop watching, so that a
            # re-send that never came does not tax every later request.
            self.resend_watch.clear()
            return
        until = self.resend_watch.pop(resend_key(datagram), None)
        if until is not None and until >= now_ns:
            self.resent_requests += 1

    # -- shipping ------------------------------------------------------------------------------

    def take_deltas(self) -> dict:
        """What was counted since the last call, sparse (JSON-ready), and start again
        from zero."""
        deltas: dict = {
            "received": _nonzero(self.requests), "ok": _nonzero(self.ok),
            "results": sorted(self.results.items()),
            "latency": _nonzero(self.latency_buckets),
            "latency_sum_ns": _nonzero(self.latency_sum_ns),
            "dropped": {k: v for k, v in self.dropped.items() if v},
        }
        deltas.update((name, getattr(self, name)) for name in _SCALARS
                      if getattr(self, name))
        self._zero()
        return {name: value for name, value in deltas.items() if value}

    def add_deltas(self, deltas: dict) -> int:
        """Add a worker's :meth:`take_deltas`; returns how many requests it received.
        ValueError (or TypeError, KeyError) for anything that is not such deltas."""
        for name, array in (("received", self.requests), ("ok", self.ok),
                            ("latency", self.latency_buckets),
                            ("latency_sum_ns", self.latency_sum_ns)):
            for index, value in deltas.get(name, ()):
                array[int(index)] += int(value)
        for key, value in deltas.get("results", ()):
            self.results[int(key)] = self.results.get(int(key), 0) + int(value)
        for reason, value in deltas.get("dropped", {}).items():
            if reason in self.dropped:
                self.dropped[reason] += int(value)
        for name in _SCALARS:
            setattr(self, name, getattr(self, name) + int(deltas.get(name, 0)))
        return sum(int(value) for _index, value in deltas.get("received", ()))


def resend_key(datagram: bytes) -> bytes:
    """A request without its seqs: the kernel's re-send differs from the first send only
    there (a new seq in the connector header and in dm_ulog_request).  Up to its
    nlmsg_len: a request held by a dead worker is known by that length alone (inflight.py),
    the re-send by its datagram, which may carry the kernel's padding after it."""
    (length,) = _NLMSG_LEN.unpack_from(datagram)
    return datagram[36:184] + datagram[188:length]


def _nonzero(array: list[int]) -> list[tuple[int, int]]:
    return [(index, value) for index, value in enumerate(array) if value]
