"""CTR records: what a restarted server needs to bring back a log the kernel still has.

When the server (or one worker) restarts, the kernel's logs are still live but the new
process does not know them.  The kernel recovers by itself: a request for an unknown log
is answered -ESRCH, and the kernel sleeps 2 s, re-sends its CTR (reconnect) and RESUME,
and retries (protocol.md §1.6b).  A record of each live instance's constructor string lets
the server do the same steps at once, on the first request, with no 2 s stall and no
request failed on the way.

One record per ``(uuid, luid)``, beside its instance file (``<instance>.ctr``), holding
the constructor string.  Written at CTR (atomically: a crash leaves the old record or the
new, never half of one), removed (``regionmap.remove_state_file``) at DTR and with stale
instance files.  A record that
cannot be written costs only the shortcut: the kernel's own reconnect still works.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .regionmap import instance_file_path

log = logging.getLogger(__name__)

SUFFIX = ".ctr"


def record_path(state_dir: Path, uuid: str, luid: int) -> Path:
    return beside(instance_file_path(state_dir, uuid, luid))


def beside(instance_file: Path) -> Path:
    """The record that belongs to an instance file."""
    return instance_file.with_suffix(SUFFIX)


def save(state_dir: Path, uuid: str, luid: int, ctr_string: str) -> None:
    """Record an instance's constructor string durably (OSError if it cannot be)."""
    path = record_path(state_dir, uuid, luid)
    try:
        if path.read_text("ascii") == ctr_string:
            return  # a re-sent or reconnect CTR: already on disk
    except (OSError, UnicodeDecodeError):
        pass
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, ctr_string.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    # The rename itself must survive a power loss, or the record may vanish with it.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(state_dir: Path, uuid: str, luid: int) -> str | None:
    """The recorded constructor string, or None when there is none (or it is unreadable,
    which is logged: the kernel's reconnect will bring the log back instead)."""
    path = record_path(state_dir, uuid, luid)
    try:
        return path.read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read CTR record %s: %s", path, exc)
        return None
