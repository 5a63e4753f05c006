"""The logs one process serves, and the rule for every request's answer.

A :class:`LogTable` maps ``(uuid, luid)`` to a :class:`~shardlog.log.dirtylog.DirtyLog`.  It
owns what is not one log's business:

- CTR creates a log, or succeeds again for one it already has: the kernel re-sends a CTR
  that timed out (15 s, new seq) and, after a server restart, sends a *reconnect* CTR
  (NUL counted in ``data_size``, no room for reply data) every 2 s until one succeeds
  (protocol.md §1.6).  A first CTR for a ``(uuid, luid)`` that was already resumed is a new
  activation at the same kernel address whose DTR we never saw: it replaces the old one —
  once it is known to be good (parsed, checked, its storage made), so that a refused CTR
  leaves the live log, its files and its record as they were.
- DTR forgets a log.
- A request for a log it does not know, but whose CTR it recorded before a restart
  (records.py), re-creates that log as the kernel's reconnect would, and is answered.
- With ``defer_commit``, FLUSHes only stage their marks, and :meth:`LogTable.commit_deferred`
  commits every staged log before any of their replies goes out (group commit).  A staged
  log that a DTR or a replacing CTR is about to close is committed first, then and there:
  its FLUSH came first, and a commit must never outlive the mapping it writes from.
- A request for a log it does not know is answered -ESRCH, never -EINVAL: -ESRCH makes the
  kernel re-send CTR + RESUME and retry (§1.6b), while -EINVAL would fail a FLUSH (the
  mirror's log is marked failed) or an IN_SYNC (writes then go to one leg only).
- Nothing escapes :meth:`LogTable.handle`: every request gets an answer, with an exact
  payload size or a negative errno, and every refusal is logged with its reason.

Two live instances of one uuid (a table reload: new luid, same uuid) are two entries, each
with its own instance file; a disk log's instances also share the device, which the new
instance reads at its RESUME, after the old one's last commit at POSTSUSPEND.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shardlog.log.dirtylog import DirtyLog, LogError, LogState
from shardlog.observability.workercounters import LOGS_RESTORED, Count, count_nothing, observe
from shardlog.storage import records
from shardlog.storage.errors import FailureTally, StoreError
from shardlog.storage.statedir import (
    instance_file_key,
    instance_file_path,
    instance_files_by_key,
    remove_state_file,
)
from shardlog.wire import protocol
from shardlog.wire.ctrargs import CtrArgsError, parse_ctr_string
from shardlog.wire.protocol import Request, RequestType

log = logging.getLogger(__name__)

LogKey = tuple[str, int]
_RESERVED_ERRNOS = frozenset({errno.EAGAIN, errno.ESRCH})
_T = TypeVar("_T")


class LogTable:
    """Every log instance this process serves, keyed by ``(uuid, luid)``."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.logs: dict[LogKey, DirtyLog] = {}
        self._deferred: list[tuple[Request, DirtyLog]] = []
        # Outcomes of staged logs committed early (before a DTR or a replacing CTR closed
        # them), by id of the log, which stays in _deferred until its reply is made.
        self._settled: dict[int, tuple[int, bytes]] = {}
        # The instance files on disk before any new instance here was resumed, by uuid key
        # (listed once, when the first one is): the only files that can be stale.
        self._files_found: dict[str, dict[int, Path]] | None = None
        # Where the metrics' counts go (a worker sets its reporter's count here).
        self.count: Count = count_nothing
        # The storage failures its logs handled, by source: the worker reports them.
        self.storage_failures = FailureTally()

    def answer(self, request: Request, *, defer_commit: bool = False) -> bytes | None:
        """The reply datagram for a decoded request.

        With ``defer_commit`` a FLUSH only stages its marks and answers None; its reply
        comes from :meth:`commit_deferred`, which commits every staged log at once.
        """
        if defer_commit and request.request_type is RequestType.FLUSH:
            outcome = self._guarded(request, self._stage_flush)
            if outcome is None:
                return None
            return self._encode(request, *outcome)
        return self._encode(request, *self.handle(request))

    def commit_deferred(self) -> list[bytes]:
        """Commit every log with a staged FLUSH, then return the replies of those FLUSHes
        (a log staged twice is committed once)."""
        deferred, self._deferred = self._deferred, []
        outcomes, self._settled = self._settled, {}
        replies = []
        for request, dirty_log in deferred:
            outcome = outcomes.get(id(dirty_log))
            if outcome is None:
                outcome = self._guarded(request, lambda _request, log=dirty_log: (
                    self._commit_staged(log)))
                outcomes[id(dirty_log)] = outcome
            replies.append(self._encode(request, *outcome))
        return replies

    def _settle(self, dirty_log: DirtyLog) -> None:
        """Commit a log whose FLUSH is staged in this batch now, before it is closed: its
        FLUSH's reply is this commit's outcome."""
        if id(dirty_log) in self._settled:
            return
        for request, staged in self._deferred:
            if staged is dirty_log:
                self._settled[id(dirty_log)] = self._guarded(
                    request, lambda _request: self._commit_staged(dirty_log))
                return

    def _commit_staged(self, dirty_log: DirtyLog) -> tuple[int, bytes]:
        syncs = dirty_log.region_map.needs_commit  # else nothing is written: not a commit
        started = time.perf_counter()
        dirty_log.commit_flush()
        if syncs:
            observe(self.count, "flush_commit_seconds", time.perf_counter() - started,
                    log_type=dirty_log.config.log_type)
        return 0, b""

    def close(self) -> None:
        """The server stops: every log commits everything and keeps its files."""
        for dirty_log in self.logs.values():
            dirty_log.shutdown()
        self.logs.clear()

    def handle(self, request: Request) -> tuple[int, bytes]:
        """Apply a request; return ``(error, payload)``, error 0 or a negative errno."""
        return self._guarded(request, self._apply)

    def _apply(self, request: Request) -> tuple[int, bytes]:
        if request.request_type is RequestType.CTR:
            return 0, self._construct(request)
        key = (request.uuid, request.luid)
        dirty_log = self.logs.get(key)
        if request.request_type is RequestType.DTR:
            return self._destroy(key, dirty_log)
        if dirty_log is None:
            dirty_log = self._restore(request)
            if dirty_log is None:
                log.info("%s for unknown log %s (luid %#x): -ESRCH, the kernel will "
                         "reconnect", request.name, request.uuid, request.luid)
                return -errno.ESRCH, b""
        dirty_log.requests += 1
        first_resume = (request.request_type is RequestType.RESUME
                        and dirty_log.state is LogState.PENDING)
        data = dirty_log.handle(request)
        if first_resume:
            self._remove_stale_instances(request.uuid)
        return 0, data

    def _stage_flush(self, request: Request) -> tuple[int, bytes] | None:
        dirty_log = self.logs.get((request.uuid, request.luid))
        if dirty_log is None:
            return self._apply(request)  # restored, or -ESRCH: answered at once
        dirty_log.requests += 1
        dirty_log.stage_flush(request)
        self._deferred.append((request, dirty_log))
        return None

    def _guarded(self, request: Request, step: Callable[[Request], _T]) -> _T | tuple[int, bytes]:
        """Run a step for a request; any failure becomes the errno the kernel gets."""
        try:
            return step(request)
        except LogError as exc:
            log.warning("%s %s (luid %#x): %s", request.name, request.uuid, request.luid, exc)
            # -EAGAIN would make the kernel re-send at once, in a loop; -ESRCH would start
            # its reconnect: neither may come from a failing file or device by chance.
            return -(errno.EIO if exc.errno in _RESERVED_ERRNOS else exc.errno), b""
        except Exception:
            # A bug must not leave the kernel waiting 15 s and retrying for ever.
            log.exception("%s %s (luid %#x) failed", request.name, request.uuid, request.luid)
            return -errno.EIO, b""

    @staticmethod
    def _encode(request: Request, error: int, data: bytes) -> bytes:
        try:
            return protocol.encode_reply(request, error, data)
        except ValueError:
            # A payload of the wrong size is a bug here; the kernel still gets an answer.
            log.exception("%s %s: bad reply payload", request.name, request.uuid)
            return protocol.encode_reply_raw(request.header, -errno.EIO, b"")

    def _destroy(self, key: LogKey, dirty_log: DirtyLog | None) -> tuple[int, bytes]:
        uuid, luid = key
        record = records.record_path(self.state_dir, uuid, luid)
        if dirty_log is not None:
            self._settle(dirty_log)
            del self.logs[key]
            dirty_log.destroy()
        elif not record.exists():
            log.info("DTR for unknown log %s (luid %#x)", uuid, luid)
            return -errno.ESRCH, b""  # ignored by the kernel
        else:
            # A log of a server before a restart, gone before any other request came.
            remove_state_file(instance_file_path(self.state_dir, uuid, luid))
        remove_state_file(record)
        return 0, b""

    def _restore(self, request: Request) -> DirtyLog | None:
        """Re-create a live log from its CTR record (records.py): what the kernel's
        reconnect would do after an -ESRCH, done at once."""
        ctr_string = records.load(self.state_dir, request.uuid, request.luid)
        if ctr_string is None:
            return None
        try:
            config = parse_ctr_string(ctr_string)
        except CtrArgsError as exc:
            log.error("CTR record of %s (luid %#x) is unusable: %s", request.uuid,
                      request.luid, exc)
            return None
        dirty_log = DirtyLog.construct(request.uuid, request.luid, config, self.state_dir,
                                       reconnect=True, failures=self.storage_failures)
        dirty_log.restore()
        self.logs[(request.uuid, request.luid)] = dirty_log
        self.count(LOGS_RESTORED, 1)
        log.info("%s: restored from its CTR record (%s)", dirty_log.name, dirty_log.state.value)
        return dirty_log

    def _construct(self, request: Request) -> bytes:
        key = (request.uuid, request.luid)
        existing = self.logs.get(key)
        if existing is not None:
            if request.reconnect:
                return b""  # the kernel's reconnect loop: we never lost this log
            if (existing.state is LogState.PENDING
                    and existing.config.ctr_string == request.ctr_string):
                return existing.ctr_reply(request.version)  # a re-sent CTR
        # Everything that can refuse the CTR comes before anything changes: a refused CTR
        # for a live instance must leave it serving, with its bits, files and record.
        try:
            config = parse_ctr_string(request.ctr_string)
        except CtrArgsError as exc:
            raise LogError(errno.EINVAL, f"bad constructor: {exc}") from exc
        if not request.reconnect and len(request.ctr_string) >= protocol.MAX_PAYLOAD:
            # Its reconnect CTR (NUL counted) would not fit the kernel's buffer: after a
            # server restart the kernel would retry it for ever.  Fail the load now.
            raise LogError(errno.EINVAL, f"constructor string of {len(request.ctr_string)} "
                           f"bytes leaves no room for its NUL in a reconnect")
        if existing is not None:
            # Its FLUSH staged in this batch came first: committed before it is replaced.
            self._settle(existing)
        try:
            # A new instance file takes the old one's name atomically, only once complete;
            # the old instance keeps its own mapping until it is closed below.
            dirty_log = DirtyLog.construct(request.uuid, request.luid, config, self.state_dir,
                                           reconnect=request.reconnect,
                                           failures=self.storage_failures)
        except StoreError as exc:
            self.storage_failures.note(exc)
            log.error("CTR %s (luid %#x): %s", request.uuid, request.luid, exc)
            raise LogError(exc.errno, str(exc)) from exc
        if existing is not None:
            log.warning("%s: new CTR %r replaces a live instance (its DTR never came)",
                        existing.name, request.ctr_string)
            existing.close()  # its file is the new instance's now: not removed
        self.logs[key] = dirty_log
        try:
            records.save(self.state_dir, request.uuid, request.luid, request.ctr_string)
        except OSError as exc:
            log.warning("%s: cannot record its CTR (%s); after a restart the kernel's "
                        "reconnect brings it back", dirty_log.name, exc)
        log.info("%s: constructed (%s%s), %d regions of %d sectors", dirty_log.name,
                 config.log_type, ", reconnect" if request.reconnect else "",
                 config.region_count, config.region_size)
        return b"" if request.reconnect else dirty_log.ctr_reply(request.version)

    def _remove_stale_instances(self, uuid: str) -> None:
        """Instance files of this uuid that no instance here owns, removed when a new
        instance is first resumed.  Not earlier: right after a server restart the old
        instance of a table reload is still live in the kernel and may yet reconnect, and
        its file is what it will continue from.  Once the new instance is resumed, dm has
        swapped the tables, so an instance that is not here is gone or about to be
        destroyed: its DTR was missed.

        Every file this process creates belongs to an instance in its table until a DTR
        removes both, so only the files it found on disk can be stale: they are listed
        once, not at every resume (a directory of 10,000 logs takes milliseconds to list)."""
        if self._files_found is None:
            self._files_found = instance_files_by_key(self.state_dir)
        for luid, path in self._files_found.pop(instance_file_key(uuid), {}).items():
            if (uuid, luid) in self.logs:
                continue
            log.info("removing stale instance file %s", path)
            remove_state_file(path)
            remove_state_file(records.beside(path))
