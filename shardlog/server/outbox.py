"""A worker's end of its events pipe: frames for the front, written as the pipe takes them.

A worker must never wait for the front: the kernel waits for the worker.  The front reads
the pipe between its other work (the other workers' reports, a scrape), and a report can
be larger than the pipe holds: about 600 KB for 5,000 logs, 1.2 MB for 10,000, against
the 1 MiB the front asks for (64 KiB where that is refused).  A blocking write would
hold the worker's requests up until the front had read enough of it.  So the worker's
end is non-blocking: what the pipe does not take now waits here, and the worker's loop
writes more when the pipe is writable again (:attr:`Outbox.pending` says when to watch
for that).  Its last frames, as it ends, are drained.

Nothing is dropped here while the front lives: a report's counters are increments the
front adds up.  Once it is gone (the pipe's read end closed: EPIPE) there is no one to
tell, and what waits is dropped; the worker learns of the death from its control pipe's
EOF and stops as ordered (worker.py), which writing must not get in the way of.  While
the front does not read (stopped, or hung) the worker keeps answering and what it would
have said grows here, about 1 KB a second without tracing; a worker that traces stops
queueing its TRACE frames past a bound (:attr:`Outbox.backlog`, worker.TRACE_BACKLOG).
"""

from __future__ import annotations

import os


class Outbox:
    """Frames queued for one pipe, written without blocking as far as it takes them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._queued = bytearray()
        self.reader_gone = False  # the front closed the pipe: nothing is written any more

    @property
    def pending(self) -> bool:
        """Whether some frame waits for the pipe to be writable."""
        return bool(self._queued)

    @property
    def backlog(self) -> int:
        """Bytes waiting for the pipe."""
        return len(self._queued)

    def send(self, frame: bytes | bytearray) -> None:
        """Queue ``frame`` behind what waits, and write what the pipe takes now."""
        if not self.reader_gone:
            self._queued += frame
            self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now (the worker calls this when it is writable)."""
        written = 0
        try:
            with memoryview(self._queued) as queued:
                while written < len(queued):
                    written += os.write(self.fd, queued[written:])
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.reader_gone = True
            written = len(self._queued)
        finally:
            del self._queued[:written]

    def drain(self) -> None:
        """Write everything, however long the front takes to read it: a worker's last
        frames, as it ends."""
        os.set_blocking(self.fd, True)
        self.flush()
