"""How storage fails: :class:`StoreError`, and the tally a server keeps of the ones it handled.

A StoreError carries facts only (what failed, the errno, which kind of storage).  It is
not counted where it is made: the offline reader (``shardlog inspect``) raises the same
errors, and a failure that is retried or replaced by another is not one the operator
should see twice.  Whoever handles a failure on a server's behalf notes it in that
server's :class:`FailureTally`; the worker reports the tally as
``shardlog_storage_errors_total``.
"""

from __future__ import annotations

import errno
import os
from collections import Counter

STATE_FILE, LOG_DEVICE = "state_file", "log_device"  # where a StoreError happened


class StoreError(Exception):
    """An instance file or log device could not be created, opened, read, written or
    synced.  ``errno`` says what; the message names the file; ``source`` says which
    (STATE_FILE or LOG_DEVICE).
    """

    def __init__(self, err: int, message: str, device_failed: bool = True,
                 source: str = STATE_FILE):
        super().__init__(message)
        self.errno = err
        # The kernel's disk log tells a failed write or read ('D') from a failed cache
        # flush ('F') in its status; so do we.
        self.device_failed = device_failed
        self.source = source


class FailureTally:
    """StoreErrors a server handled, by source, until the metrics take them."""

    def __init__(self) -> None:
        self._by_source: Counter[str] = Counter()

    def note(self, exc: StoreError) -> None:
        self._by_source[exc.source] += 1

    def take(self) -> Counter[str]:
        """StoreErrors by source since the last call."""
        taken, self._by_source = self._by_source, Counter()
        return taken


class store_errors:
    """Turn OSError into StoreError with a message that names the file.  A failed sync is
    not a failed device (``device_failed=False``: status 'F', not 'D')."""

    def __init__(self, message: str, default_errno: int | None = None,
                 device_failed: bool = True, source: str = STATE_FILE):
        self._message = message
        self._default = default_errno
        self._device_failed = device_failed
        self._source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, OSError):
            err = exc.errno or self._default or errno.EIO
            message = f"{self._message}: {os.strerror(err)}"
            raise StoreError(err, message, self._device_failed, self._source) from exc
        return False
