"""The simulated kernel (shardlog.harness.kernelsim) sends what dm-log-userspace, dm-raid1 and
dm-region-hash would, over real connector sockets in a private network namespace.

Each test runs a small log server in a thread: a connector socket in group 7 answering
with :class:`LogTable`, optionally through a hook that misbehaves on purpose.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim import (
    Connector,
    LogConstructError,
    Mirror,
    ShortReply,
    UserspaceLog,
    log_streams,
    run_load,
)
from shardlog.log.logtable import LogTable
from shardlog.server.nlsocket import open_connector_socket
from shardlog.wire import protocol
from shardlog.wire.protocol import Request, RequestType

pytestmark = pytest.mark.usefixtures("private_netns")

T = RequestType
DROP = b""  # a hook's answer meaning "send nothing"
Hook = Callable[[Request], bytes | None]
_ports = itertools.count(0x6B80)
_uuids = itertools.count()


class Responder:
    """A log server thread: every request is recorded, offered to ``hook`` (bytes: send
    them; DROP: stay silent; None: answer normally) and answered with ``table``."""

    def __init__(self, state_dir: Path, sim_port: int, hook: Hook | None = None):
        self.table = LogTable(state_dir)
        self.hook = hook
        self.sim_port = sim_port
        self.requests: list[Request] = []
        self.sock = open_connector_socket(join_group_7=True)
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self.sock.recv(65536)
            except TimeoutError:
                continue
            request = protocol.decode_datagram(datagram)
            self.requests.append(request)
            reply = self.hook(request) if self.hook else None
            if reply is None:
                reply = self.table.answer(request)
            if reply:
                self.send(reply)

    def send(self, reply: bytes) -> None:
        self.sock.sendto(reply, (self.sim_port, 0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def conn() -> Iterator[Connector]:
    with Connector(next(_ports), retry_timeout=2.0, reconnect_delay=0.05) as connector:
        yield connector


@pytest.fixture
def serve(tmp_path: Path, conn: Connector) -> Iterator[Callable[..., Responder]]:
    """Starts responders answering ``conn``; all are closed after the test."""
    started: list[Responder] = []

    def start(hook: Hook | None = None, state_dir: Path | None = None,
              sim_port: int | None = None) -> Responder:
        directory = state_dir or tmp_path / f"state-{len(started)}"
        directory.mkdir(exist_ok=True)
        responder = Responder(directory, conn.port if sim_port is None else sim_port, hook)
        started.append(responder)
        return responder

    yield start
    for responder in started:
        responder.close()


def new_uuid() -> str:
    return f"kernelsim-{next(_uuids)}"


def sent(conn: Connector) -> list[RequestType]:
    return [entry.request_type for entry in conn.history]


def regions_of(data: bytes) -> list[int]:
    return list(memoryview(data).cast("Q"))


def nosync_log(conn: Connector, **kw) -> UserspaceLog:
    """100 regions of 8 sectors, all in sync, resumed."""
    log = UserspaceLog.construct(conn, new_uuid(), "core", ["8", "nosync"], 800, **kw)
    assert log.resume() == 0
    conn.history.clear()
    return log


def error_reply(request: Request, error: int, data: bytes = b"") -> bytes:
    return protocol.encode_reply_raw(request.header, error, data)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# --- construction ---------------------------------------------------------------------------


def test_ctr_sends_target_length_and_log_args_then_asks_the_region_size(conn, serve):
    server = serve()
    uuid = new_uuid()
    log = UserspaceLog.construct(conn, uuid, "core", ["8", "nosync"], 800,
                                 integrated_flush=True)
    assert sent(conn) == [T.CTR, T.GET_REGION_SIZE]
    ctr = conn.history[0]
    # No uuid, no integrated_flush, no NUL: build_constructor_string.
    assert ctr.data == b"800 core 8 nosync" and ctr.uuid == uuid and ctr.luid == log.luid
    assert not server.requests[0].reconnect
    assert (log.region_size, log.region_count) == (8, 100)
    assert log.status_table() == f"userspace 5 {uuid} integrated_flush core 8 nosync "
    other = UserspaceLog.construct(conn, uuid, "core", ["8"], 800)
    assert other.luid != log.luid


def test_table_load_fails_where_the_kernel_fails_it(conn, serve):
    with pytest.raises(LogConstructError, match="Too few arguments"):
        UserspaceLog.construct(conn, new_uuid(), "core", [], 800)
    assert conn.stats.requests_sent == 0
    serve(lambda request: error_reply(request, -errno.EIO)
          if request.request_type is T.GET_REGION_SIZE else None)
    with pytest.raises(LogConstructError, match="region size") as failure:
        UserspaceLog.construct(conn, new_uuid(), "core", ["8"], 800)
    assert failure.value.errno == -errno.EIO
    assert sent(conn) == [T.CTR, T.GET_REGION_SIZE]  # and no DTR


# --- the flush algorithm -----------------------------------------------------------------------


def test_flush_sends_clears_first_in_groups_of_32_then_marks_then_one_flush(conn, serve):
    serve()
    log = nosync_log(conn)
    for region in range(45):
        log.mark_region(region)
    for region in range(50, 90):
        log.clear_region(region)
    assert log.flush() == 0
    assert sent(conn) == [T.CLEAR_REGION, T.CLEAR_REGION, T.MARK_REGION, T.MARK_REGION,
                          T.FLUSH]
    payloads = [regions_of(entry.data) for entry in conn.history]
    # The kernel's lists are newest first (list_add).
    assert payloads == [list(range(89, 57, -1)), list(range(57, 49, -1)),
                        list(range(44, 12, -1)), list(range(12, -1, -1)), []]
    conn.history.clear()
    assert log.flush() == 0
    assert sent(conn) == []  # nothing queued: no FLUSH at all


def test_a_failed_group_is_resent_one_region_per_request(conn, serve):
    def fail_second_clear_group(request: Request) -> bytes | None:
        if request.request_type is T.CLEAR_REGION and len(request.regions) == 8:
            return error_reply(request, -errno.EIO)
        return None

    serve(fail_second_clear_group)
    log = nosync_log(conn)
    log.mark_region(1)
    for region in range(50, 90):
        log.clear_region(region)
    assert log.flush() == 0
    clears = [regions_of(entry.data) for entry in conn.history
              if entry.request_type is T.CLEAR_REGION]
    assert [len(group) for group in clears[:2]] == [32, 8]
    # Everything handled so far, the good first group too, one by one, then the marks.
    assert clears[2:] == [[region] for region in range(50, 90)]
    assert sent(conn)[-2:] == [T.MARK_REGION, T.FLUSH]


def test_integrated_flush_carries_the_marks_and_delays_the_flush_after_clears(conn, serve):
    serve()
    log = nosync_log(conn, integrated_flush=True, flush_delay=0.2)
    for region in range(40):
        log.mark_region(region)
    assert log.flush() == 0
    assert sent(conn) == [T.FLUSH, T.FLUSH]  # no MARK_REGION, no empty FLUSH
    assert [len(entry.data) // 8 for entry in conn.history] == [32, 8]

    conn.history.clear()
    for region in range(40):
        log.clear_region(region)
    assert log.flush() == 0
    assert sent(conn) == [T.CLEAR_REGION, T.CLEAR_REGION] and log.delayed_flush_scheduled
    wait_for(lambda: len(conn.history) == 3)
    assert sent(conn)[2:] == [T.FLUSH] and conn.history[2].data == b""

    conn.history.clear()
    log.clear_region(1)
    log.flush()
    log.mark_region(2)
    log.flush()  # the marks' FLUSH commits the clears too: the delayed one is cancelled
    time.sleep(0.3)
    assert sent(conn) == [T.CLEAR_REGION, T.FLUSH]

    conn.history.clear()
    log.clear_region(2)
    log.flush()
    assert log.postsuspend() == 0  # runs the scheduled flush first
    assert sent(conn) == [T.CLEAR_REGION, T.FLUSH, T.POSTSUSPEND]


# --- the transport: retries, -EAGAIN, -ESRCH, -ENOSPC --------------------------------------


def test_a_timeout_resends_with_a_new_seq_and_the_late_reply_is_ignored(tmp_path, serve):
    with Connector(next(_ports), retry_timeout=0.3) as slow:
        def late_first_answer(request: Request) -> bytes | None:
            if request.request_type is T.IN_SYNC and not late:
                late.append(threading.Timer(0.5, lambda: server.send(protocol.encode_reply(
                    request, 0, protocol.S64.pack(7)))))
                late[0].start()
                return DROP
            return None

        late: list[threading.Timer] = []
        server = serve(late_first_answer, sim_port=slow.port)
        log = nosync_log(slow)
        assert log.in_sync(3) == 1  # the resend's answer, not the late 7
        first, second = slow.history
        assert first.request_type is second.request_type is T.IN_SYNC
        assert second.seq == first.seq + 1
        assert slow.stats.timeouts == 1
        late[0].join()
        time.sleep(0.1)
        assert slow.stats.unmatched_replies == 1


def test_eagain_resends_at_once_with_a_new_seq(conn, serve):
    answers = iter([
        lambda request: protocol.encode_ack(request.seq, errno.EAGAIN),
        lambda request: error_reply(request, -errno.EAGAIN, bytes(8)),
    ])

    def eagain_twice(request: Request) -> bytes | None:
        if request.request_type is T.IN_SYNC:
            answer = next(answers, None)
            return answer(request) if answer else None
        return None

    serve(eagain_twice)
    log = nosync_log(conn)
    assert log.in_sync(0) == 1
    seqs = [entry.seq for entry in conn.history]
    assert sent(conn) == [T.IN_SYNC] * 3 and len(set(seqs)) == 3
    assert conn.stats.eagain_resends == 2 and conn.stats.timeouts == 0


def test_concurrent_requests_are_matched_to_their_callers(conn, serve):
    serve()
    logs = [nosync_log(conn) for _ in range(4)]
    for log in logs[::2]:  # half of them out of sync: answers differ by log
        log.set_region_sync(9, False)
    answers: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        answers[index] = [logs[index].in_sync(9) for _ in range(50)]

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {0: [0] * 50, 1: [1] * 50, 2: [0] * 50, 3: [1] * 50}
    assert conn.stats.timeouts == conn.stats.unmatched_replies == 0


def test_a_full_eagain_reply_without_data_leaves_the_resend_no_room(conn, serve):
    # fill_pkg stores the reply's data_size in the caller's size: the next answer no
    # longer fits.  A server must send -EAGAIN as a connector ACK, as cmirrord does.
    first = []

    def eagain_once(request: Request) -> bytes | None:
        if request.request_type is T.IN_SYNC and not first:
            first.append(request)
            return error_reply(request, -errno.EAGAIN)
        return None

    serve(eagain_once)
    log = nosync_log(conn)
    error, _ = conn.userspace_do_request(log.uuid, log.luid, log.ctr_string, T.IN_SYNC,
                                         protocol.pack_u64(0), 8)
    assert error == -errno.ENOSPC


def test_a_reply_larger_than_the_kernels_buffer_is_enospc(conn, serve):
    def oversized(request: Request) -> bytes | None:
        if request.request_type is T.IN_SYNC:
            return error_reply(request, 0, bytes(16))
        if request.request_type is T.IS_CLEAN:
            return error_reply(request, 0, bytes(4))
        if request.request_type is T.CTR and request.ctr_string.endswith("big"):
            return error_reply(request, 0, b"x" * 128 + b"\0")
        return None

    serve(oversized)
    log = nosync_log(conn)
    assert conn.consult(log.uuid, log.luid, T.IN_SYNC, protocol.pack_u64(0), 8) == (
        -errno.ENOSPC, b"")
    assert log.in_sync(0) == 0  # a failure reads as "not in sync"
    with pytest.raises(ShortReply):
        log.is_clean(0)
    with pytest.raises(LogConstructError) as failure:
        UserspaceLog.construct(conn, new_uuid(), "core", ["8", "big"], 800)
    assert failure.value.errno == -errno.ENOSPC


def test_esrch_from_the_server_makes_the_kernel_reconnect_and_retry(conn, serve, tmp_path):
    server = serve()
    log = nosync_log(conn)
    # The server restarted and lost its logs: unknown log -> -ESRCH.  Its first answer
    # to the reconnect CTR carries data, which the kernel has no room for: it tries again.
    (tmp_path / "empty").mkdir()
    server.table = LogTable(tmp_path / "empty")
    ctr_replies: list[Request] = []

    def device_name_once(request: Request) -> bytes | None:
        if request.request_type is T.CTR and not ctr_replies:
            ctr_replies.append(request)
            return error_reply(request, 0, b"253:2\0")
        return None

    server.hook = device_name_once
    assert log.in_sync(4) == 0  # answered after the reconnect; its state was lost
    assert sent(conn) == [T.IN_SYNC, T.CTR, T.CTR, T.RESUME, T.IN_SYNC]
    reconnect_ctr = conn.history[2]
    assert reconnect_ctr.data == log.ctr_string.encode() + b"\0"  # NUL counted
    assert server.requests[-3].reconnect
    assert conn.stats.reconnect_ctrs == 2 and conn.stats.reconnects == 1


def test_no_listener_is_esrch_without_a_send_and_the_kernel_waits_for_a_server(conn, serve):
    assert conn.consult("nobody", 1, T.IN_SYNC, protocol.pack_u64(0), 8) == (
        -errno.ESRCH, b"")
    assert conn.stats.requests_sent == 0 and conn.stats.no_listener == 1

    first = serve()
    log = nosync_log(conn)
    first.close()  # the server is gone: nobody is in group 7
    answer: list[int] = []
    asking = threading.Thread(target=lambda: answer.append(log.in_sync(2)))
    asking.start()
    time.sleep(0.3)
    assert not answer and conn.stats.reconnect_ctrs >= 2
    serve(state_dir=first.table.state_dir)  # restarted, with its state files
    asking.join(5)
    assert answer == [1]
    assert sent(conn)[-3:] == [T.CTR, T.RESUME, T.IN_SYNC]
    assert conn.stats.reconnects == 1


# --- the mirror -------------------------------------------------------------------------------


def nosync_mirror(conn: Connector) -> Mirror:
    mirror = Mirror.create(conn, new_uuid(), "core", ["8", "nosync"], 800)
    conn.history.clear()
    return mirror


def test_mirror_writes_and_reads_ask_what_the_region_hash_does_not_know(conn, serve):
    serve()
    mirror = nosync_mirror(conn)
    mirror.write([5])
    # The hint is 0 after RESUME, so the first write asks IS_REMOTE_RECOVERING; then
    # dm_rh_get_state and __rh_alloc each ask IN_SYNC; the mark is committed first.
    assert sent(conn) == [T.IS_REMOTE_RECOVERING, T.IN_SYNC, T.IN_SYNC, T.MARK_REGION,
                          T.FLUSH]
    conn.history.clear()
    mirror.update_states()
    assert sent(conn) == [T.CLEAR_REGION, T.FLUSH]
    conn.history.clear()
    mirror.write([6], complete=False)  # the hint now covers every region
    mirror.write([6])  # already dirty: no IN_SYNC, no mark, so no flush either
    assert sent(conn) == [T.IN_SYNC, T.IN_SYNC, T.MARK_REGION, T.FLUSH]
    conn.history.clear()
    assert mirror.read(6) and sent(conn) == []
    assert mirror.read(50) and sent(conn) == [T.IN_SYNC]
    mirror.verify()  # an honest server: region 6 is dirty while its write is in flight


def test_mirror_recovery_copies_each_region_then_reports_it_in_sync(conn, serve):
    serve()
    mirror = Mirror.create(conn, new_uuid(), "core", ["8"], 32)  # 4 regions, none in sync
    conn.history.clear()
    assert mirror.recover(max_regions=1) == 1
    assert sent(conn) == [T.GET_RESYNC_WORK, T.IN_SYNC, T.GET_SYNC_COUNT,
                          T.SET_REGION_SYNC, T.CLEAR_REGION, T.FLUSH]
    assert mirror.regions_unsynced() == {1, 2, 3}
    assert mirror.recover() == 3 and mirror.in_sync
    types = sent(conn)
    assert types.count(T.SET_REGION_SYNC) == 4
    assert types[-2:] == [T.GET_RESYNC_WORK, T.GET_SYNC_COUNT]  # "no work", then 4/4
    conn.history.clear()
    assert mirror.status().startswith("2 8:16 8:32 4/4 1 AA ")
    assert sent(conn) == [T.GET_SYNC_COUNT, T.STATUS_INFO]
    mirror.verify()


def test_mirror_suspend_resume_reload_and_destroy_send_what_dm_does(conn, serve):
    serve()
    mirror = nosync_mirror(conn)
    mirror.write([1], complete=False)
    conn.history.clear()
    mirror.suspend()
    # The write in flight completes after PRESUSPEND: its CLEAR and FLUSH come between.
    assert sent(conn) == [T.PRESUSPEND, T.CLEAR_REGION, T.FLUSH, T.POSTSUSPEND]
    mirror.resume()
    conn.history.clear()

    old_luid = mirror.log.luid
    reloaded = mirror.reload("core", ["16", "nosync"])
    assert sent(conn) == [T.CTR, T.GET_REGION_SIZE, T.PRESUSPEND, T.POSTSUSPEND, T.RESUME,
                          T.DTR]
    luids = [entry.luid for entry in conn.history]
    new_luid = reloaded.log.luid
    assert new_luid != old_luid
    assert luids == [new_luid, new_luid, old_luid, old_luid, new_luid, old_luid]
    assert reloaded.nr_regions == 50
    conn.history.clear()
    reloaded.destroy()
    assert sent(conn) == [T.PRESUSPEND, T.POSTSUSPEND, T.DTR]


def test_verify_catches_a_server_that_calls_dirty_or_unrecovered_regions_clean(conn, serve):
    def liar(request: Request) -> bytes | None:
        if request.request_type in (T.IS_CLEAN, T.IN_SYNC):
            return protocol.encode_reply(request, 0, protocol.pack_bool(True))
        return None

    honest = serve()
    mirror = nosync_mirror(conn)
    mirror.write([3, 4], complete=False)
    mirror.verify()
    honest.hook = liar
    with pytest.raises(AssertionError, match="region 3 reported clean; region 4 reported"):
        mirror.verify()

    honest.hook = None
    unsynced = Mirror.create(conn, new_uuid(), "core", ["8"], 16)  # 2 regions, not synced
    unsynced.verify()
    honest.hook = liar
    with pytest.raises(AssertionError, match="region 1 reported in sync, never recovered"):
        unsynced.verify()


def test_verify_after_a_server_restart_with_writes_in_flight(conn, serve, tmp_path):
    server = serve(state_dir=tmp_path / "durable")
    mirror = nosync_mirror(conn)
    mirror.write([2, 7], complete=False)
    server.table = LogTable(tmp_path / "durable")  # killed and restarted: memory lost
    mirror.verify()
    mirror.complete_writes()
    mirror.update_states()
    assert mirror.regions_may_differ() == set()
    mirror.verify()


# --- the load generator -----------------------------------------------------------------------


def test_run_load_keeps_one_request_per_log_outstanding(conn, serve):
    server = serve()
    logs = [nosync_log(conn) for _ in range(3)]
    streams = log_streams([(log.uuid, log.luid) for log in logs], "write")
    result = run_load(conn, streams, in_flight=2, count=60)
    assert result.requests == 60 and not result.errors and result.resends == 0
    assert set(result.latencies_ns) == {"IN_SYNC", "MARK_REGION", "FLUSH", "CLEAR_REGION"}
    assert 0 < result.p50() <= result.p99()
    assert {request.uuid for request in server.requests[-60:]} == {log.uuid for log in logs}
    assert logs[0].in_sync(1) == 1  # the connector works again afterwards


def test_run_load_on_a_raw_socket(serve):
    port = next(_ports)
    server = serve(sim_port=port)
    with open_connector_socket(port) as sock:
        uuid = new_uuid()
        server.table.answer(protocol.decode_datagram(protocol.encode_request(
            T.CTR, seq=0, uuid=uuid, luid=1, data=b"800 core 8 nosync")))
        server.table.answer(protocol.decode_datagram(protocol.encode_request(
            T.RESUME, seq=0, uuid=uuid, luid=1)))
        result = run_load(sock, log_streams([(uuid, 1)], "read"), in_flight=1, duration=0.2)
    assert result.requests > 0 and not result.errors
    assert list(result.latencies_ns) == ["IN_SYNC"]
