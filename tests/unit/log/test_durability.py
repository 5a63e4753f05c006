"""A FLUSH reply means every mark is durable, shown in process: spies on ``os.pwritev`` and
``os.fdatasync`` see each mark of a disk log written and then flushed before the reply, a
FLUSH with nothing new syncs nothing, and the crash check sees a lost mark.  Processes
killed for real, and the page cache's own dirty flag: tests/process/test_durability.py."""

from __future__ import annotations

import os

from shardlog.harness.kernelsim.crashload import CrashCampaign, dirty_regions
from shardlog.log.logtable import LogTable
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ...conftest import Kernel

REGIONS = 4096


def test_a_flush_that_changed_nothing_does_not_sync(kernel, state_dir):
    kernel.ctr("131072 core 1024 nosync")
    kernel.ok(T.RESUME)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    before = log.region_map.commits
    kernel.ok(T.FLUSH)
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([1]))  # clean already: no change
    kernel.ok(T.FLUSH)
    assert log.region_map.commits == before
    kernel.ok(T.FLUSH, protocol.pack_regions([1]))
    assert log.region_map.commits == before + 1
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([1]))
    kernel.ok(T.FLUSH)  # only a clear: committed lazily
    assert log.region_map.commits == before + 1
    kernel.ok(T.POSTSUSPEND)  # but written at suspend
    assert log.region_map.commits == before + 2


def test_a_disk_flush_is_answered_after_the_write_and_flush_of_every_mark(
        kernel, tmp_path, monkeypatch):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    kernel.ctr(f"{REGIONS * 8} disk {device} 8 nosync")
    kernel.ok(T.RESUME)
    events: list[tuple] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def watched_pwritev(fd, buffers, offset):
        written = real_pwritev(fd, buffers, offset)
        events.append(("write", offset, offset + written))
        return written

    def watched_fdatasync(fd):
        real_fdatasync(fd)
        events.append(("flush",))

    monkeypatch.setattr(os, "pwritev", watched_pwritev)
    monkeypatch.setattr(os, "fdatasync", watched_fdatasync)
    kernel.ok(T.FLUSH, protocol.pack_regions([3, REGIONS - 1]))
    for region in (3, REGIONS - 1):
        byte = BITMAP_OFFSET + region // 8
        written_at = [i for i, e in enumerate(events)
                      if e[0] == "write" and e[1] <= byte < e[2]]
        assert written_at, (region, events)
        assert ("flush",) in events[written_at[-1]:], events  # then a cache flush
    events.clear()
    kernel.ok(T.FLUSH)
    assert events == []


def test_the_crash_check_sees_an_acknowledged_mark_that_is_clean(tmp_path):
    campaign = CrashCampaign(tmp_path, logs=1, regions=64)
    log = campaign.logs[0]
    path = instance_file_path(campaign.server.state_dir, log.uuid, log.luid)
    kernel = Kernel(LogTable(campaign.server.state_dir), uuid=log.uuid, luid=log.luid)
    assert kernel.ctr(log.ctr) == (0, b"")
    kernel.ok(T.RESUME)
    kernel.ok(T.FLUSH, protocol.pack_regions([3]))
    log.promised = {3, 4}  # 4 was never marked: a lost mark
    campaign._check_files()
    assert campaign.result.checked_in_files == 1
    assert len(campaign.result.problems) == 1 and "[4] are clean" in campaign.result.problems[0]
    assert dirty_regions(path) == {3}
