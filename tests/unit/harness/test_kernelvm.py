"""The VM harness's own parts that need no VM: module load order, table lines, status
parsing, the disk log image reader, a guest run that times out or hangs."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import pytest

from shardlog.harness.kernelvm import guest, image, lean, runner
from shardlog.harness.kernelvm.guest import LogImage, MirrorStatus
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ...conftest import PROJECT


def test_modules_come_after_their_dependencies_and_built_ins_are_left_out(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/md/dm-mirror.ko: kernel/drivers/md/dm-region-hash.ko "
        "kernel/drivers/md/dm-log.ko kernel/drivers/md/dm-mod.ko\n"
        "kernel/drivers/md/dm-region-hash.ko: kernel/drivers/md/dm-log.ko "
        "kernel/drivers/md/dm-mod.ko\n"
        "kernel/drivers/md/dm-log.ko: kernel/drivers/md/dm-mod.ko\n"
        "kernel/drivers/md/dm-mod.ko:\n"
        "kernel/drivers/block/loop.ko.xz:\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = [p.name for p in image.modules_in_load_order(
        tmp_path, ("virtio_pci", "loop", "dm-mirror"))]
    assert order == ["loop.ko.xz", "dm-mod.ko", "dm-log.ko", "dm-region-hash.ko",
                     "dm-mirror.ko"]
    with pytest.raises(image.ImageError, match="dm-nothing"):
        image.modules_in_load_order(tmp_path, ("dm-nothing",))


def test_mirror_tables_count_the_userspace_logs_arguments():
    legs = ["/dev/loop0", "/dev/loop1"]
    # The counts as kernel-vm.md records them working with the real kernel.
    assert guest.mirror_table(131072, legs, region_sectors=1024, uuid="U") == \
        "0 131072 mirror userspace 3 U core 1024 2 /dev/loop0 0 /dev/loop1 0"
    assert guest.mirror_table(131072, legs, region_sectors=1024, uuid="U",
                              integrated_flush=True) == \
        "0 131072 mirror userspace 4 U integrated_flush core 1024 2 /dev/loop0 0 /dev/loop1 0"
    assert guest.mirror_table(131072, legs, log="disk", log_device="7:2",
                              region_sectors=1024, uuid="U") == \
        "0 131072 mirror userspace 4 U disk 7:2 1024 2 /dev/loop0 0 /dev/loop1 0"
    assert guest.mirror_table(8, legs, log="disk", log_device="7:2", region_sectors=8,
                              nosync=True) == \
        "0 8 mirror disk 3 7:2 8 nosync 2 /dev/loop0 0 /dev/loop1 0"


def test_mirror_status_as_the_kernel_prints_it():
    status = MirrorStatus.parse("0 131072 mirror 2 7:0 7:1 97/128 1 AD 3 disk 7:2 A")
    assert (status.legs, status.in_sync, status.regions) == (["7:0", "7:1"], 97, 128)
    assert status.health == "AD" and not status.synced
    assert status.log_status == ["3", "disk", "7:2", "A"]
    with pytest.raises(guest.GuestError):
        MirrorStatus.parse("0 8 linear 7:0 0")


def test_log_image_reads_the_kernels_disk_log_layout():
    data = bytearray(4096)
    struct.pack_into("<IIQ", data, 0, guest.DISK_LOG_MAGIC, 2, 20)
    data[BITMAP_OFFSET] = 0b0000_0101  # regions 0 and 2 clean
    data[BITMAP_OFFSET + 2] = 0b0000_1000  # region 19
    image_ = LogImage.read(bytes(data))
    assert image_.valid and image_.region_count == 20
    assert image_.clean == {0, 2, 19}
    assert not LogImage.read(bytes(4096)).valid
    assert guest.CLEAN_BITS_OFFSET == BITMAP_OFFSET


def test_the_guest_script_runs_in_the_project_with_the_venv_first(tmp_path):
    script = runner.guest_script("echo hi", {"EXTRA": "a b"})
    assert f"cd {image.project_root()}" in script
    assert "DM_DISABLE_UDEV=1" in script and "export EXTRA='a b'" in script
    assert script.rstrip().endswith("echo hi")


def test_a_guest_that_hangs_is_killed_at_its_timeout_with_nothing_left(tmp_path,
                                                                        monkeypatch):
    # No VM: a "qemu" that ignores its arguments and hangs, with a child of its own.
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho booting\nsleep 300 &\necho $! > "
                    f"{tmp_path}/child.pid\nsleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    fake_image = image.GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i",
                                  version="test")
    started = time.monotonic()
    result = runner.boot("true", tmp_path / "share", timeout=2, guest=fake_image)
    assert time.monotonic() - started < 30
    assert result.exit_code is None and result.timed_out
    assert "booting" in result.console
    assert "timeout" in result.describe()
    child = int((tmp_path / "child.pid").read_text())
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True,
                           text=True).stdout.strip()
    # "Z" (a zombie: dead, waiting for its reaper), with "N" after it under nice.
    assert state == "" or state.startswith("Z"), f"qemu's child still runs ({state})"
    assert (tmp_path / "share" / "guest.sh").read_text().rstrip().endswith("true")


def test_scenario_names_come_from_the_guest_test_files():
    from tests.kernel.test_kernel_vm import scenario_names

    names = scenario_names()
    assert "test_faults::test_a_forged_request_from_an_unprivileged_process_changes_nothing" \
        in names
    assert all(PROJECT.joinpath("tests", "kernel", "guest", n.split("::")[0] + ".py").exists()
               for n in names)


def _fake_run(share: Path) -> runner.GuestRun:
    return runner.GuestRun(exit_code=None, timed_out=True, seconds=600.0,
                           console="line\n" * 100, share=share)


def test_a_guest_that_never_finished_is_reported_from_its_progress(tmp_path):
    from tests.kernel.test_kernel_vm import GuestReport

    progress = tmp_path / "progress.jsonl"
    progress.write_text(
        '{"nodeid": "tests/kernel/guest/test_mirrors.py::test_a[core]", "when": "call", '
        '"outcome": "passed", "text": null}\n'
        '{"nodeid": "tests/kernel/guest/test_mirrors.py::test_a[disk]", "when": "call", '
        '"outcome": "failed", "text": "assert 3 == 4"}\n')
    report = GuestReport(_fake_run(tmp_path), tmp_path / "junit.xml", progress)
    assert report.cases["test_mirrors::test_a"] == [
        ("test_a[core]", None), ("test_a[disk]", "failed (call):\nassert 3 == 4")]
    assert "test_mirrors::test_b" not in report.cases  # the stuck one: reported missing
    assert len(report.console_tail(10).splitlines()) == 10


def test_a_guest_junit_report_gives_each_case_its_failure_text(tmp_path):
    from tests.kernel.test_kernel_vm import GuestReport

    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.kernel.guest.test_faults" name="test_x"/>'
        '<testcase classname="tests.kernel.guest.test_faults" name="test_y">'
        '<failure message="boom">trace</failure></testcase>'
        '</testsuite></testsuites>')
    report = GuestReport(_fake_run(tmp_path), junit, tmp_path / "none.jsonl")
    assert report.cases == {"test_faults::test_x": [("test_x", None)],
                            "test_faults::test_y": [("test_y", "failure: boom\ntrace")]}


def test_the_lean_responder_answers_a_mirrors_requests_with_exact_replies():
    logs: dict = {}
    seq = 0

    def ask(request_type: T, data: bytes = b"") -> protocol.Reply:
        nonlocal seq
        seq += 1
        datagram = protocol.encode_request(request_type, seq=seq, uuid="lean-a", luid=3,
                                           data=data)
        reply = protocol.decode_reply(lean.answer(logs, datagram))
        assert (reply.seq, reply.error, reply.ack) == (seq, 0, False)
        want = protocol.REPLY_SIZES[request_type]
        assert want is None or len(reply.data) == want, request_type
        return reply

    def u64(reply: protocol.Reply) -> int:
        return protocol.U64.unpack(reply.data)[0]

    assert ask(T.CTR, b"131072 core 1024 nosync").data == b""
    assert u64(ask(T.GET_REGION_SIZE)) == 1024
    assert u64(ask(T.GET_SYNC_COUNT)) == 128
    ask(T.RESUME)
    ask(T.MARK_REGION, protocol.pack_regions([5]))
    ask(T.FLUSH, protocol.pack_regions([6]))  # integrated flush: marks ride in it
    assert [u64(ask(T.IS_CLEAN, protocol.pack_u64(r))) for r in (4, 5, 6)] == [1, 0, 0]
    ask(T.CLEAR_REGION, protocol.pack_regions([5, 6]))
    assert u64(ask(T.IS_CLEAN, protocol.pack_u64(5))) == 1
    assert u64(ask(T.IN_SYNC, protocol.pack_u64(7))) == 1
    assert ask(T.GET_RESYNC_WORK).data == bytes(16)
    assert ask(T.STATUS_INFO).data.endswith(b"\0")
    ask(T.DTR)
    assert logs == {}
