"""A worker's end of its events pipe: frames for the front, written as the pipe takes them.

A worker must never wait for the front: the kernel waits for the worker.  A report that
lists 5,000 logs is about 600 KB, ten times what a pipe holds, and the front reads it
between its other work (the other workers' reports, a scrape), so a blocking write held
the worker's requests up for as long as the front took: up to 84 ms measured at 10,000
logs under a scrape a second.  The worker's end is non-blocking instead: what the pipe
does not take now waits here, and the worker's loop writes more when the pipe is
writable again (:attr:`Outbox.pending` says when to watch for that).

Nothing is dropped: a report's counters are increments the front adds up.  While the
front does not read at all (stopped, or hung until the arbiter's own death ends the
worker) the worker keeps answering and what it would have said grows here, about 1 KB
a second without tracing.
"""

from __future__ import annotations

import os


class Outbox:
    """Frames queued for one pipe, written without blocking as far as it takes them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._queued = bytearray()

    @property
    def pending(self) -> bool:
        """Whether some frame waits for the pipe to be writable."""
        return bool(self._queued)

    def send(self, frame: bytes | bytearray) -> None:
        """Queue ``frame`` behind what waits, and write what the pipe takes now."""
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
        finally:
            del self._queued[:written]

    def drain(self) -> None:
        """Write everything, however long the front takes to read it: a worker's last
        frames, as it ends."""
        os.set_blocking(self.fd, True)
        self.flush()
