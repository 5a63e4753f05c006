"""The layouts of what shardlog stores: the kernel's `disk` log image and the sync page.

An *image* is what the kernel's `disk` log keeps on its device (drivers/md/dm-log.c), so
a mirror can move between the in-kernel `disk` log and shardlog with no resync.  An
*instance file* is an image followed by shardlog's sync page::

    image  byte 0     struct log_header_disk, little-endian: u32 magic 0x4D695272 ("MiRr"),
                      u32 version 2, u64 nr_regions
           byte 1024  clean bits, one per region, little-endian bit order (region i is
                      byte i>>3, bit i&7), 1 = clean, whole u32 words, bits past
                      nr_regions kept 0
    sync   next page  u32 magic "SLsy", u32 version 1, u64 nr_regions, u32 flags (1:
                      resumed at least once); from byte 64 of that page the sync
                      bits, in the same order

The sync page starts on a page of its own so that the image's pages, which a commit
writes to a log device, never hold sync bits.  This module is arithmetic and constants
only: the map (regionmap.py), the stores (stores.py) and the offline reader (image.py)
all take their offsets from here.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
#: The versions the kernel's disk_resume accepts (1 is read as 2).
KNOWN_DISK_VERSIONS = (1, MIRROR_DISK_VERSION)
BITMAP_OFFSET = 1024  # LOG_OFFSET: 2 sectors
HEADER = struct.Struct("<IIQ")
SYNC_MAGIC = 0x79734C53  # "SLsy"
SYNC_VERSION = 1
SYNC_FLAGS = struct.Struct("<I")  # after the sync header
SYNC_FLAG_RESUMED = 1
SYNC_BITS_OFFSET = 64  # within the sync page(s)
PAGE_SIZE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class Header:
    """struct log_header_disk."""

    magic: int
    version: int
    nr_regions: int

    @property
    def valid(self) -> bool:
        return self.magic == MIRROR_MAGIC


def bitmap_bytes(region_count: int) -> int:
    """Size of a bitmap: whole u32 words, as the kernel allocates it."""
    return -(-region_count // 32) * 4


def image_size(region_count: int) -> int:
    """Bytes of the kernel's image: header area and clean bits."""
    return BITMAP_OFFSET + bitmap_bytes(region_count)


def sync_offset(region_count: int) -> int:
    """Where an instance file's sync page starts."""
    return round_up(image_size(region_count), PAGE_SIZE)


def instance_size(region_count: int) -> int:
    """Bytes of an instance file: whole pages, as it is mapped."""
    end = sync_offset(region_count) + SYNC_BITS_OFFSET + bitmap_bytes(region_count)
    return round_up(end, PAGE_SIZE)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
