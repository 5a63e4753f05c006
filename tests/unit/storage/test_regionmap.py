"""Region maps against the real kernel's disk-log images and the disk_resume rules."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from shardlog.storage.devices import resolve_device
from shardlog.storage.errors import StoreError
from shardlog.storage.layout import BITMAP_OFFSET, MIRROR_MAGIC
from shardlog.storage.regionmap import RegionMap
from shardlog.storage.statedir import (
    instance_file_key,
    instance_file_path,
    instance_files_by_key,
    uuid_of_key,
)

from ...conftest import DISKLOG_IMAGES

KERNEL_REGIONS = 128  # the golden images: 131072 sectors, region size 1024


def golden(name: str) -> bytes:
    return (DISKLOG_IMAGES / f"disklog-{name}.bin").read_bytes()


def device_file(tmp_path: Path, content: bytes = b"", size: int = 4 << 20) -> Path:
    """A regular file standing in for a log device, like the kernel's 4 MiB log device."""
    path = tmp_path / "logdev"
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)
    return path


def header_of(data: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("<IIQ", data, 0)


def on_device(tmp_path: Path, device: Path, regions: int = KERNEL_REGIONS) -> RegionMap:
    """A disk log's region map: its instance file in tmp_path, persisting to ``device``."""
    return RegionMap.create(tmp_path / "instance.map", regions, device=device)


# -- layout -------------------------------------------------------------------------------------


def test_a_new_in_sync_core_instance_has_the_kernels_image(tmp_path):
    path = tmp_path / "s.map"
    rmap = RegionMap.create(path, KERNEL_REGIONS, clean=True)
    rmap.close()
    image = path.read_bytes()
    assert image[: BITMAP_OFFSET + 16] == golden("insync")[: BITMAP_OFFSET + 16]
    assert set(image[BITMAP_OFFSET + 16 : 4096]) == {0}  # then the sync bits' page


def test_a_new_out_of_sync_core_instance_has_every_bit_dirty(tmp_path):
    path = tmp_path / "s.map"
    RegionMap.create(path, 100, clean=False).close()
    image = path.read_bytes()
    assert header_of(image) == (MIRROR_MAGIC, 2, 100)
    assert set(image[BITMAP_OFFSET : BITMAP_OFFSET + 16]) == {0}


def test_bits_past_the_last_region_stay_zero(tmp_path):
    path = tmp_path / "s.map"
    RegionMap.create(path, 100, clean=True).close()
    bitmap = path.read_bytes()[BITMAP_OFFSET : BITMAP_OFFSET + 16]
    # 100 regions: 12 whole bytes, then 4 bits of byte 12, then zeros to the u32 boundary.
    assert bitmap == b"\xff" * 12 + b"\x0f" + b"\0" * 3


def test_marking_region_5_writes_the_image_the_kernel_wrote(tmp_path):
    device = device_file(tmp_path, golden("insync"))
    rmap = on_device(tmp_path, device)
    rmap.resume(honor_saved=True, new_regions_clean=False)
    rmap.mark(5)
    assert rmap.commit()
    assert device.read_bytes()[:8192] == golden("region5-dirty")
    rmap.clear(5)
    assert rmap.commit(everything=True)
    assert device.read_bytes()[:8192] == golden("after-write")
    rmap.close()


# -- resume: dm-log.c disk_resume ------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "dirty"),
    [("insync", set()), ("region5-dirty", {5}), ("after-remove", set()),
     ("nosync-fresh", set())],
)
def test_resume_reads_the_kernels_clean_bits(tmp_path, image, dirty):
    rmap = on_device(tmp_path, device_file(tmp_path, golden(image)))
    outcome = rmap.resume(honor_saved=True, new_regions_clean=False)
    assert outcome.saved_regions == KERNEL_REGIONS
    assert {r for r in range(KERNEL_REGIONS) if not rmap.clean_bits[r]} == dirty
    rmap.close()


@pytest.mark.parametrize("new_clean", [False, True])
def test_a_wiped_device_starts_over_out_of_sync_or_in_sync_for_nosync(tmp_path, new_clean):
    device = device_file(tmp_path)
    rmap = on_device(tmp_path, device)
    outcome = rmap.resume(honor_saved=True, new_regions_clean=new_clean)
    assert outcome.saved_regions == 0 and "no valid header" in outcome.reason
    assert rmap.clean_bits.count(1) == (KERNEL_REGIONS if new_clean else 0)
    rmap.close()
    # The normalised image is written back: a valid header for 128 regions.
    assert header_of(device.read_bytes()) == (MIRROR_MAGIC, 2, KERNEL_REGIONS)


def test_sync_or_nosync_ignores_the_stored_bits(tmp_path):
    rmap = on_device(tmp_path, device_file(tmp_path, golden("region5-dirty")))
    outcome = rmap.resume(honor_saved=False, new_regions_clean=True)
    assert outcome.saved_regions == 0 and "ignored" in outcome.reason
    assert rmap.clean_bits.count(1) == KERNEL_REGIONS
    rmap.close()


def test_growth_gives_new_regions_the_new_region_state(tmp_path):
    device = device_file(tmp_path, golden("region5-dirty"))
    rmap = on_device(tmp_path, device, 200)
    assert rmap.resume(honor_saved=True, new_regions_clean=False).saved_regions == 128
    assert [r for r in range(200) if not rmap.clean_bits[r]] == [5, *range(128, 200)]
    rmap.close()
    assert header_of(device.read_bytes()) == (MIRROR_MAGIC, 2, 200)


def test_shrink_clears_the_tail_of_the_last_word(tmp_path):
    device = device_file(tmp_path, golden("insync"))
    rmap = on_device(tmp_path, device, 100)
    rmap.resume(honor_saved=True, new_regions_clean=False)
    assert rmap.clean_bits.count(1) == 100 and len(rmap.clean_bits) == 128
    rmap.close()
    bitmap = device.read_bytes()[BITMAP_OFFSET : BITMAP_OFFSET + 16]
    assert bitmap == b"\xff" * 12 + b"\x0f" + b"\0" * 3


def test_version_1_is_accepted_and_rewritten_as_2(tmp_path):
    image = bytearray(golden("insync"))
    struct.pack_into("<I", image, 4, 1)
    device = device_file(tmp_path, bytes(image))
    rmap = on_device(tmp_path, device)
    assert rmap.resume(honor_saved=True, new_regions_clean=False).saved_regions == 128
    rmap.close()
    assert header_of(device.read_bytes())[1] == 2


def test_an_unknown_version_reads_as_a_failed_device_with_nothing_saved(tmp_path):
    image = bytearray(golden("region5-dirty"))
    struct.pack_into("<I", image, 4, 3)
    device = device_file(tmp_path, bytes(image))
    rmap = on_device(tmp_path, device)
    outcome = rmap.resume(honor_saved=True, new_regions_clean=False)
    assert "incompatible disk log version 3" in str(outcome.read_error)
    assert outcome.saved_regions == 0 and rmap.clean_bits.count(1) == 0
    rmap.close()
    assert header_of(device.read_bytes()) == (MIRROR_MAGIC, 2, KERNEL_REGIONS)


def test_an_unknown_version_does_not_matter_when_the_bits_are_ignored(tmp_path):
    image = bytearray(golden("region5-dirty"))
    struct.pack_into("<I", image, 4, 3)
    rmap = on_device(tmp_path, device_file(tmp_path, bytes(image)))
    outcome = rmap.resume(honor_saved=False, new_regions_clean=True)
    assert outcome.read_error is None and rmap.clean_bits.count(1) == KERNEL_REGIONS
    rmap.close()


def test_an_unreadable_device_counts_as_nothing_saved(tmp_path):
    device = device_file(tmp_path, golden("insync"))
    rmap = on_device(tmp_path, device)
    os.truncate(device, 100)  # the device shrank under us: a short read
    outcome = rmap.resume(honor_saved=True, new_regions_clean=False)
    assert outcome.read_error is not None and outcome.read_error.errno == errno.EIO
    assert "unreadable" in outcome.reason and rmap.clean_bits.count(1) == 0
    rmap.close()


def test_a_device_smaller_than_the_image_is_refused(tmp_path):
    device = device_file(tmp_path, size=1024)
    with pytest.raises(StoreError, match="too small") as caught:
        on_device(tmp_path, device)
    assert caught.value.errno == errno.EINVAL


# -- commits -----------------------------------------------------------------------------------


def test_no_sync_when_nothing_changed(tmp_path):
    rmap = RegionMap.create(tmp_path / "s.map", 64, clean=True)
    commits = rmap.commits
    assert not rmap.commit() and not rmap.commit(everything=True)
    assert rmap.commits == commits
    rmap.mark(3)
    rmap.mark(3)  # idempotent: still one change
    assert rmap.needs_commit and rmap.commit() and not rmap.needs_commit
    rmap.mark(3)  # already dirty: nothing to commit
    assert not rmap.needs_commit and not rmap.commit()
    rmap.close()


def test_clears_are_committed_lazily(tmp_path):
    rmap = RegionMap.create(tmp_path / "s.map", 64, clean=False)
    rmap.clear(1)
    assert not rmap.needs_commit and not rmap.commit()  # a FLUSH need not sync a clear
    assert rmap.commit(everything=True)  # POSTSUSPEND writes it
    rmap.close()


def test_a_commit_syncs_only_the_pages_that_changed(tmp_path, monkeypatch):
    regions = 8 * 4096 * 3  # a bitmap spanning several pages
    rmap = RegionMap.create(tmp_path / "s.map", regions, clean=True)
    persisted: list[tuple[int, int]] = []
    real = rmap._store.persist
    monkeypatch.setattr(rmap._store, "persist", lambda v, a, b: (persisted.append((a, b)),
                                                                  real(v, a, b)))
    last_region_page = (BITMAP_OFFSET + (regions - 1) // 8) // 4096
    rmap.mark(regions - 1)
    rmap.commit()
    image_end = BITMAP_OFFSET + regions // 8
    assert persisted == [(last_region_page * 4096, image_end)]
    rmap.close()


def test_a_failed_commit_keeps_its_changes_for_the_next_one(tmp_path, monkeypatch):
    rmap = on_device(tmp_path, device_file(tmp_path, golden("insync")))
    rmap.resume(honor_saved=True, new_regions_clean=False)
    rmap.mark(5)

    def failing_fdatasync(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(StoreError) as caught:
        rmap.commit()
    assert caught.value.errno == errno.EIO and not caught.value.device_failed
    monkeypatch.undo()
    assert rmap.needs_commit and rmap.commit()
    rmap.close()


# -- instance files and devices -------------------------------------------------------------------


def test_instance_files_are_per_uuid_and_luid_and_escaped(tmp_path):
    a = instance_file_path(tmp_path, "LVM-abc/def ghi", 0xFFFF8881)
    b = instance_file_path(tmp_path, "LVM-abc/def ghi", 0xFFFF8882)
    assert a != b and a.parent == b.parent == tmp_path / "logs"
    assert "/" not in a.name and " " not in a.name and len(a.name) < 255
    long_uuid = "x" * 128
    assert len(instance_file_path(tmp_path, long_uuid, 2**64 - 1).name) < 255


# Legal dm uuids (printable ASCII, up to 128 characters) whose escaped form is long.
LONG_UUIDS = ["%" * 128, "/" * 52 + "x" * 76, " %" * 64, "a" * 127 + "%", "%" * 76 + "b"]


@pytest.mark.parametrize("uuid", LONG_UUIDS)
def test_every_file_of_a_long_uuid_fits_a_name_and_is_found_again(tmp_path, uuid):
    path = instance_file_path(tmp_path, uuid, 2**64 - 1)
    longest = max(path.name + ".new", path.with_suffix(".ctr").name + ".tmp", key=len)
    assert len(longest.encode()) <= 255 and "/" not in path.name
    RegionMap.create(path, 8, clean=True).close()  # .map.new, then the name itself
    assert instance_files_by_key(tmp_path) == {instance_file_key(uuid): {2**64 - 1: path}}
    # Distinct uuids with the same long prefix get distinct names.
    assert instance_file_path(tmp_path, uuid[:-1] + "!", 1) != instance_file_path(
        tmp_path, uuid, 1)


def test_a_short_uuid_keeps_the_name_older_servers_gave_it(tmp_path):
    assert instance_file_path(tmp_path, "LVM-a/b", 0x10).name == "LVM-a%2Fb@0000000000000010.map"
    assert uuid_of_key(instance_file_key("LVM-a/b c")) == "LVM-a/b c"
    assert uuid_of_key(instance_file_key("%" * 128)) is None  # hashed: see its CTR record


def test_instance_files_are_listed_by_uuid_and_luid(tmp_path):
    odd = "LVM-a@b/c d"  # quoted in the name; an @ of its own
    paths = {(uuid, luid): instance_file_path(tmp_path, uuid, luid)
             for uuid, luid in (("u", 1), ("u", 2), (odd, 2**64 - 1))}
    for path in paths.values():
        RegionMap.create(path, 8, clean=True).close()
    (tmp_path / "logs" / "u@zz.map").touch()  # not an instance file's name
    (tmp_path / "logs" / "u@1.ctr").touch()
    assert instance_files_by_key(tmp_path) == {
        "u": {1: paths["u", 1], 2: paths["u", 2]},
        instance_file_key(odd): {2**64 - 1: paths[odd, 2**64 - 1]}}
    assert instance_files_by_key(tmp_path / "nowhere") == {}


def test_replacing_an_instance_file_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "logs" / "x.map"
    RegionMap.create(path, 8, clean=True).close()
    RegionMap.create(path, 8, clean=False).close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.map"]
    assert path.read_bytes()[BITMAP_OFFSET] == 0


def test_a_regular_file_resolves_to_itself_without_a_device_name(tmp_path):
    path = device_file(tmp_path)
    assert resolve_device(str(path), tmp_path / "dev") == (path, None)


def test_a_missing_device_is_an_error(tmp_path):
    with pytest.raises(StoreError) as caught:
        resolve_device(str(tmp_path / "missing"), tmp_path / "dev")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(StoreError, match="no block device 4095:1048575"):
        resolve_device("4095:1048575", tmp_path / "dev")


# -- the instance file: what a restarted server finds ------------------------------------------


def test_sync_bits_and_unflushed_marks_survive_in_the_instance_file(tmp_path):
    device = device_file(tmp_path, golden("insync"))
    rmap = on_device(tmp_path, device)
    rmap.resume(honor_saved=True, new_regions_clean=False)
    rmap.mark(5)  # acknowledged (MARK_REGION), not yet flushed
    rmap.sync_bits[9] = 0  # recovery of region 9 failed, and it was never clean since
    rmap.mark(9)
    # The server dies here: nothing more is written.  A new one reopens the instance.
    again = RegionMap.reopen(tmp_path / "instance.map", KERNEL_REGIONS, device=device)
    assert again is not None
    assert not again.clean_bits[5] and not again.clean_bits[9] and not again.sync_bits[9]
    assert again.sync_bits[5]  # marked, but in sync: as the kernel believes
    assert device.read_bytes()[:8192] == golden("insync")  # the marks never reached it
    again.push()
    expected = bytearray(golden("region5-dirty"))
    expected[BITMAP_OFFSET + 1] &= ~(1 << 1)  # region 9
    assert device.read_bytes()[:8192] == bytes(expected)
    again.close()
    rmap.close()


def test_reopen_finds_nothing_where_no_whole_instance_is(tmp_path):
    path = tmp_path / "i.map"
    assert RegionMap.reopen(path, 64) is None
    RegionMap.create(path, 64, clean=True).close()
    assert RegionMap.reopen(path, 65) is None  # made for another region count
    data = bytearray(path.read_bytes())
    data[4096] ^= 0xFF  # the sync section's magic
    path.write_bytes(bytes(data))
    assert RegionMap.reopen(path, 64) is None


def test_a_memory_only_core_map_fails_its_commits(tmp_path):
    rmap = RegionMap.create(None, 64, clean=True)
    rmap.mark(1)
    with pytest.raises(StoreError, match="no instance file"):
        rmap.commit()
    rmap.close()
