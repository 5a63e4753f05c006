"""The arbiter's event loop: one epoll and the callable for each descriptor it watches.

The arbiter, the control socket (control.py) and the take-over all add and drop
descriptors here, through these methods, so that none of them reaches into another's
tables; :meth:`EventLoop.run_once` sleeps until something is ready (or the timeout) and
calls the handlers of what is.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        """Call ``handler`` whenever ``fd`` is ready for ``events``."""
        self.epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        """Wait for other events on a watched ``fd`` (OSError if it is closed)."""
        self.epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (nothing happens if it was not watched or is closed)."""
        self._handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._handlers

    def run_once(self, timeout: float) -> None:
        """Sleep until a watched descriptor is ready or ``timeout`` seconds have passed,
        and call the handler of each that is ready."""
        for fd, _events in self.epoll.poll(timeout):
            handler = self._handlers.get(fd)
            if handler is not None:  # an earlier handler of this wakeup may have dropped it
                handler()

    def close(self) -> None:
        self.epoll.close()
