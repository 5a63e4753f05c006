"""The logs one process serves, and the rule for every request's answer.

A :class:`LogTable` maps ``(uuid, luid)`` to a :class:`~shardlog.dirtylog.DirtyLog`.  It
owns what is not one log's business:

- CTR creates a log, or succeeds again for one it already has: the kernel re-sends a CTR
  that timed out (15 s, new seq) and, after a server restart, sends a *reconnect* CTR
  (NUL counted in ``data_size``, no room for reply data) every 2 s until one succeeds
  (protocol.md §1.6).  A first CTR for a ``(uuid, luid)`` that was already resumed is a new
  activation at the same kernel address whose DTR we never saw: it replaces the old one.
- DTR forgets a log.
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
from pathlib import Path

from . import protocol
from .ctrargs import CtrArgsError, parse_ctr_string
from .dirtylog import DirtyLog, LogError, LogState
from .protocol import Request, RequestType
from .regionmap import StoreError, remove_instance_file, stale_instance_files

log = logging.getLogger(__name__)

LogKey = tuple[str, int]
_RESERVED_ERRNOS = frozenset({errno.EAGAIN, errno.ESRCH})


class LogTable:
    """Every log instance this process serves, keyed by ``(uuid, luid)``."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.logs: dict[LogKey, DirtyLog] = {}

    def answer(self, request: Request) -> bytes:
        """The reply datagram for a decoded request."""
        error, data = self.handle(request)
        try:
            return protocol.encode_reply(request, error, data)
        except ValueError:
            # A payload of the wrong size is a bug here; the kernel still gets an answer.
            log.exception("%s %s: bad reply payload", request.name, request.uuid)
            return protocol.encode_reply_raw(request.header, -errno.EIO, b"")

    def handle(self, request: Request) -> tuple[int, bytes]:
        """Apply a request; return ``(error, payload)``, error 0 or a negative errno."""
        try:
            if request.request_type is RequestType.CTR:
                return 0, self._construct(request)
            key = (request.uuid, request.luid)
            dirty_log = self.logs.get(key)
            if dirty_log is None:
                log.info("%s for unknown log %s (luid %#x): -ESRCH, the kernel will "
                         "reconnect", request.name, request.uuid, request.luid)
                return -errno.ESRCH, b""
            if request.request_type is RequestType.DTR:
                del self.logs[key]
                dirty_log.destroy()
                return 0, b""
            first_resume = (request.request_type is RequestType.RESUME
                            and dirty_log.state is LogState.PENDING)
            data = dirty_log.handle(request)
            if first_resume:
                self._remove_stale_instances(request.uuid)
            return 0, data
        except LogError as exc:
            log.warning("%s %s (luid %#x): %s", request.name, request.uuid, request.luid, exc)
            # -EAGAIN would make the kernel re-send at once, in a loop; -ESRCH would start
            # its reconnect: neither may come from a failing file or device by chance.
            return -(errno.EIO if exc.errno in _RESERVED_ERRNOS else exc.errno), b""
        except Exception:
            # A bug must not leave the kernel waiting 15 s and retrying for ever.
            log.exception("%s %s (luid %#x) failed", request.name, request.uuid, request.luid)
            return -errno.EIO, b""

    def _construct(self, request: Request) -> bytes:
        key = (request.uuid, request.luid)
        existing = self.logs.get(key)
        if existing is not None:
            if request.reconnect:
                return b""  # the kernel's reconnect loop: we never lost this log
            if (existing.state is LogState.PENDING
                    and existing.config.ctr_string == request.ctr_string):
                return existing.ctr_reply(request.version)  # a re-sent CTR
            log.warning("%s: new CTR %r replaces a live instance (its DTR never came)",
                        existing.name, request.ctr_string)
            del self.logs[key]
            existing.destroy()
        try:
            config = parse_ctr_string(request.ctr_string)
        except CtrArgsError as exc:
            raise LogError(errno.EINVAL, f"bad constructor: {exc}") from exc
        if not request.reconnect and len(request.ctr_string) >= protocol.MAX_PAYLOAD:
            # Its reconnect CTR (NUL counted) would not fit the kernel's buffer: after a
            # server restart the kernel would retry it for ever.  Fail the load now.
            raise LogError(errno.EINVAL, f"constructor string of {len(request.ctr_string)} "
                           f"bytes leaves no room for its NUL in a reconnect")
        try:
            dirty_log = DirtyLog.construct(request.uuid, request.luid, config, self.state_dir,
                                           reconnect=request.reconnect)
        except StoreError as exc:
            log.error("CTR %s (luid %#x): %s", request.uuid, request.luid, exc)
            raise LogError(exc.errno, str(exc)) from exc
        self.logs[key] = dirty_log
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
        destroyed: its DTR was missed."""
        live = {luid for (log_uuid, luid) in self.logs if log_uuid == uuid}
        for path in stale_instance_files(self.state_dir, uuid, live):
            log.info("removing stale instance file %s", path)
            remove_instance_file(path)
