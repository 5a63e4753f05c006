"""CTR records: what a restarted server needs to bring back a log the kernel still has.

When the server (or one worker) restarts, the kernel's logs are still live but the new
process does not know them.  The kernel recovers by itself: a request for an unknown log
is answered -ESRCH, and the kernel sleeps 2 s, re-sends its CTR (reconnect) and RESUME,
and retries (protocol.md §1.6b).  A record of each live instance's constructor string lets
the server do the same steps at once, on the first request, with no 2 s stall and no
request failed on the way.

One record per ``(uuid, luid)``, beside its instance file (``<instance>.ctr``), holding
the uuid and the constructor string::

    shardlog-ctr-record 1
    uuid <uuid>
    ctr <constructor string>

The uuid is there because an instance file's name does not always give it back (a long
uuid's name is hashed: statedir.instance_file_key); ``shardlog inspect`` reads it here,
and a record whose uuid is not the one asked for is not used.  A record of an older
shardlog is the constructor string alone; it is still read.  Both are printable ASCII
(the codec refuses anything else), so neither can hold a newline.

Written at CTR (``statedir.write_atomically``: a crash leaves the old record or the new,
never half of one), removed (``statedir.remove_state_file``) at DTR and with stale
instance files.  A record that cannot be written costs only the shortcut: the kernel's
own reconnect still works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shardlog.storage.statedir import instance_file_path, write_atomically

log = logging.getLogger(__name__)

SUFFIX = ".ctr"


def record_path(state_dir: Path, uuid: str, luid: int) -> Path:
    return beside(instance_file_path(state_dir, uuid, luid))


def beside(instance_file: Path) -> Path:
    """The record that belongs to an instance file."""
    return instance_file.with_suffix(SUFFIX)


FIRST_LINE = "shardlog-ctr-record 1\n"  # a record's format (handover.fingerprint hashes it)


@dataclass(frozen=True, slots=True)
class Record:
    uuid: str | None  # None in a record of an older shardlog: its file name says it
    ctr_string: str


def save(state_dir: Path, uuid: str, luid: int, ctr_string: str) -> None:
    """Record an instance's constructor string durably (OSError if it cannot be)."""
    path = record_path(state_dir, uuid, luid)
    content = f"{FIRST_LINE}uuid {uuid}\nctr {ctr_string}\n"
    try:
        if path.read_text("ascii") == content:
            return  # a re-sent or reconnect CTR: already on disk
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, content.encode("ascii"))


def load(state_dir: Path, uuid: str, luid: int) -> str | None:
    """The recorded constructor string, or None when there is none (or it is unreadable,
    or another uuid's, which is logged: the kernel's reconnect will bring the log back
    instead)."""
    path = record_path(state_dir, uuid, luid)
    record = read(path)
    if record is None:
        return None
    if record.uuid is not None and record.uuid != uuid:
        log.warning("CTR record %s is of log %s, not %s: not used", path, record.uuid, uuid)
        return None
    return record.ctr_string


def read(path: Path) -> Record | None:
    """The record in ``path``, or None when there is none, or it cannot be read or
    understood (logged)."""
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read CTR record %s: %s", path, exc)
        return None
    if not text.startswith(FIRST_LINE):
        return Record(None, text)  # an older shardlog's: the constructor string alone
    lines = text[len(FIRST_LINE):].split("\n")
    if (len(lines) != 3 or lines[2] or not lines[0].startswith("uuid ")
            or not lines[1].startswith("ctr ")):
        log.warning("CTR record %s is malformed: not used", path)
        return None
    return Record(lines[0][len("uuid "):], lines[1][len("ctr "):])
