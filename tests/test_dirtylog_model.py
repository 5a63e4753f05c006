"""A real LogTable, driven through the real codec, against a small reference model of one log.

The model (:class:`Model`) is the semantics of shardlog/dirtylog.py's docstring written out
with plain sets: regions ``[0, n)``, a sync set and a clean set, the resync pointer and the
region handed out for recovery.  Each request is encoded with ``protocol.encode_request``,
decoded with ``protocol.decode_datagram``, answered by ``LogTable.answer`` and read back with
``protocol.decode_reply``; its error and payload must be what the model predicts, and after
every step the real log's bits must equal the model's and keep their invariants.

Two events the kernel sees from outside are part of the machine:

- a server crash: FLUSH, then a new LogTable on the same state directory, the kernel's
  reconnect CTR (NUL counted) and RESUME; the restored log may under-state what is in sync
  (costing a resync) but never over-state it;
- a new activation: POSTSUSPEND, DTR, a new LogTable and a first CTR; a ``disk`` log then
  carries its clean bits over through the log device, a ``core`` log starts over.
"""

from __future__ import annotations

import errno
import shutil
import struct
import tempfile
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

from shardlog import protocol
from shardlog.logtable import LogTable
from shardlog.protocol import RequestType

UUID = "LVM-model-test-mirror"
LUID = 0x5EED0001
KEY = (UUID, LUID)
EINVAL = -errno.EINVAL
ESRCH = -errno.ESRCH
DEVICE_BYTES = 2 << 20  # the stand-in log device: a zero-filled regular file

PENDING, RESUMED, SUSPENDED = "pending", "resumed", "suspended"

# Sizes around the word boundaries of the bitmap (8-bit bytes, 32-bit words), and any other.
REGION_COUNTS = st.sampled_from([1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100]) | st.integers(1, 100)
HUGE_REGIONS = st.sampled_from([1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])


def any_region(n: int) -> st.SearchStrategy[int]:
    """Mostly a region of the log, sometimes one just past it or far out of range."""
    inside = st.integers(0, n - 1)
    return inside | inside | inside | st.integers(n, n + 40) | HUGE_REGIONS


def region_lists(n: int) -> st.SearchStrategy[list[int]]:
    """0-32 regions (the kernel's group size): mostly all in range, else some out of range."""
    inside = st.lists(st.integers(0, n - 1), max_size=32)
    return inside | inside | inside | st.lists(any_region(n), max_size=32)


def ones(bits, n: int) -> set[int]:
    """The set positions among the first ``n`` bits of a real bitmap."""
    return {i for i in range(n) if bits[i]}


class Model:
    """One log's state, obviously: sets and ints, following dirtylog.py's docstring."""

    def __init__(self, n: int, disk: bool, mode: str):
        self.n = n
        self.disk = disk
        self.mode = mode  # "", "sync" or "nosync"
        # disk logs: the clean regions the log device holds (None: no valid header on it)
        self.device: set[int] | None = None
        self.new_activation()

    def everything(self) -> set[int]:
        return set(range(self.n))

    def new_activation(self) -> None:
        """State after a first CTR: a fresh core log is all out of sync and dirty unless
        nosync (then all in sync and clean); a disk log reads its device only at RESUME."""
        nosync = self.mode == "nosync"
        self.state = PENDING
        self.sync = self.everything() if nosync else set()
        self.clean = set() if self.disk else set(self.sync)
        self.pointer = 0  # GET_RESYNC_WORK searches from here
        self.recovering: int | None = None  # handed out, no SET_REGION_SYNC yet
        self.halted = False  # PRESUSPEND until RESUME
        self.load_at_resume = self.disk
        self.restoring = False
        self.unsettled: set[int] = set()  # marked since and no CLEAR asked for since

    # -- what a RESUME loads -----------------------------------------------------------------

    def disk_bits_at_resume(self) -> set[int]:
        """disk_resume: the device's bits for a default log (or a restored one), otherwise
        every region clean for nosync and dirty for sync (or when nothing valid is saved)."""
        honor_saved = self.restoring or self.mode == ""
        if honor_saved and self.device is not None:
            return set(self.device)
        if self.mode == "nosync" and not self.restoring:
            return self.everything()
        return set()

    def clean_as_resumed(self) -> set[int]:
        """The clean bits, or those the pending first RESUME would load."""
        if self.state == PENDING and self.disk:
            return self.disk_bits_at_resume()
        return set(self.clean)

    def sync_as_resumed(self) -> set[int]:
        if self.state == PENDING and self.load_at_resume:
            return self.clean_as_resumed()
        return set(self.sync)

    # -- requests: each returns (error, expected answer) ----------------------------------------

    def _accepts(self, regions, changes: bool) -> bool:
        if self.state == PENDING:
            return False
        if changes and self.state == SUSPENDED:
            return False
        return all(r < self.n for r in regions)

    def resume(self):
        if self.state == RESUMED:  # a second RESUME without a suspend changes nothing
            return 0, None
        if self.load_at_resume:
            if self.disk:
                self.clean = self.disk_bits_at_resume()
                self.device = set(self.clean)  # written back
            self.sync = set(self.clean)
        self.pointer = 0
        self.recovering = None
        self.halted = False
        self.state = RESUMED
        self.load_at_resume = self.disk
        self.restoring = False
        return 0, None

    def presuspend(self):
        self.halted = True
        return 0, None

    def postsuspend(self):
        if self.state == PENDING:
            return 0, None
        self.state = SUSPENDED
        self.recovering = None
        self.unsettled = set()  # dm suspends the mirror only once every write completed
        if self.disk:
            self.device = set(self.clean)
        return 0, None

    def mark(self, regions):
        if not self._accepts(regions, changes=True):
            return EINVAL, None
        self.clean -= set(regions)
        self.unsettled |= set(regions)
        return 0, None

    def clear(self, regions):
        if not self._accepts(regions, changes=True):
            return EINVAL, None
        self.clean |= set(regions) & self.sync  # clean only when in sync
        self.unsettled -= set(regions)
        return 0, None

    def flush(self, regions):
        if not self._accepts(regions, changes=bool(regions)):
            return EINVAL, None
        self.clean -= set(regions)
        self.unsettled |= set(regions)
        return 0, None

    def in_sync(self, region):
        if not self._accepts([region], changes=False):
            return EINVAL, None
        return 0, int(region in self.sync)

    def is_clean(self, region):
        if not self._accepts([region], changes=False):
            return EINVAL, None
        return 0, int(region in self.clean)

    def is_remote_recovering(self, region):
        if not self._accepts([region], changes=False):
            return EINVAL, None
        out_of_sync = [r for r in range(self.n) if r not in self.sync]
        return 0, (0, out_of_sync[0] if out_of_sync else self.n)

    def set_region_sync(self, region, in_sync):
        if not self._accepts([region], changes=True):
            return EINVAL, None
        if self.recovering == region:
            self.recovering = None
        if in_sync:
            self.sync.add(region)
        else:
            self.sync.discard(region)
            self.clean.discard(region)
            self.unsettled.add(region)
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

    def restored(self, bits: set[int]) -> None:
        """After a crash: the new instance was resumed from ``bits``."""
        self.state = RESUMED
        self.clean = set(bits)
        self.sync = set(bits)
        if self.disk:
            self.device = set(bits)
        self.pointer = 0
        self.recovering = None
        self.halted = False
        self.load_at_resume = self.disk
        self.restoring = False


class Kernel:
    """Sends one log's requests as dm-log-userspace does, through the real codec."""

    def __init__(self, table: LogTable):
        self.table = table
        self.seq = 0

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


class DirtyLogMachine(RuleBasedStateMachine):
    """One log of a LogTable, its model, and the kernel in between."""

    def __init__(self, base: Path, disk: bool):
        super().__init__()
        self.disk = disk
        self.workdir = Path(tempfile.mkdtemp(dir=base))
        self.state_dir = self.workdir / "state"
        self.device = self.workdir / "logdev.img"
        self.table = LogTable(self.state_dir)
        self.kernel = Kernel(self.table)
        self.model: Model | None = None

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

    def first_ctr(self) -> None:
        error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode("ascii"))
        assert (error, payload) == (0, b"")

    def new_table(self) -> None:
        self.table = LogTable(self.state_dir)
        self.kernel.table = self.table

    # -- set-up --------------------------------------------------------------------------------

    @initialize(n=REGION_COUNTS, mode=st.sampled_from(["", "sync", "nosync"]),
                region_size=st.sampled_from([2, 8, 1024]), spare=st.integers(0, 1 << 20),
                resume=st.sampled_from([True, True, True, False]))
    def construct(self, n, mode, region_size, spare, resume):
        last = region_size if n == 1 else 1 + spare % region_size  # sectors of the last region
        sectors = (n - 1) * region_size + last
        args = [str(region_size)] + ([mode] if mode else [])
        if self.disk:
            with open(self.device, "wb") as f:
                f.truncate(DEVICE_BYTES)
            args.insert(0, str(self.device))
        self.log_type = "disk" if self.disk else "core"
        self.region_size = region_size
        self.ctr_string = f"{sectors} {self.log_type} {' '.join(args)}"
        self.table_args = f"{self.log_type} {len(args)} {' '.join(args)} "
        self.first_ctr()
        self.model = Model(n, self.disk, mode)
        assert self.real_log().region_count == n
        if resume:
            self.resume()

    # -- life cycle ----------------------------------------------------------------------------

    @rule()
    def resume(self):
        self.expect(RequestType.RESUME, b"", self.model.resume(), _none)

    @rule()
    def presuspend(self):
        self.expect(RequestType.PRESUSPEND, b"", self.model.presuspend(), _none)

    @rule()
    def postsuspend(self):
        self.expect(RequestType.POSTSUSPEND, b"", self.model.postsuspend(), _none)

    @rule()
    def reconnect_ctr_for_a_live_log_changes_nothing(self):
        error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode() + b"\0")
        assert (error, payload) == (0, b"")

    @precondition(lambda self: self.model is not None and self.model.state == PENDING)
    @rule()
    def resent_first_ctr_while_pending_changes_nothing(self):
        self.first_ctr()

    @rule(region=st.integers(0, 200))
    def request_for_an_unknown_log_gets_esrch(self, region):
        error, payload = self.kernel.send(RequestType.IN_SYNC, protocol.pack_u64(region),
                                          luid=LUID + 1)
        assert (error, payload) == (ESRCH, b"")

    @precondition(lambda self: self.model is not None and self.model.state == SUSPENDED)
    @rule(resume=st.booleans())
    def new_activation_on_a_restarted_server(self, resume):
        """POSTSUSPEND was answered; DTR; the server restarts; the table is loaded again."""
        clean_at_suspend = ones(self.real_log().region_map.clean_bits, self.model.n)
        assert self.kernel.send(RequestType.DTR) == (0, b"")
        self.new_table()
        self.first_ctr()
        self.model.new_activation()
        if resume:
            self.resume()
            if self.disk and self.model.mode == "":
                # the disk log carries its state across activations
                assert ones(self.real_log().sync_bits, self.model.n) == clean_at_suspend

    @precondition(lambda self: self.model is not None and self.model.state == SUSPENDED)
    @rule()
    def first_ctr_replaces_a_suspended_log_whose_dtr_never_came(self):
        self.first_ctr()
        self.model.new_activation()

    @rule()
    def crash_and_reconnect(self):
        self.crash_and_check_restore()

    def crash_and_check_restore(self) -> None:
        """FLUSH; the server dies; a new one gets the reconnect CTR and RESUME."""
        model = self.model
        self.flush_regions([])
        clean_before = model.clean_as_resumed()
        sync_before = model.sync_as_resumed()
        # Exact for a state file (mapped: it always shows the bits) and for a disk log after
        # POSTSUSPEND; otherwise a disk log's cleans since the last sync may be lost.
        exact = not model.disk or model.state == SUSPENDED
        self.real_log().region_map.close()  # the old process is gone; nothing more written
        self.new_table()
        error, payload = self.kernel.send(RequestType.CTR, self.ctr_string.encode() + b"\0")
        assert (error, payload) == (0, b"")
        assert self.kernel.send(RequestType.RESUME) == (0, b"")
        restored = ones(self.real_log().sync_bits, model.n)
        if exact:
            assert restored == clean_before
        else:
            assert restored <= clean_before, f"over-stated: {sorted(restored - clean_before)}"
        assert not restored & model.unsettled, "a marked region came back in sync"
        assert not restored - sync_before, "an out-of-sync region came back in sync"
        model.restored(restored)

    # -- changes -------------------------------------------------------------------------------

    @rule(data=st.data())
    def mark(self, data):
        regions = data.draw(region_lists(self.model.n), label="regions")
        self.expect(RequestType.MARK_REGION, protocol.pack_regions(regions),
                    self.model.mark(regions), _none)

    @rule(data=st.data())
    def clear(self, data):
        regions = data.draw(region_lists(self.model.n), label="regions")
        self.expect(RequestType.CLEAR_REGION, protocol.pack_regions(regions),
                    self.model.clear(regions), _none)

    @rule(data=st.data())
    def flush(self, data):
        regions = data.draw(st.just([]) | region_lists(self.model.n), label="regions")
        self.flush_regions(regions)

    def flush_regions(self, regions: list[int]) -> None:
        self.expect(RequestType.FLUSH, protocol.pack_regions(regions),
                    self.model.flush(regions), _none)

    @rule(data=st.data(), in_sync=st.booleans())
    def set_region_sync(self, data, in_sync):
        region = data.draw(any_region(self.model.n), label="region")
        self.set_sync(region, in_sync)

    @precondition(lambda self: self.model is not None and self.model.recovering is not None)
    @rule(in_sync=st.booleans())
    def finish_resync_work(self, in_sync):
        """The kernel recovered (or failed to recover) the region it was handed."""
        self.set_sync(self.model.recovering, in_sync)

    def set_sync(self, region: int, in_sync: bool) -> None:
        self.expect(RequestType.SET_REGION_SYNC, protocol.pack_set_region_sync(region, in_sync),
                    self.model.set_region_sync(region, in_sync), _none)

    # -- queries -------------------------------------------------------------------------------

    @rule(data=st.data())
    def in_sync(self, data):
        region = data.draw(any_region(self.model.n), label="region")
        self.expect(RequestType.IN_SYNC, protocol.pack_u64(region),
                    self.model.in_sync(region), _s64)

    @rule(data=st.data())
    def is_clean(self, data):
        region = data.draw(any_region(self.model.n), label="region")
        self.expect(RequestType.IS_CLEAN, protocol.pack_u64(region),
                    self.model.is_clean(region), _s64)

    @rule(data=st.data())
    def is_remote_recovering(self, data):
        region = data.draw(any_region(self.model.n), label="region")
        self.expect(RequestType.IS_REMOTE_RECOVERING, protocol.pack_u64(region),
                    self.model.is_remote_recovering(region), _pair)

    @rule()
    def get_resync_work(self):
        self.expect(RequestType.GET_RESYNC_WORK, b"", self.model.get_resync_work(), _pair)

    @rule()
    def get_sync_count(self):
        self.expect(RequestType.GET_SYNC_COUNT, b"", self.model.get_sync_count(), _u64)

    @rule()
    def get_region_size(self):
        self.expect(RequestType.GET_REGION_SIZE, b"", (0, self.region_size), _u64)

    @rule()
    def status_info(self):
        want = f"3 disk {self.device} A\0".encode() if self.disk else b"1 core\0"
        self.expect(RequestType.STATUS_INFO, b"", (0, want), bytes)

    @rule()
    def status_table(self):
        self.expect(RequestType.STATUS_TABLE, b"", (0, self.table_args.encode() + b"\0"), bytes)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def real_bits_match_the_model_and_keep_their_invariants(self):
        if self.model is None:
            return
        n = self.model.n
        log = self.real_log()
        sync_bits = log.sync_bits
        clean_bits = log.region_map.clean_bits
        assert len(sync_bits) == n
        assert len(clean_bits) % 32 == 0 and len(clean_bits) >= n
        assert not clean_bits[n:].any(), "bits past the last region must stay 0"
        assert log.sync_count == sync_bits.count(1), "sync count differs from the popcount"
        sync, clean = ones(sync_bits, n), ones(clean_bits, n)
        assert clean <= sync, f"clean but out of sync: {sorted(clean - sync)}"
        assert sync == self.model.sync
        assert clean == self.model.clean

    def teardown(self):
        try:
            if self.model is not None:
                self.crash_and_check_restore()  # after any sequence, a crash is survived
        finally:
            for log in self.table.logs.values():
                log.region_map.close()
            shutil.rmtree(self.workdir, ignore_errors=True)


MACHINE_SETTINGS = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_core_log_answers_like_the_model_and_survives_crashes(tmp_path):
    run_state_machine_as_test(lambda: DirtyLogMachine(tmp_path, disk=False),
                              settings=MACHINE_SETTINGS)


def test_disk_log_answers_like_the_model_and_carries_bits_across_activations(tmp_path):
    run_state_machine_as_test(lambda: DirtyLogMachine(tmp_path, disk=True),
                              settings=MACHINE_SETTINGS)
