"""The state directory: what its files are called, and how one is replaced safely.

::

    <state dir>/logs/<key>@<luid, 16 hex digits>.map   an instance file (layout.py)
    <state dir>/logs/<key>@<luid, 16 hex digits>.ctr   its CTR record (records.py)
    <state dir>/dev/<major>:<minor>                   device nodes made for log devices

``<key>`` stands for the log's uuid (:func:`instance_file_key`).  A file is replaced
only through :class:`ReplacementFile` (:func:`write_atomically` for a file written in
one go): a new file beside the old one takes its name once complete and synced, so a
crash at any moment leaves the old file or the new one, never part of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote

log = logging.getLogger(__name__)

#: The longest name a state-directory file may have (NAME_MAX).
NAME_MAX = 255
#: What any file of an instance adds to its key: "@", the luid in 16 hex digits, and the
#: longest suffix (".map.new", ".ctr.tmp").
_NAME_TAIL = len("@") + 16 + len(".map.new")
#: The longest key that is the escaped uuid itself.
_PLAIN_KEY_MAX = NAME_MAX - _NAME_TAIL
#: A hashed key keeps this much of the escaped uuid in front, for people listing the
#: directory; the hash after it names the uuid.
_HASHED_PREFIX = 120
#: Separates a hashed key's prefix from its hash.  quote() escapes "+", so no plain key
#: contains one.
_HASH_MARK = "+"
INSTANCE_SUFFIX = ".map"


# -- names -------------------------------------------------------------------------------------


def logs_directory(state_dir: Path) -> Path:
    """Where the instance files and CTR records are."""
    return state_dir / "logs"


def device_node_directory(state_dir: Path) -> Path:
    """Where device nodes are made for log devices /dev has none for (devices.py)."""
    return state_dir / "dev"


def instance_file_path(state_dir: Path, uuid: str, luid: int) -> Path:
    """Where a log instance keeps its instance file: one per (uuid, luid).

    Per luid, not per uuid: during a table reload the old and the new instance are live at
    once, and the new one must start over (design.md, safety rule) without touching the
    bits the old one still serves.  The luid is the kernel's address of the log, stable
    while the table is live, so a restarted server finds the file again from the
    reconnect CTR.  The name starts with the uuid's key (:func:`instance_file_key`).
    """
    name = f"{instance_file_key(uuid)}@{luid:016x}{INSTANCE_SUFFIX}"
    return logs_directory(state_dir) / name


def instance_file_key(uuid: str) -> str:
    """The part of an instance's file names that stands for its uuid: one path component
    whatever the uuid, short enough that every file of the instance fits NAME_MAX.

    The uuid percent-escaped (every name made before long uuids were handled), or, when
    that is too long (a dm uuid may have 128 characters, and escaping can triple them),
    the first characters of it, "+", and the SHA-256 of the uuid.  A hashed key does not
    give the uuid back: the instance's CTR record (records.py) holds it.
    """
    quoted = quote(uuid, safe="")
    if len(quoted) <= _PLAIN_KEY_MAX:
        return quoted
    prefix = quoted[:_HASHED_PREFIX]
    # Never cut an escape in two: "%4" would read as a broken escape.
    cut = prefix.rfind("%", len(prefix) - 2)
    if cut >= 0:
        prefix = prefix[:cut]
    return f"{prefix}{_HASH_MARK}{hashlib.sha256(uuid.encode()).hexdigest()}"


def uuid_of_key(key: str) -> str | None:
    """The uuid a file-name key names, or None for a hashed key (see the CTR record)."""
    return None if _HASH_MARK in key else unquote(key)


def parse_instance_file_name(name: str) -> tuple[str, int] | None:
    """``(key, luid)`` from an instance file's name (:func:`instance_file_path`), or
    None for a file named otherwise; :func:`uuid_of_key` makes the key a uuid."""
    key, at, rest = name.rpartition("@")
    if not (at and key and rest.endswith(INSTANCE_SUFFIX)):
        return None
    try:
        return key, int(rest[: -len(INSTANCE_SUFFIX)], 16)
    except ValueError:
        return None


def instance_files_by_key(state_dir: Path) -> dict[str, dict[int, Path]]:
    """Every instance file in ``state_dir``, as ``{key: {luid: path}}``, the key being
    :func:`instance_file_key` of its uuid.

    One listing of the directory, names compared as strings: with 10,000 logs it holds
    20,000 files.  Finding them is housekeeping: a directory that cannot be listed yields
    none (creating an instance file then reports what is wrong with it).
    """
    found: dict[str, dict[int, Path]] = {}
    directory = logs_directory(state_dir)
    try:
        entries = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return found
    for name in entries:
        parsed = parse_instance_file_name(name)
        if parsed is not None:
            key, luid = parsed
            found.setdefault(key, {})[luid] = directory / name
    return found


def remove_state_file(path: Path) -> None:
    """Remove a file of the state directory (an instance file, a CTR record); failing to
    is worth a warning, not an error."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


# -- replacing a file atomically ------------------------------------------------------------


class ReplacementFile:
    """A new file that takes ``path``'s name only once it is complete.

    It is made as ``path.name + temporary_suffix`` beside ``path`` (created or truncated,
    opened read-write: an instance file is mapped) and filled through :attr:`fd`;
    :meth:`install` syncs it, renames it over ``path`` and syncs the directory, since
    the rename itself must survive a power loss or the file may vanish with it.  Until
    then ``path`` is untouched; a failure anywhere removes the temporary and leaves
    ``path`` as it was.  Raises OSError.

    As a context manager it installs when the block ends and abandons when it raises.
    """

    def __init__(self, path: Path, *, temporary_suffix: str = ".tmp", mode: int = 0o600):
        self.path = path
        self.temporary = path.with_name(path.name + temporary_suffix)
        self.fd: int | None = os.open(
            self.temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)

    def install(self, *, sync_content: bool = True) -> None:
        """Give the new file ``path``'s name.  ``sync_content`` False is for a file whose
        content is written later, through a mapping, and synced (or not) by its owner."""
        try:
            if sync_content:
                os.fsync(self.fd)
            self._close()
            os.replace(self.temporary, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Remove the new file; ``path`` stays as it was."""
        self._close()
        unlink_quietly(self.temporary)

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> ReplacementFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.install()
        else:
            self.abandon()


def write_atomically(path: Path, content: bytes, *, mode: int = 0o600) -> None:
    """Make ``content`` the file at ``path``, durably: after a crash the file holds the
    old content or ``content``, never a mixture or a part (OSError if it cannot)."""
    with ReplacementFile(path, mode=mode) as replacement:
        written = 0
        while written < len(content):  # a write may be short (a signal, a full disk)
            written += os.write(replacement.fd, content[written:])


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
