"""What the log layer decided for one request: the :class:`Outcome`, and its reply bytes.

Theory of operation
-------------------
Every answer the kernel gets is decided by :meth:`LogTable.decide
<shardlog.log.logtable.LogTable.decide>` (the table's own requests, and through it one
log's per-request functions in dirtylog.py) and comes out as one :class:`Outcome`: the
error (0 or a negative errno), the reply payload, and what the worker's metrics count
for it (a workercounters key and an amount, or None).  The reply bytes are made from it
once, by :func:`encode`, with the wire codec; whoever counts reads the outcome, never the
reply's bytes.

An Outcome is a plain tuple (a NamedTuple built with ``tuple.__new__``): one is made per
request on the hot path, and the common ones (an empty success, IN_SYNC's two answers,
MARK / CLEAR of n regions) are made once here and shared.

The only answer decided outside the log table is the one for a request its worker died
holding (:func:`lost_with_worker`): nobody decided it, so the front answers -EAGAIN, and
the kernel re-sends it at once.
"""

from __future__ import annotations

import errno
import logging
from typing import NamedTuple

from shardlog.observability.workercounters import REGION_CLEARS, REGION_MARKS
from shardlog.wire import protocol
from shardlog.wire.protocol import MAX_REGIONS_PER_REQUEST, Request

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """One request's answer, as decided, before it is encoded."""

    error: int  # 0, or the negative errno the kernel gets
    payload: bytes  # the reply's data (an error reply carries none)
    counted: str | None  # the worker counter it adds to (workercounters key), or None
    amount: int  # how much it adds


_new = tuple.__new__  # a NamedTuple's own __new__ is a Python call: too slow per request


def answered(payload: bytes) -> Outcome:
    """A success with ``payload`` and nothing to count."""
    return _new(Outcome, (0, payload, None, 0))


def counted(key: str, amount: int, payload: bytes = b"") -> Outcome:
    """A success the worker counts: ``amount`` added to the counter ``key``."""
    return _new(Outcome, (0, payload, key, amount))


def refused(positive_errno: int) -> Outcome:
    """A refusal: the kernel gets ``-positive_errno`` and no data."""
    return _new(Outcome, (-positive_errno, b"", None, 0))


def failed(outcome: Outcome, positive_errno: int) -> Outcome:
    """``outcome`` turned into a refusal, keeping what it counts (a FLUSH whose marks
    were made, and whose commit then failed)."""
    return _new(Outcome, (-positive_errno, b"", outcome.counted, outcome.amount))


OK = answered(b"")
UNKNOWN_LOG = refused(errno.ESRCH)  # the kernel re-sends CTR + RESUME, then retries
BROKEN = refused(errno.EIO)  # a bug or a failed store: the kernel still gets an answer
ANSWER_BOOL = (answered(protocol.pack_bool(False)), answered(protocol.pack_bool(True)))
# MARK_REGION / integrated FLUSH and CLEAR_REGION of n regions (n <= 32, the codec's bound).
MARKED = (OK, *(counted(REGION_MARKS, n) for n in range(1, MAX_REGIONS_PER_REQUEST + 1)))
CLEARED = tuple(counted(REGION_CLEARS, n) for n in range(MAX_REGIONS_PER_REQUEST + 1))


def encode(request: Request, outcome: Outcome) -> bytes:
    """The reply datagram for ``request``: made once, by the wire codec, which checks the
    payload's size against the kernel's buffer."""
    try:
        return protocol.encode_reply(request, outcome[0], outcome[1])
    except ValueError:
        # A payload of the wrong size is a bug here; the kernel still gets an answer.
        log.exception("%s %s: bad reply payload", request.name, request.uuid)
        return protocol.encode_reply_raw(request.header, BROKEN.error, b"")


LOST_WITH_WORKER = -errno.EAGAIN  # the result counted for such a request


def lost_with_worker(seq: int) -> bytes:
    """The answer to a request its worker died holding: -EAGAIN, which makes the kernel
    re-send it at once (with a new seq) to the worker's successor.  A connector ACK, not
    a full reply: a full reply with -EAGAIN would also set the kernel's reply size to 0
    (fill_pkg), and the answer to the re-send would then fail with -ENOSPC."""
    return protocol.encode_ack(seq, -LOST_WITH_WORKER)
