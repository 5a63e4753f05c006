"""Take-over (handover.py): a new `shardlog serve --take-over` continues a running server.

The simulated kernel drives mirrors of every kind through real sockets in a private
namespace while servers take each other over, and checks what the kernel would notice:
a request unanswered (a 2 s retry here), one answered twice (a reply no waiter wants),
a wait longer than the hand-over, a reconnect, or an acknowledged mark that is gone
(each mirror's oracle).  Then every way a take-over must be refused or fail safely: the
old server serves on, untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim import Connector
from shardlog.harness.kernelsim.connector import group7_listeners
from shardlog.harness.kernelsim.serveprocess import ServeFailed
from shardlog.server import control, handover
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

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
    server = ServerProcess(tmp_path / "state", workers=2).start()
    servers.append(server)
    mirrors = [core_mirror(kernel, f"core-{n}", "nosync") for n in range(6)]
    mirrors += [core_mirror(kernel, f"iflush-{n}", "nosync", integrated_flush=True)
                for n in range(2)]
    mirrors += [disk_mirror(kernel, f"disk-{n}", scratch_device(tmp_path / f"dev{n}"),
                            "nosync") for n in range(2)]
    writers = Writers(mirrors)
    writers.wait_for_rounds(10)
    hand_overs = []
    for _ in range(TAKE_OVERS):
        started = time.monotonic()
        successor = server.take_over()
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
    assert server.metrics().get("shardlog_reconnect_ctrs_total", 0) == 0
    # Each new server restored the logs from their files, none was reconnected.
    assert all("restored from its CTR record" in s.log for s in servers[1:-1])
    assert "reconnect" not in "".join(s.log for s in servers).replace(
        "reconnect_ctrs", "")
    # No request waited longer than a hand-over (from asking for it to the old
    # server's exit), nor anywhere near the kernel's retry.
    longest_hand_over = max(end - start for start, end in hand_overs)
    print(f"\n{TAKE_OVERS} take-overs: longest request wait {kernel.longest * 1e3:.1f} ms, "
          f"longest hand-over {longest_hand_over * 1e3:.0f} ms")
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


def test_another_worker_count_is_refused(running, peer):
    with pytest.raises(ServeFailed, match="exited 1") as failed:
        running.take_over(extra=("--workers", "3"))
    assert "take-over refused, the running server serves on" in str(failed.value)
    assert "another worker count is not supported" in str(failed.value)
    old_server_serves(running, peer)


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
