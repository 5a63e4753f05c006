"""`shardlog inspect`: real instance files and log devices, written by a real server or the
kernel (the captured images), read offline; and the files it must refuse, with why."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import struct
from pathlib import Path

import pytest

from shardlog.log.logtable import LogTable
from shardlog.storage.errors import STATE_FILE
from shardlog.storage.image import ImageError, read_stored_image
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.tools import inspection
from shardlog.tools.inspection import compact, ranges
from shardlog.wire.protocol import RequestType as T

from ...conftest import DISKLOG_IMAGES, Kernel
from ..cli.test_cli import shardlog


def inspect_json(path: Path) -> dict:
    result = shardlog("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_kernel_disk_log_image_shows_its_one_dirty_region():
    image = DISKLOG_IMAGES / "disklog-region5-dirty.bin"
    result = shardlog("inspect", str(image))
    assert result.returncode == 0, result.stderr
    assert "disk log image, 8192 bytes" in result.stdout
    assert "magic 0x4d695272, version 2, 128 regions" in result.stdout
    assert "clean         127 of 128 (1 dirty)" in result.stdout
    assert "dirty         5\n" in result.stdout + "\n"
    summary = inspect_json(image)
    assert summary["dirty_ranges"] == [[5, 5]] and "in_sync" not in summary


def test_an_instance_file_shows_uuid_luid_and_both_maps(table, state_dir):
    kernel = Kernel(table, uuid="LVM-vg/lv", luid=0xABC)
    kernel.ctr("1000 core 8 nosync")
    kernel.ok(T.RESUME)
    kernel.regions(T.MARK_REGION, 3, 4, 5, 9)
    kernel.ok(T.FLUSH)
    kernel.set_region_sync(100, False)
    path = instance_file_path(state_dir, "LVM-vg/lv", 0xABC)
    summary = inspect_json(path)
    assert summary["uuid"] == "LVM-vg/lv" and summary["luid"] == "0x0000000000000abc"
    assert summary["region_count"] == 125 and summary["resumed"] is True
    # A region out of sync is never clean (regionmap: a clean bit only for a synced one).
    assert summary["dirty"] == 5 and summary["dirty_ranges"] == [[3, 5], [9, 9], [100, 100]]
    assert summary["out_of_sync"] == 1 and summary["out_of_sync_ranges"] == [[100, 100]]
    text = shardlog("inspect", str(path)).stdout
    assert "dirty         3-5,9,100\n" in text and "out of sync   100" in text


def test_the_uuid_of_a_hashed_file_name_comes_from_its_ctr_record(table, state_dir):
    uuid = "%/" * 64  # 128 characters, 384 escaped: the name is hashed
    kernel = Kernel(table, uuid=uuid, luid=7)
    assert kernel.ctr("64 core 8 nosync") == (0, b"")
    path = instance_file_path(state_dir, uuid, 7)
    assert uuid not in path.name and path.exists()
    summary = inspect_json(path)
    assert summary["uuid"] == uuid and summary["luid"] == "0x0000000000000007"


# -- what it refuses -----------------------------------------------------------------------


def corrupt_copy(tmp_path: Path, name: str, offset: int, data: bytes) -> Path:
    path = tmp_path / name
    shutil.copy(DISKLOG_IMAGES / "disklog-insync.bin", path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


@pytest.mark.parametrize("name, offset, data, expected", [
    ("garbage.bin", 0, b"NOPE", "bad magic 0x45504f4e (expected 0x4d695272 'MiRr'): not a"),
    ("wiped.bin", 0, bytes(16), "bad magic 0x00000000 (expected 0x4d695272 'MiRr'): all "
     "zeros: a new or wiped log device"),
    ("future.bin", 4, struct.pack("<I", 7), "unknown disk log version 7"),
])
def test_a_corrupt_image_is_explained_and_exits_1(tmp_path, name, offset, data, expected):
    path = corrupt_copy(tmp_path, name, offset, data)
    result = shardlog("inspect", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"shardlog inspect: {path}: {expected}"), result.stderr


def test_a_truncated_image_says_how_long_it_should_be(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes((DISKLOG_IMAGES / "disklog-insync.bin").read_bytes()[: BITMAP_OFFSET + 8])
    result = shardlog("inspect", str(path))
    assert result.returncode == 1
    assert "truncated: the header says 128 regions, which need 1040 bytes; it has 1032" \
        in result.stderr
    (tmp_path / "tiny.bin").write_bytes(b"MiR")
    result = shardlog("inspect", str(tmp_path / "tiny.bin"))
    assert result.returncode == 1 and "truncated: 3 bytes, a header needs 16" in result.stderr


def test_a_truncated_or_foreign_instance_file_is_refused(table, state_dir, tmp_path):
    kernel = Kernel(table, uuid="cut")
    kernel.ctr("1000 core 8")
    kernel.ok(T.RESUME)
    whole = instance_file_path(state_dir, "cut", kernel.luid).read_bytes()
    cut = tmp_path / "cut@0000000000000001.map"
    cut.write_bytes(whole[:4096])
    result = shardlog("inspect", str(cut))
    assert result.returncode == 1
    assert "truncated instance file: 125 regions need 8192 bytes with the sync page; it " \
           "has 4096" in result.stderr
    # Its sync page overwritten: not ours.
    foreign = tmp_path / "foreign@0000000000000001.map"
    foreign.write_bytes(whole[:4096] + bytes(4096))
    result = shardlog("inspect", str(foreign))
    assert result.returncode == 1 and "bad sync page magic at byte 4096" in result.stderr
    future = tmp_path / "future@0000000000000001.map"
    future.write_bytes(whole[:4100] + struct.pack("<I", 9) + whole[4104:])
    result = shardlog("inspect", str(future))
    assert result.returncode == 1 and "unknown sync page version 9" in result.stderr


def test_a_missing_file_exits_1_and_no_argument_exits_2(tmp_path):
    result = shardlog("inspect", str(tmp_path / "absent.map"))
    assert result.returncode == 1
    assert "cannot open" in result.stderr and "No such file or directory" in result.stderr
    result = shardlog("inspect", str(tmp_path))
    assert result.returncode == 1 and "is not a file or a block device" in result.stderr
    assert shardlog("inspect").returncode == 2


def test_reading_a_damaged_file_counts_no_worker_storage_error(table, state_dir, tmp_path):
    kernel = Kernel(table, uuid="counted", luid=3)
    kernel.ctr("1000 core 8 nosync")
    kernel.ok(T.RESUME)
    damaged = tmp_path / "damaged.map"
    damaged.write_bytes(instance_file_path(state_dir, "counted", 3).read_bytes()[:2000])
    with pytest.raises(ImageError, match="truncated"):
        read_stored_image(damaged)
    args = argparse.Namespace(path=tmp_path / "missing.map", json=False, all=False)
    assert inspection.run(args) == inspection.EXIT_ERROR
    # Storage errors are counted by whoever serves a log and handles one, not where they
    # are made: inspect's, in the worker's own process, are no worker's failures.
    assert table.storage_failures.take() == {}
    unusable = tmp_path / "not-a-directory"
    unusable.write_text("")
    broken = LogTable(unusable)
    assert Kernel(broken).ctr("1000 core 8")[0] == -errno.ENOTDIR
    assert broken.storage_failures.take() == {STATE_FILE: 1}
    assert broken.storage_failures.take() == {}  # taken once


def test_inspect_never_writes(tmp_path):
    path = corrupt_copy(tmp_path, "image.bin", BITMAP_OFFSET, b"\x0f")
    before = path.read_bytes()
    path.chmod(0o444)
    assert inspect_json(path)["dirty_ranges"] == [[4, 7]]
    assert path.read_bytes() == before


def test_ranges_are_the_runs_and_compact_cuts_long_lists():
    from bitarray import bitarray

    bits = bitarray("1100010111", endian="little")
    assert ranges(bits, 0) == [[2, 4], [6, 6]]
    assert ranges(bits, 1) == [[0, 1], [5, 5], [7, 9]]
    assert compact(ranges(bits, 1)) == "0-1,5,7-9"
    assert compact(ranges(bits, 1), limit=1) == "0-1,... (2 more ranges: --all)"
    assert compact([]) == "none"
