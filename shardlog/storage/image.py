"""Reading a stored image offline, read-only: what ``shardlog inspect`` shows.

An instance file (``*.map``) or a log device (or a copy of one) in the kernel's `disk`
log layout (layout.py) is read once, never written or locked, so it is safe while the
server runs.  The format is checked as the server checks it, and every way an image can
be wrong (a bad magic, a version nobody writes, a file cut short, a sync page that does
not match) is explained in one line.  Errors here are the caller's to report: they are
no server's storage failures (errors.py), and nothing counts them.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bitarray import bitarray

from shardlog.storage import records
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
    round_up,
    sync_offset,
)
from shardlog.storage.statedir import parse_instance_file_name, uuid_of_key
from shardlog.storage.stores import logical_block_size


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
    with store_errors(f"cannot open {path}"):
        st = os.stat(path)
        block_device = stat.S_ISBLK(st.st_mode)
        if not (block_device or stat.S_ISREG(st.st_mode)):
            raise StoreError(errno.EINVAL, f"{path} is not a file or a block device")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if block_device else 0))
    try:
        with store_errors(f"cannot read {path}"):
            size = os.lseek(fd, 0, os.SEEK_END)
            block = logical_block_size(fd) if block_device else 1
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
        sync_start = sync_offset(nr)
        with store_errors(f"cannot read {path}"):
            length = image_size(nr) - BITMAP_OFFSET
            clean = _bits(_read_at(fd, BITMAP_OFFSET, length, block), nbytes, nr)
            sync_page = b""
            if size >= sync_start + SYNC_BITS_OFFSET:
                sync_page = _read_at(fd, sync_start, SYNC_BITS_OFFSET + nbytes, block)
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
                             f"byte {sync_start + SYNC_BITS_OFFSET + nbytes}; it has "
                             f"{size}")
        sync_bits = _bits(sync_page[SYNC_BITS_OFFSET:], nbytes, nr)
        resumed = bool(SYNC_FLAGS.unpack_from(sync_page, HEADER.size)[0] & SYNC_FLAG_RESUMED)
    elif expect_sync:
        if size < instance_size(nr):
            raise ImageError(f"{path}: truncated instance file: {nr} regions need "
                             f"{instance_size(nr)} bytes with the sync page; it has {size}")
        raise ImageError(f"{path}: bad sync page magic at byte {sync_start} (expected "
                         f"{SYNC_MAGIC:#010x} 'SLsy'): not an instance file of this format")
    return StoredImage(path, sync_bits is not None, size, header, clean, sync_bits, resumed)


def _check_image_header(path: Path, header: Header) -> None:
    if not header.valid:
        what = ("all zeros: a new or wiped log device (the kernel's disk_resume starts "
                "every region over)" if header == Header(0, 0, 0)
                else "not a device-mapper disk log image")
        raise ImageError(f"{path}: bad magic {header.magic:#010x} (expected "
                         f"{MIRROR_MAGIC:#010x} 'MiRr'): {what}")
    if header.version not in KNOWN_DISK_VERSIONS:
        raise ImageError(f"{path}: unknown disk log version {header.version} (the kernel "
                         f"and shardlog know 1 and {MIRROR_DISK_VERSION}; both would start "
                         "every region over)")


def _read_at(fd: int, offset: int, length: int, block: int) -> bytes:
    """``length`` bytes from ``offset`` (fewer at the end of the file); with ``block`` > 1
    (O_DIRECT) through an aligned buffer in whole blocks."""
    if block <= 1:
        return os.pread(fd, length, offset)
    start = offset - offset % block
    span = round_up(offset + length, block) - start
    bounce = mmap.mmap(-1, round_up(span, PAGE_SIZE))
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


def instance_identity(path: Path) -> tuple[str | None, int | None]:
    """The uuid and luid of an instance file, or None for a file named otherwise.  The
    luid is in its name, and so is the uuid unless it was too long to be (a hashed name):
    then the CTR record beside the file holds it (None without one)."""
    parsed = parse_instance_file_name(path.name)
    if parsed is None:
        return None, None
    key, luid = parsed
    uuid = uuid_of_key(key)
    if uuid is None:
        record = records.read(records.beside(path))
        uuid = record.uuid if record is not None else None
    return uuid, luid
