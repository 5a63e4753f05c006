"""dmtable: mirror tables and statuses as the real kernel prints them (LVM's, and the
harness's userspace tables), and the tables adopt and release load."""

from __future__ import annotations

import pytest

from shardlog.tools import dmtable
from shardlog.tools.dmtable import Refusal, TableError

from ...conftest import FIXTURES

UUID = "LVM-8zqvGFtPR6y2rtgfMftXdOLIt1mfoCDtM40X8RJxLN1sFfq87nP3frY4f8kMu3BK"


def kernel_lines(kind: str) -> dict[str, str]:
    lines = {}
    for line in (FIXTURES / "lvm-tables.txt").read_text().splitlines():
        if line.startswith(kind + " "):
            name, _, text = line.removeprefix(kind + " ").partition("\t")
            lines[name] = text
    return lines


TABLES = kernel_lines("table")
STATUSES = kernel_lines("status")


def test_lvm_disk_log_mirror_parses_and_prints_back_word_for_word():
    for name in ("vg-m1", "vg-m2", "vg-mc", "vg-m1-extended", "vg-m1-adopted"):
        assert dmtable.parse_mirror_table(TABLES[name]).line() == TABLES[name], name
    table = dmtable.parse_mirror_table(TABLES["vg-m2"])
    assert table.log == dmtable.MirrorLog(kind="disk", inner="disk", region_sectors=4096,
                                          device="254:4")
    assert table.legs == (("254:5", "0"), ("254:6", "0"), ("254:7", "0"))
    assert table.features == ("handle_errors",)
    assert (table.start, table.length) == (0, 16384)


def test_the_adopted_table_is_what_the_kernel_then_prints():
    live = dmtable.parse_mirror_table(TABLES["vg-m1"])
    adopted = dmtable.adopted_table(live, UUID)
    assert adopted is not None
    assert adopted.line() == TABLES["vg-m1-adopted"]
    assert adopted.log.on_shardlog and adopted.log.uuid == UUID
    # and back: the kernel's own disk log, exactly as LVM had it
    assert dmtable.released_table(dmtable.parse_mirror_table(adopted.line())) == live


def test_integrated_flush_sync_options_and_features_are_kept():
    live = dmtable.parse_mirror_table(
        "0 131072 mirror disk 3 7:2 1024 nosync 3 7:0 0 7:1 0 7:3 8 2 handle_errors keep_log")
    adopted = dmtable.adopted_table(live, "u-1", integrated_flush=True)
    assert adopted is not None
    assert adopted.line() == ("0 131072 mirror userspace 6 u-1 integrated_flush disk 7:2 "
                              "1024 nosync 3 7:0 0 7:1 0 7:3 8 2 handle_errors keep_log")
    reparsed = dmtable.parse_mirror_table(adopted.line())
    assert reparsed.log.integrated_flush and reparsed.log.sync_option == "nosync"
    assert dmtable.released_table(reparsed) == live
    # a mirror without features has none afterwards either
    bare = dmtable.parse_mirror_table("0 2048 mirror disk 2 7:2 128 2 7:0 0 7:1 0")
    assert dmtable.adopted_table(bare, "u").line().endswith("128 2 7:0 0 7:1 0")


def test_the_harness_userspace_tables_parse():
    for name in ("disklog", "iflush", "plain", "resync"):
        text = (FIXTURES / f"table-{name}.txt").read_text()
        table = dmtable.parse_mirror_table(text)
        assert table.log.on_shardlog and table.line() == text.strip()
    iflush = dmtable.parse_mirror_table((FIXTURES / "table-iflush.txt").read_text())
    assert iflush.log.integrated_flush and iflush.log.inner == "core"


def test_adopting_an_adopted_mirror_or_releasing_a_released_one_is_a_no_op():
    assert dmtable.adopted_table(dmtable.parse_mirror_table(TABLES["vg-m1-adopted"]),
                                 UUID) is None
    assert dmtable.released_table(dmtable.parse_mirror_table(TABLES["vg-m1"])) is None


def test_a_core_log_is_refused_both_ways_with_the_reason():
    with pytest.raises(Refusal, match=r"core log.*resyncs the whole mirror.*disk log"):
        dmtable.adopted_table(dmtable.parse_mirror_table(TABLES["vg-mc"]), UUID)
    core_on_shardlog = (FIXTURES / "table-plain.txt").read_text()
    with pytest.raises(Refusal, match="shardlog's core log"):
        dmtable.released_table(dmtable.parse_mirror_table(core_on_shardlog))


def test_a_device_without_a_usable_uuid_is_refused():
    live = dmtable.parse_mirror_table(TABLES["vg-m1"])
    with pytest.raises(Refusal, match="no device-mapper uuid"):
        dmtable.adopted_table(live, "")


@pytest.mark.parametrize("text, message", [
    (TABLES["vg-lin"], "a linear target, not a mirror"),
    (TABLES["vg-m1"] + "\n" + TABLES["vg-m1"], "2 segments"),
    ("", "empty table"),
    ("0 100 mirror disk 2 7:2", "fewer log arguments"),
    ("0 100 mirror disk 2 7:2 8 2 7:0", "2 legs"),
    ("0 100 mirror disk 2 7:2 x 2 7:0 0 7:1 0", "region size is not a number"),
    ("0 100 mirror core 2 8 maybe 2 7:0 0 7:1 0", "not sync or nosync"),
    ("0 100 mirror userspace 3 u clustered-disk 8 2 7:0 0 7:1 0", "clustered-disk"),
    ("0 100 mirror core 1 8 1 7:0 0", "1 legs"),
    ("0 100 mirror core 1 8 2 7:0 0 7:1 0 2 handle_errors", "1 features, counted 2"),
    ("0 100 mirror weird 1 8 2 7:0 0 7:1 0", "not core, disk or userspace"),
])
def test_tables_it_does_not_take_are_refused_with_why(text, message):
    with pytest.raises(TableError, match=message):
        dmtable.parse_mirror_table(text)


def test_statuses_of_lvm_mirrors():
    m2 = dmtable.parse_mirror_status(STATUSES["vg-m2"])
    assert (m2.in_sync, m2.regions, m2.health, m2.synced) == (4, 4, "AAA", True)
    assert m2.log_status == ("3", "disk", "254:4", "A")
    assert dmtable.parse_mirror_status(STATUSES["vg-mc"]).log_status == ("1", "core")
    # shardlog's STATUS_INFO is the kernel disk log's, word for word (LVM parses it)
    assert dmtable.parse_mirror_status(STATUSES["vg-m1-adopted"]) == \
        dmtable.parse_mirror_status(STATUSES["vg-m1"])
    resyncing = dmtable.parse_mirror_status("0 32768 mirror 2 254:1 254:2 17/128 1 AA "
                                            "3 disk 254:0 A")
    assert (resyncing.in_sync, resyncing.synced) == (17, False)
    with pytest.raises(TableError):
        dmtable.parse_mirror_status("0 8192 linear")
    with pytest.raises(TableError):
        dmtable.parse_mirror_status("0 8192 mirror 2 254:1")


@pytest.mark.parametrize("vg, lv", [("vg", "m1"), ("my-vg", "data-mirror"),
                                    ("a--b", "c-"), ("vg0", "m1_mlog")])
def test_lvm_dm_names_both_ways(vg, lv):
    name = dmtable.lvm_dm_name(vg, lv)
    assert dmtable.split_lvm_dm_name(name) == (vg, lv)
    assert dmtable.device_label(name, UUID) == f"{vg}/{lv}"


def test_labels_of_devices_that_are_not_lvm_volumes():
    assert dmtable.device_label("m-disk", "uuid-m-disk") == "m-disk"
    assert dmtable.lvm_dm_name("my-vg", "lv") == "my--vg-lv"
    assert dmtable.split_lvm_dm_name("nodash") is None
    assert dmtable.split_lvm_dm_name("vg-lv-real") is None  # a layer, not an LV
    assert dmtable.device_label("vg-lv-real", UUID + "-real") == "vg-lv-real"
