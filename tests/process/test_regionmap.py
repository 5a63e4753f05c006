"""Region maps and device resolution on a real block device (a loop device: root)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

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
    # The bytes read back below would match a buffered write too (an O_DIRECT read
    # writes the page cache back first): the open file itself must be O_DIRECT.
    held = [fd for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(loop_device)]
    assert held, "the log device is not held open"
    for fd in held:
        flags = int(dict(line.split(":\t") for line in Path(
            f"/proc/self/fdinfo/{fd}").read_text().splitlines())["flags"], 8)
        assert flags & os.O_DIRECT, f"fd {fd} on the log device is not O_DIRECT"
    rmap.close()
    fd = os.open(loop_device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8192)
        os.preadv(fd, [buf], 0)
        assert bytes(buf) == golden("region5-dirty")
    finally:
        os.close(fd)
