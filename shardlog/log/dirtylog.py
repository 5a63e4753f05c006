"""One dirty log's state machine: how each request changes one log, and what it answers.

Theory of operation
-------------------
A mirror's log keeps two bits per region (dm-log.c):

- ``clean_bits`` (persistent): 1 when the legs are known to be identical there and no
  write is outstanding.  MARK clears a bit before the kernel writes; CLEAR sets it again
  once the writes completed.
- ``sync_bits``: 1 when the legs are in sync.  Resync work is handed out for 0 bits, and
  IN_SYNC answers from them.  At RESUME they are loaded from the clean bits, as
  ``disk_resume`` does.

Both live in the log's :class:`~shardlog.storage.regionmap.RegionMap` (a MAP_SHARED instance
file), so a server that dies leaves them in the page cache for the one that replaces it.

One invariant ties them together: **a clean bit is only ever set for an in-sync region**
(CLEAR of an out-of-sync region leaves it dirty, as cmirrord does; SET_REGION_SYNC(r, 0)
dirties it).  So deriving ``sync_bits = clean_bits`` from stored bits can only under-state
what is in sync, never call an unsynced region in sync.

Life cycle (``state``)::

    CTR ──► PENDING ──RESUME──► RESUMED ──PRESUSPEND──► (recovery halted)
                                   ▲  └───POSTSUSPEND (commit everything)──► SUSPENDED
                                   └──────────────────RESUME─────────────────────┘

Which bits a RESUME starts from is the safety rule of design.md:

- a fresh ``core`` log starts over like the kernel's (all out of sync unless ``nosync``);
- a ``disk`` log reads its device by ``disk_resume``'s rules, at every RESUME;
- a log re-created by the kernel's reconnect CTR (the server restarted under a live
  kernel) continues from its instance file exactly, sync bits and unflushed marks
  included, and first writes the image back so those marks become durable (an instance
  that was never resumed does its first RESUME's work instead).  Without an instance file
  a disk log falls back to its device's clean bits (none for ``sync``, which resyncs at
  every activation) and a core log to "all out of sync" — loudly, because the kernel will
  not ask for resync work again before the mirror's next resume.

A reconnect never fails: the kernel re-sends a failed reconnect CTR every 2 s for ever
while the mirror's I/O waits.  Storage that cannot be had then gives a log running from
memory with a failed device (status 'D', FLUSH -EIO), as the kernel's disk log does.

Corrections to the in-kernel logs and cmirrord (protocol.md §3, §8): IN_SYNC answers
exactly 0 or 1; every region is bounds-checked (-EINVAL); GET_RESYNC_WORK hands each
out-of-sync region out once per pass, in order, and the same region again until its
SET_REGION_SYNC; the sync count is kept incrementally; MARK, CLEAR and SET_REGION_SYNC are
idempotent; FLUSH with regions (integrated flush) marks them and then commits.

Each request type is one function (dm-log.c's ops), and each state has its own table of
them (:data:`HANDLERS`): what a request may do before the first RESUME or after
POSTSUSPEND is decided by which table the log is on, not by tests on every request.
:data:`TRANSITIONS` says which request moves a log to which state.  A function answers
with an :class:`~shardlog.log.outcome.Outcome` (the common ones are shared constants);
refusals leave as :class:`LogError` (a positive errno, negated for the kernel, and the
reason), which the log table turns into the outcome.  The log table
(:meth:`LogTable.decide <shardlog.log.logtable.LogTable.decide>`) is the one entry: it
owns CTR, DTR, unknown logs and a FLUSH's commit, and calls these functions for the rest.

I/O happens only in the RegionMap (and, at CTR, in resolving a log device); its failures
arrive as StoreError.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from shardlog.log.outcome import ANSWER_BOOL, CLEARED, MARKED, OK, Outcome, answered, counted
from shardlog.observability.workercounters import RECOVERY_COMPLETED, RECOVERY_HANDED_OUT
from shardlog.observability.workerstats import LogStatus
from shardlog.storage.devices import resolve_device
from shardlog.storage.errors import FailureTally, StoreError
from shardlog.storage.regionmap import RegionMap
from shardlog.storage.statedir import device_node_directory, instance_file_path
from shardlog.wire import protocol
from shardlog.wire.ctrargs import LogConfig, SyncMode
from shardlog.wire.protocol import Request, RequestType

log = logging.getLogger(__name__)


class LogError(Exception):
    """A request this log refuses; ``errno`` is positive, the kernel gets it negated."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


class LogState(Enum):
    PENDING = "pending"  # constructed, bits not loaded yet
    RESUMED = "resumed"
    SUSPENDED = "suspended"  # after POSTSUSPEND: bits committed, no new marks


class ResumeFrom(Enum):
    """Where the next RESUME takes the bits from."""

    MEMORY = "memory"  # as they are: a fresh core log's, a core log's after a suspend
    DEVICE = "device"  # a disk log's device, by disk_resume's rules
    DEVICE_AS_SAVED = "device as saved"  # the same, honouring its bits whatever sync says
    INSTANCE = "instance"  # a restored instance file, written back to the store first


class DirtyLog:
    """The state of one log instance, identified by ``(uuid, luid)``."""

    def __init__(
        self,
        uuid: str,
        luid: int,
        config: LogConfig,
        region_map: RegionMap,
        *,
        device_name: str | None,
        resume_from: ResumeFrom,
        failures: FailureTally | None = None,
    ):
        self.uuid = uuid
        self.luid = luid
        self.config = config
        self.region_count = config.region_count
        self.region_map = region_map
        self.device_name = device_name  # "major:minor" handed back to the kernel at CTR
        self.state = LogState.PENDING
        # What each request does in this state (HANDLERS): changes with the state.
        self.handlers: dict[RequestType, Handler] = HANDLERS[LogState.PENDING]
        # The kernel's disk log never clears these once set (dm-log.c).
        self.device_failed = False
        self.flush_failed = False
        self.sync_count = region_map.sync_bits.count(1)
        self.sync_search = 0  # where the next GET_RESYNC_WORK looks for an out-of-sync region
        self.recovering: int | None = None  # region handed out, awaiting SET_REGION_SYNC
        self.recovery_halted = False  # PRESUSPEND until RESUME
        self.requests = 0  # answered for this instance (LogTable counts; status reports it)
        self._resume_from = resume_from
        # Re-created from an instance file that says it was never resumed: a restore
        # leaves it pending for the kernel's own first RESUME (restore()).
        self._first_resume_to_come = False
        # Where the storage failures this log handles are counted (its table's tally).
        self.storage_failures = failures if failures is not None else FailureTally()

    # -- construction: the safety rule ------------------------------------------------------

    @classmethod
    def construct(
        cls, uuid: str, luid: int, config: LogConfig, state_dir: Path, *, reconnect: bool,
        failures: FailureTally | None = None,
    ) -> DirtyLog:
        """A new log instance for a CTR (StoreError when a first CTR's storage fails:
        the caller handles, and counts, that one)."""
        failures = failures if failures is not None else FailureTally()
        path = instance_file_path(state_dir, uuid, luid)
        device, device_name = None, None
        try:
            if config.is_disk:
                assert config.device is not None
                device, device_name = resolve_device(config.device,
                                                     device_node_directory(state_dir))
            if reconnect:
                rmap = RegionMap.reopen(path, config.region_count, device=device)
                if rmap is not None:
                    # Never resumed: the kernel had started no I/O; its coming RESUME does
                    # what the dead server's would have done.
                    start = ResumeFrom.INSTANCE if rmap.resumed else cls._first_resume(config)
                    dirty_log = cls(uuid, luid, config, rmap, device_name=device_name,
                                    resume_from=start, failures=failures)
                    dirty_log._first_resume_to_come = not rmap.resumed
                    return dirty_log
                log.warning(
                    "%s: reconnect CTR but no state saved at %s: %s; suspend and resume "
                    "the mirror so that the kernel asks for their resync", _name(uuid, luid),
                    path, "every region counts as out of sync"
                    if device is None or config.sync_mode is SyncMode.SYNC
                    else "regions dirty on the log device count as out of sync")
            clean = config.sync_mode is SyncMode.NOSYNC and not reconnect
            rmap = RegionMap.create(path, config.region_count, device=device, clean=clean)
            return cls(uuid, luid, config, rmap, device_name=device_name,
                       resume_from=cls._first_resume(config, reconnect), failures=failures)
        except StoreError as exc:
            if not reconnect:
                raise
            failures.note(exc)
            return cls._without_storage(uuid, luid, config, device, device_name, exc,
                                        failures)

    @staticmethod
    def _first_resume(config: LogConfig, reconnect: bool = False) -> ResumeFrom:
        if not config.is_disk:
            return ResumeFrom.MEMORY
        # A reconnect with nothing saved takes what the device holds; but `sync` means
        # every region is resynced at each activation, so there the device's bits
        # (perhaps an earlier activation's) must not count.
        if reconnect and config.sync_mode is not SyncMode.SYNC:
            return ResumeFrom.DEVICE_AS_SAVED
        return ResumeFrom.DEVICE

    @classmethod
    def _without_storage(cls, uuid: str, luid: int, config: LogConfig, device: Path | None,
                         device_name: str | None, exc: StoreError,
                         failures: FailureTally) -> DirtyLog:
        """A reconnected log whose instance file (or device) cannot be had: the kernel
        would re-send a failed reconnect CTR for ever with the mirror's I/O waiting, so
        it runs on with what there is — its device if only the state directory failed,
        else memory alone — and a failed device in its status."""
        if device is not None:
            try:
                rmap = RegionMap.create(None, config.region_count, device=device)
            except StoreError as device_exc:
                failures.note(device_exc)
            else:
                log.error("%s: reconnect CTR without an instance file (%s): serving from the "
                          "log device's bits", _name(uuid, luid), exc)
                dirty_log = cls(uuid, luid, config, rmap, device_name=device_name,
                                resume_from=cls._first_resume(config, reconnect=True),
                                failures=failures)
                dirty_log.device_failed = True
                return dirty_log
        log.error("%s: reconnect CTR without storage (%s): serving from memory, every "
                  "region out of sync, commits fail", _name(uuid, luid), exc)
        dirty_log = cls(uuid, luid, config, RegionMap.create(None, config.region_count),
                        device_name=device_name, resume_from=ResumeFrom.MEMORY,
                        failures=failures)
        dirty_log.device_failed = True
        return dirty_log

    def ctr_reply(self, version: int) -> bytes:
        """The CTR answer: since version 2 the kernel takes a log device to hold open."""
        if version >= 2 and self.device_name is not None:
            return protocol.pack_string(self.device_name)
        return b""

    def destroy(self) -> None:
        """DTR: forget the log without writing (the kernel's logs do not write at DTR
        either; everything that matters was committed by the last FLUSH/POSTSUSPEND)."""
        self.region_map.close(remove=True)

    def close(self) -> None:
        """Forget the log without writing, as DTR does, but keep its instance file: a new
        instance at the same address (a CTR whose DTR never came) has taken its name."""
        self.region_map.close()

    def restore(self) -> None:
        """Bring a log re-created from its CTR record (the server restarted under a live
        kernel) to where the kernel believes it is, as the kernel's own reconnect would
        (CTR, then RESUME) — except that an instance its file says was never resumed
        stays pending: its first RESUME must still read the device *after* the old
        instance of a reload has committed its last marks.  With no file to say so
        (lost, or never made: a reconnect that ran without storage), it is resumed as
        the kernel's reconnect would: left pending, a log the kernel believes resumed
        would refuse its I/O requests for ever."""
        if not self._first_resume_to_come:
            self._resume(None)

    def shutdown(self) -> None:
        """The server stops: commit everything (clears included) and close, keeping the
        instance file for the server that comes next.  Failures are logged: the next
        server's reconnect RESUME writes the image back anyway."""
        try:
            if self.state is not LogState.PENDING:
                self._commit(everything=True)
        except LogError:
            pass
        finally:
            self.region_map.close()

    @property
    def name(self) -> str:
        return _name(self.uuid, self.luid)

    @property
    def health(self) -> str:
        """The disk log's status character: F(lush failed) over D(evice failed) over A."""
        return "F" if self.flush_failed else "D" if self.device_failed else "A"

    def status(self) -> LogStatus:
        """This log as the worker reports it to the front (status, top, metrics)."""
        count = self.region_count
        return LogStatus(
            uuid=self.uuid, luid=self.luid, log_type=self.config.log_type,
            state=self.state.value, region_size=self.config.region_size,
            region_count=count, in_sync=self.sync_count,
            dirty=count - self.region_map.clean_bits.count(1, 0, count),
            recovering=self.recovering, sync_search=self.sync_search,
            requests=self.requests, health=self.health)

    # -- life cycle -------------------------------------------------------------------------

    def _enter(self, state: LogState) -> None:
        self.state = state
        self.handlers = HANDLERS[state]

    def _transition(self, request_type: RequestType) -> None:
        """Move to the state :data:`TRANSITIONS` names for this request (if any)."""
        new_state = TRANSITIONS[self.state].get(request_type)
        if new_state is not None:
            self._enter(new_state)

    def _resume(self, request: Request | None) -> Outcome:
        # RESUME restarts recovery (dm_rh_start_recovery), whatever else it does.
        self.recovery_halted = False
        if self._resume_from is ResumeFrom.INSTANCE:
            self._storage_step("writing the restored image back", self.region_map.push)
        elif self._resume_from is not ResumeFrom.MEMORY:
            self._load()
        self.sync_count = self.region_map.sync_bits.count(1)
        self.sync_search = 0
        self.recovering = None
        self._transition(RequestType.RESUME)
        self.region_map.resumed = True
        # From now on: a disk log re-reads its device at every resume (disk_resume); a core
        # log keeps its bits across a suspend (core_resume), as does one held in memory.
        if self._resume_from is not ResumeFrom.MEMORY and self.config.is_disk:
            self._resume_from = ResumeFrom.DEVICE
        else:
            self._resume_from = ResumeFrom.MEMORY
        # dm-raid1 only warns when a resume fails; a failed device shows in the status and
        # fails the next FLUSH, as with the kernel's disk log.  So RESUME succeeds.
        return OK

    def _resume_again(self, request: Request) -> Outcome:
        # A second RESUME without a suspend (cmirrord: "Additional resume issued before
        # suspend"): reloading now would forget marks of writes in flight.
        self.recovery_halted = False
        return OK

    def _load(self) -> None:
        sync_mode = self.config.sync_mode
        as_saved = self._resume_from is ResumeFrom.DEVICE_AS_SAVED
        honor_saved = as_saved or sync_mode is SyncMode.DEFAULT
        new_clean = sync_mode is SyncMode.NOSYNC and not as_saved
        outcome = self._storage_step(
            "writing the region map back", self.region_map.resume, honor_saved, new_clean)
        if outcome is None:
            return
        if outcome.read_error is not None:
            self.storage_failures.note(outcome.read_error)
            self.device_failed = True
            log.error("%s: %s", self.name, outcome.read_error)
        log.info("%s: resumed from %s: %s", self.name, self.region_map.store_path,
                 outcome.reason)

    def _presuspend(self, request: Request) -> Outcome:
        # dm-raid1 has stopped recovery; hand out no more work until RESUME.
        self.recovery_halted = True
        return OK

    def _postsuspend(self, request: Request) -> Outcome:
        try:
            self._commit(everything=True)
        finally:
            # Suspended even if the commit failed: the next RESUME must be a real one.
            self._transition(RequestType.POSTSUSPEND)
            self.recovering = None
        return OK

    def _nothing(self, request: Request) -> Outcome:
        return OK

    # -- queries ----------------------------------------------------------------------------

    def _get_region_size(self, request: Request) -> Outcome:
        return answered(protocol.pack_u64(self.config.region_size))

    def _is_clean(self, request: Request) -> Outcome:
        return ANSWER_BOOL[self.region_map.clean_bits[self._one_region(request)]]

    def _in_sync(self, request: Request) -> Outcome:
        # The kernel asks before every read: the range check is inlined.
        (region,) = request.regions
        if region >= self.region_count:
            self._out_of_range(request, region)
        return ANSWER_BOOL[self.region_map.sync_bits[region]]

    def _get_sync_count(self, request: Request) -> Outcome:
        return answered(protocol.pack_u64(self.sync_count))

    def _status_info(self, request: Request) -> Outcome:
        # The in-kernel logs' format, whatever the type was called (clustered-*): LVM's
        # status parser reads the device and health only after exactly "disk", and the
        # device as major:minor (0:0 for a regular file standing in for a device).
        if self.config.is_disk:
            text = f"3 disk {self.device_name or '0:0'} {self.health}"
        else:
            text = "1 core"
        # NUL included: the kernel copies the reply over the NUL that ended the status so
        # far, and the ioctl reads the status up to the next NUL.
        return answered(protocol.pack_string(text))

    def _status_table(self, request: Request) -> Outcome:
        return answered(protocol.pack_string(self.config.table_args()))

    def _is_remote_recovering(self, request: Request) -> Outcome:
        self._one_region(request)
        # One host: nothing is recovered remotely, and dm-raid1's region hash holds writes
        # back from the region it recovers itself, so the answer is always 0.
        return answered(protocol.pack_remote_recovering(False, self.in_sync_hint()))

    def in_sync_hint(self) -> int:
        """The hint for IS_REMOTE_RECOVERING: below it the kernel does not ask.

        The kernel uses the hint for two things only (dm-log-userspace-base.c): a write
        to a region below it skips this question, and a hint of ``region_count`` or more
        stops GET_RESYNC_WORK until the next resume.  Above the hint, a second write within
        250 ms of the last question (one timestamp for all userspace logs) is requeued for
        200 ms without asking.  So the hint is ``region_count`` once no resync work is
        left in this pass, and ``region_count - 1`` while there is some: as high as it can
        go without stopping resync, so that only writes to the last region can still be
        throttled during a resync (the answer is 0 whatever the region).
        """
        work_left = (self.recovering is not None
                     or self.region_map.sync_bits.find(0, self.sync_search,
                                                       self.region_count) >= 0)
        return self.region_count - 1 if work_left else self.region_count

    # -- changes ----------------------------------------------------------------------------

    def _mark_region(self, request: Request) -> Outcome:
        """MARK_REGION, and a FLUSH's marks (integrated flush, version 3: the regions to
        mark ride in the FLUSH itself, and its reply promises they are durable like any
        other mark).  A FLUSH's commit is the log table's: it commits the FLUSHes of a
        batch's logs together (:meth:`commit_flush`) before any of their replies goes out."""
        regions = request.regions
        if regions:  # an empty FLUSH is the most frequent request of all
            self._check_range(request, regions)
            mark = self.region_map.mark
            for region in regions:
                mark(region)
        return MARKED[len(regions)]

    def _clear_region(self, request: Request) -> Outcome:
        regions = request.regions
        self._check_range(request, regions)
        sync_bits, clear = self.region_map.sync_bits, self.region_map.clear
        for region in regions:
            if sync_bits[region]:  # the invariant: clean only when in sync
                clear(region)
        return CLEARED[len(regions)]

    def _clear_region_suspended(self, request: Request) -> Outcome:
        # dm-raid1's last pass over completed writes can run after POSTSUSPEND; the bits
        # were committed then, so the region stays dirty: a resync, not a risk.
        self._check_range(request, request.regions)
        return CLEARED[len(request.regions)]

    def _flush_suspended(self, request: Request) -> Outcome:
        if request.regions:
            return self._marks_after_postsuspend(request)
        return OK  # what is left to commit, the log table commits

    def commit_flush(self) -> None:
        """Make every mark so far durable (LogError EIO if the store fails)."""
        self._commit(everything=False)

    def _get_resync_work(self, request: Request) -> Outcome:
        if self.recovery_halted:
            return NO_RESYNC_WORK
        if self.recovering is None:
            region = self.region_map.sync_bits.find(0, self.sync_search, self.region_count)
            if region < 0:
                self.sync_search = self.region_count
                return NO_RESYNC_WORK
            self.sync_search = region + 1
            self.recovering = region
        # Asked again before SET_REGION_SYNC: the answer was lost or the kernel retried;
        # dm-raid1 recovers one region at a time (MAX_RECOVERY = 1), so it is the same one.
        return counted(RECOVERY_HANDED_OUT, 1,
                       protocol.pack_resync_work(True, self.recovering))

    def _no_resync_work(self, request: Request) -> Outcome:
        return NO_RESYNC_WORK

    def _set_region_sync(self, request: Request) -> Outcome:
        region = self._one_region(request)
        if self.recovering == region:
            self.recovering = None
        sync_bits = self.region_map.sync_bits
        if request.in_sync:
            if not sync_bits[region]:
                sync_bits[region] = 1
                self.sync_count += 1
            return RECOVERED
        if sync_bits[region]:
            sync_bits[region] = 0
            self.sync_count -= 1
        self.region_map.mark(region)  # the invariant: never clean while out of sync
        # Durable now, not at the next FLUSH (which may never come, e.g. after
        # POSTSUSPEND): a region known to differ between the legs must not be
        # forgotten.  Rare (a failed leg write or recovery), so the sync costs nothing.
        self._commit(everything=False)
        return OK

    # -- refusals -----------------------------------------------------------------------------

    def _before_resume(self, request: Request) -> Outcome:
        raise LogError(errno.EINVAL, f"{request.name} before the log was resumed")

    def _marks_after_postsuspend(self, request: Request) -> Outcome:
        raise LogError(errno.EINVAL, f"{request.name}: new marks after POSTSUSPEND")

    # -- helpers ------------------------------------------------------------------------------

    def _one_region(self, request: Request) -> int:
        (region,) = request.regions
        if region >= self.region_count:
            self._out_of_range(request, region)
        return region

    def _check_range(self, request: Request, regions: tuple[int, ...]) -> None:
        if regions and max(regions) >= self.region_count:
            self._out_of_range(request, next(r for r in regions if r >= self.region_count))

    def _out_of_range(self, request: Request, region: int) -> None:
        raise LogError(errno.EINVAL, f"{request.name}: region {region} out of range "
                       f"(0-{self.region_count - 1})")

    def _commit(self, everything: bool) -> None:
        try:
            self.region_map.commit(everything=everything)
        except StoreError as exc:
            self._record_failure(exc)
            log.error("%s: commit failed: %s", self.name, exc)
            raise LogError(errno.EIO, str(exc)) from exc

    def _storage_step(self, what: str, step: Callable, *args):
        """Run a RESUME storage step; a failure is recorded in the health, not raised."""
        try:
            return step(*args)
        except StoreError as exc:
            self._record_failure(exc)
            log.error("%s: RESUME failed %s: %s", self.name, what, exc)
            return None

    def _record_failure(self, exc: StoreError) -> None:
        self.storage_failures.note(exc)
        if exc.device_failed:
            self.device_failed = True
        else:
            self.flush_failed = self.device_failed = True


def _name(uuid: str, luid: int) -> str:
    return f"log {uuid} (luid {luid:#x})"


Handler = Callable[[DirtyLog, Request], Outcome]
NO_RESYNC_WORK = answered(protocol.pack_resync_work(False, 0))
RECOVERED = counted(RECOVERY_COMPLETED, 1)

# What each request does to a log in each state: one function per request type, one
# table per state (dm-log.c's ops table), so that the hot path asks no state questions.
# CTR and DTR are the log table's (logtable.py), as is a FLUSH's commit.
_RESUMED: dict[RequestType, Handler] = {
    RequestType.PRESUSPEND: DirtyLog._presuspend,
    RequestType.POSTSUSPEND: DirtyLog._postsuspend,
    RequestType.RESUME: DirtyLog._resume_again,
    RequestType.GET_REGION_SIZE: DirtyLog._get_region_size,
    RequestType.IS_CLEAN: DirtyLog._is_clean,
    RequestType.IN_SYNC: DirtyLog._in_sync,
    RequestType.FLUSH: DirtyLog._mark_region,
    RequestType.MARK_REGION: DirtyLog._mark_region,
    RequestType.CLEAR_REGION: DirtyLog._clear_region,
    RequestType.GET_RESYNC_WORK: DirtyLog._get_resync_work,
    RequestType.SET_REGION_SYNC: DirtyLog._set_region_sync,
    RequestType.GET_SYNC_COUNT: DirtyLog._get_sync_count,
    RequestType.STATUS_INFO: DirtyLog._status_info,
    RequestType.STATUS_TABLE: DirtyLog._status_table,
    RequestType.IS_REMOTE_RECOVERING: DirtyLog._is_remote_recovering,
}
HANDLERS: dict[LogState, dict[RequestType, Handler]] = {
    # No bits loaded yet: nothing to answer about regions, nothing to commit.
    LogState.PENDING: {
        **_RESUMED,
        RequestType.POSTSUSPEND: DirtyLog._nothing,
        RequestType.RESUME: DirtyLog._resume,
        RequestType.GET_RESYNC_WORK: DirtyLog._no_resync_work,
        **dict.fromkeys((RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.FLUSH,
                         RequestType.MARK_REGION, RequestType.CLEAR_REGION,
                         RequestType.SET_REGION_SYNC, RequestType.IS_REMOTE_RECOVERING),
                        DirtyLog._before_resume),
    },
    LogState.RESUMED: _RESUMED,
    # Everything committed at POSTSUSPEND: no new marks until RESUME, no recovery.
    LogState.SUSPENDED: {
        **_RESUMED,
        RequestType.RESUME: DirtyLog._resume,
        RequestType.MARK_REGION: DirtyLog._marks_after_postsuspend,
        RequestType.FLUSH: DirtyLog._flush_suspended,
        RequestType.CLEAR_REGION: DirtyLog._clear_region_suspended,
        RequestType.GET_RESYNC_WORK: DirtyLog._no_resync_work,
    },
}
assert all(set(table) == set(RequestType) - {RequestType.CTR, RequestType.DTR}
           for table in HANDLERS.values())

# The life cycle: which request moves a log from which state to which (module docstring).
TRANSITIONS: dict[LogState, dict[RequestType, LogState]] = {
    LogState.PENDING: {RequestType.RESUME: LogState.RESUMED},
    LogState.RESUMED: {RequestType.POSTSUSPEND: LogState.SUSPENDED},
    LogState.SUSPENDED: {RequestType.RESUME: LogState.RESUMED},
}
