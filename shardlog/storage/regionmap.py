"""Region maps: one log instance's bits, in an mmap'd instance file.

Each log instance ``(uuid, luid)`` has an *instance file* under the state directory
(statedir.py names it), laid out as layout.py says: the kernel's `disk` log image, then
the sync page.  It is mapped ``MAP_SHARED``, so that a bit operation is a C call on the
page cache.  Where the image is made durable depends on the log type: a ``core`` log's
instance file itself, a ``disk`` log's device (stores.py).

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

import errno
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from bitarray import bitarray

from shardlog.storage.errors import StoreError, store_errors
from shardlog.storage.layout import (
    BITMAP_OFFSET,
    HEADER,
    KNOWN_DISK_VERSIONS,
    MIRROR_DISK_VERSION,
    MIRROR_MAGIC,
    PAGE_SIZE,
    SYNC_BITS_OFFSET,
    SYNC_FLAG_RESUMED,
    SYNC_FLAGS,
    SYNC_MAGIC,
    SYNC_VERSION,
    Header,
    bitmap_bytes,
    image_size,
    instance_size,
    sync_offset,
)
from shardlog.storage.statedir import ReplacementFile, remove_state_file
from shardlog.storage.stores import Store, store_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What :meth:`RegionMap.resume` found, for the log line and the operator."""

    saved_regions: int  # regions whose stored bits were kept
    reason: str  # why the stored bits were (not) used
    read_error: StoreError | None  # the stored image could not be read or understood


class RegionMap:
    """The bits of one log instance: its instance file's mapping and where it persists."""

    def __init__(self, path: Path | None, buffer: mmap.mmap, region_count: int,
                 store: Store):
        self.path = path  # the instance file; None when only memory was to be had
        self.region_count = region_count
        self._buffer = buffer
        self._store = store
        self._view = memoryview(buffer)
        nbytes = bitmap_bytes(region_count)
        sync_start = sync_offset(region_count) + SYNC_BITS_OFFSET
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
        region dirty and out of sync, committed to its file before this returns (a core
        log's commit is the shared mapping itself: no sync, design.md).  A disk log's bits
        come from its device at :meth:`resume`.  ``path`` None keeps the bits in memory
        only (a core log then fails every commit).
        """
        store = store_for(path, region_count, device)
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
            with store_errors(f"cannot map {path}"):  # ENOMEM: vm.max_map_count, memory
                if os.fstat(fd).st_size < size:
                    return None
                buffer = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        header = Header(*HEADER.unpack_from(buffer, 0))
        sync = HEADER.unpack_from(buffer, sync_offset(region_count))
        if not header.valid or header.nr_regions != region_count or sync != (
                SYNC_MAGIC, SYNC_VERSION, region_count):
            buffer.close()
            return None
        try:
            store = store_for(path, region_count, device)
        except BaseException:
            buffer.close()
            raise
        return cls(path, buffer, region_count, store)

    @property
    def resumed(self) -> bool:
        """Whether the instance was ever resumed: a server that restores one that was not
        must do that first RESUME's work itself."""
        offset = sync_offset(self.region_count) + HEADER.size
        return bool(SYNC_FLAGS.unpack_from(self._view, offset)[0] & SYNC_FLAG_RESUMED)

    @resumed.setter
    def resumed(self, value: bool) -> None:
        offset = sync_offset(self.region_count) + HEADER.size
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
        elif header.version not in KNOWN_DISK_VERSIONS:
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
        HEADER.pack_into(self._view, sync_offset(self.region_count), SYNC_MAGIC,
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


def _create_instance_file(path: Path | None, size: int) -> mmap.mmap:
    """A new, fully allocated, zeroed instance file mapped MAP_SHARED (anonymous memory
    when ``path`` is None).  It takes the old file's name only once complete: a crash in
    between leaves the old file or none, never a half-made one."""
    if path is None:
        return mmap.mmap(-1, size)
    temporary = path.with_name(path.name + ".new")
    with store_errors(f"cannot create instance file {temporary}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        replacement = ReplacementFile(path, temporary_suffix=".new")
    try:
        with store_errors(f"cannot allocate {size} bytes for instance file {temporary}"):
            os.posix_fallocate(replacement.fd, 0, size)
        with store_errors(f"cannot map instance file {temporary}"):
            buffer = mmap.mmap(replacement.fd, size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        replacement.abandon()
        raise
    try:
        with store_errors(f"cannot install instance file {path}"):
            # Zeroes so far: what is written into the mapping next is the store's to
            # make durable (stores.py), so syncing the file now would buy nothing.
            replacement.install(sync_content=False)
    except BaseException:
        buffer.close()
        raise
    return buffer
