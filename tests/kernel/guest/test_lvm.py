"""Real LVM mirrors (lvm2, its configuration in a scratch directory: kernelvm/lvm.py)
moved onto shardlog by ``shardlog adopt`` and back by ``release``, with no resync:
what the kernel's table and status say, what ``lvs`` says, the legs' contents.

``shardlog adopt`` runs in this process (cli.main: one Python start under emulation
costs seconds) except where its exit code as a process is the point."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from shardlog import cli
from shardlog.harness.kernelvm import guest
from shardlog.harness.kernelvm.guest import WriteLoop, direct_read, direct_write
from shardlog.harness.kernelvm.lvm import LOOP_DEVICES, Lvm
from shardlog.tools import dmtable

from .conftest import Rig

PV_SIZE = 48 << 20
REGION = "128k"
REGION_BYTES = 128 << 10


class LvmRig:
    """A volume group on three loop PVs; everything in it is deactivated and removed
    afterwards, with a server up (an adopted mirror's log needs one to go away)."""

    def __init__(self, rig: Rig, vg: str, pv_read_delay_ms: int = 0):
        self.rig, self.vg = rig, vg
        # Slow PVs are dm-delay devices over the loops: LVM must not see the loops too
        # (the same PV twice).
        self.lvm = Lvm(rig.root / "lvm",
                       accept=f"^/dev/mapper/{vg}-slowpv[0-9]$" if pv_read_delay_ms
                       else LOOP_DEVICES)
        pvs = [str(loop.path) for loop in (rig.loop(PV_SIZE) for _ in range(3))]
        if pv_read_delay_ms:
            pvs = [self._slow(pv, i, pv_read_delay_ms) for i, pv in enumerate(pvs)]
        rig.cleanup.append(self._remove)
        self.lvm("vgcreate", "-q", vg, *pvs)

    def _slow(self, pv: str, index: int, delay_ms: int) -> str:
        """A dm-delay device over ``pv`` whose reads take ``delay_ms`` longer (resync
        copies by reading a leg: this makes it last)."""
        name = f"{self.vg}-slowpv{index}"
        sectors = PV_SIZE // guest.SECTOR
        guest.dmsetup("create", name, "--table", f"0 {sectors} delay {pv} 0 {delay_ms} "
                      f"{pv} 0 0")
        self.rig.cleanup.append(lambda: guest.dmsetup("remove", "--force", name,
                                                      check=False))
        return f"/dev/mapper/{name}"

    def _remove(self) -> None:
        self.rig.start_server()
        self.lvm("vgchange", "-an", self.vg, check=False)
        self.lvm("vgremove", "-ff", self.vg, check=False)

    def mirror(self, lv: str, *options: str, size: str = "16M") -> str:
        self.lvm("lvcreate", "-q", "-y", "--type", "mirror", "-L", size, "-R", REGION,
                 "-n", lv, *options, self.vg)
        return f"{self.vg}/{lv}"

    def dm_name(self, lv: str) -> str:
        return dmtable.lvm_dm_name(self.vg, lv)

    def table(self, lv: str) -> dmtable.MirrorTable:
        return dmtable.parse_mirror_table(guest.dmsetup("table", self.dm_name(lv)))

    def status(self, lv: str) -> dmtable.MirrorStatus:
        return dmtable.parse_mirror_status(guest.dmsetup("status", self.dm_name(lv)))

    def wait_synced(self, lv: str, timeout: float = 180.0) -> dmtable.MirrorStatus:
        deadline = time.monotonic() + timeout
        while not (status := self.status(lv)).synced:
            assert time.monotonic() < deadline, f"{lv} not in sync: {status}"
            time.sleep(0.3)
        return status

    def image(self, lv: str, leg: int) -> Path:
        return Path("/dev/mapper") / self.dm_name(f"{lv}_mimage_{leg}")

    def dm_uuid(self, lv: str) -> str:
        return guest.dmsetup("info", "-c", "--noheadings", "-o", "uuid",
                             self.dm_name(lv)).strip()


def shardlog(*args: str) -> tuple[int, str, str]:
    """``shardlog ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def adopt(rig: Rig, *args: str) -> str:
    code, out, err = shardlog("adopt", "--socket", str(rig.server.control_socket), *args)
    assert code == 0, out + err
    return out


def fio_writes(device: str, size: str = "512k") -> dict:
    """fio: random 4 KiB O_DIRECT writes from 1 MiB on (the witnesses' regions are
    below), 2 in flight; its report (exit 0 and no error, asserted)."""
    result = subprocess.run(
        ["fio", "--name=adopted", f"--filename={device}", "--offset=1M", "--rw=randwrite",
         "--bs=4k",
         "--direct=1", "--ioengine=psync", "--numjobs=2", f"--io_size={size}",
         "--output-format=json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert all(job["error"] == 0 for job in report["jobs"]), report["jobs"]
    assert sum(job["write"]["total_ios"] for job in report["jobs"]) > 0
    return report


def plant_witness(lvm: LvmRig, lv: str, region: int) -> tuple[int, bytes]:
    """A block written to the last leg only, behind the mirror's back, in a clean region
    below 1 MiB (no other write goes there): only a resync of that region would erase
    it."""
    witness = (f"only-on-the-last-leg:{lv};".encode() * 200)[:4096]
    offset = region * REGION_BYTES
    legs = len(lvm.table(lv).legs)
    direct_write(lvm.image(lv, legs - 1), offset, witness)
    return offset, witness


def legs_identical(lvm: LvmRig, lv: str) -> None:
    legs = len(lvm.table(lv).legs)
    for leg in range(1, legs):
        assert guest.differing_chunks(lvm.image(lv, 0), lvm.image(lv, leg)) == [], leg


def test_lvm_mirror_adopted_survives_a_server_kill_released_and_reactivated_no_resync(rig):
    server = rig.start_server()
    lvm = LvmRig(rig, "vga")
    lv = lvm.mirror("m", "-m1", "--mirrorlog", "disk")
    other = lvm.mirror("other", "-m1", "--mirrorlog", "disk", size="4M")
    regions = lvm.wait_synced("m").regions  # the kernel's own resync, with its own log
    assert regions == 128
    witness_offset, witness = plant_witness(lvm, "m", 5)
    kernel_log = lvm.table("m").log

    out = adopt(rig, lv)
    assert "vga/m (vga-m): adopted, 128/128 in sync" in out
    table = lvm.table("m")
    assert table.log.on_shardlog and table.log.uuid == lvm.dm_uuid("m")
    assert (table.log.device, table.log.region_sectors) == (kernel_log.device, 256)
    assert table.features == ("handle_errors",)
    status = lvm.status("m")
    assert status.synced and status.health == "AA"
    assert status.log_status == ("3", "disk", kernel_log.device, "A")
    report = lvm.lvm.report(lv, "copy_percent", "lv_health_status", "lv_attr")
    assert report["copy_percent"] == "100.00" and report["lv_health_status"] == ""
    assert "already" in adopt(rig, f"/dev/{lv}")  # idempotent
    code, out, _ = shardlog("status", "--socket", str(server.control_socket))
    assert code == 0 and "vga/m" in out, out
    fio_writes(f"/dev/{lv}", size="256k")

    writer = WriteLoop(f"/dev/{lv}", 16 << 20, count=60, first_block=1).start()
    deadline = time.monotonic() + 60
    while writer.written < 10 and not writer.errors and time.monotonic() < deadline:
        time.sleep(0.1)
    server.kill()  # front and workers, while the writes go on
    # No server: neither way may load anything (the suspend, or the mirror's I/O,
    # would wait for a server for ever).
    tables = {name: lvm.table(name) for name in ("m", "other")}
    code, _, err = shardlog("adopt", "--socket", str(server.control_socket), other)
    assert code == 1 and "vga/other (vga-other): refused: no shardlog server" in err, err
    code, _, err = shardlog("release", "--socket", str(server.control_socket), lv)
    assert code == 1 and "vga/m (vga-m): refused: no shardlog server" in err, err
    assert {name: lvm.table(name) for name in ("m", "other")} == tables
    rig.start_server()
    writer.join(180)
    assert writer.errors == [] and writer.written == 60
    assert lvm.status("m").synced  # no resync

    code, out, err = shardlog("release", "--socket", str(rig.server.control_socket), lv)
    assert code == 0 and "released, 128/128 in sync" in out, out + err
    assert lvm.table("m").log == kernel_log
    lvm.lvm("lvchange", "-an", lv)
    lvm.lvm("lvchange", "-ay", lv)
    assert lvm.status("m").synced
    assert lvm.table("m").log == kernel_log
    assert direct_read(lvm.image("m", 1), witness_offset, 4096) == witness  # no resync
    direct_write(f"/dev/{lv}", witness_offset, witness)  # mirrored again: both legs
    legs_identical(lvm, "m")


def test_a_mirror_adopted_while_resyncing_finishes_its_resync_through_shardlog(rig):
    server = rig.start_server()
    lvm = LvmRig(rig, "vgr", pv_read_delay_ms=60)  # the copy reads leg 0: slowly
    lv = lvm.mirror("m", "-m1", "--mirrorlog", "disk")
    before = lvm.status("m")
    adopt(rig, lv)
    after = lvm.status("m")
    assert not after.synced, "the resync ended before adopt: the test proved nothing"
    assert before.in_sync <= after.in_sync
    assert lvm.table("m").log.on_shardlog
    status = lvm.wait_synced("m", timeout=300)  # the kernel asks shardlog for the work
    assert status.regions == 128
    code, out, _ = shardlog("status", "--json", "--socket", str(server.control_socket))
    assert code == 0
    (log,) = json.loads(out)["logs"]
    assert log["device"] == "vgr/m" and log["in_sync"] == 128
    legs_identical(lvm, "m")


def test_lvextend_of_an_adopted_three_leg_mirror_brings_back_the_kernel_log(rig):
    rig.start_server()
    lvm = LvmRig(rig, "vge")
    lv = lvm.mirror("m", "-m2", "--mirrorlog", "disk", size="8M")
    lvm.wait_synced("m")
    witness_offset, witness = plant_witness(lvm, "m", 3)
    assert "adopted, 64/64" in adopt(rig, "--integrated-flush", lv)
    table = lvm.table("m")
    assert table.log.on_shardlog and table.log.integrated_flush and len(table.legs) == 3
    assert lvm.status("m").health == "AAA"
    fio_writes(f"/dev/{lv}", size="256k")

    lvm.lvm("lvextend", "-q", "-L", "+4M", lv)  # LVM's reload: its own table again
    table = lvm.table("m")
    assert table.log.kind == "disk" and len(table.legs) == 3
    assert lvm.status("m").in_sync >= 64  # the old regions kept their state
    assert lvm.wait_synced("m").regions == 96  # the new ones resynced by the kernel
    assert "adopted, 96/96" in adopt(rig, lv)
    assert lvm.table("m").log.on_shardlog
    assert direct_read(lvm.image("m", 2), witness_offset, 4096) == witness  # no resync
    direct_write(f"/dev/{lv}", witness_offset, witness)
    fio_writes(f"/dev/{lv}", size="128k")
    legs_identical(lvm, "m")


def test_adopt_refuses_a_core_log_a_linear_lv_an_unknown_name_and_changes_nothing(rig):
    """(No server: the first scenario, while its server is dead.)  As a process: the
    exit code, one line each on stderr."""
    server = rig.start_server()
    lvm = LvmRig(rig, "vgn")
    lvm.mirror("core", "-m1", "--mirrorlog", "core", size="4M")
    lvm.lvm("lvcreate", "-q", "-y", "-L", "4M", "-n", "lin", "vgn")
    names = [lvm.dm_name(lv) for lv in ("core", "lin")]
    tables = {name: guest.dmsetup("table", name) for name in names}
    result = subprocess.run(
        [sys.executable, "-m", "shardlog.cli", "adopt", "--socket",
         str(server.control_socket), "/dev/vgn/core", "/dev/mapper/vgn-lin", "vgn/nothing"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert "vgn/core (vgn-core): refused: its log is the kernel's core log" in lines[0]
    assert "resync" in lines[0] and "lvconvert --mirrorlog disk" in lines[0]
    assert "vgn/lin (vgn-lin): refused: not a mirror shardlog can take: a linear" in lines[1]
    assert "vgn/nothing: failed" in lines[2]
    assert {name: guest.dmsetup("table", name) for name in names} == tables
    # --all skips the core-log mirror (saying why) and touches nothing
    code, out, _ = shardlog("adopt", "--all", "--socket", str(server.control_socket))
    assert code == 0 and "vgn/core (vgn-core): skipped: its log is the kernel's core" in out
    assert {name: guest.dmsetup("table", name) for name in names} == tables
