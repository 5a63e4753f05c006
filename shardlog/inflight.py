"""What a worker holds: the requests it has read and not yet answered, in shared memory.

Theory of operation
-------------------
Each worker reads its shard's netlink socket itself and replies to the kernel itself
(front.py), so the front never sees a request.  Yet when a worker dies, the requests it
had read but not answered must be answered -EAGAIN at once (the kernel re-sends them with
a new seq), or each would cost the mirror the kernel's 15 s timeout.  And a worker that
hangs with requests in hand must be noticed and killed.

So every worker slot has an :class:`InFlight`: an anonymous ``MAP_SHARED`` mapping made
by the front before the fork, which the worker writes and the front reads.  It is the
worker's receive ring itself: the worker receives each datagram straight into the next
entry (no copy), then publishes the entry's length and the count of entries held, so a
worker killed at any instant leaves behind exactly what it held.  Once a reply has left,
its entry's length goes back to 0; once the batch is done, the count does, and the
batch counter (``progress``) moves on: the front's hang check watches it.

A worker killed after a reply left but before it noted so (the wakeup of whoever reads
the reply can preempt it right there) has that request answered -EAGAIN as well: the
kernel, no longer waiting for that seq, ignores the second answer.  The reverse order
would be worse: a request noted as answered whose reply never left waits 15 s.

Writes are single aligned stores of 4 or 8 bytes.  The front reads the entries only once
the worker is dead, so nothing is ever read half-written; a hang check that reads the
counters mid-update is at worst one check late.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

# Entries per batch: a wakeup reads at most this many datagrams, so that a flood on one
# socket never starves the replies (DRAIN_LIMIT in worker.py takes it from here).
CAPACITY = 512
# A request is at most 528 bytes (protocol.MAX_PAYLOAD + headers) plus 3 pad bytes; a
# longer datagram is cut here and answered as malformed.
ENTRY_SIZE = 1024
_LENGTH = struct.Struct("=I")
_HEADER = struct.Struct("=QI")  # progress (batches finished), count (entries held)
_COUNT_AT = 8
_STARTED = struct.Struct("=Q")  # when the batch held now was read (monotonic ns)
_STARTED_AT = 16
_LENGTHS_AT = 64  # one u32 per entry

def _layout() -> tuple[int, int]:
    lengths_size = CAPACITY * _LENGTH.size
    entries_at = _LENGTHS_AT + ((lengths_size + 63) // 64) * 64
    return entries_at, entries_at + CAPACITY * ENTRY_SIZE


_ENTRIES_AT, _SIZE = _layout()


class InFlight:
    """One worker slot's receive ring and counters, shared between front and worker."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)
        view = memoryview(self._map)
        # One writable view per entry, made once: the worker receives into them.
        self.entries = [view[_ENTRIES_AT + i * ENTRY_SIZE:_ENTRIES_AT + (i + 1) * ENTRY_SIZE]
                        for i in range(CAPACITY)]
        self._view = view

    # -- the worker's side -------------------------------------------------------------------

    def begin_batch(self, now_ns: int) -> None:
        """A batch is being read now (its requests' arrival, for the metrics)."""
        _STARTED.pack_into(self._map, _STARTED_AT, now_ns)

    def hold(self, index: int, length: int) -> None:
        """Entry ``index`` holds a request of ``length`` bytes: count it as held."""
        _LENGTH.pack_into(self._map, _LENGTHS_AT + 4 * index, length)
        _LENGTH.pack_into(self._map, _COUNT_AT, index + 1)

    def answered(self, index: int) -> None:
        """The reply to entry ``index`` has left."""
        _LENGTH.pack_into(self._map, _LENGTHS_AT + 4 * index, 0)

    def batch_done(self) -> None:
        """Every entry is answered: nothing held, one more batch finished."""
        progress = _HEADER.unpack_from(self._map, 0)[0]
        _HEADER.pack_into(self._map, 0, progress + 1, 0)

    # -- the front's side --------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests the worker holds now (read, not yet all answered)."""
        return _LENGTH.unpack_from(self._map, _COUNT_AT)[0]

    @property
    def batch_started(self) -> int:
        """When the batch held now was read (monotonic ns)."""
        return _STARTED.unpack_from(self._map, _STARTED_AT)[0]

    @property
    def progress(self) -> int:
        """Batches the worker has finished: a hung worker's stays put."""
        return _HEADER.unpack_from(self._map, 0)[0]

    def unanswered(self) -> Iterator[bytes]:
        """The datagrams held and not answered (read once the worker is dead)."""
        for index in range(min(self.held, CAPACITY)):
            length = _LENGTH.unpack_from(self._map, _LENGTHS_AT + 4 * index)[0]
            if length:
                yield bytes(self.entries[index][:min(length, ENTRY_SIZE)])

    def reset(self) -> None:
        """Forget what a dead worker held, for its successor (the progress counter stays
        monotonic)."""
        _LENGTH.pack_into(self._map, _COUNT_AT, 0)

    def close(self) -> None:
        for entry in self.entries:
            entry.release()
        self._view.release()
        self._map.close()
