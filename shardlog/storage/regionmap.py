"""Region maps: one log instance's bits, in the kernel's own `disk` log layout.

Each log instance ``(uuid, luid)`` has an *instance file* under the state directory,
mapped ``MAP_SHARED``, so that a bit operation is a C call on the page cache::

    image  byte 0     struct log_header_disk, little-endian: u32 magic 0x4D695272 ("MiRr"),
                      u32 version 2, u64 nr_regions            (drivers/md/dm-log.c)
           byte 1024  clean bits, one per region, little-endian bit order (region i is
                      byte i>>3, bit i&7), 1 = clean, whole u32 words, bits past
                      nr_regions kept 0
    sync   next page  u32 magic "SLsy", u32 version 1, u64 nr_regions, u32 flags (1:
                      resumed at least once); from byte 64 of that page the sync
                      bits, in the same order

The *image* is what the kernel's `disk` log keeps on its device, so a mirror can move
between the in-kernel `disk` log and shardlog with no resync.  Where it is made durable
depends on the log type:

- ``core`` logs: the instance file itself, mapped ``MAP_SHARED``: a mark is in the page
  cache the moment it is made, and a commit writes nothing.  The file is read back only by
  a server restarted under a live kernel (the reconnect CTR), which finds every
  acknowledged mark in the page cache; after a host crash the kernel's tables are gone and
  a core log starts over, as the kernel's own does (design.md), so an ``msync`` would buy
  nothing and cost ~0.1 ms a FLUSH.
- ``disk`` logs: the log device, written with ``O_DIRECT`` like the kernel's ``dm_io`` (so
  neither side reads the other's stale page cache) and ``fdatasync``'d for the cache flush
  the kernel issues with ``REQ_PREFLUSH``.  The device is never mapped: one that
  disappears must give -EIO on the next flush, not a SIGBUS on the next bit test.  The
  instance file is then a *shadow* of the device image.

The *sync bits* are never synced to storage, and need not be: they matter only to a
server restarted under a live kernel (the reconnect CTR), which means the host, and so
the page cache, survived.  They let such a server continue with exactly the state the
kernel is relying on: marks it had acknowledged but not yet flushed, and sync state it
could not rebuild from clean bits (the kernel does not ask for resync work again until
the mirror is resumed, so a region wrongly reported out of sync would be written to one
leg only until then).

Durability (dm-log.c ``disk_flush``): bits *dirtied* (a region marked, the header
rewritten) must be on stable storage before a FLUSH is answered, because the kernel
starts the data writes right after.  Bits *cleaned* may be committed lazily: losing one
costs a region resync after a crash, never data.  So :meth:`RegionMap.commit` syncs only
when something was dirtied since the last commit (or when asked to write everything),
and then only the page range that changed.

Instance files are allocated in full when made: a store into a mapped page of a sparse
file on a full filesystem is a SIGBUS, which would kill the process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from bitarray import bitarray

log = logging.getLogger(__name__)

MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
BITMAP_OFFSET = 1024  # LOG_OFFSET: 2 sectors
HEADER = struct.Struct("<IIQ")
SYNC_MAGIC = 0x79734C53  # "SLsy"
SYNC_VERSION = 1
SYNC_FLAGS = struct.Struct("<I")  # after the sync header
SYNC_FLAG_RESUMED = 1
SYNC_BITS_OFFSET = 64  # within the sync page(s)
PAGE_SIZE = mmap.PAGESIZE
_BLKSSZGET = 0x1268  # logical block size of a block device


STATE_FILE, LOG_DEVICE = "state_file", "log_device"  # where a StoreError happened

# Every StoreError this process has made, by source: failures happen deep in the stores
# and are mostly absorbed into a log's health, so they are tallied where they are made,
# and the worker reports the tally (take_failures) for the metrics.
_failures: Counter[str] = Counter()


def take_failures() -> Counter[str]:
    """StoreErrors by source since the last call."""
    taken = _failures.copy()
    _failures.clear()
    return taken


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
        _failures[source] += 1


def bitmap_bytes(region_count: int) -> int:
    """Size of a bitmap: whole u32 words, as the kernel allocates it."""
    return -(-region_count // 32) * 4


def image_size(region_count: int) -> int:
    return BITMAP_OFFSET + bitmap_bytes(region_count)


def _sync_offset(region_count: int) -> int:
    return _round_up(image_size(region_count), PAGE_SIZE)


def instance_size(region_count: int) -> int:
    end = _sync_offset(region_count) + SYNC_BITS_OFFSET + bitmap_bytes(region_count)
    return _round_up(end, PAGE_SIZE)


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
    read_error: StoreError | None  # the stored image could not be read or understood


class RegionMap:
    """The bits of one log instance: its instance file's mapping and where it persists."""

    def __init__(self, path: Path | None, buffer: mmap.mmap, region_count: int,
                 store: _Store):
        self.path = path  # the instance file; None when only memory was to be had
        self.region_count = region_count
        self._buffer = buffer
        self._store = store
        self._view = memoryview(buffer)
        nbytes = bitmap_bytes(region_count)
        sync_start = _sync_offset(region_count) + SYNC_BITS_OFFSET
        self.clean_bits = bitarray(
            buffer=self._view[BITMAP_OFFSET : BITMAP_OFFSET + nbytes], endian="little"
        )
        self.sync_bits = bitarray(
            buffer=self._view[sync_start : sync_start + nbytes], endian="little"
        )
        # Image pages changed since the last commit, and whether a change dirtied a bit.
        self._first_page: int | None = None
        self._last_page = -1
        self._dirtied = False
        self.commits = 0  # syncs actually issued; tests and metrics read it

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path | None, region_count: int, *, device: Path | None = None,
               clean: bool = False) -> RegionMap:
        """A new instance, replacing any old instance file at ``path``.

        A core log (no ``device``) starts with every region clean and in sync, or every
        region dirty and out of sync, made durable before this returns.  A disk log's bits
        come from its device at :meth:`resume`.  ``path`` None keeps the bits in memory
        only (a core log then fails every commit).
        """
        store = _store_for(path, region_count, device)
        try:
            buffer = _create_instance_file(path, instance_size(region_count))
        except BaseException:
            store.close()
            raise
        rmap = cls(path, buffer, region_count, store)
        HEADER.pack_into(rmap._view, 0, MIRROR_MAGIC, MIRROR_DISK_VERSION, region_count)
        rmap.clean_bits[:region_count] = clean
        rmap._copy_clean_to_sync()
        rmap._touch(0, image_size(region_count) - 1)
        if device is None and path is not None:
            rmap.commit(everything=True)
        return rmap

    @classmethod
    def reopen(cls, path: Path, region_count: int, *,
               device: Path | None = None) -> RegionMap | None:
        """The instance a server that died left at ``path``, or None if there is none
        with both bitmaps for ``region_count`` regions.  Raises StoreError when the
        device (or the file) cannot be opened."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"cannot open {path}: {exc}") from exc
        try:
            size = instance_size(region_count)
            if os.fstat(fd).st_size < size:
                return None
            buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        header = Header(*HEADER.unpack_from(buffer, 0))
        sync = HEADER.unpack_from(buffer, _sync_offset(region_count))
        if not header.valid or header.nr_regions != region_count or sync != (
                SYNC_MAGIC, SYNC_VERSION, region_count):
            buffer.close()
            return None
        try:
            store = _store_for(path, region_count, device)
        except BaseException:
            buffer.close()
            raise
        return cls(path, buffer, region_count, store)

    @property
    def resumed(self) -> bool:
        """Whether the instance was ever resumed: a server that restores one that was not
        must do that first RESUME's work itself."""
        offset = _sync_offset(self.region_count) + HEADER.size
        return bool(SYNC_FLAGS.unpack_from(self._view, offset)[0] & SYNC_FLAG_RESUMED)

    @resumed.setter
    def resumed(self, value: bool) -> None:
        offset = _sync_offset(self.region_count) + HEADER.size
        SYNC_FLAGS.pack_into(self._view, offset, SYNC_FLAG_RESUMED if value else 0)

    @property
    def store_path(self) -> Path | None:
        """Where the bits are made durable: the log device or the instance file."""
        return self._store.path

    # -- the header and resume ---------------------------------------------------------------

    def header(self) -> Header:
        return Header(*HEADER.unpack_from(self._view, 0))

    def resume(self, honor_saved: bool, new_regions_clean: bool) -> ResumeOutcome:
        """Load the stored image and normalise it by the kernel's ``disk_resume`` rules;
        then the sync bits are the clean bits.

        ``honor_saved`` False means the stored bits are ignored (a ``sync``/``nosync``
        option on a new activation).  An unreadable image (a read error, or a valid magic
        with a version the kernel would refuse too) counts as nothing saved and is
        reported in the outcome, as ``disk_resume`` fails the device and carries on.
        Regions the stored header does not cover (the log grew, or nothing was saved)
        become ``new_regions_clean``; bits past ``region_count`` are cleared (it shrank).
        The normalised image is then written back and synced (StoreError if that fails;
        the bits in memory stand).
        """
        read_error = None
        try:
            # Released on the way out even when the load fails: an exception's traceback
            # must not keep the mapping exported, or it could never be closed.
            with self._view[: image_size(self.region_count)] as image:
                self._store.load(image)
            header = self.header()
        except StoreError as exc:
            read_error, header = exc, Header(0, 0, 0)
        saved, reason = 0, "no valid header (new or wiped log): every region starts over"
        if read_error is not None:
            reason = f"unreadable ({read_error}): every region starts over"
        elif not header.valid:
            pass
        elif not honor_saved:
            reason = "sync/nosync given: stored bits ignored"
        elif header.version not in (1, MIRROR_DISK_VERSION):
            read_error = StoreError(
                errno.EINVAL, f"{self._store.path}: incompatible disk log version "
                f"{header.version}: every region starts over", source=self._store.source)
            reason = str(read_error)
        else:
            saved = min(header.nr_regions, self.region_count)
            reason = f"restored {saved} of {header.nr_regions} saved regions"
        self.clean_bits[saved : self.region_count] = new_regions_clean
        self.clean_bits[self.region_count :] = False  # shrink: clear the last word's tail
        HEADER.pack_into(self._view, 0, MIRROR_MAGIC, MIRROR_DISK_VERSION, self.region_count)
        self._copy_clean_to_sync()
        outcome = ResumeOutcome(saved, reason, read_error)
        self.push()
        return outcome

    def push(self) -> None:
        """Write the whole image to where it persists: a reconnected server's first act,
        so that marks the dead one acknowledged but had not flushed become durable."""
        self._touch(0, image_size(self.region_count) - 1)
        self._dirtied = True
        self.commit(everything=True)

    def _copy_clean_to_sync(self) -> None:
        self.sync_bits[:] = self.clean_bits
        HEADER.pack_into(self._view, _sync_offset(self.region_count), SYNC_MAGIC,
                         SYNC_VERSION, self.region_count)

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
        """Make the image's changes since the last commit durable.

        Without ``everything`` only a change that dirtied a bit forces a sync (clears ride
        along with it or wait); with it, any pending change is written (POSTSUSPEND).
        Returns whether a sync was issued.  Raises StoreError; the changes then stay
        pending, so a later commit retries them.
        """
        if self._first_page is None or not (self._dirtied or everything):
            return False
        start = self._first_page * PAGE_SIZE
        stop = min((self._last_page + 1) * PAGE_SIZE, image_size(self.region_count))
        self._store.persist(self._view, start, stop)
        self._first_page, self._last_page, self._dirtied = None, -1, False
        self.commits += 1
        return True

    def close(self, remove: bool = False) -> None:
        """Release the mapping and the device without writing anything (DTR: the kernel's
        logs do not write at destruction either); ``remove`` deletes the instance file."""
        del self.clean_bits, self.sync_bits
        self._store.close()
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:
            # Someone still holds a view of the bits (a caller's variable, a traceback):
            # the mapping goes away with the last of them.  A DTR must not fail for it.
            log.debug("%s: mapping still referenced; released when the last view goes",
                      self.path)
        if remove and self.path is not None:
            remove_state_file(self.path)


# -- where an image persists -----------------------------------------------------------------


def _store_for(path: Path | None, region_count: int, device: Path | None) -> _Store:
    return LogDevice.open(device, region_count) if device else CoreStore(path)


class _Store:
    path: Path | None
    source = STATE_FILE

    def load(self, image: memoryview) -> None:
        """Fill ``image`` with what was stored (StoreError if it cannot be read); a core
        log's image is already in its mapping, so there is nothing to do."""

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


class CoreStore(_Store):
    """A core log's store: the instance file's shared mapping, which needs no sync (see
    the module's docstring); a core log running from memory (``path`` None) has nothing a
    restarted server could read, so it can commit nothing."""

    def __init__(self, path: Path | None):
        self.path = path

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        if self.path is None:
            raise StoreError(errno.EIO, "no instance file (the state directory failed)")


class LogDevice(_Store):
    """A log device read and written with O_DIRECT through an aligned bounce buffer.

    A regular file is accepted in place of a device (tests, or a log on a filesystem); it is
    written through the page cache and fdatasync'd, as O_DIRECT alignment rules for files
    depend on the filesystem.
    """

    source = LOG_DEVICE

    def __init__(self, path: Path, fd: int, io_size: int, block: int):
        self.path = path
        self._fd = fd
        self._io_size = io_size  # bytes read and written: whole logical blocks
        self._block = block  # the device's logical block size: O_DIRECT's unit
        self._bounce = mmap.mmap(-1, _round_up(io_size, PAGE_SIZE))  # page-aligned

    @classmethod
    def open(cls, path: Path, region_count: int) -> LogDevice:
        with _errors(f"cannot open log device {path}", source=LOG_DEVICE):
            st = os.stat(path)
            block_device = stat.S_ISBLK(st.st_mode)
            if not (block_device or stat.S_ISREG(st.st_mode)):
                raise StoreError(errno.EINVAL, f"{path} is not a block device or a file",
                                 source=LOG_DEVICE)
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if block_device else 0)
            fd = os.open(path, flags)
        try:
            with _errors(f"cannot size log device {path}", source=LOG_DEVICE):
                block = _logical_block_size(fd) if block_device else 512
                device_bytes = os.lseek(fd, 0, os.SEEK_END)
            io_size = _round_up(image_size(region_count), block)
            if device_bytes < io_size:
                raise StoreError(
                    errno.EINVAL,
                    f"log device {path} too small: need {io_size} bytes, has {device_bytes}",
                    source=LOG_DEVICE)
            return cls(path, fd, io_size, block)
        except BaseException:
            os.close(fd)
            raise

    def load(self, image: memoryview) -> None:
        with _errors(f"cannot read log device {self.path}", errno.EIO, source=LOG_DEVICE), \
                memoryview(self._bounce)[: self._io_size] as target:
            got = os.preadv(self._fd, [target], 0)
        if got != self._io_size:
            raise StoreError(errno.EIO, f"short read of log device {self.path}: {got}",
                             source=LOG_DEVICE)
        image[:] = self._bounce[: len(image)]

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        stop = min(_round_up(stop, self._block), self._io_size)
        image_end = min(stop, len(view))
        self._bounce[start:image_end] = view[start:image_end]
        with _errors(f"cannot write log device {self.path}", errno.EIO,
                     source=LOG_DEVICE), \
                memoryview(self._bounce)[start:stop] as chunk:
            written = os.pwritev(self._fd, [chunk], start)
        if written != stop - start:
            raise StoreError(errno.EIO, f"short write to log device {self.path}",
                             source=LOG_DEVICE)
        with _errors(f"cannot flush log device {self.path}", device_failed=False,
                     source=LOG_DEVICE):
            os.fdatasync(self._fd)

    def close(self) -> None:
        self._bounce.close()
        os.close(self._fd)


def _create_instance_file(path: Path | None, size: int) -> mmap.mmap:
    """A new, fully allocated, zeroed instance file mapped MAP_SHARED (anonymous memory
    when ``path`` is None).  It takes the old file's name only once complete: a crash in
    between leaves the old file or none, never a half-made one."""
    if path is None:
        return mmap.mmap(-1, size)
    tmp = path.with_name(path.name + ".new")
    with _errors(f"cannot create instance file {tmp}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with _errors(f"cannot allocate {size} bytes for instance file {tmp}"):
            os.posix_fallocate(fd, 0, size)
        buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        with _errors(f"cannot install instance file {path}"):
            os.rename(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        buffer.close()
        _unlink_quietly(tmp)
        raise
    return buffer


class _errors:
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


# -- reading a stored image, read-only (shardlog inspect) ------------------------------------------


class ImageError(StoreError):
    """A stored image that cannot be understood: the message says what is wrong with it
    and what it probably is."""

    def __init__(self, message: str):
        super().__init__(errno.EINVAL, message)


@dataclass(frozen=True)
class StoredImage:
    """What an instance file or a log device holds, read once, never written.

    ``sync_bits`` and ``resumed`` are None for a log device image: only instance files
    carry the sync page.  Bit arrays are cut to ``header.nr_regions``.
    """

    path: Path
    is_instance_file: bool
    size: int  # bytes in the file or device
    header: Header
    clean_bits: bitarray
    sync_bits: bitarray | None
    resumed: bool | None


def read_stored_image(path: Path) -> StoredImage:
    """Read ``path`` — an instance file (``*.map``) or a log device or image in the
    kernel's `disk` log layout — without writing to it or locking it.

    A block device is read with O_DIRECT, as the server and the kernel write it, so that
    a stale page cache is never shown.  Raises StoreError when it cannot be opened or
    read, ImageError when what it holds is not a valid image: a bad magic, a version
    nobody writes, a file cut short.
    """
    with _errors(f"cannot open {path}"):
        st = os.stat(path)
        block_device = stat.S_ISBLK(st.st_mode)
        if not (block_device or stat.S_ISREG(st.st_mode)):
            raise StoreError(errno.EINVAL, f"{path} is not a file or a block device")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if block_device else 0))
    try:
        with _errors(f"cannot read {path}"):
            size = os.lseek(fd, 0, os.SEEK_END)
            block = _logical_block_size(fd) if block_device else 1
            first = _read_at(fd, 0, max(block, HEADER.size), block)
        if len(first) < HEADER.size:
            raise ImageError(f"{path}: truncated: {size} bytes, a header needs {HEADER.size}")
        header = Header(*HEADER.unpack_from(first, 0))
        _check_image_header(path, header)
        nr = header.nr_regions
        nbytes = bitmap_bytes(nr)
        if size < image_size(nr):
            raise ImageError(f"{path}: truncated: the header says {nr} regions, which "
                             f"need {image_size(nr)} bytes; it has {size}")
        expect_sync = path.suffix == ".map"
        sync_offset = _sync_offset(nr)
        with _errors(f"cannot read {path}"):
            length = image_size(nr) - BITMAP_OFFSET
            clean = _bits(_read_at(fd, BITMAP_OFFSET, length, block), nbytes, nr)
            sync_page = b""
            if size >= sync_offset + SYNC_BITS_OFFSET:
                sync_page = _read_at(fd, sync_offset, SYNC_BITS_OFFSET + nbytes, block)
    finally:
        os.close(fd)
    sync_bits = resumed = None
    sync_header = HEADER.unpack_from(sync_page, 0) if len(sync_page) >= HEADER.size else None
    if sync_header is not None and sync_header[0] == SYNC_MAGIC:
        if sync_header[1] != SYNC_VERSION:
            raise ImageError(f"{path}: unknown sync page version {sync_header[1]} "
                             f"(this shardlog writes {SYNC_VERSION})")
        if sync_header[2] != nr:
            raise ImageError(f"{path}: corrupt: the image says {nr} regions, its sync "
                             f"page {sync_header[2]}")
        if len(sync_page) < SYNC_BITS_OFFSET + nbytes:
            raise ImageError(f"{path}: truncated: the sync bits of {nr} regions end at "
                             f"byte {sync_offset + SYNC_BITS_OFFSET + nbytes}; it has "
                             f"{size}")
        sync_bits = _bits(sync_page[SYNC_BITS_OFFSET:], nbytes, nr)
        resumed = bool(SYNC_FLAGS.unpack_from(sync_page, HEADER.size)[0] & SYNC_FLAG_RESUMED)
    elif expect_sync:
        if size < instance_size(nr):
            raise ImageError(f"{path}: truncated instance file: {nr} regions need "
                             f"{instance_size(nr)} bytes with the sync page; it has {size}")
        raise ImageError(f"{path}: bad sync page magic at byte {sync_offset} (expected "
                         f"{SYNC_MAGIC:#010x} 'SLsy'): not an instance file of this format")
    return StoredImage(path, sync_bits is not None, size, header, clean, sync_bits, resumed)


def _check_image_header(path: Path, header: Header) -> None:
    if not header.valid:
        what = ("all zeros: a new or wiped log device (the kernel's disk_resume starts "
                "every region over)" if header == Header(0, 0, 0)
                else "not a device-mapper disk log image")
        raise ImageError(f"{path}: bad magic {header.magic:#010x} (expected "
                         f"{MIRROR_MAGIC:#010x} 'MiRr'): {what}")
    if header.version not in (1, MIRROR_DISK_VERSION):
        raise ImageError(f"{path}: unknown disk log version {header.version} (the kernel "
                         f"and shardlog know 1 and {MIRROR_DISK_VERSION}; both would start "
                         "every region over)")


def _read_at(fd: int, offset: int, length: int, block: int) -> bytes:
    """``length`` bytes from ``offset`` (fewer at the end of the file); with ``block`` > 1
    (O_DIRECT) through an aligned buffer in whole blocks."""
    if block <= 1:
        return os.pread(fd, length, offset)
    start = offset - offset % block
    span = _round_up(offset + length, block) - start
    bounce = mmap.mmap(-1, _round_up(span, PAGE_SIZE))
    try:
        with memoryview(bounce)[:span] as target:
            got = os.preadv(fd, [target], start)
        return bounce[offset - start : min(offset - start + length, got)]
    finally:
        bounce.close()


def _bits(data: bytes, nbytes: int, nr_regions: int) -> bitarray:
    bits = bitarray(endian="little")
    bits.frombytes(bytes(data[:nbytes]))
    del bits[nr_regions:]
    return bits


# -- names and devices ---------------------------------------------------------------------------


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


def instance_file_path(state_dir: Path, uuid: str, luid: int) -> Path:
    """Where a log instance keeps its instance file: one per (uuid, luid).

    Per luid, not per uuid: during a table reload the old and the new instance are live at
    once, and the new one must start over (design.md, safety rule) without touching the
    bits the old one still serves.  The luid is the kernel's address of the log, stable
    while the table is live, so a restarted server finds the file again from the
    reconnect CTR.  The name starts with the uuid's key (:func:`instance_file_key`).
    """
    return state_dir / "logs" / f"{instance_file_key(uuid)}@{luid:016x}.map"


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


def remove_state_file(path: Path) -> None:
    """Remove a file of the state directory (an instance file, a CTR record); failing to
    is worth a warning, not an error."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def instance_files_by_key(state_dir: Path) -> dict[str, dict[int, Path]]:
    """Every instance file in ``state_dir``, as ``{key: {luid: path}}``, the key being
    :func:`instance_file_key` of its uuid.

    One listing of the directory, names compared as strings: with 10,000 logs it holds
    20,000 files.  Finding them is housekeeping: a directory that cannot be listed yields
    none (creating an instance file then reports what is wrong with it).
    """
    found: dict[str, dict[int, Path]] = {}
    directory = state_dir / "logs"
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


def parse_instance_file_name(name: str) -> tuple[str, int] | None:
    """``(key, luid)`` from an instance file's name (:func:`instance_file_path`), or
    None for a file named otherwise; :func:`uuid_of_key` makes the key a uuid."""
    key, at, rest = name.rpartition("@")
    if not (at and key and rest.endswith(".map")):
        return None
    try:
        return key, int(rest[: -len(".map")], 16)
    except ValueError:
        return None
