"""The log table on real block devices (loop devices) and a full tmpfs: root."""

from __future__ import annotations

import errno
import os
import subprocess

from shardlog.log.logtable import LogTable
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import Kernel, requires_root
from ..unit.log.test_logtable import CORE, NOSYNC, resumed


def test_version_2_ctr_of_a_block_device_log_returns_its_major_minor(kernel, loop_device):
    st = os.stat(loop_device)
    name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    ctr = f"8192 disk {name} 1024"
    assert kernel.ctr(ctr, version=2) == (0, f"{name}\0".encode())
    assert kernel.ctr(ctr, version=2) == (0, f"{name}\0".encode())  # re-sent: same answer
    assert kernel.ctr(ctr, reconnect=True) == (0, b"")  # no reply buffer on reconnect
    v1 = Kernel(kernel.table, uuid="v1")
    assert v1.ctr(ctr, version=1) == (0, b"")  # version 1 kernels take no device name


def test_a_full_filesystem_fails_new_logs_and_spares_existing_ones(tmp_path, caplog):
    requires_root("mounting a tiny tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    table = LogTable(mount)
    try:
        first = resumed(Kernel(table, uuid="first"), NOSYNC)
        results = [Kernel(table, uuid=f"log{i}").ctr(CORE)[0] for i in range(40)]
        assert -errno.ENOSPC in results and "cannot allocate" in caplog.text
        first.ok(T.FLUSH, protocol.pack_regions([1]))  # the existing log still works
        assert first.in_sync(1) == 1
    finally:
        for dirty_log in table.logs.values():
            dirty_log.region_map.close()  # release the mappings so the mount can go
        # Lazy: a mapping still held somewhere must not leave the mount behind.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_status_info_is_the_kernels_format_for_clustered_types_too(kernel, loop_device):
    st = os.stat(loop_device)
    name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    assert kernel.ctr(f"8192 clustered-disk {loop_device} 1024") == (0, f"{name}\0".encode())
    kernel.ok(T.RESUME)
    assert kernel.status_info() == f"3 disk {name} A\0"  # what LVM's parser reads
    core = Kernel(kernel.table, uuid="core")
    resumed(core, "8192 clustered-core 1024")
    assert core.status_info() == "1 core\0"
