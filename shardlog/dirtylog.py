"""One dirty log's state machine: everything that decides an answer to the kernel lives here.

Theory of operation
-------------------
A mirror's log keeps two bits per region (dm-log.c):

- ``clean_bits`` (persistent, in the :class:`~shardlog.regionmap.RegionMap`): 1 when the
  legs are known to be identical there and no write is outstanding.  MARK clears a bit
  before the kernel writes; CLEAR sets it again once the writes completed.
- ``sync_bits`` (memory only): 1 when the legs are in sync.  Resync work is handed out
  for 0 bits, and IN_SYNC answers from them.  At RESUME they are loaded from the clean
  bits, as ``disk_resume`` does.

One invariant ties them together and makes a restart safe: **a clean bit is only ever set
for an in-sync region** (CLEAR of an out-of-sync region leaves it dirty, as cmirrord does;
SET_REGION_SYNC(r, 0) dirties it).  So restoring ``sync_bits = clean_bits`` after a crash
can only under-state what is in sync (costing a region resync), never over-state it
(which would be silent data loss after a leg failure).

Life cycle (``state``)::

    CTR ──► PENDING ──RESUME──► RESUMED ──PRESUSPEND──► (recovery halted)
                                   ▲  └───POSTSUSPEND (commit everything)──► SUSPENDED
                                   └──────────────────RESUME─────────────────────┘

Which bits a RESUME starts from is the safety rule of design.md: a fresh ``core`` log starts
over like the kernel's (all out of sync unless ``nosync``), a ``disk`` log reads its device
by ``disk_resume``'s rules, and a log re-created by the kernel's reconnect CTR after a
server restart continues from what was saved.

Corrections to the in-kernel logs and cmirrord (protocol.md §3, §8): IN_SYNC answers
exactly 0 or 1; every region is bounds-checked (-EINVAL); GET_RESYNC_WORK hands each
out-of-sync region out once per pass, in order, and the same region again until its
SET_REGION_SYNC; the sync count is kept incrementally; IS_REMOTE_RECOVERING's hint is the
first out-of-sync region, never beyond it; MARK, CLEAR and SET_REGION_SYNC are
idempotent; FLUSH with regions (integrated flush) marks them and then commits.

Errors leave as :class:`LogError` (a negative errno for the kernel plus the reason); the
only I/O is through the RegionMap, whose failures arrive as StoreError.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import ClassVar

from bitarray import bitarray

from . import protocol
from .ctrargs import LogConfig, SyncMode
from .protocol import Request, RequestType
from .regionmap import (
    IncompatibleVersion,
    RegionMap,
    StoreError,
    resolve_device,
    state_file_path,
)

log = logging.getLogger(__name__)


class LogError(Exception):
    """A request this log refuses; ``errno`` is positive, the kernel gets it negated."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


class LogState(Enum):
    PENDING = "pending"  # constructed, bits not loaded yet
    RESUMED = "resumed"
    SUSPENDED = "suspended"  # after POSTSUSPEND: bits committed, nothing may change them


class Health(Enum):
    """The disk log's status character (dm-log.c ``disk_status``)."""

    ALIVE = "A"
    DEVICE_FAILED = "D"  # a read or write of the log device failed
    FLUSH_FAILED = "F"  # a cache flush / sync failed


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
        load_at_resume: bool,
        restoring: bool,
    ):
        self.uuid = uuid
        self.luid = luid
        self.config = config
        self.region_count = config.region_count
        self.region_map = region_map
        self.device_name = device_name  # "major:minor" handed back to the kernel at CTR
        self.state = LogState.PENDING
        self.health = Health.ALIVE
        # Until the first RESUME the kernel's logs report their constructor-time counts.
        self.sync_bits = bitarray(self.region_count, endian="little")
        self.sync_bits.setall(config.sync_mode is SyncMode.NOSYNC)
        self.sync_count = self.sync_bits.count(1)
        self.sync_search = 0  # where the next GET_RESYNC_WORK looks for an out-of-sync region
        self.recovering: int | None = None  # region handed out, awaiting SET_REGION_SYNC
        self.recovery_halted = False  # PRESUSPEND until RESUME
        self._load_at_resume = load_at_resume  # the region map must be read at RESUME
        self._restoring = restoring  # reconnect CTR: continue from the saved bits

    # -- construction: the safety rule ------------------------------------------------------

    @classmethod
    def construct(
        cls, uuid: str, luid: int, config: LogConfig, state_dir: Path, *, reconnect: bool
    ) -> DirtyLog:
        """A new log instance for a CTR (raises StoreError when its storage fails).

        - ``disk``: the log device holds the state; it is read at RESUME.
        - ``core``, first CTR (new activation or table reload): a new state file, every
          region out of sync unless ``nosync`` — never bits of an earlier instance, which
          could call a brand-new leg in sync.
        - ``core``, reconnect CTR (the kernel kept the log while the server was away): the
          state file saved for this ``(uuid, luid)`` is continued at RESUME.  Without one,
          nothing is known, so every region is out of sync, even for ``nosync``.
        """
        if config.is_disk:
            assert config.device is not None
            path, device_name = resolve_device(config.device, state_dir / "dev")
            rmap = RegionMap.open_device(path, config.region_count)
            return cls(uuid, luid, config, rmap, device_name=device_name,
                       load_at_resume=True, restoring=reconnect)
        path = state_file_path(state_dir, uuid, luid)
        if reconnect and path.exists():
            rmap = RegionMap.open_state_file(path, config.region_count)
            return cls(uuid, luid, config, rmap, device_name=None,
                       load_at_resume=True, restoring=True)
        if reconnect:
            log.warning("%s: reconnect CTR but no saved state at %s: every region will be "
                        "resynced", _name(uuid, luid), path)
            rmap = RegionMap.create_state_file(path, config.region_count, clean=False)
            return cls(uuid, luid, config, rmap, device_name=None,
                       load_at_resume=True, restoring=True)
        nosync = config.sync_mode is SyncMode.NOSYNC
        rmap = RegionMap.create_state_file(path, config.region_count, clean=nosync)
        return cls(uuid, luid, config, rmap, device_name=None,
                   load_at_resume=False, restoring=False)

    def ctr_reply(self, version: int) -> bytes:
        """The CTR answer: since version 2 the kernel takes a log device to hold open."""
        if version >= 2 and self.device_name is not None:
            return protocol.pack_string(self.device_name)
        return b""

    def destroy(self) -> None:
        """DTR: forget the log without writing (the kernel's logs do not write at DTR
        either; everything that matters was committed by the last FLUSH/POSTSUSPEND)."""
        self.region_map.close()
        if not self.config.is_disk:
            try:
                os.unlink(self.region_map.path)
            except OSError as exc:
                log.warning("%s: cannot remove %s: %s", self.name, self.region_map.path, exc)

    @property
    def name(self) -> str:
        return _name(self.uuid, self.luid)

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, request: Request) -> bytes:
        """Apply one request (anything but CTR and DTR) and return the reply payload."""
        return self._HANDLERS[request.request_type](self, request)

    # -- life cycle -------------------------------------------------------------------------

    def _resume(self, request: Request) -> bytes:
        if self.state is LogState.RESUMED:
            # A second RESUME without a suspend (cmirrord: "Additional resume issued before
            # suspend"): reloading now would forget marks of writes in flight.
            return b""
        failure = None
        if self._load_at_resume:
            failure = self._load()
            self.sync_bits = self.region_map.clean_bits[: self.region_count]
            self.sync_count = self.sync_bits.count(1)
        # Otherwise the in-memory bits stand: a fresh core log's were set at CTR, and a core
        # log keeps them across a suspend (dm-log.c core_resume).
        self.sync_search = 0
        self.recovering = None
        self.recovery_halted = False
        self.state = LogState.RESUMED
        # A disk log is re-read from its device at every resume, as disk_resume does.
        self._load_at_resume = self.config.is_disk
        self._restoring = False
        if failure is not None:
            raise failure
        return b""

    def _load(self) -> LogError | None:
        """Read and normalise the region map; a failure to write it back is returned (the
        log runs on from memory with a failed device, as the kernel's does)."""
        sync_mode = self.config.sync_mode
        honor_saved = self._restoring or sync_mode is SyncMode.DEFAULT
        new_clean = sync_mode is SyncMode.NOSYNC and not self._restoring
        failure = None
        try:
            outcome = self.region_map.resume(honor_saved, new_clean)
            log.info("%s: resumed from %s: %s", self.name, self.region_map.path, outcome.reason)
        except IncompatibleVersion as exc:
            raise LogError(errno.EINVAL, str(exc)) from exc  # nothing loaded: stays as is
        except StoreError as exc:
            log.error("%s: RESUME could not write the region map back: %s", self.name, exc)
            failure = LogError(exc.errno, str(exc))
        self.health = Health.ALIVE
        if self.region_map.read_error is not None:
            log.error("%s: %s", self.name, self.region_map.read_error)
            self.health = Health.DEVICE_FAILED
        elif failure is not None:
            self.health = Health.DEVICE_FAILED
        return failure

    def _presuspend(self, request: Request) -> bytes:
        # dm-raid1 has stopped recovery; hand out no more work until RESUME.
        self.recovery_halted = True
        return b""

    def _postsuspend(self, request: Request) -> bytes:
        if self.state is LogState.PENDING:
            return b""
        self._commit(everything=True)
        self.state = LogState.SUSPENDED
        self.recovering = None
        return b""

    # -- queries ----------------------------------------------------------------------------

    def _get_region_size(self, request: Request) -> bytes:
        return protocol.pack_u64(self.config.region_size)

    def _is_clean(self, request: Request) -> bytes:
        (region,) = self._checked(request)
        return protocol.pack_bool(self.region_map.clean_bits[region])

    def _in_sync(self, request: Request) -> bytes:
        (region,) = self._checked(request)
        return protocol.pack_bool(self.sync_bits[region])

    def _get_sync_count(self, request: Request) -> bytes:
        return protocol.pack_u64(self.sync_count)

    def _status_info(self, request: Request) -> bytes:
        if self.config.is_disk:
            device = self.device_name or self.config.device
            text = f"3 {self.config.log_type} {device} {self.health.value}"
        else:
            text = f"1 {self.config.log_type}"
        return protocol.pack_string(text)

    def _status_table(self, request: Request) -> bytes:
        return protocol.pack_string(self.config.table_args())

    def _is_remote_recovering(self, request: Request) -> bytes:
        self._checked(request)
        # One host: nothing is recovered remotely, and dm-raid1's region hash already holds
        # writes back from the region it recovers itself.  The hint lets the kernel skip
        # this question below the first out-of-sync region, and no further: a hint past it
        # would stop resync requests until the next RESUME.
        return protocol.pack_remote_recovering(False, self.first_out_of_sync())

    def first_out_of_sync(self) -> int:
        region = self.sync_bits.find(0)
        return self.region_count if region < 0 else region

    # -- changes ----------------------------------------------------------------------------

    def _mark_region(self, request: Request) -> bytes:
        for region in self._checked(request, changes=True):
            self.region_map.mark(region)
        return b""

    def _clear_region(self, request: Request) -> bytes:
        for region in self._checked(request, changes=True):
            if self.sync_bits[region]:  # the invariant: clean only when in sync
                self.region_map.clear(region)
        return b""

    def _flush(self, request: Request) -> bytes:
        # Integrated flush (version 3): the regions to mark ride in the FLUSH itself, and
        # the reply promises they are durable like any other mark.
        for region in self._checked(request, changes=bool(request.regions)):
            self.region_map.mark(region)
        self._commit(everything=False)
        return b""

    def _get_resync_work(self, request: Request) -> bytes:
        if self.state is not LogState.RESUMED or self.recovery_halted:
            return protocol.pack_resync_work(False, 0)
        if self.recovering is None:
            region = self.sync_bits.find(0, self.sync_search)
            if region < 0:
                self.sync_search = self.region_count
                return protocol.pack_resync_work(False, 0)
            self.sync_search = region + 1
            self.recovering = region
        # Asked again before SET_REGION_SYNC: the answer was lost or the kernel retried;
        # dm-raid1 recovers one region at a time (MAX_RECOVERY = 1), so it is the same one.
        return protocol.pack_resync_work(True, self.recovering)

    def _set_region_sync(self, request: Request) -> bytes:
        (region,) = self._checked(request, changes=True)
        if self.recovering == region:
            self.recovering = None
        if request.in_sync:
            if not self.sync_bits[region]:
                self.sync_bits[region] = 1
                self.sync_count += 1
        else:
            if self.sync_bits[region]:
                self.sync_bits[region] = 0
                self.sync_count -= 1
            self.region_map.mark(region)  # the invariant: never clean while out of sync
        return b""

    # -- helpers ------------------------------------------------------------------------------

    def _checked(self, request: Request, changes: bool = False) -> tuple[int, ...]:
        """The request's regions, once the log can take it and every region is in range."""
        if self.state is LogState.PENDING:
            raise LogError(errno.EINVAL, f"{request.name} before the log was resumed")
        if changes and self.state is LogState.SUSPENDED:
            raise LogError(errno.EINVAL, f"{request.name} after POSTSUSPEND")
        for region in request.regions:
            if region >= self.region_count:
                raise LogError(
                    errno.EINVAL,
                    f"{request.name}: region {region} out of range (0-{self.region_count - 1})",
                )
        return request.regions

    def _commit(self, everything: bool) -> None:
        try:
            self.region_map.commit(everything=everything)
        except StoreError as exc:
            self.health = Health.DEVICE_FAILED if exc.device_failed else Health.FLUSH_FAILED
            log.error("%s: commit failed: %s", self.name, exc)
            raise LogError(errno.EIO, str(exc)) from exc

    _HANDLERS: ClassVar[dict[RequestType, Callable[[DirtyLog, Request], bytes]]] = {
        RequestType.PRESUSPEND: _presuspend,
        RequestType.POSTSUSPEND: _postsuspend,
        RequestType.RESUME: _resume,
        RequestType.GET_REGION_SIZE: _get_region_size,
        RequestType.IS_CLEAN: _is_clean,
        RequestType.IN_SYNC: _in_sync,
        RequestType.FLUSH: _flush,
        RequestType.MARK_REGION: _mark_region,
        RequestType.CLEAR_REGION: _clear_region,
        RequestType.GET_RESYNC_WORK: _get_resync_work,
        RequestType.SET_REGION_SYNC: _set_region_sync,
        RequestType.GET_SYNC_COUNT: _get_sync_count,
        RequestType.STATUS_INFO: _status_info,
        RequestType.STATUS_TABLE: _status_table,
        RequestType.IS_REMOTE_RECOVERING: _is_remote_recovering,
    }


def _name(uuid: str, luid: int) -> str:
    return f"log {uuid} (luid {luid:#x})"
