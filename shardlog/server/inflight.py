"""What a worker holds: the requests it has read and not yet answered, in shared memory.

Theory of operation
-------------------
Each worker reads its shard's netlink socket itself and replies to the kernel itself
(arbiter.py), so the front never sees a request.  Yet when a worker dies, the requests it
had read but not answered must be answered -EAGAIN at once (the kernel re-sends them with
a new seq), or each would cost the mirror the kernel's 15 s timeout.  And a worker that
hangs with requests in hand must be noticed and killed.

So every worker slot has an :class:`InFlight`: an anonymous ``MAP_SHARED`` mapping made
by the front before the fork, which the worker writes and the front reads.  It is the
worker's receive ring itself: the worker receives each datagram straight into the next
entry (no copy).  What publishes the entry is the kernel's own write: a datagram begins
with its netlink header, whose first field (``nlmsg_len``) is never 0 in a request, and
an entry that holds nothing has that field at 0.  So there is no instant between the
receive and a store of the worker's own at which a kill would lose the request: a
worker killed at any instant leaves behind exactly what it held.  (An earlier layout
published a length after the receive; a worker killed between the two, a few bytecodes
apart, left a request that nobody answered, and the kernel waited its 15 s.)  Once a
reply has left, the worker sets the entry's ``nlmsg_len`` back to 0 — as it does for a
datagram it drops — and once the batch is done, the batch counter (``progress``) moves
on: the front's hang check watches it.

A datagram whose own ``nlmsg_len`` is 0 is never held in the front's eyes: the kernel
sends none, and what a test sends that way is malformed, answered -EINVAL by a live
worker and by nobody if its worker dies holding it.

A worker killed after a reply left but before it noted so (the wakeup of whoever reads
the reply can preempt it right there) has that request answered -EAGAIN as well: the
kernel, no longer waiting for that seq, ignores the second answer.  The reverse order
would be worse: a request noted as answered whose reply never left waits 15 s.

Writes are single aligned stores of 4 or 8 bytes.  The front reads the entries only once
the worker is dead, so nothing is ever read half-written; a hang check that reads the
counters mid-update is at worst one check late.  The worker makes those stores through
typed views of the mapping (:attr:`InFlight.headers`, :attr:`InFlight.counters`): an
item assignment, where a method and a ``struct`` call would cost several times more per
request.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Iterator

# Entries per batch: a wakeup reads at most this many datagrams, so that a flood on one
# socket never starves the replies (worker.py reads at most CAPACITY a wakeup).
CAPACITY = 512
# A request is at most 528 bytes (protocol.MAX_PAYLOAD + headers) plus 3 pad bytes; a
# longer datagram is cut here and answered as malformed.
ENTRY_SIZE = 1024
_PROGRESS = struct.Struct("=Q")  # batches finished
_PROGRESS_AT = 0
_STARTED = struct.Struct("=Q")  # when the batch held now was read (monotonic ns)
_STARTED_AT = 8
# 1 while the worker still drops copies of what a take-over from another worker count
# handed it (handover.Leftovers): its socket may hold requests answered already.
_DROPPING_COPIES_AT = 16
_ENTRIES_AT = 64
_SIZE = _ENTRIES_AT + CAPACITY * ENTRY_SIZE
# Indexes of the counters in the view of the mapping's first 24 bytes as 8-byte words.
PROGRESS, STARTED, DROPPING_COPIES = _PROGRESS_AT // 8, _STARTED_AT // 8, \
    _DROPPING_COPIES_AT // 8
_NO_HEADERS = array("I", bytes(4 * CAPACITY))  # every entry's nlmsg_len at 0


class InFlight:
    """One worker slot's receive ring and counters, shared between front and worker.

    An entry holds a request from the moment the kernel writes it there until the worker
    sets its ``nlmsg_len`` back to 0 once the reply has left: one store per request."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)
        view = memoryview(self._map)
        # One writable view per entry, made once: the worker receives into them.
        self.entries = [view[_ENTRIES_AT + i * ENTRY_SIZE:_ENTRIES_AT + (i + 1) * ENTRY_SIZE]
                        for i in range(CAPACITY)]
        self._view = view
        # Entry i's nlmsg_len is headers[i] (0: it holds nothing); counters[PROGRESS] and
        # counters[STARTED] are the batch counter and the batch's start: each assignment
        # one aligned store.
        self._words = view[_ENTRIES_AT:_SIZE].cast("I")
        self.headers = self._words[::ENTRY_SIZE // 4]
        self.counters = view[:24].cast("Q")

    # -- the worker's side -------------------------------------------------------------------

    # The request path (worker.py) makes its stores inline through ``headers`` and
    # ``counters``: the receive itself holds entry i, headers[i] = 0 frees it,
    # counters[STARTED] = now_ns starts a batch, counters[PROGRESS] += 1 ends one.

    def answered(self, index: int) -> None:
        """The reply to entry ``index`` has left (or it needs none)."""
        self.headers[index] = 0

    # -- the front's side --------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests the worker holds now (read, not yet answered)."""
        return CAPACITY - self.headers.tolist().count(0)

    @property
    def batch_started(self) -> int:
        """When the batch held now was read (monotonic ns)."""
        return _STARTED.unpack_from(self._map, _STARTED_AT)[0]

    @property
    def dropping_copies(self) -> bool:
        """Whether the worker may yet read copies of requests answered already (a
        take-over now would hand them on as unanswered: handover.py)."""
        return bool(self.counters[DROPPING_COPIES])

    @property
    def progress(self) -> int:
        """Batches the worker has finished: a hung worker's stays put."""
        return _PROGRESS.unpack_from(self._map, _PROGRESS_AT)[0]

    def unanswered(self) -> Iterator[bytes]:
        """The requests held and not answered (read once the worker is dead), each as
        long as its nlmsg_len says: the receive's size was never stored (the module
        docstring), and the kernel's padding to 4 bytes after it is not the request's."""
        for index, length in enumerate(self.headers.tolist()):
            if length:  # a bad length is cut at the entry's end
                yield bytes(self.entries[index][:min(length, ENTRY_SIZE)])

    def reset(self) -> None:
        """Forget what a dead worker held, for its successor (the progress counter stays
        monotonic: the successor continues the one in the mapping)."""
        self.headers[:] = memoryview(_NO_HEADERS)

    def close(self) -> None:
        self.headers.release()
        self._words.release()
        self.counters.release()
        for entry in self.entries:
            entry.release()
        self._view.release()
        self._map.close()
