"""Region maps: a log's clean bits, kept in the kernel's own `disk` log layout.

Layout (drivers/md/dm-log.c, protocol.md §4.1), the same for a state file and a device::

    byte 0     struct log_header_disk, little-endian: u32 magic 0x4D695272 ("MiRr"),
               u32 version 2, u64 nr_regions
    byte 1024  clean bits, one per region, little-endian bit order (region i is byte i>>3,
               bit i&7), 1 = clean, whole u32 words, bits past nr_regions kept 0

Because the layout is the kernel's, a mirror can move between the in-kernel `disk` log and
shardlog on the same log device with no resync.

The image lives in a page-aligned buffer with a ``bitarray`` view over its bitmap, so a
bit operation is a C call with no copying.  Two backings fill and persist that buffer:

- :class:`StateFile` (``core`` logs): a file under the state directory, fully allocated and
  mapped ``MAP_SHARED``; the buffer *is* the page cache, and a commit is ``msync`` of the
  pages that changed.  Allocation up front matters: a store into a mapped page of a sparse
  file on a full filesystem is a SIGBUS, which would kill the process.
- :class:`LogDevice` (``disk`` logs): the log device itself, read and written with
  ``O_DIRECT`` like the kernel's ``dm_io`` (so neither side reads the other's stale page
  cache), into an anonymous mapping, then ``fdatasync`` for the device cache flush the
  kernel issues with ``REQ_PREFLUSH``.  Not mapped: a device that disappears must give
  -EIO on the next flush, not a SIGBUS on the next bit test.

Durability (dm-log.c ``disk_flush``): bits *dirtied* (a region marked, header rewritten)
must be on stable storage before a FLUSH is answered, because the kernel starts the data
writes right after.  Bits *cleaned* may be committed lazily: losing one costs a region
resync after a crash, never data.  So :meth:`RegionMap.commit` syncs only when something
was dirtied since the last commit (or when asked to write everything), and then only the
page range that changed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bitarray import bitarray

log = logging.getLogger(__name__)

MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
BITMAP_OFFSET = 1024  # LOG_OFFSET: 2 sectors
HEADER = struct.Struct("<IIQ")
PAGE_SIZE = mmap.PAGESIZE
_BLKSSZGET = 0x1268  # logical block size of a block device


class StoreError(Exception):
    """A state file or log device could not be created, opened, read, written or synced.

    ``errno`` is what the kernel is answered (negated); the message names the file.
    """

    def __init__(self, err: int, message: str, device_failed: bool = True):
        super().__init__(message)
        self.errno = err
        # The kernel's disk log tells a failed write or read ('D') from a failed cache
        # flush ('F') in its status; so do we.
        self.device_failed = device_failed


class IncompatibleVersion(StoreError):
    """A valid magic with a version the kernel's disk log would refuse too."""


def bitmap_bytes(region_count: int) -> int:
    """Size of the clean bitmap: whole u32 words, as the kernel allocates it."""
    return -(-region_count // 32) * 4


def image_size(region_count: int) -> int:
    return BITMAP_OFFSET + bitmap_bytes(region_count)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True, slots=True)
class Header:
    magic: int
    version: int
    nr_regions: int

    @property
    def valid(self) -> bool:
        return self.magic == MIRROR_MAGIC


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What :meth:`RegionMap.resume` found, for the log line and the operator."""

    saved_regions: int  # regions whose stored bits were kept
    reason: str  # why the stored bits were (not) used


class RegionMap:
    """The clean bits of one log instance over a backing (a state file or a log device)."""

    def __init__(self, backing: _Backing, region_count: int):
        self.region_count = region_count
        self._backing = backing
        self._view = memoryview(backing.buffer)
        self.clean_bits = bitarray(
            buffer=self._view[BITMAP_OFFSET : image_size(region_count)], endian="little"
        )
        # Pages changed since the last commit, and whether any change dirtied a bit.
        self._first_page: int | None = None
        self._last_page = -1
        self._dirtied = False
        self.commits = 0  # syncs actually issued; tests and metrics read it
        self.read_error: StoreError | None = None  # set by resume() when the load failed

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create_state_file(cls, path: Path, region_count: int, clean: bool) -> RegionMap:
        """A new state file at ``path`` (replacing any old one) with every region clean or
        dirty, durable before this returns."""
        rmap = cls(StateFile.create(path, image_size(region_count)), region_count)
        rmap.clean_bits.setall(0)
        rmap._fill(0, region_count, clean)
        rmap._write_header()
        rmap.commit(everything=True)
        return rmap

    @classmethod
    def open_state_file(cls, path: Path, region_count: int) -> RegionMap:
        """An existing state file, as it was left (raises StoreError if it is missing)."""
        return cls(StateFile.open(path, image_size(region_count)), region_count)

    @classmethod
    def open_device(cls, device: Path, region_count: int) -> RegionMap:
        """A log device (or a regular file standing in for one), not yet read."""
        return cls(LogDevice.open(device, image_size(region_count)), region_count)

    @property
    def path(self) -> Path:
        return self._backing.path

    # -- the header and resume ---------------------------------------------------------------

    def header(self) -> Header:
        return Header(*HEADER.unpack_from(self._view, 0))

    def resume(self, honor_saved: bool, new_regions_clean: bool) -> ResumeOutcome:
        """Load the stored image and normalise it by the kernel's ``disk_resume`` rules.

        ``honor_saved`` False means the stored bits are ignored (a ``sync``/``nosync``
        option on a new activation).  A bad magic or an unreadable device means nothing was
        saved.  Regions the stored header does not cover (the log grew, or nothing was
        saved) become ``new_regions_clean``; bits past ``region_count`` are cleared (it
        shrank).  The normalised image is then written back and synced.

        Raises IncompatibleVersion when the stored version is unknown (nothing is
        written), StoreError when the write-back fails; a read error is survived
        (everything counts as unsaved) but is reported by :attr:`read_error`.
        """
        self.read_error = None
        try:
            self._backing.load()
            header = self.header()
        except StoreError as exc:
            self.read_error = exc
            header = Header(0, 0, 0)
        saved, reason = 0, "no valid header (new or wiped log): every region starts over"
        if self.read_error is not None:
            reason = f"unreadable ({self.read_error}): every region starts over"
        elif header.valid:
            if header.version not in (1, MIRROR_DISK_VERSION):
                raise IncompatibleVersion(
                    errno.EINVAL,
                    f"{self.path}: incompatible disk log version {header.version}",
                )
            if honor_saved:
                saved = min(header.nr_regions, self.region_count)
                reason = f"restored {saved} of {header.nr_regions} saved regions"
            else:
                reason = "sync/nosync given: stored bits ignored"
        if saved < self.region_count:
            self._fill(saved, self.region_count, new_regions_clean)
        self._fill(self.region_count, len(self.clean_bits), False)  # shrink: clear the tail
        self._write_header()
        self._touch(0, len(self._view) - 1)
        self.commit(everything=True)
        return ResumeOutcome(saved, reason)

    def _write_header(self) -> None:
        HEADER.pack_into(self._view, 0, MIRROR_MAGIC, MIRROR_DISK_VERSION, self.region_count)
        self._touch(0, HEADER.size - 1)
        self._dirtied = True

    def _fill(self, start: int, stop: int, clean: bool) -> None:
        if start < stop:
            self.clean_bits[start:stop] = clean
            self._touch(BITMAP_OFFSET + start // 8, BITMAP_OFFSET + (stop - 1) // 8)
            self._dirtied = True

    # -- bit changes ---------------------------------------------------------------------------

    def mark(self, region: int) -> None:
        """Region may now differ between the legs: must be durable at the next commit."""
        if self.clean_bits[region]:
            self.clean_bits[region] = 0
            self._touch_region(region)
            self._dirtied = True

    def clear(self, region: int) -> None:
        """Region is clean again: committed with the next durable commit, or lazily."""
        if not self.clean_bits[region]:
            self.clean_bits[region] = 1
            self._touch_region(region)

    def _touch_region(self, region: int) -> None:
        offset = BITMAP_OFFSET + (region >> 3)
        self._touch(offset, offset)

    def _touch(self, first_byte: int, last_byte: int) -> None:
        first, last = first_byte // PAGE_SIZE, last_byte // PAGE_SIZE
        if self._first_page is None or first < self._first_page:
            self._first_page = first
        if last > self._last_page:
            self._last_page = last

    @property
    def needs_commit(self) -> bool:
        """True when a bit was dirtied since the last commit (a FLUSH must sync)."""
        return self._dirtied

    # -- commit ----------------------------------------------------------------------------

    def commit(self, everything: bool = False) -> bool:
        """Make the changes since the last commit durable.

        Without ``everything`` only a change that dirtied a bit forces a sync (clears ride
        along with it or wait); with it, any pending change is written (POSTSUSPEND, close).
        Returns whether a sync was issued.  Raises StoreError; the changes then stay
        pending, so a later commit retries them.
        """
        if self._first_page is None or not (self._dirtied or everything):
            return False
        start = self._first_page * PAGE_SIZE
        stop = min((self._last_page + 1) * PAGE_SIZE, len(self._view))
        self._backing.persist(start, stop)
        self._first_page, self._last_page, self._dirtied = None, -1, False
        self.commits += 1
        return True

    def close(self) -> None:
        """Release the backing without writing anything (DTR: the kernel's logs do not
        write at destruction either)."""
        del self.clean_bits
        self._view.release()
        self._backing.close()


# -- backings ----------------------------------------------------------------------------------


class _Backing:
    """Where an image is read from and persisted to; ``buffer`` holds the image."""

    path: Path
    buffer: mmap.mmap
    _fd: int

    def load(self) -> None:
        raise NotImplementedError

    def persist(self, start: int, stop: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.buffer.close()
        os.close(self._fd)


class StateFile(_Backing):
    """A state file mapped MAP_SHARED: the buffer is the file's page cache."""

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self._fd = fd
        self.buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, path: Path, image_bytes: int) -> StateFile:
        size = _round_up(image_bytes, PAGE_SIZE)
        tmp = path.with_name(path.name + ".new")
        with _errors(f"cannot create state file {tmp}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with _errors(f"cannot allocate {size} bytes for state file {tmp}"):
                os.posix_fallocate(fd, 0, size)
            backing = cls(path, fd, size)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        # The new file takes the old one's name only once it is complete: a crash in
        # between leaves the old file or none, never a half-made one.  Its content is made
        # durable by the caller's first commit, before the CTR is answered.
        with _errors(f"cannot install state file {path}"):
            os.rename(tmp, path)
            _fsync_dir(path.parent)
        return backing

    @classmethod
    def open(cls, path: Path, image_bytes: int) -> StateFile:
        size = _round_up(image_bytes, PAGE_SIZE)
        with _errors(f"cannot open state file {path}"):
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with _errors(f"cannot size state file {path}"):
                if os.fstat(fd).st_size < size:
                    os.posix_fallocate(fd, 0, size)
            return cls(path, fd, size)
        except BaseException:
            os.close(fd)
            raise

    def load(self) -> None:
        """Nothing to read: the mapping shows the file."""

    def persist(self, start: int, stop: int) -> None:
        with _errors(f"cannot sync state file {self.path}", device_failed=False):
            self.buffer.flush(start, stop - start)


class LogDevice(_Backing):
    """A log device read and written with O_DIRECT, staged in an anonymous mapping.

    A regular file is accepted in place of a device (tests, or a log on a filesystem); it is
    written through the page cache and fdatasync'd, as O_DIRECT alignment rules for files
    depend on the filesystem.
    """

    def __init__(self, path: Path, fd: int, io_size: int, block: int):
        self.path = path
        self._fd = fd
        self._io_size = io_size  # bytes read and written: whole logical blocks
        self._block = block  # the device's logical block size: O_DIRECT's unit
        self.buffer = mmap.mmap(-1, _round_up(io_size, PAGE_SIZE))

    @classmethod
    def open(cls, path: Path, image_bytes: int) -> LogDevice:
        with _errors(f"cannot open log device {path}"):
            st = os.stat(path)
            block_device = stat.S_ISBLK(st.st_mode)
            if not (block_device or stat.S_ISREG(st.st_mode)):
                raise StoreError(errno.EINVAL, f"{path} is not a block device or a file")
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if block_device else 0)
            fd = os.open(path, flags)
        try:
            with _errors(f"cannot size log device {path}"):
                block = _logical_block_size(fd) if block_device else 512
                device_bytes = os.lseek(fd, 0, os.SEEK_END)
            io_size = _round_up(image_bytes, block)
            if device_bytes < io_size:
                raise StoreError(
                    errno.EINVAL,
                    f"log device {path} too small: need {io_size} bytes, has {device_bytes}",
                )
            return cls(path, fd, io_size, block)
        except BaseException:
            os.close(fd)
            raise

    def load(self) -> None:
        with _errors(f"cannot read log device {self.path}", errno.EIO):
            got = os.preadv(self._fd, [memoryview(self.buffer)[: self._io_size]], 0)
            if got != self._io_size:
                raise StoreError(errno.EIO, f"short read of log device {self.path}: {got}")

    def persist(self, start: int, stop: int) -> None:
        stop = min(_round_up(stop, self._block), self._io_size)
        with _errors(f"cannot write log device {self.path}", errno.EIO):
            chunk = memoryview(self.buffer)[start:stop]
            written = os.pwritev(self._fd, [chunk], start)
            chunk.release()
            if written != stop - start:
                raise StoreError(errno.EIO, f"short write to log device {self.path}")
        with _errors(f"cannot flush log device {self.path}", device_failed=False):
            os.fdatasync(self._fd)


class _errors:
    """Turn OSError into StoreError with a message that names the file.  A failed sync is
    not a failed device (``device_failed=False``: status 'F', not 'D')."""

    def __init__(self, message: str, default_errno: int | None = None,
                 device_failed: bool = True):
        self._message = message
        self._default = default_errno
        self._device_failed = device_failed

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, StoreError):
            err = exc.errno or self._default or errno.EIO
            message = f"{self._message}: {os.strerror(err)}"
            raise StoreError(err, message, self._device_failed) from exc
        return False


def _logical_block_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4)
    return struct.unpack("=i", buf)[0]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# -- names and devices ---------------------------------------------------------------------------


def state_file_path(state_dir: Path, uuid: str, luid: int) -> Path:
    """Where a core log instance keeps its bits: one file per (uuid, luid).

    Per luid, not per uuid: during a table reload the old and the new instance are live at
    once, and the new one must start over (design.md, safety rule) without touching the
    bits the old one still serves.  The luid is the kernel's address of the log, stable
    while the table is live, so a restarted server finds the file again from the
    reconnect CTR.  The uuid is percent-escaped to stay one path component.
    """
    return state_dir / "core" / f"{quote(uuid, safe='')}@{luid:016x}.map"


def stale_state_files(state_dir: Path, uuid: str, live_luids: set[int]) -> list[Path]:
    """State files of ``uuid`` that belong to none of ``live_luids``.

    Finding them is housekeeping: a directory that cannot be listed yields none (creating
    the new state file then reports what is wrong with it).
    """
    prefix = f"{quote(uuid, safe='')}@"
    stale = []
    try:
        entries = list((state_dir / "core").iterdir())
    except OSError:
        return []
    for path in entries:
        name = path.name
        if not (name.startswith(prefix) and name.endswith(".map")):
            continue
        try:
            luid = int(name[len(prefix) : -len(".map")], 16)
        except ValueError:
            continue
        if luid not in live_luids:
            stale.append(path)
    return stale


def resolve_device(device: str, node_dir: Path) -> tuple[Path, str | None]:
    """The path to open for a CTR's log device argument, and its ``major:minor`` name.

    ``major:minor`` is looked up in sysfs; when /dev has no matching node (no udev, a
    container) one is made in ``node_dir``.  A path must be a block device or a regular
    file; a file has no ``major:minor`` (None), so nothing is handed back to the kernel.
    """
    major_minor = _parse_major_minor(device)
    if major_minor is None:
        path = Path(device)
        with _errors(f"cannot find log device {device}"):
            st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return path, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return path, None
    major, minor = major_minor
    name = f"{major}:{minor}"
    rdev = os.makedev(major, minor)
    devname = _sysfs_devname(name)
    if devname is not None:
        candidate = Path("/dev") / devname
        try:
            st = os.stat(candidate)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return candidate, name
        except OSError:
            pass
    elif not Path("/sys/dev/block").is_dir():
        raise StoreError(errno.ENOENT, f"cannot resolve {name}: no /sys/dev/block")
    else:
        raise StoreError(errno.ENOENT, f"no block device {name}")
    node = node_dir / name
    with _errors(f"cannot make a device node for {name} in {node_dir}"):
        node_dir.mkdir(parents=True, exist_ok=True)
        try:
            st = os.stat(node)
            if not (stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev):
                os.unlink(node)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
    return node, name


def _parse_major_minor(device: str) -> tuple[int, int] | None:
    major, sep, minor = device.partition(":")
    if sep and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    return None


def _sysfs_devname(name: str) -> str | None:
    try:
        uevent = Path(f"/sys/dev/block/{name}/uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            return value
    return None
