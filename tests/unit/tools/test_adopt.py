"""``shardlog adopt`` / ``release`` on this host (no device-mapper in its kernel: the
real moves are tested in the VM, tests/kernel/guest/test_lvm.py), and the device names
that ``status`` and ``top`` show beside each log's uuid."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from shardlog.tools import adopt, dmdevices, status, top

from ...conftest import PROJECT

UUID = "LVM-8zqvGFtPR6y2rtgfMftXdOLIt1mfoCDtM40X8RJxLN1sFfq87nP3frY4f8kMu3BK"


def shardlog(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlog.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["adopt"], ["release"], ["adopt", "vg/lv", "--all"],
                                  ["adopt", "--bogus", "vg/lv"]])
def test_usage_errors_exit_2(args):
    result = shardlog(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""


def test_a_device_that_cannot_be_found_exits_1_saying_why(tmp_path):
    result = shardlog("adopt", "--socket", str(tmp_path / "none.sock"), "vg/lv",
                      f"{tmp_path}/no-such-device", "/dev/null")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith("shardlog adopt: vg/lv: failed: ")
    assert "no-such-device: No such file or directory" in lines[1]
    assert lines[2] == "shardlog adopt: /dev/null: failed: /dev/null is not a block device"
    assert shardlog("release", "--all").returncode in (0, 1)  # 0 on a host with no mirror


def test_help_says_what_it_refuses_and_the_exit_codes():
    result = shardlog("adopt", "--help")
    assert result.returncode == 0
    for words in ("core-log mirror", "no shardlog server", "exit codes: 0 ok, 1",
                  "VG/LV", "--integrated-flush", "--dry-run"):
        assert words in result.stdout, words


def fake_sysfs(root: Path, devices: dict[str, str]) -> Path:
    for index, (name, uuid) in enumerate(devices.items()):
        dm = root / f"dm-{index}" / "dm"
        dm.mkdir(parents=True)
        (dm / "name").write_text(name + "\n")
        (dm / "uuid").write_text(uuid + "\n")
    return root


def log_row(uuid: str) -> dict:
    return {"uuid": uuid, "luid": 0xff00, "type": "disk", "state": "resumed",
            "region_size": 256, "region_count": 128, "in_sync": 128, "dirty": 0,
            "recovering": None, "sync_search": 128, "worker": 0, "requests_per_s": 0.0,
            "health": "A"}


def test_status_and_top_name_each_logs_device(tmp_path, monkeypatch):
    monkeypatch.setattr(dmdevices, "SYS_BLOCK", fake_sysfs(tmp_path, {
        "my--vg-data": UUID, "m-plain": "uuid-plain", "nouuid": ""}))
    logs = [log_row(UUID), log_row("uuid-plain"), log_row("uuid-elsewhere")]
    dmdevices.label_logs(logs)
    assert [log["device"] for log in logs] == ["my-vg/data", "m-plain", None]
    answer = {"server": {"pid": 1, "uptime_s": 5, "workers": 1, "requests_total": 0,
                         "state_dir": "/s", "serving": True, "stopping": False,
                         "requests": {}, "eagain_replies": 0, "worker_restarts": 0},
              "workers": [], "logs": logs}
    text = status.format_text(answer)
    header, *rows = text.splitlines()[-4:]
    assert header.split()[:3] == ["UUID", "Device", "LUID"]
    assert [row.split()[1] for row in rows] == ["my-vg/data", "-", "m-plain"]  # by uuid
    frame = top.render(answer, answer, 1.0, {}, 10, 0)
    assert "Device" in frame and "my-vg/data" in frame


def test_without_device_mapper_there_is_no_device_column(tmp_path, monkeypatch):
    monkeypatch.setattr(dmdevices, "SYS_BLOCK", tmp_path / "absent")
    logs = [log_row("uuid-a")]
    dmdevices.label_logs(logs)
    assert logs[0]["device"] is None
    answer = {"server": {"pid": 1, "uptime_s": 5, "workers": 1, "requests_total": 0,
                         "state_dir": "/s", "serving": True, "stopping": False},
              "workers": [], "logs": logs}
    assert "Device" not in status.format_text(answer)


def test_the_boot_unit_adopts_after_lvm_and_releases_before_shardlog_stops():
    unit = (PROJECT / "scripts" / "shardlog-adopt.service").read_text()
    lines = unit.splitlines()
    from shardlog.cli import _parser

    commands = {}
    for key in ("ExecStart", "ExecStop"):
        line = next(line for line in lines if line.startswith(f"{key}="))
        binary, *args = line.removeprefix(f"{key}=").split()
        assert binary.endswith("/shardlog")
        commands[key] = _parser().parse_args(args)  # SystemExit on an unknown option
    assert commands["ExecStart"].all and commands["ExecStart"].wait > 0
    assert commands["ExecStop"].all
    after = " ".join(line for line in lines if line.startswith("After="))
    assert "shardlog.service" in after and "lvm2-activation.service" in after
    assert "Requires=shardlog.service" in lines and "RemainAfterExit=yes" in lines


# -- the decisions, over a stand-in for dmsetup (the real one: tests/kernel/guest) -------

LVM_TABLE = "0 32768 mirror disk 2 254:0 256 2 254:1 0 254:2 0 1 handle_errors"


class FakeDm:
    """dmdevices' functions over one device, recording what would have been loaded."""

    def __init__(self, monkeypatch, *, attr: str = "L--w", table: str = LVM_TABLE,
                 in_sync_after: int = 128):
        self.attr, self.live, self.in_sync = attr, table, 128
        self.in_sync_after = in_sync_after
        self.loaded: list[str] = []
        monkeypatch.setattr(dmdevices, "resolve", lambda spec: "vg-m1")
        monkeypatch.setattr(dmdevices, "info", lambda name: dmdevices.DeviceInfo(
            name, UUID, suspended="s" in self.attr, inactive_table="I" in self.attr))
        monkeypatch.setattr(dmdevices, "table", lambda name: self.live + "\n")
        monkeypatch.setattr(dmdevices, "status", lambda name: (
            f"0 32768 mirror 2 254:1 254:2 {self.in_sync}/128 1 AA 3 disk 254:0 A"))
        monkeypatch.setattr(dmdevices, "swap_table", self.swap)
        monkeypatch.setattr(adopt, "check_log_device", lambda device: None)

    def swap(self, name: str, table: str) -> None:
        self.loaded.append(table)
        self.live, self.in_sync = table, self.in_sync_after


def move(monkeypatch, *args: str, server_problem: str | None = None,
         adopting: bool = True) -> adopt.Outcome:
    monkeypatch.setattr(adopt.ServerCheck, "problem", lambda self: server_problem)
    parser = argparse.ArgumentParser()
    subcommands = parser.add_subparsers()
    adopt.add_parsers(subcommands)
    parsed = parser.parse_args(["adopt" if adopting else "release", *args, "vg/m1"])
    return adopt.Mover(parsed, adopting=adopting).move("vg/m1")


def test_adopt_then_release_load_the_planned_tables(monkeypatch):
    dm = FakeDm(monkeypatch)
    outcome = move(monkeypatch, "--integrated-flush")
    assert (outcome.result, outcome.label, outcome.in_sync) == ("adopted", "vg/m1", [128, 128])
    assert dm.loaded == [f"0 32768 mirror userspace 5 {UUID} integrated_flush disk 254:0 "
                         "256 2 254:1 0 254:2 0 1 handle_errors"]
    assert move(monkeypatch).result == "already"
    assert move(monkeypatch, adopting=False).result == "released"
    assert dm.live == LVM_TABLE
    again = move(monkeypatch, adopting=False)
    assert (again.result, again.reason) == ("already", "on the kernel's disk log already")
    dm.live = "0 32768 mirror core 2 256 nosync 2 254:1 0 254:2 0 1 handle_errors"
    on_core = move(monkeypatch, adopting=False)
    assert (on_core.result, on_core.reason) == ("already", "on the kernel's core log already")


@pytest.mark.parametrize("attr, words", [("L-sw", "suspended"), ("LI-w", "inactive table")])
def test_a_suspended_device_or_one_being_changed_is_refused(monkeypatch, attr, words):
    dm = FakeDm(monkeypatch, attr=attr)
    outcome = move(monkeypatch)
    assert outcome.result == "refused" and words in outcome.reason
    assert dm.loaded == []


def test_no_server_refuses_both_ways_and_a_dry_run_only_says_so(monkeypatch):
    dm = FakeDm(monkeypatch)
    outcome = move(monkeypatch, server_problem="no shardlog server is serving")
    assert (outcome.result, outcome.reason) == ("refused", "no shardlog server is serving")
    dry = move(monkeypatch, "--dry-run", server_problem="no shardlog server is serving")
    assert dry.result == "would" and dry.new_table.startswith("0 32768 mirror userspace 4 ")
    assert dm.loaded == []
    dm.live = dry.new_table
    monkeypatch.setattr(dmdevices, "status", lambda name: pytest.fail(
        "the status of a userspace log with no server waits for one for ever"))
    assert move(monkeypatch, adopting=False, server_problem="none").result == "refused"
    assert move(monkeypatch, "--dry-run", adopting=False,
                server_problem="none").result == "refused"
    assert dm.loaded == []


def test_a_sync_count_that_drops_is_reported_as_a_failure(monkeypatch):
    FakeDm(monkeypatch, in_sync_after=0)
    outcome = move(monkeypatch)
    assert outcome.result == "failed" and "dropped from 128 to 0" in outcome.reason


def test_a_resume_that_fails_after_the_swap_is_tried_again_then_reported(monkeypatch):
    """The swap happens at resume: a failed one leaves the device suspended, its I/O
    waiting, whatever was loaded.  It is tried once more, and if that fails the error
    says what state the device is in and what to do."""
    calls: list[str] = []
    resumes_failing = [2]

    def dmsetup(*args: str) -> str:
        calls.append(args[0])
        if args[0] == "resume" and resumes_failing[0]:
            resumes_failing[0] -= 1
            raise dmdevices.DmError("dmsetup resume vg-m1: device-mapper: resume ioctl "
                                    "failed: Invalid argument")
        return ""

    monkeypatch.setattr(dmdevices, "dmsetup", dmsetup)
    resumes_failing[0] = 1
    dmdevices.swap_table("vg-m1", "0 8 zero")  # the second resume succeeds
    assert calls == ["load", "suspend", "resume", "resume"]
    resumes_failing[0] = 2
    with pytest.raises(dmdevices.DmError, match="vg-m1 is left SUSPENDED, its I/O waiting"):
        dmdevices.swap_table("vg-m1", "0 8 zero")
