"""Log life cycles through the log table: CTR, reconnect, reloads, unknown logs."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from shardlog.log import dirtylog
from shardlog.log.dirtylog import LogState
from shardlog.log.logtable import LogTable
from shardlog.log.outcome import MARKED, OK, answered, encode
from shardlog.observability.workercounters import key
from shardlog.storage import records, regionmap
from shardlog.storage.errors import LOG_DEVICE, StoreError
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ...conftest import Kernel

CORE = "131072 core 1024"  # 128 regions
NOSYNC = "131072 core 1024 nosync"


def resumed(kernel: Kernel, ctr: str = CORE, **kw) -> Kernel:
    assert kernel.ctr(ctr, **kw) == (0, b"")
    kernel.ok(T.GET_REGION_SIZE, **kw)
    kernel.ok(T.RESUME, **kw)
    return kernel


# -- construction ------------------------------------------------------------------------------


def test_a_fresh_core_log_is_out_of_sync_and_nosync_is_in_sync(kernel):
    assert kernel.ctr(CORE) == (0, b"")
    assert kernel.ok(T.GET_REGION_SIZE) == protocol.pack_u64(1024)
    assert kernel.sync_count() == 0
    kernel.ok(T.RESUME)
    assert kernel.in_sync(0) == 0 and kernel.sync_count() == 0
    other = Kernel(kernel.table, uuid="other")
    resumed(other, NOSYNC)
    assert other.in_sync(127) == 1 and other.sync_count() == 128


def test_bad_constructor_is_einval_and_creates_nothing(kernel, caplog):
    assert kernel.ctr("131072 core 1000") == (-errno.EINVAL, b"")
    assert "not a power of two" in caplog.text
    assert kernel.table.logs == {}


def test_a_re_sent_ctr_succeeds_without_resetting_the_log(kernel):
    assert kernel.ctr(NOSYNC) == (0, b"")
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert kernel.ctr(NOSYNC) == (0, b"")  # the 15 s retry of a CTR whose reply was lost
    assert kernel.table.logs[(kernel.uuid, kernel.luid)] is log


def test_the_reconnect_ctr_of_a_known_log_succeeds_with_an_empty_reply(kernel):
    resumed(kernel, NOSYNC)
    kernel.ok(T.MARK_REGION, protocol.pack_regions([7]))
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert kernel.ctr(NOSYNC, reconnect=True) == (0, b"")
    kernel.ok(T.RESUME)  # the reconnect loop's RESUME: a no-op for a live log
    assert kernel.table.logs[(kernel.uuid, kernel.luid)] is log
    assert log.state is LogState.RESUMED and not log.region_map.clean_bits[7]


def test_a_first_ctr_for_a_resumed_instance_replaces_it(kernel, caplog):
    resumed(kernel, NOSYNC)
    old = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert kernel.ctr(CORE) == (0, b"")
    assert "replaces a live instance" in caplog.text
    new = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert new is not old and new.config.ctr_string == CORE and new.sync_count == 0


def test_requests_for_an_unknown_log_are_esrch_so_the_kernel_reconnects(kernel):
    for request_type in T:
        if request_type is T.CTR:
            continue
        data = b""
        if request_type in (T.IN_SYNC, T.IS_CLEAN, T.IS_REMOTE_RECOVERING):
            data = protocol.pack_u64(0)
        elif request_type is T.SET_REGION_SYNC:
            data = protocol.pack_set_region_sync(0, True)
        assert kernel.send(request_type, data) == (-errno.ESRCH, b""), request_type.name


# -- life cycle ----------------------------------------------------------------------------------


def test_region_requests_before_resume_are_refused(kernel):
    kernel.ctr(CORE)
    assert kernel.regions(T.MARK_REGION, 1) == (-errno.EINVAL, b"")
    assert kernel.send(T.IN_SYNC, protocol.pack_u64(1)) == (-errno.EINVAL, b"")


def test_a_suspended_log_keeps_its_bits_and_refuses_changes(kernel, state_dir):
    resumed(kernel, NOSYNC)
    kernel.ok(T.MARK_REGION, protocol.pack_regions([3]))
    kernel.ok(T.FLUSH)
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([3]))
    kernel.ok(T.PRESUSPEND)
    assert kernel.resync_work() == (0, 0)  # recovery halted
    kernel.ok(T.POSTSUSPEND)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert log.state is LogState.SUSPENDED and not log.region_map.needs_commit
    assert kernel.regions(T.MARK_REGION, 4) == (-errno.EINVAL, b"")  # no new writes now
    assert kernel.regions(T.FLUSH, 4) == (-errno.EINVAL, b"")
    assert kernel.regions(T.FLUSH) == (0, b"")  # an empty FLUSH changes nothing
    # dm-raid1's last pass over completed writes may come after POSTSUSPEND: harmless.
    assert kernel.regions(T.CLEAR_REGION, 3) == (0, b"")
    assert kernel.in_sync(3) == 1  # queries still answer
    kernel.ok(T.RESUME)
    assert kernel.sync_count() == 128 and log.state is LogState.RESUMED


def test_a_core_log_keeps_its_sync_bits_across_suspend_like_the_kernels(kernel):
    resumed(kernel)
    assert kernel.resync_work() == (1, 0)
    kernel.set_region_sync(0, True)
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([0]))
    kernel.set_region_sync(1, True)  # in sync, but its CLEAR has not come
    for step in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
        kernel.ok(step)
    assert kernel.sync_count() == 2 and kernel.in_sync(1) == 1
    assert kernel.resync_work() == (1, 2)


def test_dtr_forgets_the_log_and_removes_its_instance_file(kernel, state_dir):
    resumed(kernel)
    path = instance_file_path(state_dir, kernel.uuid, kernel.luid)
    assert path.exists()
    kernel.ok(T.DTR)
    assert not path.exists() and kernel.table.logs == {}
    assert kernel.send(T.GET_SYNC_COUNT) == (-errno.ESRCH, b"")


# -- table reloads: two live instances of one uuid ------------------------------------------------


def test_a_core_reload_starts_the_new_instance_over_and_spares_the_old(kernel, state_dir):
    old = resumed(kernel, NOSYNC)
    old.ok(T.MARK_REGION, protocol.pack_regions([9]))
    old.ok(T.FLUSH)
    new = Kernel(kernel.table, uuid=kernel.uuid, luid=kernel.luid + 0x1000)
    new.seq = old.seq
    assert new.ctr(CORE) == (0, b"")  # the reload's table: a new leg may need resync
    old.ok(T.CLEAR_REGION, protocol.pack_regions([9]))  # old still serving I/O
    old.ok(T.FLUSH)
    old.ok(T.PRESUSPEND)
    old.ok(T.POSTSUSPEND)
    new.ok(T.RESUME)
    old.ok(T.DTR)
    assert new.sync_count() == 0 and new.in_sync(9) == 0
    assert not instance_file_path(state_dir, old.uuid, old.luid).exists()
    assert instance_file_path(state_dir, new.uuid, new.luid).exists()


def test_a_disk_reload_carries_the_device_bits_to_the_new_instance(kernel, tmp_path):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    ctr = f"131072 disk {device} 1024"
    old = resumed(kernel, ctr)
    assert old.sync_count() == 0  # a wiped device: everything out of sync
    for region in range(10):
        assert old.resync_work() == (1, region)
        old.set_region_sync(region, True)
        old.ok(T.CLEAR_REGION, protocol.pack_regions([region]))
    old.ok(T.FLUSH)
    old.ok(T.MARK_REGION, protocol.pack_regions([4]))  # a write in flight at the reload
    old.ok(T.FLUSH)
    new = Kernel(kernel.table, uuid=kernel.uuid, luid=kernel.luid + 0x1000)
    new.seq = old.seq
    assert new.ctr(ctr) == (0, b"")
    old.ok(T.CLEAR_REGION, protocol.pack_regions([4]))
    old.ok(T.PRESUSPEND)
    old.ok(T.POSTSUSPEND)
    new.ok(T.RESUME)
    old.ok(T.DTR)
    assert new.sync_count() == 10
    assert [new.in_sync(r) for r in range(12)] == [1] * 10 + [0, 0]
    assert new.resync_work() == (1, 10)
    assert device.exists()  # DTR of a disk log never touches the device's file


def test_a_new_activation_removes_instances_left_by_a_missed_dtr_at_its_resume(state_dir):
    stale = Kernel(LogTable(state_dir), uuid="u", luid=1)
    resumed(stale)
    stale_file = instance_file_path(state_dir, "u", 1)
    # The server restarts (the table is lost); the kernel removed the mirror meanwhile.
    fresh = Kernel(LogTable(state_dir), uuid="u", luid=2)
    assert fresh.ctr(CORE) == (0, b"")
    assert stale_file.exists()  # not yet: it could be a reload's old, still live instance
    fresh.ok(T.RESUME)
    assert not stale_file.exists()
    assert instance_file_path(state_dir, "u", 2).exists()


def test_a_reload_right_after_a_restart_keeps_the_old_instance_restorable(state_dir):
    old = resumed(Kernel(LogTable(state_dir), uuid="u", luid=1), NOSYNC)
    old.set_region_sync(4, False)
    # The server restarts; the first thing to arrive is the reload's new table.
    table = LogTable(state_dir)
    new = Kernel(table, uuid="u", luid=2)
    assert new.ctr(CORE) == (0, b"")
    # Then the old instance's I/O finds the server gone and reconnects.
    old = Kernel(table, uuid="u", luid=1)
    assert old.ctr(NOSYNC, reconnect=True) == (0, b"")
    old.ok(T.RESUME)
    assert old.sync_count() == 127 and old.in_sync(0) == 1  # continued, not reset


# -- restart: the reconnect CTR restores saved state ---------------------------------------------


def restarted(before: Kernel, ctr: str, via: str) -> Kernel:
    """A new server for ``before``'s log, which the kernel still has (SIGKILL: nothing was
    written since).  ``via="record"``: the server restores the log from its CTR record at
    the first request; ``via="reconnect"``: without a record, the kernel's reconnect loop
    (-ESRCH, CTR with its NUL, RESUME) brings it back."""
    after = Kernel(LogTable(before.table.state_dir), uuid=before.uuid, luid=before.luid)
    after.seq = before.seq
    if via == "reconnect":
        records.record_path(after.table.state_dir, after.uuid, after.luid).unlink()
        assert after.send(T.GET_SYNC_COUNT) == (-errno.ESRCH, b"")
        assert after.ctr(ctr, reconnect=True) == (0, b"")
        after.ok(T.RESUME)
    return after


RESTART_PATHS = pytest.mark.parametrize("via", ["record", "reconnect"])


@RESTART_PATHS
def test_a_restarted_server_continues_a_core_log_exactly(state_dir, via):
    before = resumed(Kernel(LogTable(state_dir)), NOSYNC)
    before.set_region_sync(5, False)  # a leg write failed there
    before.ok(T.FLUSH, protocol.pack_regions([1, 2]))  # two writes in flight
    before.ok(T.CLEAR_REGION, protocol.pack_regions([2]))  # one completed
    before.ok(T.MARK_REGION, protocol.pack_regions([3]))  # acknowledged, FLUSH not yet sent
    after = restarted(before, NOSYNC, via)
    # The kernel kept its state (its hint says "all in sync", so it will not ask for resync
    # work before the next resume): regions 1-3 are in sync, only their writes are pending.
    assert [after.in_sync(r) for r in range(6)] == [1, 1, 1, 1, 1, 0]
    assert after.sync_count() == 127
    log = after.table.logs[(after.uuid, after.luid)]
    assert [log.region_map.clean_bits[r] for r in range(6)] == [1, 0, 1, 0, 1, 0]
    after.ok(T.FLUSH)  # the retried FLUSH: the unflushed mark of region 3 is durable
    image = instance_file_path(state_dir, after.uuid, after.luid).read_bytes()
    assert image[BITMAP_OFFSET] & 0b1000 == 0


@RESTART_PATHS
def test_a_restarted_server_makes_a_disk_logs_unflushed_marks_durable(
        state_dir, tmp_path, via):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    ctr = f"131072 disk {device} 1024 nosync"
    before = resumed(Kernel(LogTable(state_dir)), ctr)
    before.ok(T.MARK_REGION, protocol.pack_regions([7]))  # answered; FLUSH not yet sent
    assert device.read_bytes()[BITMAP_OFFSET] == 0xFF  # the device has not seen it
    after = restarted(before, ctr, via)
    if via == "record":
        assert after.ok(T.GET_SYNC_COUNT)  # the first request restores the log
    assert device.read_bytes()[BITMAP_OFFSET] == 0x7F  # written back at the RESUME
    assert after.in_sync(7) == 1 and after.sync_count() == 128


def test_a_reconnect_without_saved_state_falls_back_loudly(state_dir, tmp_path, caplog):
    kernel = Kernel(LogTable(state_dir))
    assert kernel.ctr(NOSYNC, reconnect=True) == (0, b"")
    kernel.ok(T.RESUME)
    assert "no state saved" in caplog.text and "suspend and resume" in caplog.text
    assert kernel.sync_count() == 0  # even nosync: nothing is known about the legs
    # A disk log falls back to its device's clean bits, whatever sync/nosync says.
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    ctr = f"131072 disk {device} 1024 nosync"
    first = resumed(Kernel(LogTable(state_dir), uuid="d"), ctr)
    first.ok(T.FLUSH, protocol.pack_regions([3]))
    for path in (state_dir / "logs").iterdir():
        path.unlink()  # the state directory was wiped while the server was down
    after = Kernel(LogTable(state_dir), uuid="d")
    assert after.ctr(ctr, reconnect=True) == (0, b"")
    after.ok(T.RESUME)
    assert after.in_sync(3) == 0 and after.sync_count() == 127


def test_a_reconnect_never_fails_even_without_storage(tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    kernel = Kernel(LogTable(not_a_dir))
    assert kernel.ctr(CORE) == (-errno.ENOTDIR, b"")  # a first CTR fails: the load fails
    assert kernel.ctr(CORE, reconnect=True) == (0, b"")  # a reconnect must not loop for ever
    kernel.ok(T.RESUME)
    assert "serving from memory" in caplog.text
    assert kernel.in_sync(0) == 0 and kernel.status_info() == "1 core\0"
    assert kernel.resync_work() == (1, 0)
    kernel.set_region_sync(0, True)
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([0]))
    # A new mark cannot be made durable: the FLUSH fails, as on a failed log device.
    assert kernel.send(T.FLUSH, protocol.pack_regions([0])) == (-errno.EIO, b"")


# -- storage failures ---------------------------------------------------------------------------


def test_an_unusable_state_dir_fails_the_ctr_and_spares_other_logs(tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    kernel = Kernel(LogTable(not_a_dir))
    error, _ = kernel.ctr(CORE)
    assert error == -errno.ENOTDIR and "cannot create instance file" in caplog.text
    assert kernel.table.logs == {}


def test_a_failing_log_device_gives_eio_and_a_sticky_status(kernel, tmp_path, monkeypatch):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    resumed(kernel, f"131072 disk {device} 1024 nosync")
    assert kernel.status_info() == "3 disk 0:0 A\0"

    def fail(*args):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "pwritev", fail)
    assert kernel.send(T.FLUSH, protocol.pack_regions([1])) == (-errno.EIO, b"")
    assert kernel.status_info() == "3 disk 0:0 D\0"
    monkeypatch.undo()
    monkeypatch.setattr(os, "fdatasync", fail)
    assert kernel.send(T.FLUSH) == (-errno.EIO, b"")
    assert kernel.status_info() == "3 disk 0:0 F\0"  # a failed flush shows over D
    monkeypatch.undo()
    assert kernel.send(T.FLUSH) == (0, b"")  # the pending mark was kept and now lands
    assert device.read_bytes()[BITMAP_OFFSET] == 0xFD
    for step in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
        kernel.ok(step)
    assert kernel.status_info()[-2] == "F"  # never cleared, as in the kernel's disk log
    other = Kernel(kernel.table, uuid="other")
    resumed(other)  # other logs unaffected throughout


def test_a_device_that_shrank_reads_as_failed_and_resume_goes_on(kernel, tmp_path):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    assert kernel.ctr(f"131072 disk {device} 1024") == (0, b"")
    os.truncate(device, 10)
    kernel.ok(T.RESUME)  # dm-raid1 would only warn; the status tells
    assert kernel.status_info()[-2] == "D"
    assert kernel.sync_count() == 0 and kernel.resync_work() == (1, 0)


def test_an_incompatible_device_version_reads_as_failed_with_everything_out_of_sync(
        kernel, tmp_path):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.write(b"\x72\x52\x69\x4d\x07\0\0\0" + b"\0" * 8)
        f.truncate(1 << 20)
    kernel.ctr(f"131072 disk {device} 1024")
    kernel.ok(T.RESUME)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert log.state is LogState.RESUMED and log.health == "D"
    assert kernel.sync_count() == 0
    assert kernel.send(T.IS_REMOTE_RECOVERING, protocol.pack_u64(5))[0] == 0  # no hang


def test_a_bug_in_a_handler_is_answered_eio_not_raised(kernel, monkeypatch, caplog):
    resumed(kernel)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    monkeypatch.setattr(log, "handlers", {**log.handlers,
                                          T.GET_SYNC_COUNT: lambda log, request: 1 / 0})
    assert kernel.send(T.GET_SYNC_COUNT) == (-errno.EIO, b"")
    assert "ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("region", [128, 2**64 - 1])
def test_every_region_is_bounds_checked(kernel, region):
    resumed(kernel)
    for request_type in (T.IN_SYNC, T.IS_CLEAN, T.IS_REMOTE_RECOVERING):
        assert kernel.send(request_type, protocol.pack_u64(region))[0] == -errno.EINVAL
    for request_type in (T.MARK_REGION, T.CLEAR_REGION, T.FLUSH):
        assert kernel.regions(request_type, 0, region)[0] == -errno.EINVAL
    assert kernel.set_region_sync(region, True)[0] == -errno.EINVAL
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    assert log.region_map.clean_bits.count(1) == 0 and log.sync_count == 0


def test_a_constructor_with_no_room_for_the_reconnect_nul_is_refused(kernel, caplog):
    ctr = "131072 core 1024" + " " * (protocol.MAX_PAYLOAD - 16)
    assert len(ctr) == protocol.MAX_PAYLOAD
    assert kernel.ctr(ctr) == (-errno.EINVAL, b"")
    assert "no room for its NUL" in caplog.text


def test_storage_errnos_that_mean_something_else_to_the_kernel_become_eio(kernel, monkeypatch):
    resumed(kernel, NOSYNC)

    def again(*args):
        raise OSError(errno.EAGAIN, "would block")

    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    monkeypatch.setattr(log.region_map._store, "persist", again)
    # -EAGAIN would make the kernel re-send at once, for ever.
    assert kernel.send(T.FLUSH, protocol.pack_regions([1]))[0] == -errno.EIO


def test_the_hint_stays_below_region_count_while_resync_work_is_left(kernel):
    resumed(kernel, "8192 core 1024")  # 8 regions, all out of sync
    hint = lambda: protocol.S64_U64.unpack(  # noqa: E731
        kernel.ok(T.IS_REMOTE_RECOVERING, protocol.pack_u64(0)))
    assert hint() == (0, 7)  # the kernel keeps asking for work, writes are not held back
    for region in range(8):
        assert kernel.resync_work() == (1, region)
        assert hint() == (0, 7)
        if region == 3:
            kernel.set_region_sync(region, False)  # this recovery failed
        else:
            kernel.set_region_sync(region, True)
    assert kernel.resync_work() == (0, 0)
    assert hint() == (0, 8)  # nothing left this pass: the kernel may stop asking
    for step in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
        kernel.ok(step)
    assert hint() == (0, 7) and kernel.resync_work() == (1, 3)  # the next pass retries it


def test_a_region_set_out_of_sync_is_durable_at_once(kernel, tmp_path):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    resumed(kernel, f"131072 disk {device} 1024 nosync")
    assert device.read_bytes()[BITMAP_OFFSET] == 0xFF
    kernel.set_region_sync(2, False)  # a leg write failed; no FLUSH follows yet
    assert device.read_bytes()[BITMAP_OFFSET] == 0xFB


def test_dtr_succeeds_while_something_still_holds_the_bits(kernel, state_dir):
    resumed(kernel)
    held = kernel.table.logs[(kernel.uuid, kernel.luid)].region_map.clean_bits
    assert kernel.send(T.DTR) == (0, b"")
    assert not instance_file_path(state_dir, kernel.uuid, kernel.luid).exists()
    assert held.count(1) == 0  # still readable: the mapping lives as long as the view


def test_a_failed_postsuspend_still_lets_the_next_resume_restart_recovery(kernel, monkeypatch):
    resumed(kernel, NOSYNC)
    kernel.set_region_sync(3, False)  # a region to resync
    kernel.ok(T.PRESUSPEND)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    log.region_map.mark(1)  # something left to commit

    def fail(*args):
        raise StoreError(errno.EIO, "injected")

    monkeypatch.setattr(log.region_map._store, "persist", fail)
    assert kernel.send(T.POSTSUSPEND) == (-errno.EIO, b"")
    monkeypatch.undo()
    kernel.ok(T.RESUME)
    assert kernel.resync_work() == (1, 3)  # recovery runs again


def test_a_repeated_resume_restarts_recovery_stopped_by_an_aborted_suspend(kernel):
    resumed(kernel, "8192 core 1024")
    kernel.ok(T.PRESUSPEND)  # dm aborted the suspend after this: no POSTSUSPEND
    assert kernel.resync_work() == (0, 0)
    kernel.ok(T.RESUME)
    assert kernel.resync_work() == (1, 0)


def test_a_reply_of_the_wrong_size_still_answers_the_kernel(kernel, monkeypatch, caplog):
    resumed(kernel)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    monkeypatch.setattr(log, "handlers", {**log.handlers,
                                          T.IN_SYNC: lambda log, request: answered(b"\0" * 3)})
    assert kernel.send(T.IN_SYNC, protocol.pack_u64(0)) == (-errno.EIO, b"")
    assert "bad reply payload" in caplog.text


def test_a_reconnect_whose_state_dir_failed_falls_back_to_the_log_device(tmp_path, caplog):
    device = tmp_path / "logdev"
    with open(device, "wb") as f:
        f.truncate(1 << 20)
    ctr = f"131072 disk {device} 1024 nosync"
    before = resumed(Kernel(LogTable(tmp_path / "state")), ctr)
    before.ok(T.FLUSH, protocol.pack_regions([3]))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    after = Kernel(LogTable(not_a_dir), uuid=before.uuid, luid=before.luid)
    assert after.ctr(ctr, reconnect=True) == (0, b"")
    after.ok(T.RESUME)
    assert "serving from the log device's bits" in caplog.text
    assert after.in_sync(3) == 0 and after.sync_count() == 127  # the device's bits
    assert after.status_info() == "3 disk 0:0 D\0"
    after.ok(T.FLUSH, protocol.pack_regions([5]))  # the device still takes marks
    assert device.read_bytes()[BITMAP_OFFSET] == 0xD7


def test_a_reconnect_whose_instance_file_cannot_be_mapped_still_succeeds(state_dir,
                                                                       monkeypatch, caplog):
    """mmap refused (ENOMEM: vm.max_map_count reached, or memory): a reconnect CTR runs
    from memory, as for any storage failure, where it was answered -EIO and re-sent by the
    kernel every 2 s for ever; a first CTR is refused with the mapping's own errno."""
    before = resumed(Kernel(LogTable(state_dir)))
    file_mapping = mmap.mmap

    def refused(fd: int, *args, **kwargs):
        if fd != -1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return file_mapping(fd, *args, **kwargs)  # anonymous memory is still had

    monkeypatch.setattr(mmap, "mmap", refused)
    after = Kernel(LogTable(state_dir), uuid=before.uuid, luid=before.luid)
    assert after.ctr(CORE, reconnect=True) == (0, b"")  # its file is there, unmappable
    after.ok(T.RESUME)
    assert "reconnect CTR without storage" in caplog.text
    assert "cannot map" in caplog.text
    assert after.in_sync(0) == 0  # nothing saved could be read: out of sync
    fresh = Kernel(after.table, uuid="another")
    assert fresh.ctr(CORE) == (-errno.ENOMEM, b"")  # a first CTR fails the table load


# -- CTR records: restoring what a restarted server lost ----------------------------------------


def test_every_ctr_is_recorded_and_dtr_removes_the_record(kernel, state_dir):
    resumed(kernel, NOSYNC)
    record = records.record_path(state_dir, kernel.uuid, kernel.luid)
    assert records.read(record) == records.Record(kernel.uuid, NOSYNC)
    kernel.ok(T.DTR)
    assert not record.exists()


def test_a_record_of_an_older_shardlog_still_restores_its_log(state_dir):
    before = resumed(Kernel(LogTable(state_dir)), NOSYNC)
    before.ok(T.FLUSH, protocol.pack_regions([9]))
    records.record_path(state_dir, before.uuid, before.luid).write_text(NOSYNC)  # old format
    after = Kernel(LogTable(state_dir), uuid=before.uuid, luid=before.luid)
    assert after.send(T.IS_CLEAN, protocol.pack_u64(9)) == (0, protocol.pack_bool(False))


def test_a_record_of_another_uuid_is_not_used(state_dir, caplog):
    before = resumed(Kernel(LogTable(state_dir), uuid="a"), NOSYNC)
    record = records.record_path(state_dir, "a", before.luid)
    record.write_text(record.read_text().replace("uuid a\n", "uuid b\n"))
    after = Kernel(LogTable(state_dir), uuid="a", luid=before.luid)
    assert after.send(T.GET_SYNC_COUNT) == (-errno.ESRCH, b"")
    assert "is of log b, not a" in caplog.text


def test_a_never_resumed_instance_is_restored_pending_for_its_first_resume(state_dir):
    before = Kernel(LogTable(state_dir))
    assert before.ctr(NOSYNC) == (0, b"")  # then the server died, before GET_REGION_SIZE
    after = Kernel(LogTable(state_dir), uuid=before.uuid, luid=before.luid)
    assert after.ok(T.GET_REGION_SIZE) == protocol.pack_u64(1024)  # no -ESRCH: the table
    log = after.table.logs[(after.uuid, after.luid)]  # load would fail on it
    assert log.state is LogState.PENDING  # a reload's old instance may still write
    after.ok(T.RESUME)
    assert after.sync_count() == 128  # the first RESUME's work: nosync


def test_a_resumed_log_whose_instance_file_is_lost_is_restored_resumed(state_dir, caplog):
    """A record with no instance file beside it (lost, or never made: a reconnect CTR that
    ran without storage still records its CTR): nothing says the instance was never
    resumed, and the kernel, which believes it is, sends its I/O requests.  So it is
    restored as the kernel's reconnect would (CTR, then RESUME), every region out of
    sync, rather than left pending to refuse them (-EINVAL) for ever."""
    before = resumed(Kernel(LogTable(state_dir)))
    before.ok(T.FLUSH, protocol.pack_regions([3]))
    instance_file_path(state_dir, before.uuid, before.luid).unlink()  # the server died
    after = Kernel(LogTable(state_dir), uuid=before.uuid, luid=before.luid)
    assert after.in_sync(3) == 0  # answered, where it was -EINVAL
    assert after.table.logs[(after.uuid, after.luid)].state is LogState.RESUMED
    assert after.send(T.IS_CLEAN, protocol.pack_u64(3)) == (0, protocol.pack_bool(False))
    assert after.regions(T.MARK_REGION, 5) == (0, b"")
    assert after.ok(T.FLUSH) == b""
    assert after.sync_count() == 0  # nothing saved: every region is resynced
    assert "no state saved" in caplog.text


def test_dtr_of_a_recorded_log_the_server_lost_removes_its_files(state_dir):
    before = resumed(Kernel(LogTable(state_dir)))
    after = Kernel(LogTable(state_dir), uuid=before.uuid, luid=before.luid)
    assert after.send(T.DTR) == (0, b"")
    assert not instance_file_path(state_dir, after.uuid, after.luid).exists()
    assert not records.record_path(state_dir, after.uuid, after.luid).exists()
    assert after.send(T.DTR) == (-errno.ESRCH, b"")  # nothing left: the kernel ignores it


def test_stale_instances_lose_their_records_too(state_dir):
    resumed(Kernel(LogTable(state_dir), uuid="u", luid=1))
    fresh = resumed(Kernel(LogTable(state_dir), uuid="u", luid=2))
    assert not records.record_path(state_dir, "u", 1).exists()
    assert records.record_path(state_dir, "u", 2).exists()
    assert fresh.sync_count() == 0


def test_a_record_that_cannot_be_written_costs_only_the_shortcut(kernel, state_dir,
                                                                 monkeypatch, caplog):
    def refuse(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "save", refuse)
    resumed(kernel)
    assert "cannot record its CTR" in caplog.text
    after = Kernel(LogTable(state_dir), uuid=kernel.uuid, luid=kernel.luid)
    assert after.send(T.GET_SYNC_COUNT) == (-errno.ESRCH, b"")  # the kernel reconnects


# -- group commit ---------------------------------------------------------------------------------


def test_deferred_flushes_are_committed_together_before_any_reply(state_dir):
    table = LogTable(state_dir)
    kernels = [resumed(Kernel(table, uuid=f"u{n}"), NOSYNC) for n in range(3)]
    maps = [table.logs[(k.uuid, k.luid)].region_map for k in kernels]
    before = [m.commits for m in maps]
    flushes = [k.request(T.FLUSH, protocol.pack_regions([n])) for n, k in enumerate(kernels)]
    again = kernels[0].request(T.FLUSH)  # a log staged twice is committed once
    for request in (*flushes, again):
        assert table.decide(request) is None
    assert [m.commits for m in maps] == before  # marked, nothing synced yet
    replies = [protocol.decode_reply(encode(q, o))
               for q, o in zip((*flushes, again), table.commit_staged(), strict=True)]
    assert [(r.seq, r.error) for r in replies] == [(q.seq, 0) for q in (*flushes, again)]
    assert [m.commits for m in maps] == [n + 1 for n in before]
    assert table.commit_staged() == []
    # Anything but FLUSH is answered at once, deferral or not.
    assert table.decide(kernels[1].request(T.GET_SYNC_COUNT))


def test_a_flush_with_nothing_to_commit_is_answered_at_once(state_dir):
    table = LogTable(state_dir)
    kernel = resumed(Kernel(table), NOSYNC)
    region_map = table.logs[(kernel.uuid, kernel.luid)].region_map
    assert table.decide(kernel.request(T.FLUSH, protocol.pack_regions([3]))) is None
    assert table.commit_staged() == [MARKED[1]]
    commits = region_map.commits
    # Marked and committed already: nothing to stage, no commit.
    assert table.decide(kernel.request(T.FLUSH, protocol.pack_regions([3]))) == MARKED[1]
    assert table.decide(kernel.request(T.FLUSH)) == OK
    assert table.commit_staged() == [] and region_map.commits == commits


def test_an_outcome_says_what_the_metrics_count(state_dir):
    table = LogTable(state_dir)
    kernel = resumed(Kernel(table), "1024 core 8")  # every region to recover
    outcome = table.decide(kernel.request(T.MARK_REGION, protocol.pack_regions([1, 2])))
    assert (outcome.error, outcome.counted, outcome.amount) == (0, key("region_marks"), 2)
    outcome = table.decide(kernel.request(T.GET_RESYNC_WORK))
    assert (outcome.counted, outcome.amount) == (key("recovery_handed_out"), 1)
    assert outcome.payload == protocol.pack_resync_work(True, 0)
    refused = table.decide(kernel.request(T.MARK_REGION, protocol.pack_regions([4096])))
    assert (refused.error, refused.payload, refused.counted) == (-errno.EINVAL, b"", None)


def test_each_state_has_a_function_for_every_request_of_a_log():
    for state, handlers in dirtylog.HANDLERS.items():
        assert set(handlers) == set(T) - {T.CTR, T.DTR}, state
    assert dirtylog.TRANSITIONS[LogState.PENDING] == {T.RESUME: LogState.RESUMED}


def test_a_failed_group_commit_fails_only_that_logs_flush(state_dir, monkeypatch):
    table = LogTable(state_dir)
    good, bad = (resumed(Kernel(table, uuid=u), NOSYNC) for u in ("good", "bad"))
    bad_map = table.logs[(bad.uuid, bad.luid)].region_map

    def failing_commit(everything=False):
        raise StoreError(errno.EIO, "write error", device_failed=True)

    monkeypatch.setattr(bad_map, "commit", failing_commit)
    requests = [k.request(T.FLUSH, protocol.pack_regions([1])) for k in (bad, good)]
    for request in requests:
        table.decide(request)
    errors = [protocol.decode_reply(encode(q, o)).error
              for q, o in zip(requests, table.commit_staged(), strict=True)]
    assert errors == [-errno.EIO, 0]


def test_each_storage_failure_a_log_handles_is_counted_once_in_its_table(state_dir,
                                                                         monkeypatch):
    table = LogTable(state_dir)
    kernel = resumed(Kernel(table, uuid="failing"), NOSYNC)
    region_map = table.logs[(kernel.uuid, kernel.luid)].region_map

    def failing_commit(everything=False):
        raise StoreError(errno.EIO, "write error", source=LOG_DEVICE)

    monkeypatch.setattr(region_map, "commit", failing_commit)
    assert table.storage_failures.take() == {}
    for _ in range(2):
        assert kernel.send(T.FLUSH, protocol.pack_regions([1])) == (-errno.EIO, b"")
    assert table.storage_failures.take() == {LOG_DEVICE: 2}


def test_a_deferred_flush_for_an_unknown_log_is_answered_at_once(table):
    kernel = Kernel(table, uuid="nobody")
    request = kernel.request(T.FLUSH)
    reply = encode(request, table.decide(request))
    assert protocol.decode_reply(reply).error == -errno.ESRCH


def test_a_flush_then_dtr_in_one_batch_commits_the_flush_first(state_dir, tmp_path):
    device = tmp_path / "logdev"
    device.write_bytes(bytes(1 << 20))
    table = LogTable(state_dir)
    core = resumed(Kernel(table, uuid="core"), NOSYNC)
    disk = resumed(Kernel(table, uuid="disk"), f"131072 disk {device} 1024 nosync")
    commits = [table.logs[(k.uuid, k.luid)].region_map.commits for k in (core, disk)]
    flushes = [k.request(T.FLUSH, protocol.pack_regions([5])) for k in (core, disk)]
    for kernel, flush in zip((core, disk), flushes, strict=True):
        assert table.decide(flush) is None
        maps = table.logs[(kernel.uuid, kernel.luid)].region_map
        dtr = kernel.request(T.DTR)
        assert protocol.decode_reply(encode(dtr, table.decide(dtr))).error == 0
        assert maps.commits == commits.pop(0) + 1  # committed before the DTR closed it
    replies = [protocol.decode_reply(encode(f, o))
               for f, o in zip(flushes, table.commit_staged(), strict=True)]
    assert [(r.seq, r.error) for r in replies] == [(f.seq, 0) for f in flushes]
    assert not device.read_bytes()[BITMAP_OFFSET] & 1 << 5  # the mark reached the device


def test_a_flush_then_a_replacing_ctr_in_one_batch_commits_the_flush_first(state_dir, caplog):
    table = LogTable(state_dir)
    kernel = resumed(Kernel(table), NOSYNC)
    old_map = table.logs[(kernel.uuid, kernel.luid)].region_map
    flush = kernel.request(T.FLUSH, protocol.pack_regions([5]))
    assert table.decide(flush) is None
    ctr = kernel.request(T.CTR, CORE.encode())
    assert protocol.decode_reply(encode(ctr, table.decide(ctr))).error == 0
    assert old_map.commits == 2  # its creation, then the staged FLUSH
    (outcome,) = table.commit_staged()
    assert protocol.decode_reply(encode(flush, outcome)).error == 0
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


# The reproducer: CTR "8192 core 7 nosync" (7 is not a power of two) for log-a,
# luid 1, as a live server received it.
REFUSED_CTR = bytes.fromhex(
    "d600000003000000050000000000000007000000010000000500000000000000b2000000010000000000"
    "0000" "6c6f672d61" + "00" * 127 + "0300000000000000050000000100000012000000"
    "3831393220636f72652037206e6f73796e63")


def state_files(state_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((state_dir / "logs").iterdir())}


@pytest.mark.parametrize("how", ["bad constructor", "too long", "storage fails"])
def test_a_refused_ctr_for_a_live_instance_leaves_it_serving(state_dir, monkeypatch, how):
    table = LogTable(state_dir)
    kernel = Kernel(table, uuid="log-a", luid=1)
    resumed(kernel, "8192 core 8 nosync")
    kernel.ok(T.FLUSH, protocol.pack_regions([5]))
    before = state_files(state_dir)
    if how == "bad constructor":
        request = protocol.decode_datagram(REFUSED_CTR)
        assert request.ctr_string == "8192 core 7 nosync" and request.uuid == "log-a"
    elif how == "too long":
        request = kernel.request(T.CTR, b"8192 core 8 nosync".ljust(protocol.MAX_PAYLOAD))
    else:
        def no_space(*args, **kw):
            raise StoreError(errno.ENOSPC, "no space")
        monkeypatch.setattr(regionmap, "_create_instance_file", no_space)
        request = kernel.request(T.CTR, b"8192 core 8")
    reply = protocol.decode_reply(table.answer(request))
    assert reply.error in (-errno.EINVAL, -errno.ENOSPC)
    assert state_files(state_dir) == before  # instance file and CTR record untouched
    assert kernel.send(T.IS_CLEAN, protocol.pack_u64(5)) == (0, protocol.pack_bool(False))
    assert kernel.in_sync(5) == 1 and kernel.sync_count() == 1024


LONG_UUID = "%" * 128  # legal; 384 characters escaped


def test_a_log_with_a_long_uuid_is_created_restored_and_destroyed(state_dir):
    before = Kernel(LogTable(state_dir), uuid=LONG_UUID, luid=9)
    assert before.send(T.DTR) == (-errno.ESRCH, b"")  # unknown: the kernel ignores it
    resumed(before, NOSYNC)
    before.ok(T.FLUSH, protocol.pack_regions([3]))
    after = Kernel(LogTable(state_dir), uuid=LONG_UUID, luid=9)  # a restarted server
    assert after.send(T.IS_CLEAN, protocol.pack_u64(3)) == (0, protocol.pack_bool(False))
    # A new activation (new luid) removes the old one's files at its first RESUME.
    fresh = resumed(Kernel(after.table, uuid=LONG_UUID, luid=10), NOSYNC)
    assert not instance_file_path(state_dir, LONG_UUID, 9).exists() or (LONG_UUID, 9) in (
        after.table.logs)
    assert fresh.send(T.DTR) == (0, b"")
    assert after.send(T.DTR) == (0, b"")
    assert not list((state_dir / "logs").iterdir())


# -- listing the logs for a report --------------------------------------------------------------


def test_a_listing_describes_the_logs_of_its_start_a_slice_at_a_time(kernel):
    table = kernel.table
    logs = [resumed(Kernel(table, uuid=f"log-{n}"), NOSYNC) for n in range(5)]
    listing = table.listing()
    assert [status.uuid for status in listing.take(2)] == ["log-0", "log-1"]
    assert not listing.done
    logs[3].ok(T.DTR)  # destroyed before its turn: left out
    resumed(Kernel(table, uuid="later"))  # created after the listing began: not in it
    logs[4].ok(T.MARK_REGION, protocol.pack_regions([7]))  # described as it is when taken
    assert [status.uuid for status in listing.take(2)] == ["log-2"]
    assert not listing.done
    (last,) = listing.take(2)
    assert listing.done and listing.take(2) == []
    assert (last.uuid, last.dirty) == ("log-4", 1)
    assert sorted(status.uuid for status in table.statuses()) == [
        "later", "log-0", "log-1", "log-2", "log-4"]
