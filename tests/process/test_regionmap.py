"""Region maps and device resolution on a real block device (a loop device: root)."""

from __future__ import annotations

import mmap
import os

from shardlog.storage import devices
from shardlog.storage.devices import resolve_device

from ..unit.storage.test_regionmap import golden, on_device


def test_a_real_block_device_by_path_and_by_major_minor(loop_device, tmp_path):
    st = os.stat(loop_device)
    name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    assert resolve_device(str(loop_device), tmp_path / "dev") == (loop_device, name)
    assert resolve_device(name, tmp_path / "dev") == (loop_device, name)


def test_a_device_node_is_made_when_dev_has_none(loop_device, tmp_path, monkeypatch):
    st = os.stat(loop_device)
    name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    monkeypatch.setattr(devices, "_sysfs_devname", lambda _: "no-such-node-in-dev")
    path, got = resolve_device(name, tmp_path / "dev")
    assert got == name and path == tmp_path / "dev" / name
    assert os.stat(path).st_rdev == st.st_rdev


def test_a_block_device_log_is_written_with_direct_io(loop_device, tmp_path):
    with open(loop_device, "r+b") as f:
        f.write(golden("insync"))
    rmap = on_device(tmp_path, loop_device)
    rmap.resume(honor_saved=True, new_regions_clean=False)
    rmap.mark(5)
    rmap.commit()
    rmap.close()
    fd = os.open(loop_device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8192)
        os.preadv(fd, [buf], 0)
        assert bytes(buf) == golden("region5-dirty")
    finally:
        os.close(fd)
