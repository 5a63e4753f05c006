"""The logs one process serves, and the one place every request's answer is decided.

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
- A FLUSH that leaves something to commit only stages it: :meth:`LogTable.commit_staged`,
  run once per batch, commits every staged log before any of their replies goes out
  (group commit; a FLUSH with nothing to commit is answered at once).  A staged log that
  a DTR or a replacing CTR is about to close is committed first, then and there: its
  FLUSH came first, and a commit must never outlive the mapping it writes from.
- A request for a log it does not know is answered -ESRCH, never -EINVAL: -ESRCH makes the
  kernel re-send CTR + RESUME and retry (§1.6b), while -EINVAL would fail a FLUSH (the
  mirror's log is marked failed) or an IN_SYNC (writes then go to one leg only).
- Nothing escapes :meth:`LogTable.decide`: every request gets an
  :class:`~shardlog.log.outcome.Outcome` (an error or an exact payload, and what the
  metrics count), and every refusal is logged with its reason.  The reply bytes are made
  from the outcome once (:func:`~shardlog.log.outcome.encode`); a request on its own
  (tools, tests) is answered by :meth:`LogTable.answer`, a batch of one.

The hot path is short: a known log's request other than CTR, DTR, RESUME and FLUSH goes
from :meth:`LogTable.decide` straight to the log's function for its state (dirtylog.py).

Two live instances of one uuid (a table reload: new luid, same uuid) are two entries, each
with its own instance file; a disk log's instances also share the device, which the new
instance reads at its RESUME, after the old one's last commit at POSTSUSPEND.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

from shardlog.log.dirtylog import DirtyLog, LogError, LogState
from shardlog.log.outcome import (
    BROKEN,
    OK,
    UNKNOWN_LOG,
    Outcome,
    answered,
    counted,
    encode,
    failed,
    refused,
)
from shardlog.observability.workercounters import (
    LOGS_RESTORED,
    RECONNECT_CTRS,
    Count,
    count_nothing,
    observe,
)
from shardlog.observability.workerstats import LogStatus
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
# The requests the table decides itself, with the log's help or without a log: the rest
# go straight to the log's function for its state.
_TABLE_REQUESTS = frozenset({RequestType.CTR, RequestType.DTR, RequestType.RESUME,
                             RequestType.FLUSH})
RECONNECTED = counted(RECONNECT_CTRS, 1)


class LogTable:
    """Every log instance this process serves, keyed by ``(uuid, luid)``.

    ``count`` is where the metrics' counts of what only the table sees go (logs restored,
    commit times): a worker's reporter's count; nothing outside a worker."""

    def __init__(self, state_dir: Path, count: Count = count_nothing):
        self.state_dir = Path(state_dir)
        self.logs: dict[LogKey, DirtyLog] = {}
        self.count = count
        # The FLUSHes staged in this batch: (request, log, the outcome of its marks).
        self._staged: list[tuple[Request, DirtyLog, Outcome]] = []
        # Logs of staged FLUSHes committed early (before a DTR or a replacing CTR closed
        # them), by id of the log, which stays in _staged until its outcome is made: the
        # error of their commit, 0 if it succeeded.
        self._settled: dict[int, int] = {}
        # The instance files on disk before any new instance here was resumed, by uuid key
        # (listed once, when the first one is): the only files that can be stale.
        self._files_found: dict[str, dict[int, Path]] | None = None
        # The storage failures its logs handled, by source: the worker reports them.
        self.storage_failures = FailureTally()

    def decide(self, request: Request) -> Outcome | None:
        """What to answer to a decoded request: every answer the kernel gets is decided
        here.  None for a FLUSH whose marks wait for a commit: its outcome comes from
        :meth:`commit_staged`, which the caller runs once per batch, before it sends any
        of their replies.  Nothing escapes: any failure is an errno in the outcome."""
        try:
            dirty_log = self.logs.get((request.uuid, request.luid))
            request_type = request.request_type
            if dirty_log is not None:
                if request_type not in _TABLE_REQUESTS:
                    dirty_log.requests += 1
                    return dirty_log.handlers[request_type](dirty_log, request)
                if request_type is RequestType.FLUSH:
                    return self._flush(request, dirty_log)
            return self._decide_for_table(request, dirty_log)
        except Exception as exc:
            return self._refusal(request, exc)

    def answer(self, request: Request) -> bytes:
        """The reply datagram to one request decided on its own (a batch of one): a
        FLUSH is committed before its reply is made."""
        outcome = self.decide(request)
        if outcome is None:
            outcome = self.commit_staged()[-1]  # staged last
        return encode(request, outcome)

    def staged_writes_device(self) -> bool:
        """Whether committing what is staged writes and syncs a log device (a disk log's
        commit), rather than nothing but memory (a core log's: design.md): only then is
        it worth sharing with FLUSHes still queued."""
        return any(dirty_log.config.is_disk for _request, dirty_log, _marked in self._staged)

    def commit_staged(self) -> list[Outcome]:
        """Commit every log with a staged FLUSH, then return the outcomes of those
        FLUSHes in the order they were staged (a log staged twice is committed once)."""
        staged, self._staged = self._staged, []
        errors, self._settled = self._settled, {}
        outcomes = []
        for request, dirty_log, marked in staged:
            error = errors.get(id(dirty_log))
            if error is None:
                error = errors[id(dirty_log)] = self._commit(request, dirty_log)
            outcomes.append(marked if not error else failed(marked, -error))
        return outcomes

    def statuses(self) -> list[LogStatus]:
        """A snapshot of every log, at once (a worker's last report)."""
        return self.listing().take(len(self.logs))

    def listing(self) -> StatusListing:
        """The logs served now, to be described a slice at a time (StatusListing)."""
        return StatusListing(self)

    def close(self) -> None:
        """The server stops: every log commits everything and keeps its files."""
        for dirty_log in self.logs.values():
            dirty_log.shutdown()
        self.logs.clear()

    # -- the table's own requests ------------------------------------------------------------

    def _decide_for_table(self, request: Request, dirty_log: DirtyLog | None) -> Outcome | None:
        request_type = request.request_type
        if request_type is RequestType.CTR:
            return self._construct(request)
        if request_type is RequestType.DTR:
            return self._destroy(request, dirty_log)
        if dirty_log is None:
            dirty_log = self._restore(request)
            if dirty_log is None:
                log.info("%s for unknown log %s (luid %#x): -ESRCH, the kernel will "
                         "reconnect", request.name, request.uuid, request.luid)
                return UNKNOWN_LOG
        if request_type is RequestType.FLUSH:
            return self._flush(request, dirty_log)
        dirty_log.requests += 1
        first_resume = (request_type is RequestType.RESUME
                        and dirty_log.state is LogState.PENDING)
        outcome = dirty_log.handlers[request_type](dirty_log, request)
        if first_resume:
            self._remove_stale_instances(request.uuid)
        return outcome

    def _flush(self, request: Request, dirty_log: DirtyLog) -> Outcome | None:
        """A FLUSH makes its marks (the log's function for its state) and, if anything is
        left to commit, is staged: committed with the batch's other logs before any of
        their replies goes out.  A FLUSH with nothing to commit is answered at once."""
        dirty_log.requests += 1
        outcome = dirty_log.handlers[RequestType.FLUSH](dirty_log, request)
        if dirty_log.region_map.needs_commit:
            self._staged.append((request, dirty_log, outcome))
            return None
        return outcome

    def _commit(self, request: Request, dirty_log: DirtyLog) -> int:
        """Commit a staged log: 0, or the negative errno its FLUSH gets."""
        syncs = dirty_log.region_map.needs_commit  # else nothing is written: not a commit
        started = time.perf_counter()
        try:
            dirty_log.commit_flush()
        except Exception as exc:
            return self._refusal(request, exc).error
        if syncs:
            observe(self.count, "flush_commit_seconds", time.perf_counter() - started,
                    log_type=dirty_log.config.log_type)
        return 0

    def _settle(self, dirty_log: DirtyLog) -> None:
        """Commit a log whose FLUSH is staged in this batch now, before it is closed: its
        FLUSH's reply is this commit's outcome."""
        if id(dirty_log) in self._settled:
            return
        for request, staged, _marked in self._staged:
            if staged is dirty_log:
                self._settled[id(dirty_log)] = self._commit(request, dirty_log)
                return

    @staticmethod
    def _refusal(request: Request, exc: Exception) -> Outcome:
        """The outcome of a request whose step failed: the errno the kernel gets."""
        if isinstance(exc, LogError):
            log.warning("%s %s (luid %#x): %s", request.name, request.uuid, request.luid, exc)
            # -EAGAIN would make the kernel re-send at once, in a loop; -ESRCH would start
            # its reconnect: neither may come from a failing file or device by chance.
            return BROKEN if exc.errno in _RESERVED_ERRNOS else refused(exc.errno)
        # A bug must not leave the kernel waiting 15 s and retrying for ever.
        log.error("%s %s (luid %#x) failed", request.name, request.uuid, request.luid,
                  exc_info=exc)
        return BROKEN

    def _destroy(self, request: Request, dirty_log: DirtyLog | None) -> Outcome:
        uuid, luid = key = (request.uuid, request.luid)
        record = records.record_path(self.state_dir, uuid, luid)
        if dirty_log is not None:
            self._settle(dirty_log)
            del self.logs[key]
            dirty_log.destroy()
        elif not record.exists():
            log.info("DTR for unknown log %s (luid %#x)", uuid, luid)
            return UNKNOWN_LOG  # ignored by the kernel
        else:
            # A log of a server before a restart, gone before any other request came.
            remove_state_file(instance_file_path(self.state_dir, uuid, luid))
        remove_state_file(record)
        return OK

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

    def _construct(self, request: Request) -> Outcome:
        key = (request.uuid, request.luid)
        existing = self.logs.get(key)
        if existing is not None:
            if request.reconnect:
                return RECONNECTED  # the kernel's reconnect loop: we never lost this log
            if (existing.state is LogState.PENDING
                    and existing.config.ctr_string == request.ctr_string):
                return answered(existing.ctr_reply(request.version))  # a re-sent CTR
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
        if request.reconnect:
            return RECONNECTED
        return answered(dirty_log.ctr_reply(request.version))

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


class StatusListing:
    """The statuses of the logs a table served when the listing began, taken a slice at a
    time: describing 5,000 logs takes 20-50 ms, and a worker answers its socket between
    two slices rather than after the whole list.  A log destroyed (or replaced) between
    two slices is left out; one created after the listing began is not in it."""

    def __init__(self, table: LogTable) -> None:
        self._table = table
        self._pending = list(table.logs.items())
        self._position = 0

    @property
    def done(self) -> bool:
        """Whether every log of the listing has been taken."""
        return self._position >= len(self._pending)

    def take(self, count: int) -> list[LogStatus]:
        """The statuses of the next ``count`` logs (fewer if some were destroyed)."""
        logs = self._table.logs
        end = self._position + count
        statuses = [dirty_log.status() for key, dirty_log in self._pending[self._position:end]
                    if logs.get(key) is dirty_log]
        self._position = end
        return statuses
