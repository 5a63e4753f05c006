"""Take-over (handover.py): a new `shardlog serve --take-over` continues a running server.

The simulated kernel drives mirrors of every kind through real sockets in a private
namespace while servers take each other over, and checks what the kernel would notice:
a request unanswered (a 2 s retry here), one answered twice (a reply no waiter wants),
a wait longer than the hand-over, a reconnect, or an acknowledged mark that is gone
(each mirror's oracle) — with the same worker count, and switching between 2 and 3
workers (the old sockets' leftovers handed across, their copies dropped).  Then every way
a take-over must be refused or fail safely: the old server serves on, untouched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim import Connector
from shardlog.harness.kernelsim.serveprocess import ServeFailed
from shardlog.log.logtable import LogTable
from shardlog.observability.workerstats import Reporter
from shardlog.server import control, handover, routing
from shardlog.server.inflight import InFlight
from shardlog.server.nlsocket import group7_listeners, open_connector_socket
from shardlog.server.outbox import Outbox
from shardlog.server.worker import Peer, ShardWorker
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T
from tests.unit.server.test_handover import request_datagram, seq_of

from ..harness import PEER_PORT, RawPeer, ServerProcess
from .test_end_to_end import REGIONS, Writers, core_mirror, disk_mirror, scratch_device

pytestmark = pytest.mark.usefixtures("private_netns")

TAKE_OVERS = 20


class TimedConnector(Connector):
    """The simulated kernel, timing every request from its first send to its result
    (retries and -EAGAIN re-sends included): what a mirrored write waits for it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.longest = 0.0
        self.waits: list[tuple[float, float]] = []  # (sent at, waited), monotonic

    def consult(self, *args, **kw):
        started = time.monotonic()
        try:
            return super().consult(*args, **kw)
        finally:
            waited = time.monotonic() - started
            self.waits.append((started, waited))
            self.longest = max(self.longest, waited)


@pytest.fixture
def kernel() -> Iterator[TimedConnector]:
    # A 2 s retry (the kernel's is 15 s): a request left unanswered shows as a timeout.
    with TimedConnector(PEER_PORT, retry_timeout=2.0, reconnect_delay=0.1,
                        remote_recovering_interval=0.01, history=200_000) as conn:
        yield conn


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Every server a test starts (append them): none outlives it."""
    started: list[ServerProcess] = []
    yield started
    for server in reversed(started):
        server.close()


def assert_nothing_noticed(kernel: TimedConnector) -> None:
    stats = kernel.stats
    assert stats.timeouts == 0, "a request was left unanswered"
    assert stats.unmatched_replies == 0, "a request was answered twice"
    assert stats.no_listener == 0, "the kernel found no server in group 7"
    assert stats.reconnect_ctrs == 0 and stats.reconnects == 0
    assert stats.eagain_resends == 0


# -- take-over under load ----------------------------------------------------------------------


def test_twenty_take_overs_under_load_lose_nothing(tmp_path, kernel, servers):
    take_over_under_load(tmp_path, kernel, servers, [2] * (TAKE_OVERS + 1))


def test_twenty_take_overs_between_2_and_3_workers_lose_nothing(tmp_path, kernel, servers):
    counts = [2 + n % 2 for n in range(TAKE_OVERS + 1)]  # 2, 3, 2, 3, ...
    take_over_under_load(tmp_path, kernel, servers, counts, extra_logs=6)
    # Each take-over switched sockets and handed the old sockets' requests across.
    for before, after, successor in zip(counts[:-1], counts[1:], servers[1:], strict=True):
        assert f"switched from {before} shard sockets to {after}" in successor.log
    handed_on = [int(found) for s in servers[1:]
                 for found in re.findall(r"(\d+) requests handed on", s.log)]
    print(f"requests handed on from the old sockets per take-over: {handed_on}")
    # Every take-over reported what it handed across, and the load kept requests queued
    # for most of them (a writer has one in flight): the path was taken, not left unused.
    assert len(handed_on) == TAKE_OVERS and sum(handed_on) > 0, handed_on
    assert len(group7_listeners(exclude_port=PEER_PORT)) == counts[-1]


def take_over_under_load(tmp_path: Path, kernel: TimedConnector,
                         servers: list[ServerProcess], counts: list[int],
                         extra_logs: int = 0) -> None:
    """Servers with ``counts[0]``, ``counts[1]``, ... workers take each other over while
    mirrors are written: nothing is noticed, every acknowledged mark is there."""
    server = ServerProcess(tmp_path / "state", workers=counts[0]).start()
    servers.append(server)
    mirrors = [core_mirror(kernel, f"core-{n}", "nosync") for n in range(6 + extra_logs)]
    mirrors += [core_mirror(kernel, f"iflush-{n}", "nosync", integrated_flush=True)
                for n in range(2)]
    mirrors += [disk_mirror(kernel, f"disk-{n}", scratch_device(tmp_path / f"dev{n}"),
                            "nosync") for n in range(2)]
    writers = Writers(mirrors)
    writers.wait_for_rounds(10)
    hand_overs = []
    for workers in counts[1:]:
        started = time.monotonic()
        successor = server.take_over(extra=("--workers", str(workers)))
        servers.append(successor)
        assert server.process.wait(30) == 0  # the old front exits 0 once the new serves
        hand_overs.append((started, time.monotonic()))
        assert int(server.pid_file.read_text()) == successor.process.pid
        server = successor
        writers.wait_for_rounds(3)  # every mirror goes on writing
    writers.finish()
    assert_nothing_noticed(kernel)
    for mirror in mirrors:  # no resync was forced
        assert mirror.log.get_sync_count() == REGIONS
    assert server.metrics()["shardlog_reconnect_ctrs_total"] == 0
    # Each new server restored the logs from their files, none was reconnected.
    assert all("restored from its CTR record" in s.log for s in servers[1:-1])
    assert "reconnect" not in "".join(s.log for s in servers).replace(
        "reconnect_ctrs", "")
    # No request waited longer than a hand-over (from asking for it to the old
    # server's exit), nor anywhere near the kernel's retry.
    longest_hand_over = max(end - start for start, end in hand_overs)
    print(f"\n{len(hand_overs)} take-overs: longest request wait "
          f"{kernel.longest * 1e3:.1f} ms, longest hand-over {longest_hand_over * 1e3:.0f} ms")
    assert kernel.longest < longest_hand_over


def test_the_control_socket_passes_to_the_new_server(tmp_path, peer, servers):
    server = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(server)
    peer.open_log("log-a")
    successor = server.take_over()
    servers.append(successor)
    assert server.process.wait(30) == 0
    assert successor.control_socket == server.control_socket
    assert peer.is_clean(0, uuid="log-a") == 1  # restored from its files at this request
    status = control.ask(successor.control_socket, {"cmd": "status"})
    assert status["server"]["pid"] == successor.process.pid
    assert [row["uuid"] for row in status["logs"]] == ["log-a"]
    # The shard sockets are the same ones: still two in group 7, now the new server's.
    assert len(group7_listeners(exclude_port=PEER_PORT)) == 2
    assert successor.stop() == 0
    assert not group7_listeners(exclude_port=PEER_PORT)


def test_top_samples_the_new_server_after_a_take_over(tmp_path, peer, servers):
    """top's latency sample is a trace the old server ends as it goes: top subscribes
    again, to the server now answering at the socket, rather than show empty latency
    columns for ever."""
    server = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(server)
    peer.open_log("log-a")

    def traced(by: ServerProcess) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if control.ask(by.control_socket, {"cmd": "status"})["server"]["tracing"]:
                return True
            time.sleep(0.1)
        return False

    top = subprocess.Popen(
        [sys.executable, "-m", "shardlog.cli", "top", "--socket", str(server.control_socket),
         "--interval", "0.5", "--sample", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert traced(server)
        successor = server.take_over()
        servers.append(successor)
        assert server.process.wait(30) == 0
        assert traced(successor), "top did not subscribe to the new server"
        for region in range(20):
            peer.in_sync(region, uuid="log-a")
        time.sleep(1.5)  # two frames
    finally:
        top.terminate()
        out, err = top.communicate(timeout=30)
    assert "latencies unavailable" not in out, out[-2000:]
    frames = [frame for frame in out.split("shardlog pid ")
              if frame.startswith(f"{successor.process.pid} ")]
    timed = [int(line.split()[2]) for frame in frames for line in frame.splitlines()
             if line.split()[:1] in (["IN_SYNC"], ["in_sync"])]
    assert sum(timed) == 20, out[-3000:]  # the new server's IN_SYNCs, each timed
    assert top.returncode in (0, -signal.SIGTERM), err


def test_take_over_in_the_background_returns_once_serving(tmp_path, peer, servers):
    server = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(server)
    peer.open_log("log-a")
    peer.ok(T.MARK_REGION, protocol.pack_regions([5]), uuid="log-a")
    # Its output to a file: the server keeps the parent's stderr, as systemd's journal.
    with open(tmp_path / "background.log", "wb") as log:
        result = subprocess.run([*server.command, "--take-over", "--background"],
                                stdout=log, stderr=log, timeout=60)
    new_pid = int(server.pid_file.read_text())
    try:
        assert result.returncode == 0, (tmp_path / "background.log").read_text()
        assert server.process.wait(30) == 0
        assert new_pid != server.process.pid
        assert peer.is_clean(5, uuid="log-a") == 0
    finally:
        os.kill(new_pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{new_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


# -- refusals: the old server serves on -------------------------------------------------------


def old_server_serves(server: ServerProcess, peer: RawPeer) -> None:
    assert server.process.poll() is None
    assert int(server.pid_file.read_text()) == server.process.pid
    assert peer.is_clean(7, uuid="log-a") == 0  # the mark made before is there
    peer.ok(T.FLUSH, protocol.pack_regions([8]), uuid="log-a")


@pytest.fixture
def running(tmp_path: Path, peer: RawPeer, servers) -> ServerProcess:
    server = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(server)
    peer.open_log("log-a")
    peer.ok(T.FLUSH, protocol.pack_regions([7]), uuid="log-a")
    return server


def test_another_worker_count_takes_over_and_moves_the_logs(running, peer, servers):
    # Logs on every shard of both counts, each with a mark acknowledged by the old server.
    uuids = [f"log-{n}" for n in range(12)]
    assert {routing.shard_of_uuid(uuid, 2) for uuid in uuids} == {0, 1}
    assert {routing.shard_of_uuid(uuid, 3) for uuid in uuids} == {0, 1, 2}
    for uuid in uuids:
        peer.open_log(uuid)
        peer.ok(T.FLUSH, protocol.pack_regions([3]), uuid=uuid)
    successor = running.take_over(extra=("--workers", "3"))
    servers.append(successor)
    assert running.process.wait(30) == 0
    assert "switched from 2 shard sockets to 3" in successor.log
    assert len(group7_listeners(exclude_port=PEER_PORT)) == 3
    # Every log restored from its files by its new shard's worker: no reconnect.
    for uuid in [*uuids, "log-a"]:
        assert peer.is_clean(3 if uuid != "log-a" else 7, uuid=uuid) == 0
    status = control.ask(successor.control_socket, {"cmd": "status"})
    assert len(status["workers"]) == 3
    assert successor.metrics()["shardlog_reconnect_ctrs_total"] == 0
    back = successor.take_over(extra=("--workers", "2"))
    servers.append(back)
    assert successor.process.wait(30) == 0
    assert "switched from 3 shard sockets to 2" in back.log
    assert len(group7_listeners(exclude_port=PEER_PORT)) == 2
    for uuid in uuids:
        assert peer.is_clean(3, uuid=uuid) == 0
    assert peer.quiet()  # nothing answered twice


def test_another_state_dir_is_refused(running, peer, tmp_path):
    with pytest.raises(ServeFailed, match="state directory"):
        running.take_over(extra=("--state-dir", str(tmp_path / "elsewhere")))
    old_server_serves(running, peer)


def test_a_state_dir_the_new_server_cannot_open_is_refused_before_asking(running, peer,
                                                                         tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ServeFailed, match="state directory") as failed:
        running.take_over(extra=("--state-dir", str(blocker / "state")))
    assert "take-over" not in running.log  # it never asked
    assert "shardlog serve: state directory" in str(failed.value)
    old_server_serves(running, peer)


def test_another_fingerprint_is_refused(running, peer):
    request = {"cmd": "take-over", "pid": 1, "workers": 2,
               "state_dir": str(running.state_dir), "test_peer": PEER_PORT,
               "fingerprint": {**handover.fingerprint(), "routing": "0123456789abcdef"}}
    with pytest.raises(control.ControlError, match="routing differs"):
        control.ask(running.control_socket, request)
    request["fingerprint"] = {**handover.fingerprint(), "formats": "mirror v3"}
    with pytest.raises(control.ControlError, match="formats differs"):
        control.ask(running.control_socket, request)
    del request["fingerprint"]
    with pytest.raises(control.ControlError, match="no fingerprint"):
        control.ask(running.control_socket, request)
    old_server_serves(running, peer)


def test_no_server_to_take_over_is_refused(tmp_path):
    server = ServerProcess(tmp_path / "state", workers=2)
    result = subprocess.run([*server.command, "--take-over"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "take-over refused" in result.stderr
    assert "shardlog is not running" in result.stderr


def test_a_new_server_that_fails_after_the_hand_over_leaves_the_old_one_serving(
        running, peer, tmp_path):
    # It gets the sockets and starts its workers, then cannot write its pid file.
    with pytest.raises(ServeFailed, match="exited 1") as failed:
        running.take_over(extra=("--pid-file", "/nonexistent/x.pid"))
    assert "take-over abandoned: the old server" in str(failed.value)
    deadline = time.monotonic() + 30
    while "serving on" not in running.log:
        assert time.monotonic() < deadline, running.log
        time.sleep(0.05)
    old_server_serves(running, peer)
    assert "after the hand-over" in running.log
    # And it can still be taken over.
    successor = running.take_over()
    try:
        assert running.process.wait(30) == 0
        assert peer.is_clean(8, uuid="log-a") == 0
    finally:
        successor.close()


def test_a_new_server_of_another_count_that_fails_after_the_switch_leaves_the_old_one_serving(
        running, peer, servers):
    # It switches to 3 sockets of its own (the old ones left group 7 and were drained),
    # starts its workers, then cannot write its pid file.
    with pytest.raises(ServeFailed, match="exited 1") as failed:
        running.take_over(extra=("--workers", "3", "--pid-file", "/nonexistent/x.pid"))
    assert "switched from 2 shard sockets to 3" in str(failed.value)
    assert "take-over abandoned: the old server" in str(failed.value)
    deadline = time.monotonic() + 30
    while "serving on" not in running.log:
        assert time.monotonic() < deadline, running.log
        time.sleep(0.05)
    # The old server's sockets rejoined group 7: its 2, and none of the new server's.
    assert len(group7_listeners(exclude_port=PEER_PORT)) == 2
    old_server_serves(running, peer)
    successor = running.take_over(extra=("--workers", "3"))
    servers.append(successor)
    assert running.process.wait(30) == 0
    assert peer.is_clean(8, uuid="log-a") == 0


def test_a_new_server_killed_during_the_take_over_leaves_the_old_one_serving(
        kernel, tmp_path, servers):
    running = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(running)
    mirrors = [core_mirror(kernel, f"core-{n}", "nosync") for n in range(4)]
    writers = Writers(mirrors)
    writers.wait_for_rounds(5)
    # Its pid file's temporary name is a FIFO: writing it blocks the new front for good
    # once its workers are up and serving, the moment to kill it.
    os.mkfifo(tmp_path / "new.pid.tmp")
    command = [*running.command, "--take-over", "--pid-file", str(tmp_path / "new.pid")]
    new_log = tmp_path / "killed.log"
    with open(new_log, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "worker 1 started" not in new_log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, new_log.read_text()
            time.sleep(0.01)
        writers.wait_for_rounds(2)  # served by the new workers meanwhile
        os.killpg(process.pid, signal.SIGKILL)  # the front and its workers at once
        process.wait(10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "serving on" not in running.log:
        assert time.monotonic() < deadline, running.log
        time.sleep(0.05)
    writers.wait_for_rounds(5)  # the old server serves every mirror again
    writers.finish()
    for mirror in mirrors:
        assert mirror.log.get_sync_count() == REGIONS
    # A worker killed with requests in hand loses them: the kernel re-sends after its
    # timeout.  Nothing else is noticed: no reconnect, nothing answered twice.
    assert kernel.stats.reconnect_ctrs == 0 and kernel.stats.no_listener == 0
    assert kernel.stats.unmatched_replies == 0
    assert running.process.poll() is None


def test_sigterm_during_a_take_over_waits_for_its_outcome(running, peer):
    # The old server, told to stop while it hands over, must not take the sockets out
    # of group 7 under the new one: the stop is deferred, and the take-over completes.
    results: list[ServerProcess] = []
    thread = threading.Thread(target=lambda: results.append(running.take_over()))
    thread.start()
    deadline = time.monotonic() + 60
    while "the workers hand over" not in running.log:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    running.process.send_signal(signal.SIGTERM)
    thread.join(60)
    try:
        assert results, "the take-over failed"
        assert running.process.wait(30) == 0
        assert peer.is_clean(7, uuid="log-a") == 0
    finally:
        for successor in results:
            successor.close()



# -- another worker count, in one process: the socket switch and the dedupe -----------------


def test_a_switch_to_another_count_answers_every_request_once(monkeypatch, tmp_path):
    # The old server's 2 shard sockets, in group 7, holding what its stopped workers left.
    old = [open_connector_socket(join_group_7=True, shard=(index, 2)) for index in (0, 1)]
    peer = RawPeer()
    uuids = [f"log-{n}" for n in range(24)]
    sent: list[int] = []

    def send(count: int) -> None:
        for _ in range(count):
            sent.append(peer.request(T.IS_CLEAN, protocol.pack_u64(0),
                                     uuid=uuids[len(sent) % len(uuids)]))

    send(40)  # before the switch: in the old sockets only
    # Requests the kernel sends while both sets of sockets are in group 7 (between the
    # new sockets' joins and the old ones' leaving): queued in one old and one new socket.
    leave = handover.leave_group_7
    in_both = []

    def leave_after_sending(sock):
        if not in_both:
            before = len(sent)
            send(30)
            in_both.extend(sent[before:])
        leave(sock)

    monkeypatch.setattr(handover, "leave_group_7", leave_after_sending)
    new, leftovers = handover.switch_sockets(old, 3, receive_buffer=None,
                                             allowed_ports=frozenset({PEER_PORT}))
    send(40)  # after it: in the new sockets only
    try:
        assert len(group7_listeners(exclude_port=PEER_PORT)) == 3
        assert all(sock.fileno() == -1 for sock in old)  # drained and closed
        answered: list[int] = []
        duplicates = 0
        seqs_of = {uuid: set(sent[n::len(uuids)]) for n, uuid in enumerate(uuids)}
        for shard, sock in enumerate(new):
            mine = leftovers[shard]
            order = [seq_of(datagram) for datagram in mine.datagrams]
            mine.datagrams.clear()
            sock.setblocking(False)
            while True:
                try:
                    datagram = sock.recv(1024)
                except BlockingIOError:
                    break
                assert routing.shard_of_datagram(datagram, 3) == shard
                if mine.duplicate(datagram):
                    duplicates += 1
                else:
                    order.append(seq_of(datagram))
            for uuid in uuids:  # the order each log's requests are answered in: sent's
                of_log = [seq for seq in order if seq in seqs_of[uuid]]
                assert of_log == sorted(of_log)
            answered += order
        assert sorted(answered) == sorted(sent)  # each once: none lost, none twice
        assert duplicates == len(in_both) == 30
    finally:
        for sock in new:
            sock.close()
        peer.close()


def test_a_worker_answers_its_leftovers_first_and_drops_their_copies(tmp_path):
    sock = open_connector_socket(join_group_7=True, shard=(0, 1))
    peer = RawPeer()
    events_r, events_w = os.pipe()  # the front's end, unread: this worker only answers
    try:
        left = [request_datagram(seq, "log-a") for seq in (100, 101)]
        for datagram in left:  # their copies, queued in the worker's socket too
            peer.send_raw(datagram)
        peer.send_raw(request_datagram(102, "log-a"))  # sent after the switch
        table = LogTable(tmp_path)
        worker = ShardWorker(table, sock, InFlight(), Peer(PEER_PORT), Reporter(),
                             Outbox(events_w))
        worker.take_leftovers(handover.Leftovers(left))
        assert worker.answer_batch() == 2  # the leftovers alone, the socket untouched
        assert worker.in_flight.dropping_copies  # a take-over now is refused
        assert worker.answer_batch() == 1  # then the socket, copies dropped
        assert worker.leftovers is None and not worker.in_flight.dropping_copies
        assert worker.reporter.requests.dropped["duplicate"] == 2
        replies = [peer.receive(2.0) for _ in range(3)]
        assert [reply.seq for reply in replies if reply is not None] == [100, 101, 102]
        assert peer.quiet()
        table.close()
    finally:
        sock.close()
        peer.close()
        os.close(events_r)
        os.close(events_w)
