"""The real kernel's dm-mirror with shardlog as its userspace log: what the kernel
reports (dmsetup status, the legs' content, dmesg) and what shardlog keeps on disk."""

from __future__ import annotations

import os

import pytest

from shardlog.harness.kernelvm import guest
from shardlog.harness.kernelvm.guest import LogImage, Mirror, WriteLoop, direct_read, direct_write

from .conftest import REGION_SECTORS, SECTORS, Rig

REGIONS = SECTORS // REGION_SECTORS
REGION_BYTES = REGION_SECTORS * guest.SECTOR


def block(tag: str, size: int = 4096) -> bytes:
    text = f"{tag};".encode()
    return (text * (size // len(text) + 1))[:size]


def write_and_read_back(mirror: Mirror, legs: list[guest.Loop], count: int = 12) -> None:
    """O_DIRECT writes spread over the regions, read back through the mirror and found
    on every leg."""
    offsets = [(i * 7 % REGIONS) * REGION_BYTES + (i % 8) * 4096 for i in range(count)]
    for i, offset in enumerate(offsets):
        direct_write(mirror.path, offset, block(f"{mirror.name}:{i}"))
    for i, offset in enumerate(offsets):
        expected = block(f"{mirror.name}:{i}")
        assert direct_read(mirror.path, offset, 4096) == expected
        for leg in legs:
            assert direct_read(leg.path, offset, 4096) == expected, f"{leg.path} at {offset}"


def expected_log_status(log: str, log_device: guest.Loop | None) -> list[str]:
    """The in-kernel logs' STATUS_INFO, which shardlog's must equal (LVM parses it)."""
    return ["1", "core"] if log == "core" else ["3", "disk", log_device.number, "A"]


def no_kernel_errors(since: str) -> None:
    """No line the kernel logged after ``since`` (an earlier dmesg) says a mirror
    failed or a userspace log request went wrong."""
    new = guest.kernel_log()[len(since):]
    bad = [line for line in new.splitlines()
           if any(word in line for word in ("error", "failed", "Unable", "not found",
                                            "Attempting to contact"))]
    assert not bad, "\n".join(bad)


def life_cycle(rig: Rig, log: str, integrated_flush: bool) -> None:
    server = rig.start_server()
    before = guest.kernel_log()
    legs = rig.legs()
    log_device = rig.loop(1 << 20) if log == "disk" else None
    name = f"m-{log}{'-if' if integrated_flush else ''}"
    table = guest.mirror_table(
        SECTORS, [str(leg.path) for leg in legs], log=log,
        log_device=log_device.number if log_device else None, region_sectors=REGION_SECTORS,
        nosync=True, uuid=f"uuid-{name}", integrated_flush=integrated_flush)
    mirror = rig.mirror(name, table)
    # The kernel answers `table` itself; the log arguments it shows are the ones it sent.
    assert "userspace" in mirror.kernel_table()
    assert len(guest.instance_files(rig.state_dir)) == 1

    write_and_read_back(mirror, legs)
    status = mirror.status()
    assert (status.in_sync, status.regions) == (REGIONS, REGIONS)
    assert status.health == "AA"
    assert status.log_status == expected_log_status(log, log_device)

    mirror.suspend()
    mirror.resume()
    write_and_read_back(mirror, legs, count=4)
    assert mirror.status().synced

    mirror.remove()
    assert guest.instance_files(rig.state_dir) == []  # DTR removed the instance file
    if log_device is not None:
        # The log device holds the kernel's own disk log image: every region clean.
        image = LogImage.of_device(log_device.path)
        assert image.valid and image.region_count == REGIONS
        assert image.clean == set(range(REGIONS))
    assert server.process.poll() is None
    no_kernel_errors(before)


@pytest.mark.parametrize("log", ["core", "disk"])
def test_core_and_disk_logs_create_write_status_suspend_resume_remove(rig, log):
    life_cycle(rig, log, integrated_flush=False)


@pytest.mark.parametrize("log", ["core", "disk"])
def test_integrated_flush_carries_marks_in_flush(rig, log):
    life_cycle(rig, log, integrated_flush=True)


def test_full_resync_through_shardlog_while_writes_continue(rig):
    rig.start_server()
    before = guest.kernel_log()
    legs = rig.legs(fills=(b"primary!", None))
    assert guest.differing_chunks(legs[0].path, legs[1].path)  # they differ everywhere
    table = guest.mirror_table(SECTORS, [str(leg.path) for leg in legs],
                               region_sectors=REGION_SECTORS, uuid="uuid-resync")
    mirror = rig.mirror("m-resync", table)
    writes = WriteLoop(mirror.path, guest.device_size(mirror.path)).start()
    status = mirror.wait_synced(timeout=180)
    writes.stop()
    assert writes.errors == []
    assert writes.written > 0
    assert (status.in_sync, status.regions) == (REGIONS, REGIONS)
    mirror.remove()
    assert guest.differing_chunks(legs[0].path, legs[1].path) == []  # cmp of the legs
    no_kernel_errors(before)


def test_guest_runs_as_root_with_the_real_kernel():
    assert os.geteuid() == 0
    assert guest.has_userspace_log()
