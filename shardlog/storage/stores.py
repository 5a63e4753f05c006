"""Where a region map's image persists: a ``core`` log's instance file or a ``disk`` log's
log device.

- ``core`` logs (:class:`CoreStore`): the instance file itself, mapped ``MAP_SHARED``: a
  mark is in the page cache the moment it is made, and a commit writes nothing.  The file
  is read back only by a server restarted under a live kernel (the reconnect CTR), which
  finds every acknowledged mark in the page cache; after a host crash the kernel's tables
  are gone and a core log starts over, as the kernel's own does (design.md), so an
  ``msync`` would buy nothing and cost ~0.1 ms a FLUSH.
- ``disk`` logs (:class:`LogDevice`): the log device, written with ``O_DIRECT`` like the
  kernel's ``dm_io`` (so neither side reads the other's stale page cache) and
  ``fdatasync``'d for the cache flush the kernel issues with ``REQ_PREFLUSH``.  The
  device is never mapped: one that disappears must give -EIO on the next flush, not a
  SIGBUS on the next bit test.  The instance file is then a *shadow* of the device image.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from pathlib import Path

from shardlog.storage.errors import LOG_DEVICE, STATE_FILE, StoreError, store_errors
from shardlog.storage.layout import PAGE_SIZE, image_size, round_up

_BLKSSZGET = 0x1268  # logical block size of a block device


class Store:
    """Where an image persists: loaded at RESUME, written by commits."""

    path: Path | None
    source = STATE_FILE

    def load(self, image: memoryview) -> None:
        """Fill ``image`` with what was stored (StoreError if it cannot be read); a core
        log's image is already in its mapping, so there is nothing to do."""

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        """Make bytes ``start:stop`` of the image in ``view`` durable (StoreError)."""
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


def store_for(path: Path | None, region_count: int, device: Path | None) -> Store:
    """A disk log's device (opened now: StoreError), else a core log's instance file."""
    return LogDevice.open(device, region_count) if device else CoreStore(path)


class CoreStore(Store):
    """A core log's store: the instance file's shared mapping, which needs no sync (see
    the module's docstring); a core log running from memory (``path`` None) has nothing a
    restarted server could read, so it can commit nothing."""

    def __init__(self, path: Path | None):
        self.path = path

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        if self.path is None:
            raise StoreError(errno.EIO, "no instance file (the state directory failed)")


class LogDevice(Store):
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
        self._bounce = mmap.mmap(-1, round_up(io_size, PAGE_SIZE))  # page-aligned

    @classmethod
    def open(cls, path: Path, region_count: int) -> LogDevice:
        with store_errors(f"cannot open log device {path}", source=LOG_DEVICE):
            st = os.stat(path)
            block_device = stat.S_ISBLK(st.st_mode)
            if not (block_device or stat.S_ISREG(st.st_mode)):
                raise StoreError(errno.EINVAL, f"{path} is not a block device or a file",
                                 source=LOG_DEVICE)
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if block_device else 0)
            fd = os.open(path, flags)
        try:
            with store_errors(f"cannot size log device {path}", source=LOG_DEVICE):
                block = logical_block_size(fd) if block_device else 512
                device_bytes = os.lseek(fd, 0, os.SEEK_END)
            io_size = round_up(image_size(region_count), block)
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
        with store_errors(f"cannot read log device {self.path}", errno.EIO,
                          source=LOG_DEVICE), \
                memoryview(self._bounce)[: self._io_size] as target:
            got = os.preadv(self._fd, [target], 0)
        if got != self._io_size:
            raise StoreError(errno.EIO, f"short read of log device {self.path}: {got}",
                             source=LOG_DEVICE)
        image[:] = self._bounce[: len(image)]

    def persist(self, view: memoryview, start: int, stop: int) -> None:
        stop = min(round_up(stop, self._block), self._io_size)
        image_end = min(stop, len(view))
        self._bounce[start:image_end] = view[start:image_end]
        with store_errors(f"cannot write log device {self.path}", errno.EIO,
                          source=LOG_DEVICE), \
                memoryview(self._bounce)[start:stop] as chunk:
            written = os.pwritev(self._fd, [chunk], start)
        if written != stop - start:
            raise StoreError(errno.EIO, f"short write to log device {self.path}",
                             source=LOG_DEVICE)
        with store_errors(f"cannot flush log device {self.path}", device_failed=False,
                          source=LOG_DEVICE):
            os.fdatasync(self._fd)

    def close(self) -> None:
        self._bounce.close()
        os.close(self._fd)


def logical_block_size(fd: int) -> int:
    """A block device's logical block size: the unit of its O_DIRECT I/O."""
    buf = fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4)
    return struct.unpack("=i", buf)[0]
