"""The kernel's ``userspace`` dirty log type: dm-log-userspace-base.c over a Connector.

Theory of operation
-------------------
dm-raid1 and dm-region-hash call a dirty log through an ops table (``struct
dm_dirty_log_type``); the ``userspace`` type turns each op into requests to the log
server.  :class:`UserspaceLog` has one method per op, each modelling the kernel function
named in its docstring, and keeps the same kernel-side state:

- the **constructor string** (``build_constructor_string``): ``"<target sectors> <log
  type> <args…>"``, after the uuid and an optional ``integrated_flush`` token were taken
  off the table's log arguments.  It is sent once by CTR (``data_size`` without the NUL,
  a 128-byte reply buffer for a device name) and again, NUL counted, by every reconnect;
- the **region size**, asked once with GET_REGION_SIZE right after the CTR, then cached;
- ``in_sync_hint``, reset to 0 at RESUME and raised by IS_REMOTE_RECOVERING replies and by
  a full GET_SYNC_COUNT: at or above it the kernel stops asking IS_REMOTE_RECOVERING and
  GET_RESYNC_WORK;
- the **mark and clear lists**: ``mark_region``/``clear_region`` only queue (``list_add``:
  newest first); ``flush`` sends them (``userspace_flush``):

  1. both lists empty → nothing is sent at all;
  2. clears first, as CLEAR_REGION groups of at most 32 regions;
  3. marks as MARK_REGION groups, then one empty FLUSH; or, with ``integrated_flush``,
     each mark group *is* a FLUSH carrying the regions;
  4. when a CLEAR or MARK group fails, everything that list has handled so far, good
     groups included, is sent again one region per request (``flush_one_by_one``);
     an integrated FLUSH that fails is not retried;
  5. integrated mode, clears only: an empty FLUSH is scheduled 3 s later (``do_flush``
     on a workqueue; here a timer thread), unless one is already scheduled, in which case
     it is *cancelled*, as the kernel does; any flush with marks cancels it too.
     POSTSUSPEND and DTR run a scheduled one first (``flush_delayed_work``).

CTR, DTR, PRESUSPEND, POSTSUSPEND, RESUME and the construction-time GET_REGION_SIZE go
straight to ``dm_consult_userspace`` (:meth:`Connector.consult`); every other request goes
through ``userspace_do_request`` and so survives a server restart by reconnecting.

Where the kernel would go on with an uninitialised variable (a successful reply shorter
than the fixed-size answer it expects) the model raises :class:`ShortReply` instead: that is
a server bug a test should see, not a value to make up.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from shardlog.harness.kernelsim.connector import Connector, ConnectorClosed
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

log = logging.getLogger(__name__)

DM_NAME_LEN = 128  # the kernel's buffer for the CTR reply (a device name)
STATUS_BUFFER = 4096  # room assumed left in dm's status buffer for STATUS_INFO

# Fake kernel addresses of ``struct log_c`` (the kernel uses the pointer as the luid):
# random per process so that two test processes never collide on one server.
_luids = itertools.count(0xFFFF_8880_0000_0000 | secrets.randbits(24) << 16, 0x400)


class LogConstructError(RuntimeError):
    """``userspace_ctr`` failed: the table load fails with ``errno``."""

    def __init__(self, err: int, message: str):
        super().__init__(f"{message} ({errno.errorcode.get(-err, err)})")
        self.errno = err


class ShortReply(AssertionError):
    """A successful reply shorter than the kernel's fixed-size result: the kernel would
    read an uninitialised variable (protocol.md §3.18)."""


def _c_int(value: int) -> int:
    """``(int)`` of an s64, as the kernel returns is_clean / in_sync / is_recovering."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


class UserspaceLog:
    """One ``struct log_c``: a live userspace log instance (one table's log)."""

    def __init__(self, conn: Connector, uuid: str, luid: int, ctr_string: str, usr_argc: int,
                 *, integrated_flush: bool, flush_delay: float):
        self.conn = conn
        self.uuid = uuid
        self.luid = luid
        self.ctr_string = ctr_string
        self.usr_argc = usr_argc
        self.integrated_flush = integrated_flush
        self.flush_delay = flush_delay
        self.target_sectors = int(ctr_string.split(" ", 1)[0])
        self.region_size = 0
        self.region_count = 0
        self.log_device: str | None = None  # the name a CTR reply gave (dm_get_device)
        self.in_sync_hint = 0
        self.table_events = 0  # dm_table_event() calls: failed flushes
        self._flush_lock = threading.Lock()
        self._mark_list: deque[int] = deque()
        self._clear_list: deque[int] = deque()
        # The delayed work item; "scheduled" (sched_flush) is "a timer is set".
        self._delayed_lock = threading.Lock()
        self._delayed_timer: threading.Timer | None = None

    # --- userspace_ctr / userspace_dtr ---------------------------------------------------

    @classmethod
    def construct(cls, conn: Connector, uuid: str, log_type: str, log_args: Sequence[str],
                  target_sectors: int, *, integrated_flush: bool = False,
                  luid: int | None = None, flush_delay: float = 3.0) -> UserspaceLog:
        """``userspace_ctr`` for the table log arguments
        ``<uuid> [integrated_flush] <log_type> <log_args…>``.

        Raises :class:`LogConstructError` where the kernel fails the table load: fewer than
        three arguments, a uuid over 128 characters, a CTR or GET_REGION_SIZE that fails,
        a device name reply without its NUL.  As in the kernel, no DTR follows a failure
        after the CTR succeeded."""
        argv = [uuid, *(["integrated_flush"] if integrated_flush else []), log_type,
                *log_args]
        if len(argv) < 3:
            raise LogConstructError(-errno.EINVAL, "Too few arguments to userspace dirty log")
        if len(uuid) > protocol.DM_UUID_LEN - 1:
            raise LogConstructError(-errno.EINVAL, "UUID argument too long.")
        ctr_string = " ".join([str(target_sectors), log_type, *log_args])
        lc = cls(conn, uuid, next(_luids) if luid is None else luid, ctr_string, len(argv),
                 integrated_flush=integrated_flush, flush_delay=flush_delay)
        error, device = conn.consult(uuid, lc.luid, RequestType.CTR,
                                     ctr_string.encode("ascii"), DM_NAME_LEN)
        if error < 0:  # the kernel tests "r < 0" here, unlike everywhere else
            reason = ("Userspace log server not found" if error == -errno.ESRCH
                      else "Userspace log server failed to create log")
            raise LogConstructError(error, reason)
        error, region_size = conn.consult(uuid, lc.luid, RequestType.GET_REGION_SIZE,
                                          reply_size=protocol.U64.size)
        if error:
            raise LogConstructError(error, "Failed to get region size of dirty log")
        (region_size_u64,) = protocol.U64.unpack(
            lc._exact(region_size, RequestType.GET_REGION_SIZE))
        lc.region_size = region_size_u64 & 0xFFFFFFFF  # the kernel keeps it in a uint32_t
        if lc.region_size == 0:
            # dm_sector_div_up would divide by zero: the kernel would oops.
            raise LogConstructError(-errno.EINVAL, "GET_REGION_SIZE returned 0")
        lc.region_count = -(-target_sectors // lc.region_size)
        if device:
            if not device.endswith(b"\0"):
                raise LogConstructError(-errno.EINVAL, "DM_ULOG_CTR device return string "
                                                       "not properly terminated")
            lc.log_device = device[:-1].decode("ascii", "replace")
        return lc

    def dtr(self) -> None:
        """``userspace_dtr``: run a scheduled flush, then DTR (its result is ignored)."""
        if self.integrated_flush:
            self._flush_delayed_work()
        self.conn.consult(self.uuid, self.luid, RequestType.DTR)

    # --- suspend / resume ------------------------------------------------------------------

    def presuspend(self) -> int:
        """``userspace_presuspend``."""
        return self.conn.consult(self.uuid, self.luid, RequestType.PRESUSPEND)[0]

    def postsuspend(self) -> int:
        """``userspace_postsuspend``: a scheduled flush runs first."""
        if self.integrated_flush:
            self._flush_delayed_work()
        return self.conn.consult(self.uuid, self.luid, RequestType.POSTSUSPEND)[0]

    def resume(self) -> int:
        """``userspace_resume``: the hint starts over."""
        self.in_sync_hint = 0
        return self.conn.consult(self.uuid, self.luid, RequestType.RESUME)[0]

    # --- queries -------------------------------------------------------------------------------

    def get_region_size(self) -> int:
        """``userspace_get_region_size``: cached since the CTR, never asked again."""
        return self.region_size

    def is_clean(self, region: int) -> int:
        """``userspace_is_clean``: any failure counts as "not clean"."""
        error, values = self._ask(RequestType.IS_CLEAN, protocol.pack_u64(region), protocol.S64)
        return 0 if error else _c_int(values[0])

    def in_sync(self, region: int, can_block: bool = True) -> int:
        """``userspace_in_sync``: -EWOULDBLOCK without asking when it may not block (the
        kernel never caches the answer); any failure counts as "not in sync"."""
        if not can_block:
            return -errno.EWOULDBLOCK
        error, values = self._ask(RequestType.IN_SYNC, protocol.pack_u64(region), protocol.S64)
        return 0 if error else _c_int(values[0])

    def get_resync_work(self) -> tuple[int, int | None]:
        """``userspace_get_resync_work``: ``(result, region)``; result 1 when a region
        was handed out, 0 for no work (without asking once the hint reaches the region
        count), or the negative error."""
        if self.in_sync_hint >= self.region_count:
            return 0, None
        error, values = self._ask(RequestType.GET_RESYNC_WORK, b"", protocol.S64_U64)
        if error:
            return error, None
        assigned, region = values
        return _c_int(assigned), region

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        """``userspace_set_region_sync``: "must not fail", so its result is ignored."""
        self._request(RequestType.SET_REGION_SYNC,
                      protocol.pack_set_region_sync(region, in_sync), 0)

    def get_sync_count(self) -> int:
        """``userspace_get_sync_count``: 0 on failure; a full count lifts the hint to the
        region count, which ends GET_RESYNC_WORK and IS_REMOTE_RECOVERING traffic."""
        error, values = self._ask(RequestType.GET_SYNC_COUNT, b"", protocol.U64)
        if error:
            return 0
        (sync_count,) = values
        if sync_count >= self.region_count:
            self.in_sync_hint = self.region_count
        return sync_count

    def status_info(self, maxlen: int = STATUS_BUFFER) -> str:
        """``userspace_status(STATUSTYPE_INFO)``: the server's text, in a buffer of
        ``maxlen`` bytes; ``userspace 1 COM_FAILURE`` when the request fails."""
        error, data = self._request(RequestType.STATUS_INFO, b"", maxlen)
        if error:
            return "userspace 1 COM_FAILURE"
        return data.split(b"\0", 1)[0].decode("ascii", "replace")

    def status_table(self) -> str:
        """``userspace_status(STATUSTYPE_TABLE)``: built in the kernel from the saved
        constructor string; STATUS_TABLE is never sent (protocol.md §3.15)."""
        table_args = self.ctr_string.split(" ", 1)[1]
        integrated = "integrated_flush " if self.integrated_flush else ""
        return f"userspace {self.usr_argc} {self.uuid} {integrated}{table_args} "

    def is_remote_recovering(self, region: int) -> int:
        """``userspace_is_remote_recovering``: 0 below the hint without asking; 1 without
        asking within 250 ms of the last question of *any* log; 1 on failure."""
        if region < self.in_sync_hint:
            return 0
        now = time.monotonic()
        if self.conn.remote_recovering_limit > now:
            return 1
        self.conn.remote_recovering_limit = now + self.conn.remote_recovering_interval
        error, values = self._ask(RequestType.IS_REMOTE_RECOVERING,
                                  protocol.pack_u64(region), protocol.S64_U64)
        if error:
            return 1
        recovering, self.in_sync_hint = values
        return _c_int(recovering)

    # --- mark, clear, flush -------------------------------------------------------------------

    def mark_region(self, region: int) -> None:
        """``userspace_mark_region``: queued for the next flush."""
        with self._flush_lock:
            self._mark_list.appendleft(region)

    def clear_region(self, region: int) -> None:
        """``userspace_clear_region``: queued for the next flush."""
        with self._flush_lock:
            self._clear_list.appendleft(region)

    def flush(self) -> int:
        """``userspace_flush``: send the queued clears, then the marks, and commit them
        (see the module docstring).  0, or the error; on an error the queued entries are
        dropped anyway and a table event is raised."""
        with self._flush_lock:
            marks, self._mark_list = list(self._mark_list), deque()
            clears, self._clear_list = list(self._clear_list), deque()
        if not marks and not clears:
            return 0
        error = self._flush_by_group(RequestType.CLEAR_REGION, clears, with_payload=False)
        if not error and not self.integrated_flush:
            error = self._flush_by_group(RequestType.MARK_REGION, marks, with_payload=False)
            if not error:
                error = self._request(RequestType.FLUSH, b"", 0)[0]
        elif not error:
            error = self._flush_by_group(RequestType.MARK_REGION, marks, with_payload=True)
            if not error:
                with self._delayed_lock:
                    if not marks and self._delayed_timer is None:
                        self._schedule_delayed_flush()
                    else:
                        self._cancel_delayed_flush()
        if error:
            self.table_events += 1
        return error

    def _flush_by_group(self, request_type: RequestType, regions: list[int],
                        with_payload: bool) -> int:
        """``flush_by_group``: groups of up to 32, each as ``request_type``, or as a FLUSH
        carrying them (integrated); a failed group falls back to one by one."""
        handled: deque[int] = deque()  # the kernel's tmp_list: list_move puts each first
        for start in range(0, len(regions), protocol.MAX_REGIONS_PER_REQUEST):
            group = regions[start:start + protocol.MAX_REGIONS_PER_REQUEST]
            handled.extendleft(group)
            sent_as = RequestType.FLUSH if with_payload else request_type
            error = self._request(sent_as, protocol.pack_regions(group), 0)[0]
            if error:
                if with_payload:
                    return error
                rest = regions[start + len(group):]
                return self._flush_one_by_one(request_type, [*handled, *rest])
        return 0

    def _flush_one_by_one(self, request_type: RequestType, regions: list[int]) -> int:
        """``flush_one_by_one``: one region per request, stopping at the first error."""
        for region in regions:
            error = self._request(request_type, protocol.pack_u64(region), 0)[0]
            if error:
                return error
        return 0

    # --- the delayed flush (integrated mode) ---------------------------------------------

    def _schedule_delayed_flush(self) -> None:
        timer = threading.Timer(self.flush_delay, lambda: self._delayed_flush_due(timer))
        timer.daemon = True
        self._delayed_timer = timer
        timer.start()

    def _cancel_delayed_flush(self) -> None:
        if self._delayed_timer is not None:
            self._delayed_timer.cancel()
            self._delayed_timer = None

    @property
    def delayed_flush_scheduled(self) -> bool:
        """The kernel's ``sched_flush``."""
        return self._delayed_timer is not None

    def _delayed_flush_due(self, timer: threading.Timer) -> None:
        with self._delayed_lock:
            if self._delayed_timer is not timer:
                return  # cancelled, or run early by flush_delayed_work
            self._delayed_timer = None
        # The simulated kernel may have gone away with the work still queued.
        with contextlib.suppress(ConnectorClosed):
            self._do_flush()

    def _do_flush(self) -> None:
        """``do_flush``: the delayed empty FLUSH that commits lazily sent clears."""
        if self._request(RequestType.FLUSH, b"", 0)[0]:
            self.table_events += 1

    def _flush_delayed_work(self) -> None:
        """``flush_delayed_work`` when ``sched_flush`` is set: a scheduled flush runs now.
        One already running is not waited for: the kernel clears ``sched_flush`` when the
        work starts, so its FLUSH may still arrive after POSTSUSPEND or DTR."""
        with self._delayed_lock:
            timer, self._delayed_timer = self._delayed_timer, None
        if timer is not None:
            timer.cancel()
            self._do_flush()

    # --- helpers ------------------------------------------------------------------------------

    def _request(self, request_type: RequestType, data: bytes,
                 reply_size: int) -> tuple[int, bytes]:
        return self.conn.userspace_do_request(self.uuid, self.luid, self.ctr_string,
                                              request_type, data, reply_size)

    def _ask(self, request_type: RequestType, data: bytes,
             answer: struct.Struct) -> tuple[int, tuple[int, ...]]:
        """A request whose answer fills a fixed-size kernel variable."""
        error, reply = self._request(request_type, data, answer.size)
        if error:
            return error, ()
        return 0, answer.unpack(self._exact(reply, request_type))

    def _exact(self, data: bytes, request_type: RequestType) -> bytes:
        expected = protocol.REPLY_SIZES[request_type]
        if len(data) != expected:
            raise ShortReply(f"{request_type.name} for {self.uuid}: a successful reply of "
                             f"{len(data)} bytes; the kernel reads {expected}")
        return data
