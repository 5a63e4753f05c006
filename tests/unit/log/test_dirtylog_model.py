"""A real LogTable, driven through the real codec, against a small reference model of one log.

The model (:class:`Model`) is the semantics of shardlog/dirtylog.py's docstring written out
with plain sets: regions ``[0, n)``, a sync set and a clean set, the resync pointer and the
region handed out for recovery, and, for a ``disk`` log, the clean regions its device holds.
Each request is encoded with ``protocol.encode_request``, decoded with
``protocol.decode_datagram``, answered by ``LogTable.answer`` and read back with
``protocol.decode_reply``; its error and payload must be what the model predicts.  After
every step the real log's bits must equal the model's and keep their invariants, and at
the points where the bits must be durable (FLUSH, POSTSUSPEND, RESUME) the image on stable
storage (the instance file of a core log, the log device of a disk log) is read back.

Events from outside the protocol are part of the machine:

- a server crash, with or without a FLUSH first: a new LogTable on the same state
  directory gets the kernel's reconnect CTR (NUL counted) and RESUME, and continues with
  exactly the old bits (the instance file survives in the page cache), unflushed marks
  made durable by that RESUME;
- the same crash with the instance file lost: a core log then has every region out of
  sync, a disk log the clean bits of its device; never more in sync than before;
- a new activation: POSTSUSPEND, DTR, a new LogTable and a first CTR, maybe for a new
  size; a ``disk`` log carries its clean bits over through its device (or grows/shrinks),
  a ``core`` log starts over.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shardlog.log.logtable import LogTable
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

UUID = "LVM-model-test-mirror"
LUID = 0x5EED0001
KEY = (UUID, LUID)
EINVAL = -errno.EINVAL
ESRCH = -errno.ESRCH
DEVICE_BYTES = 2 << 20  # the stand-in log device: a zero-filled regular file
MIRROR_MAGIC, MIRROR_DISK_VERSION, BITMAP_OFFSET = 0x4D695272, 2, 1024  # dm-log.c

PENDING, RESUMED, SUSPENDED = "pending", "resumed", "suspended"

# Sizes around the word boundaries of the bitmap (8-bit bytes, 32-bit words), and any other.
REGION_COUNTS = st.sampled_from([1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100]) | st.integers(1, 100)
HUGE_REGIONS = st.sampled_from([1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])


def any_region(n: int) -> st.SearchStrategy[int]:
    """Mostly a region of the log, sometimes one just past it or far out of range."""
    inside = st.integers(0, n - 1)
    return inside | inside | inside | st.integers(n, n + 40) | HUGE_REGIONS


def region_of_interest(model: Model) -> st.SearchStrategy[int]:
    """A region in sync, one out of sync, a clean one, a dirty one, or any (maybe out of
    range)."""
    everything = set(range(model.n))
    groups = [model.sync, everything - model.sync, model.clean, everything - model.clean]
    choices = [st.sampled_from(sorted(group)) for group in groups if group]
    return st.one_of(*choices, any_region(model.n))


def region_lists(n: int) -> st.SearchStrategy[list[int]]:
    """0-32 regions (the kernel's group size): mostly all in range, else some out of range."""
    inside = st.lists(st.integers(0, n - 1), max_size=32)
    return inside | inside | inside | st.lists(any_region(n), max_size=32)


def ones(bits, n: int) -> set[int]:
    """The set positions among the first ``n`` bits of a real bitmap."""
    return {i for i in range(n) if bits[i]}


def stored_clean(path: Path, n: int) -> set[int]:
    """The clean regions of the kernel disk-log image at the start of ``path`` (the layout
    of protocol.md §4.1, read by hand), after checking its header and the bitmap's tail."""
    data = path.read_bytes()
    assert struct.unpack_from("<IIQ", data, 0) == (MIRROR_MAGIC, MIRROR_DISK_VERSION, n)
    words = -(-n // 32)
    bitmap = data[BITMAP_OFFSET : BITMAP_OFFSET + 4 * words]
    bits = [bitmap[i >> 3] >> (i & 7) & 1 for i in range(32 * words)]
    assert not any(bits[n:]), "stored bits past the last region must be 0"
    return {i for i in range(n) if bits[i]}


class Model:
    """One log's state, obviously: sets and ints, following dirtylog.py's docstring."""

    def __init__(self, n: int, disk: bool, mode: str):
        self.disk = disk
        self.mode = mode  # "", "sync" or "nosync"
        # disk logs: the clean regions the log device holds (None: no valid header on it),
        # and the region count its header gives
        self.device: set[int] | None = None
        self.device_regions = 0
        self.new_activation(n)

    def new_activation(self, n: int) -> None:
        """State after a first CTR for ``n`` regions: every region in sync and clean for
        nosync, otherwise out of sync and dirty (a disk log reads its device at RESUME)."""
        self.n = n
        self.state = PENDING
        self.sync = set(range(n)) if self.mode == "nosync" else set()
        self.clean = set(self.sync)
        self.pointer = 0  # GET_RESYNC_WORK searches from here
        self.recovering: int | None = None  # handed out, no SET_REGION_SYNC yet
        self.halted = False  # PRESUSPEND until RESUME
        self.unsettled: set[int] = set()  # marked, and not cleared since

    def disk_bits_at_resume(self, honor_saved: bool, new_clean: bool) -> set[int]:
        """disk_resume: the device's bits of the regions its header covers if they are
        honoured; every other region clean if ``new_clean``, else dirty."""
        valid = self.device is not None
        saved = min(self.device_regions, self.n) if honor_saved and valid else 0
        kept = {r for r in self.device or () if r < saved}
        return kept | (set(range(saved, self.n)) if new_clean else set())

    def restart(self, sync: set[int], clean: set[int]) -> None:
        """A reconnect CTR + RESUME gave a new instance these bits, written back."""
        self.sync, self.clean = set(sync), set(clean)
        if self.disk:
            self.device, self.device_regions = set(clean), self.n
        self.state = RESUMED
        self.pointer = 0
        self.recovering = None
        self.halted = False

    # -- requests: each returns (error, expected answer) ----------------------------------------

    def _accepts(self, regions, marks: bool) -> bool:
        if self.state == PENDING:
            return False
        if marks and self.state == SUSPENDED:
            return False
        return all(r < self.n for r in regions)

    def resume(self):
        self.halted = False  # every RESUME restarts recovery (dm_rh_start_recovery)
        if self.state == RESUMED:  # a second RESUME without a suspend changes no bits
            return 0, None
        if self.disk:  # a disk log reads its device at every RESUME; sync = clean
            self.clean = self.disk_bits_at_resume(self.mode == "", self.mode == "nosync")
            self.sync = set(self.clean)
            self.device, self.device_regions = set(self.clean), self.n  # written back
            self.unsettled -= self.clean
        # a core log keeps its bits across a suspend
        self.state = RESUMED
        self.pointer = 0
        self.recovering = None
        self.halted = False
        return 0, None

    def presuspend(self):
        self.halted = True
        return 0, None

    def postsuspend(self):
        if self.state == PENDING:
            return 0, None
        self.state = SUSPENDED
        self.recovering = None
        if self.disk:
            self.device = set(self.clean)
        return 0, None

    def mark(self, regions):
        if not self._accepts(regions, marks=True):
            return EINVAL, None
        self.clean -= set(regions)
        self.unsettled |= set(regions)
        return 0, None

    def clear(self, regions):
        if not self._accepts(regions, marks=False):
            return EINVAL, None
        if self.state == RESUMED:  # after POSTSUSPEND a CLEAR is accepted and ignored
            self.clean |= set(regions) & self.sync  # clean only when in sync
            self.unsettled -= set(regions)
        return 0, None

    def flush(self, regions):
        """Marks the regions (integrated flush), then commits."""
        if not self._accepts(regions, marks=bool(regions)):
            return EINVAL, None
        self.clean -= set(regions)
        self.unsettled |= set(regions)
        return 0, None

    def in_sync(self, region):
        if not self._accepts([region], marks=False):
            return EINVAL, None
        return 0, int(region in self.sync)

    def is_clean(self, region):
        if not self._accepts([region], marks=False):
            return EINVAL, None
        return 0, int(region in self.clean)

    def is_remote_recovering(self, region):
        """Never recovering; the hint is n - 1 while this pass has resync work left, else n
        (dirtylog.DirtyLog.in_sync_hint)."""
        if not self._accepts([region], marks=False):
            return EINVAL, None
        todo = [r for r in range(self.pointer, self.n) if r not in self.sync]
        work_left = self.recovering is not None or bool(todo)
        return 0, (0, self.n - 1 if work_left else self.n)

    def set_region_sync(self, region, in_sync):
        if not self._accepts([region], marks=False):
            return EINVAL, None
        if self.recovering == region:
            self.recovering = None
        if in_sync:
            self.sync.add(region)
        else:
            self.sync.discard(region)
            self.clean.discard(region)
            self.unsettled.add(region)
            if self.disk and self.state == SUSPENDED:  # committed at once
                self.device = set(self.clean)
        return 0, None

    def get_resync_work(self):
        if self.state != RESUMED or self.halted:
            return 0, (0, 0)
        if self.recovering is None:
            todo = [r for r in range(self.pointer, self.n) if r not in self.sync]
            if not todo:
                self.pointer = self.n
                return 0, (0, 0)
            self.recovering = todo[0]
            self.pointer = todo[0] + 1
        return 0, (1, self.recovering)

    def get_sync_count(self):
        return 0, len(self.sync)


class Kernel:
    """Sends one log's requests as dm-log-userspace does, through the real codec."""

    def __init__(self, table: LogTable):
        self.table = table
        self.seq = 0  # also the number of requests sent

    def send(self, request_type: RequestType, data: bytes = b"", *, luid: int = LUID):
        self.seq += 1
        raw = protocol.encode_request(request_type, seq=self.seq, uuid=UUID, luid=luid,
                                      data=data, version=3)
        request = protocol.decode_datagram(raw)
        assert request.request_type is request_type
        reply = protocol.decode_reply(self.table.answer(request))
        assert reply.seq == self.seq and not reply.ack
        if reply.error:
            assert reply.data == b"", "an error reply carries no data"
        return reply.error, reply.data


# How each request's reply payload reads (the kernel's view).
def _none(data: bytes):
    assert data == b"", f"expected no payload, got {data!r}"


def _s64(data: bytes) -> int:
    assert len(data) == 8
    return struct.unpack("=q", data)[0]


def _u64(data: bytes) -> int:
    assert len(data) == 8
    return struct.unpack("=Q", data)[0]


def _pair(data: bytes) -> tuple[int, int]:
    assert len(data) == 16
    return struct.unpack("=qQ", data)


def in_model(method):
    """A precondition: the machine has been set up."""
    return precondition(lambda self: self.model is not None)(method)


class DirtyLogMachine(RuleBasedStateMachine):
    """One log of a LogTable, its model, and the kernel in between."""

    def __init__(self, base: Path, disk: bool):
        super().__init__()
        self.disk = disk
        self.log_type = "disk" if disk else "core"
        self.workdir = Path(tempfile.mkdtemp(dir=base))
        self.state_dir = self.workdir / "state"
        self.device = self.workdir / "logdev.img"
        self.table = LogTable(self.state_dir)
        self.kernel = Kernel(self.table)
        self.model: Model | None = None
        self.in_flight: set[int] = set()  # written, CLEAR not sent yet
        self.verified = 0  # requests sent when the invariants last held

    # -- plumbing ------------------------------------------------------------------------------

    def expect(self, request_type: RequestType, data: bytes, predicted, decode) -> None:
        error, payload = self.kernel.send(request_type, data)
        want_error, want_value = predicted
        assert error == want_error, f"{request_type.name}: error {error}, model {want_error}"
        if error == 0:
            got = decode(payload)
            assert got == want_value, f"{request_type.name}: {got!r}, model {want_value!r}"

    def real_log(self):
        return self.table.logs[KEY]

    def stored(self) -> set[int]:
        """The clean bits on stable storage: the log device, or the core instance file."""
        return stored_clean(self.real_log().region_map.store_path, self.model.n)

    def first_ctr(self) -> None:
        error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode("ascii"))
        assert (error, payload) == (0, b"")

    def new_table(self) -> None:
        self.table = LogTable(self.state_dir)
        self.kernel.table = self.table

    def configure(self, n: int, spare: int) -> None:
        """The CTR string for ``n`` regions (the last one maybe short, by ``spare``)."""
        size = self.region_size
        last = size if n == 1 else 1 + spare % size  # sectors in the last region
        args = [str(size)] + ([self.mode] if self.mode else [])
        if self.disk:
            args.insert(0, str(self.device))
        self.ctr_string = f"{(n - 1) * size + last} {self.log_type} {' '.join(args)}"
        self.table_args = f"{self.log_type} {len(args)} {' '.join(args)} "

    # -- set-up --------------------------------------------------------------------------------

    @initialize(n=REGION_COUNTS, mode=st.sampled_from(["", "sync", "nosync"]),
                region_size=st.sampled_from([2, 8, 1024]), spare=st.integers(0, 1 << 20),
                resume=st.sampled_from([True, True, True, False]))
    def construct(self, n, mode, region_size, spare, resume):
        if self.disk:
            with open(self.device, "wb") as f:
                f.truncate(DEVICE_BYTES)
        self.region_size = region_size
        self.mode = mode
        self.configure(n, spare)
        self.first_ctr()
        self.model = Model(n, self.disk, mode)
        assert self.real_log().region_count == n
        if resume:
            self.resume()

    # -- life cycle ----------------------------------------------------------------------------

    @in_model
    @rule()
    def resume(self):
        effective = self.model.state != RESUMED
        self.expect(RequestType.RESUME, b"", self.model.resume(), _none)
        if effective:
            assert self.stored() == self.model.clean

    @in_model
    @rule()
    def presuspend(self):
        self.expect(RequestType.PRESUSPEND, b"", self.model.presuspend(), _none)

    @in_model
    @rule()
    def postsuspend(self):
        was_pending = self.model.state == PENDING
        self.expect(RequestType.POSTSUSPEND, b"", self.model.postsuspend(), _none)
        if not was_pending:  # everything committed
            assert self.stored() == self.model.clean

    @in_model
    @rule(kind=st.sampled_from(["reconnect ctr", "unknown log", "region size", "status"]))
    def requests_that_change_nothing(self, kind):
        if kind == "reconnect ctr":  # the kernel's reconnect loop, for a log we still have
            error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode() + b"\0")
            assert (error, payload) == (0, b"")
        elif kind == "unknown log":  # -ESRCH, so that the kernel reconnects
            error, payload = self.kernel.send(RequestType.IN_SYNC, protocol.pack_u64(0),
                                              luid=LUID + 1)
            assert (error, payload) == (ESRCH, b"")
        elif kind == "region size":
            self.expect(RequestType.GET_REGION_SIZE, b"", (0, self.region_size), _u64)
        else:
            disk_info = b"3 disk 0:0 A\0"  # a regular file stands in for the device
            info = disk_info if self.disk else b"1 core\0"
            self.expect(RequestType.STATUS_INFO, b"", (0, info), bytes)
            table = self.table_args.encode() + b"\0"
            self.expect(RequestType.STATUS_TABLE, b"", (0, table), bytes)

    @precondition(lambda self: self.model is not None and self.model.state == PENDING)
    @rule()
    def resent_first_ctr_while_pending_changes_nothing(self):
        self.first_ctr()

    @precondition(lambda self: self.model is not None and self.model.state == SUSPENDED)
    @rule(n=REGION_COUNTS, spare=st.integers(0, 1 << 20), resume=st.booleans())
    def new_activation_on_a_restarted_server(self, n, spare, resume):
        """POSTSUSPEND was answered; DTR; the server restarts; the table is loaded again,
        maybe for a new size (a disk log then grows or shrinks)."""
        clean_at_suspend = ones(self.real_log().region_map.clean_bits, self.model.n)
        assert self.kernel.send(RequestType.DTR) == (0, b"")
        self.new_table()
        self.configure(n, spare)
        self.first_ctr()
        self.model.new_activation(n)
        self.in_flight = set()
        if resume:
            self.resume()
            if self.disk and self.mode == "":
                # the disk log carries its state across activations
                kept = {r for r in clean_at_suspend if r < n}
                assert ones(self.real_log().region_map.sync_bits, n) & kept == kept

    @precondition(lambda self: self.model is not None and self.model.state == SUSPENDED)
    @rule(n=REGION_COUNTS, spare=st.integers(0, 1 << 20))
    def first_ctr_replaces_a_suspended_log_whose_dtr_never_came(self, n, spare):
        self.configure(n, spare)
        self.first_ctr()
        self.model.new_activation(n)
        self.in_flight = set()

    @in_model
    @rule(flush_first=st.booleans())
    def crash_and_reconnect(self, flush_first):
        self.crash_and_check_restore(flush_first)

    def crash(self, flush_first: bool, lose_instance_file: bool = False) -> None:
        """The server dies (after a FLUSH, maybe); a new one gets the reconnect CTR and
        RESUME."""
        if flush_first:
            self.flush_regions([])
        region_map = self.real_log().region_map
        instance_file = region_map.path
        region_map.close()  # the process is gone: nothing more is written
        if lose_instance_file:
            instance_file.unlink()
        self.new_table()
        error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode() + b"\0")
        assert (error, payload) == (0, b"")
        assert self.kernel.send(RequestType.RESUME) == (0, b"")

    def crash_and_check_restore(self, flush_first: bool) -> None:
        model = self.model
        never_resumed = model.state == PENDING
        self.crash(flush_first)
        if never_resumed:
            # The kernel had started no I/O on it: the reconnect RESUME does the work of
            # the first RESUME the dead server never got (a disk log reads its device).
            model.resume()
        region_map = self.real_log().region_map
        sync = ones(region_map.sync_bits, model.n)
        clean = ones(region_map.clean_bits, model.n)
        # The restarted server continues exactly (the instance file is in the page cache) ...
        assert sync == model.sync, "the sync bits changed across a server restart"
        assert clean == model.clean, "the clean bits changed across a server restart"
        # ... and its RESUME made every acknowledged mark durable, flushed or not.
        stored = self.stored()
        assert stored == clean
        assert not stored & model.unsettled, "a marked region is clean on stable storage"
        model.restart(sync, clean)

    @in_model
    @rule()
    def crash_losing_the_instance_file(self):
        """Nothing saved: a core log comes back all out of sync, a disk log with its
        device's clean bits; never a region in sync that was not (or, before the first
        RESUME, that this RESUME would not have called in sync)."""
        model = self.model
        if model.state != PENDING:
            self.flush_regions([])  # marks are durable; the dead server's last clears may not be
        on_device = self.device_bits_kept(model.n) if self.disk else set()
        if model.state == PENDING:
            before = model.disk_bits_at_resume(model.mode == "", model.mode == "nosync") \
                if self.disk else set()
        else:
            before = set(model.sync)
        self.crash(flush_first=False, lose_instance_file=True)
        region_map = self.real_log().region_map
        sync = ones(region_map.sync_bits, model.n)
        clean = ones(region_map.clean_bits, model.n)
        assert sync == clean
        if model.mode == "sync":  # the device's bits, or none (sync: a resync is due anyway)
            assert clean <= on_device
        else:
            assert clean == on_device
        assert not sync - before, f"came back in sync: {sorted(sync - before)}"
        assert not sync & model.unsettled, "a marked region came back in sync"
        assert self.stored() == clean
        model.restart(sync, clean)

    def device_bits_kept(self, n: int) -> set[int]:
        """The clean bits disk_resume keeps from the device when it honours them: those of
        the regions its header covers, none without a valid header."""
        data = self.device.read_bytes()
        magic, _version, saved = struct.unpack_from("<IIQ", data, 0)
        if magic != MIRROR_MAGIC:
            return set()
        bitmap = data[BITMAP_OFFSET:]
        return {i for i in range(min(saved, n)) if bitmap[i >> 3] >> (i & 7) & 1}

    # -- what dm-raid1 does --------------------------------------------------------------------

    @in_model
    @rule(data=st.data(), integrated=st.booleans())
    def kernel_writes(self, data, integrated):
        """Marks before the writes: MARK + FLUSH, or an integrated FLUSH."""
        regions = data.draw(st.lists(st.integers(0, self.model.n - 1), min_size=1, max_size=32),
                            label="written")
        if integrated:
            self.flush_regions(regions)
        else:
            self.mark_regions(regions)
            self.flush_regions([])
        self.in_flight |= set(regions)

    @precondition(lambda self: self.model is not None and self.in_flight)
    @rule()
    def writes_complete(self):
        """The CLEAR and FLUSH after the writes (maybe only after POSTSUSPEND)."""
        done = sorted(self.in_flight)
        for i in range(0, len(done), 32):  # the kernel groups at most 32 regions a request
            self.clear_regions(done[i : i + 32])
        self.flush_regions([])
        self.in_flight = set()

    @in_model
    @rule(recovered=st.booleans(), retried=st.booleans())
    def kernel_recovers_a_region(self, recovered, retried):
        """GET_RESYNC_WORK (again if the answer was lost), the copy, SET_REGION_SYNC, and
        for a success CLEAR + FLUSH."""
        assigned, region = self.resync_work()
        if retried:
            assert self.resync_work() == (assigned, region)
        if not assigned:
            return
        self.set_sync(region, recovered)
        if recovered:
            self.clear_regions([region])
            self.flush_regions([])

    @in_model
    @rule(data=st.data(), clears_after=st.booleans(), leg_failed=st.booleans(),
          resume=st.booleans())
    def kernel_suspends(self, data, clears_after, leg_failed, resume):
        """dm-raid1's suspend: PRESUSPEND; the writes drain, their CLEARs maybe only after
        POSTSUSPEND; maybe a write error then takes a region out of sync; maybe the
        RESUME."""
        self.presuspend()
        if self.in_flight and not clears_after:
            self.writes_complete()
        self.postsuspend()
        if self.in_flight and clears_after:
            self.writes_complete()
        if leg_failed:
            clean = sorted(self.model.clean)
            region = data.draw(st.sampled_from(clean) if clean else
                               st.integers(0, self.model.n - 1), label="failed")
            self.set_sync(region, False)
        if resume:
            self.resume()

    # -- changes -------------------------------------------------------------------------------

    @in_model
    @rule(data=st.data(), request_type=st.sampled_from(
        [RequestType.MARK_REGION, RequestType.CLEAR_REGION, RequestType.FLUSH]))
    def region_list_request(self, data, request_type):
        """MARK, CLEAR or FLUSH with 0-32 regions, maybe some out of range."""
        regions = data.draw(region_lists(self.model.n), label="regions")
        if request_type is RequestType.MARK_REGION:
            self.mark_regions(regions)
        elif request_type is RequestType.CLEAR_REGION:
            self.clear_regions(regions)
        else:
            self.flush_regions(regions)

    def mark_regions(self, regions: list[int]) -> None:
        self.expect(RequestType.MARK_REGION, protocol.pack_regions(regions),
                    self.model.mark(regions), _none)

    def clear_regions(self, regions: list[int]) -> None:
        self.expect(RequestType.CLEAR_REGION, protocol.pack_regions(regions),
                    self.model.clear(regions), _none)

    def flush_regions(self, regions: list[int]) -> None:
        predicted = self.model.flush(regions)
        self.expect(RequestType.FLUSH, protocol.pack_regions(regions), predicted, _none)
        if predicted[0] == 0:  # the answer promises every mark is on stable storage
            stored = self.stored()
            assert stored <= self.model.clean, f"not durable: {sorted(stored - self.model.clean)}"

    @in_model
    @rule(data=st.data(), in_sync=st.booleans())
    def set_region_sync(self, data, in_sync):
        self.set_sync(data.draw(region_of_interest(self.model), label="region"), in_sync)

    @precondition(lambda self: self.model is not None and self.model.recovering is not None)
    @rule(in_sync=st.booleans())
    def finish_resync_work(self, in_sync):
        """The kernel recovered (or failed to recover) the region it was handed."""
        self.set_sync(self.model.recovering, in_sync)

    def set_sync(self, region: int, in_sync: bool) -> None:
        suspended = self.model.state == SUSPENDED
        predicted = self.model.set_region_sync(region, in_sync)
        self.expect(RequestType.SET_REGION_SYNC, protocol.pack_set_region_sync(region, in_sync),
                    predicted, _none)
        if predicted[0] == 0 and not in_sync:  # durable at once: no FLUSH may follow
            stored = self.stored()
            assert region not in stored
            if suspended:  # and nothing else was pending since POSTSUSPEND
                assert stored == self.model.clean

    # -- queries -------------------------------------------------------------------------------

    @in_model
    @rule(data=st.data(), request_type=st.sampled_from(
        [RequestType.IN_SYNC, RequestType.IS_CLEAN, RequestType.IS_REMOTE_RECOVERING,
         RequestType.GET_RESYNC_WORK, RequestType.GET_SYNC_COUNT]))
    def query(self, data, request_type):
        model = self.model
        if request_type is RequestType.GET_RESYNC_WORK:
            self.resync_work()
        elif request_type is RequestType.GET_SYNC_COUNT:
            self.expect(request_type, b"", model.get_sync_count(), _u64)
        else:
            region = data.draw(region_of_interest(model), label="region")
            if request_type is RequestType.IN_SYNC:
                predicted, decode = model.in_sync(region), _s64
            elif request_type is RequestType.IS_CLEAN:
                predicted, decode = model.is_clean(region), _s64
            else:
                predicted, decode = model.is_remote_recovering(region), _pair
            self.expect(request_type, protocol.pack_u64(region), predicted, decode)

    def resync_work(self) -> tuple[int, int]:
        predicted = self.model.get_resync_work()
        self.expect(RequestType.GET_RESYNC_WORK, b"", predicted, _pair)
        return predicted[1]

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def real_bits_match_the_model_and_keep_their_invariants(self):
        if self.model is None:
            return
        n = self.model.n
        log = self.real_log()
        sync_bits = log.region_map.sync_bits
        clean_bits = log.region_map.clean_bits
        assert len(clean_bits) == len(sync_bits) == 32 * -(-n // 32)
        assert not clean_bits[n:].any(), "clean bits past the last region must stay 0"
        assert not sync_bits[n:].any(), "sync bits past the last region must stay 0"
        assert log.sync_count == sync_bits.count(1), "sync count differs from the popcount"
        sync, clean = ones(sync_bits, n), ones(clean_bits, n)
        assert clean <= sync, f"clean but out of sync: {sorted(clean - sync)}"
        assert sync == self.model.sync
        assert clean == self.model.clean
        # and the kernel's view of them, for one region a step
        region = self.kernel.seq % n
        self.expect(RequestType.IN_SYNC, protocol.pack_u64(region),
                    self.model.in_sync(region), _s64)
        self.expect(RequestType.IS_CLEAN, protocol.pack_u64(region),
                    self.model.is_clean(region), _s64)
        self.expect(RequestType.GET_SYNC_COUNT, b"", self.model.get_sync_count(), _u64)
        self.verified = self.kernel.seq

    def teardown(self):
        try:
            # After any sequence a restart is survived; not worth checking after a failure.
            if self.model is not None and self.verified == self.kernel.seq:
                self.crash_and_check_restore(flush_first=True)
        finally:
            self.close()

    def close(self) -> None:
        for log in self.table.logs.values():
            log.region_map.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


MACHINE_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_core_log_answers_like_the_model_and_survives_restarts(tmp_path):
    run_state_machine_as_test(lambda: DirtyLogMachine(tmp_path, disk=False),
                              settings=MACHINE_SETTINGS)


def test_disk_log_answers_like_the_model_and_carries_bits_across_activations(tmp_path):
    run_state_machine_as_test(lambda: DirtyLogMachine(tmp_path, disk=True),
                              settings=MACHINE_SETTINGS)


@contextlib.contextmanager
def sync_disk_log_reactivated_but_not_resumed(tmp_path) -> Iterator[DirtyLogMachine]:
    """A ``sync`` disk log that resynced region 3 and was suspended (region 3 is clean on
    the device), then activated again on a restarted server, not yet resumed."""
    machine = DirtyLogMachine(tmp_path, disk=True)
    try:
        machine.construct(n=8, mode="sync", region_size=8, spare=0, resume=True)
        machine.set_sync(3, True)
        machine.clear_regions([3])
        machine.postsuspend()
        machine.new_activation_on_a_restarted_server(n=8, spare=0, resume=False)
        yield machine
    finally:
        machine.close()


def test_a_restart_before_the_first_resume_of_a_sync_disk_log_keeps_its_resync(tmp_path):
    """``sync`` forces a full resync; a server restart between the CTR and the first
    RESUME must not bring back what the device said in an earlier activation."""
    with sync_disk_log_reactivated_but_not_resumed(tmp_path) as machine:
        machine.crash_and_check_restore(flush_first=False)
        assert ones(machine.real_log().region_map.sync_bits, 8) == set()
        machine.real_bits_match_the_model_and_keep_their_invariants()


def test_a_restart_that_lost_the_instance_file_keeps_a_pending_sync_disk_log_out_of_sync(
        tmp_path):
    """The same, when the instance file is gone too: the device's bits from the earlier
    activation are exactly what ``sync`` told the log to ignore."""
    with sync_disk_log_reactivated_but_not_resumed(tmp_path) as machine:
        machine.crash_losing_the_instance_file()
        assert ones(machine.real_log().region_map.sync_bits, 8) == set()
