"""`shardlog serve` as real processes over real netlink sockets, in a private namespace.

Byte-level behaviour of the front and its workers: who may drive the server, bad input,
a worker killed with requests in its hands, stop and restart.  The simulated kernel's
scenarios are in test_end_to_end.py.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog.harness.kernelsim.serveprocess import ServeFailed
from shardlog.server.nlsocket import (
    GROUP_7_MASK,
    SO_RCVBUFFORCE,
    group7_listeners,
    open_connector_socket,
)
from shardlog.storage import records
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import wait_until_blocked
from ..harness import PEER_PORT, RawPeer, ServerProcess, uuids_for_worker

pytestmark = pytest.mark.usefixtures("private_netns")


# -- start and stop ------------------------------------------------------------------------


def test_without_root_serve_fails_with_one_clear_line(tmp_path):
    # Root's capabilities taken away (setpriv, util-linux): what the check looks at.
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin,-sys_admin", sys.executable, "-m",
         "shardlog.cli", "serve", "--state-dir", str(tmp_path / "state"),
         "--metrics-addr", ""],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs root" in lines[0]
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN missing" in lines[0]


def test_the_pid_file_appears_once_serving_and_sigterm_exits_0(server, peer):
    assert server.metrics()["shardlog_workers_up"] == 2
    peer.open_log("log-a")
    assert server.stop() == 0
    assert not server.pid_file.exists()
    assert "stopping (signal)" in server.log


def test_sigterm_commits_every_log_clears_included(server, peer):
    peer.open_log("log-a")
    peer.ok(T.FLUSH, protocol.pack_regions([3, 4]))
    peer.ok(T.CLEAR_REGION, protocol.pack_regions([3]))  # lazy: not committed yet
    image_file = instance_file_path(server.state_dir, "log-a", 1)
    assert server.stop() == 0
    # Read the file as the next server will (a core log's file is read back from the
    # page cache: no sync is made, design.md); the worker committed and closed it.
    bitmap = image_file.read_bytes()[BITMAP_OFFSET]
    assert bitmap & 0b11000 == 0b01000  # 3 clean again, 4 still dirty


def test_sigterm_answers_everything_queued_for_a_slow_worker_first(server, peer):
    peer.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)  # room for all
    uuid = uuids_for_worker(0, 2, 1)[0]
    peer.open_log(uuid)
    slow = server.worker_pids()[0]
    os.kill(slow, signal.SIGSTOP)
    # More than its 1 MiB pipe holds: the rest waits in the front when the stop begins.
    sent = {peer.request(T.IN_SYNC, protocol.pack_u64(n % 100), uuid=uuid)
            for n in range(6000)}
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    os.kill(slow, signal.SIGCONT)
    answered = set()
    while (reply := peer.receive(5.0)) is not None and len(answered) < len(sent):
        assert reply.error == 0
        answered.add(reply.seq)
    assert answered == sent
    assert server.process.wait(30) == 0


def test_a_state_dir_that_cannot_be_made_fails_the_start_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    server = ServerProcess(blocker / "state", run_dir=tmp_path)
    with pytest.raises(ServeFailed, match="exited 1"):
        server.start()
    assert "shardlog serve: state directory" in server.log


def test_a_pid_file_that_cannot_be_written_stops_the_server_clearly(tmp_path):
    server = ServerProcess(tmp_path / "state", extra=("--pid-file", "/nonexistent/x.pid"))
    server.pid_file = tmp_path / "never"
    with pytest.raises(ServeFailed, match="exited 1"):
        server.start()
    assert "shardlog serve: cannot write pid file /nonexistent/x.pid" in server.log
    assert not server.worker_pids() or all(
        not Path(f"/proc/{pid}").exists() for pid in server.worker_pids())


def test_a_test_peer_is_refused_outside_a_private_namespace(tmp_path, private_netns):
    # The initial namespace has the kernel's connector: replies there must go to port 0.
    result = subprocess.run(
        ["nsenter", f"--net={private_netns}", sys.executable, "-m", "shardlog.cli", "serve",
         "--state-dir", str(tmp_path / "state"), "--metrics-addr", "",
         "--test-peer", str(PEER_PORT)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "--test-peer is for a private network namespace" in result.stderr


# -- only the kernel may drive it ------------------------------------------------------------


def test_requests_from_another_port_are_dropped_and_counted(server, peer):
    peer.open_log("log-a")
    intruder = RawPeer(port=PEER_PORT + 1)
    try:
        intruder.request(T.FLUSH, protocol.pack_regions([9]), uuid="log-a")
        intruder.request(T.DTR, uuid="log-a")
        assert intruder.quiet() and peer.quiet()
    finally:
        intruder.close()
    assert server.metrics()['shardlog_datagrams_dropped_total{reason="forged_sender"}'] == 2
    assert peer.is_clean(9, uuid="log-a") == 1  # nothing marked, the log still there


def test_without_a_test_peer_only_port_0_is_served(tmp_path, peer):
    server = ServerProcess(tmp_path / "state", peer=None).start()
    try:
        peer.request(T.CTR, b"8192 core 8", uuid="log-a")
        assert peer.quiet()
        assert server.metrics()['shardlog_datagrams_dropped_total{reason="forged_sender"}'] == 1
        assert not instance_file_path(server.state_dir, "log-a", 1).exists()
    finally:
        server.close()


def test_a_non_root_process_cannot_forge_a_request(server, peer):
    peer.open_log("log-a")
    forged = protocol.encode_request(T.SET_REGION_SYNC, seq=1, uuid="log-a", luid=1,
                                     data=protocol.pack_set_region_sync(5, False))
    server_port = server.process.pid  # the front's socket is the first it bound: its pid
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read)
        os.setgid(65534)
        os.setuid(65534)
        outcomes = []
        sock = open_connector_socket()
        for destination in ((0, GROUP_7_MASK), (server_port, 0), (PEER_PORT, 0)):
            try:
                sock.sendto(forged, destination)
                outcomes.append("sent")
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno])
        os.write(write, ",".join(outcomes).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    outcomes = os.read(read, 100).decode().split(",")
    os.close(read)
    assert outcomes == ["EPERM", "EPERM", "EPERM"]  # the kernel refuses it at the send
    assert peer.in_sync(5, uuid="log-a") == 1
    metrics = server.metrics()
    assert 'shardlog_requests_received_total{type="set_region_sync"}' not in metrics
    assert metrics['shardlog_requests_received_total{type="in_sync"}'] == 1


# -- bad input ---------------------------------------------------------------------------------


def valid(request_type=T.IN_SYNC, seq=77, **kw) -> bytes:
    kw.setdefault("data", protocol.pack_u64(1))
    return protocol.encode_request(request_type, seq=seq, uuid="log-a", luid=1, **kw)


# Each bad datagram, and whether it is refused (-EINVAL: it carries a request header the
# kernel waits on) or dropped (not a dm-log-userspace request: nobody waits for it).
REFUSED, DROPPED = True, False
BAD_DATAGRAMS = {
    "shorter than a netlink header": (valid()[:10], DROPPED),
    "truncated request header": (valid()[:100], REFUSED),
    "truncated payload": (valid()[:-3], REFUSED),
    "oversized": (valid() + bytes(600), REFUSED),
    "wrong connector id": (valid()[:16] + (9).to_bytes(4, "little") + valid()[20:], DROPPED),
    "wrong message type": (valid()[:4] + (1).to_bytes(2, "little") + valid()[6:], DROPPED),
    "garbage": (random.Random(7).randbytes(300), DROPPED),
    "region out of range": (valid(data=protocol.pack_u64(1 << 40)), REFUSED),
    "unknown request type": (valid(request_type=T.IN_SYNC)[:36 + 152]
                             + (99).to_bytes(4, "little") + valid()[36 + 156:], REFUSED),
}


@pytest.mark.parametrize("datagram, refused", BAD_DATAGRAMS.values(), ids=BAD_DATAGRAMS.keys())
def test_bad_datagrams_are_answered_einval_or_dropped_and_serving_goes_on(
        server, peer, datagram, refused):
    peer.open_log("log-a")
    peer.send_raw(datagram)
    if refused:  # the kernel would wait for its answer: it must come, once
        reply = peer.receive(5.0)
        assert reply is not None, "a request the kernel waits for went unanswered"
        assert reply.error == -errno.EINVAL  # a full reply or a connector ACK
    else:
        assert peer.receive(0.5) is None  # not a request: no answer
    assert peer.quiet(), "answered twice: two shard sockets accepted it"
    assert peer.in_sync(1, uuid="log-a") == 1
    assert server.process.poll() is None
    assert server.metrics()["shardlog_worker_restarts_total"] == 0


def test_fuzzed_datagrams_never_stop_the_server(server, peer):
    peer.open_log("log-a")
    base = valid(T.FLUSH, data=protocol.pack_regions([1, 2]))

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.binary(max_size=700),
        st.builds(lambda cut: base[:cut], st.integers(0, len(base))),
        st.builds(lambda at, value: base[:at] + bytes([value]) + base[at + 1:],
                  st.integers(0, len(base) - 1), st.integers(0, 255)),
    ))
    def send(datagram):
        peer.send_anything(datagram)

    send()
    # Whatever came back was a reply; the log still answers, nothing died.
    while peer.receive(0.3) is not None:
        pass
    assert peer.in_sync(1, uuid="log-a") in (0, 1)
    assert server.process.poll() is None
    assert server.metrics()["shardlog_worker_restarts_total"] == 0


# -- supervision -------------------------------------------------------------------------------


def test_requests_queued_for_a_killed_worker_are_answered_by_its_successor(server, peer):
    victim_logs = uuids_for_worker(0, 2, 2)
    other_log = uuids_for_worker(1, 2, 1)[0]
    for uuid in [*victim_logs, other_log]:
        peer.open_log(uuid)
        peer.ok(T.FLUSH, protocol.pack_regions([7]), uuid=uuid)  # acknowledged marks
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    queued = [peer.request(T.FLUSH, protocol.pack_regions([8]), uuid=uuid)
              for uuid in victim_logs]  # wait in its shard socket: it reads nothing now
    assert peer.ok(T.GET_SYNC_COUNT, uuid=other_log)  # the other worker serves on
    os.kill(victim, signal.SIGKILL)
    replies = {reply.seq: (reply.ack, reply.error)
               for reply in (peer.receive() for _ in queued)}
    # The successor inherited the socket and answered them: nothing waits for a re-send.
    assert replies == {seq: (False, 0) for seq in queued}
    for uuid in victim_logs:  # restored from its files, with every acknowledged mark
        assert peer.is_clean(7, uuid=uuid) == 0 and peer.is_clean(8, uuid=uuid) == 0
        assert peer.in_sync(7, uuid=uuid) == 1
    metrics = server.metrics()
    assert metrics["shardlog_worker_restarts_total"] == 1
    assert metrics["shardlog_eagain_replies_total"] == 0
    assert metrics["shardlog_workers_up"] == 2
    assert f"worker 0 (pid {victim}) died (killed by SIGKILL)" in server.log


def test_a_killed_worker_answers_what_it_held_eagain_and_comes_back(tmp_path, peer,
                                                                    freezable):
    # Its state directory on a filesystem frozen meanwhile: the worker reads its batch,
    # then blocks in the kernel on the first CTR's file, holding every request of it.
    server = ServerProcess(freezable.path / "state", run_dir=tmp_path).start()
    try:
        victim_logs = uuids_for_worker(0, 2, 8)
        other_log = uuids_for_worker(1, 2, 1)[0]
        peer.open_log(other_log)
        victim = server.worker_pids()[0]
        freezable.freeze()
        os.kill(victim, signal.SIGSTOP)
        sent = {peer.request(T.CTR, b"8192 core 8 nosync", uuid=uuid): uuid
                for uuid in victim_logs}
        os.kill(victim, signal.SIGCONT)  # it reads all 8 in one batch
        wait_until_blocked(victim)
        os.kill(victim, signal.SIGKILL)
        freezable.thaw()  # the kill lands as the blocked write returns
        answers = {}
        while set(answers) != set(sent):
            reply = peer.receive(5.0)
            assert reply is not None, f"unanswered: {sorted(set(sent) - set(answers))}"
            answers.setdefault(reply.seq, (reply.ack, reply.error))
        # Connector ACKs: a full -EAGAIN reply would zero the kernel's reply buffer size.
        assert answers == {seq: (True, -errno.EAGAIN) for seq in sent}
        assert peer.ok(T.GET_SYNC_COUNT, uuid=other_log)  # the other worker served on
        # The kernel re-sends at once, with new seqs: the new worker answers.
        for uuid in sent.values():
            peer.ok(T.CTR, b"8192 core 8 nosync", uuid=uuid)
        metrics = server.metrics()
        assert metrics["shardlog_worker_restarts_total"] == 1
        assert metrics["shardlog_eagain_replies_total"] == len(sent)
        assert metrics["shardlog_resent_requests_total"] == len(sent)
        assert metrics["shardlog_workers_up"] == 2
        assert f"worker 0 (pid {victim}) died (killed by SIGKILL)" in server.log
    finally:
        freezable.thaw()
        server.close()


def test_a_hung_worker_is_replaced_before_the_kernel_would_time_out(tmp_path, peer):
    server = ServerProcess(tmp_path / "state", extra=("--worker-timeout", "1")).start()
    try:
        uuid = uuids_for_worker(0, 2, 1)[0]
        peer.open_log(uuid)
        peer.ok(T.FLUSH, protocol.pack_regions([4]), uuid=uuid)
        hung = server.worker_pids()[0]
        os.kill(hung, signal.SIGSTOP)  # alive, answering nothing
        seq = peer.request(T.IS_CLEAN, protocol.pack_u64(4), uuid=uuid)
        started = time.monotonic()
        reply = peer.receive(10.0)
        if reply is not None and reply.seq == seq - 1:
            # Stopped right after its FLUSH reply left, before it noted so in its ring:
            # that FLUSH is answered -EAGAIN too, which the kernel, no longer waiting
            # for it, ignores.
            assert (reply.ack, reply.error) == (True, -errno.EAGAIN)
            reply = peer.receive(10.0)
        # Its successor answered from the same socket, from the restored files.
        assert (reply.seq, reply.ack, reply.error) == (seq, False, 0)
        assert protocol.S64.unpack(reply.data)[0] == 0  # region 4 is still marked
        assert time.monotonic() - started < 5  # well inside the kernel's 15 s
        assert f"worker 0 (pid {hung}) answered nothing for" in server.log
        assert server.metrics()["shardlog_worker_restarts_total"] == 1
    finally:
        server.close()


def test_a_worker_that_keeps_dying_at_start_stops_the_server(tmp_path, peer):
    state = tmp_path / "state"
    server = ServerProcess(state).start()
    try:
        for _ in range(5):
            pids = server.worker_pids()
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 5
            while server.worker_pids() == pids and server.process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert server.process.wait(30) == 1
        assert "died 5 times right after starting: stopping" in server.log
    finally:
        server.close()


def test_a_receive_buffer_overflow_is_counted_and_survived(tmp_path, peer):
    server = ServerProcess(tmp_path / "state", extra=("--receive-buffer", "65536")).start()
    try:
        peer.open_log("log-a")
        request = valid(T.IN_SYNC)
        # The workers read the shard sockets (the front never does): stopped, the
        # requests pile up in their receive buffers, whatever the host's speed.
        workers = server.worker_pids()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(2000):  # far more than 64 KiB holds
                peer.send_raw(request)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        while peer.receive(1.0) is not None:  # whatever was answered (replies to a full
            pass  # peer are dropped, as the kernel would drop nothing but a test peer may)
        assert peer.in_sync(1, uuid="log-a") == 1
        metrics = server.metrics()
        assert metrics["shardlog_enobufs_total"] >= 1
        assert metrics["shardlog_worker_restarts_total"] == 0
        assert "receive buffer overflowed" in server.log
    finally:
        server.close()


# -- restart ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_restarted_server_restores_every_log_at_its_first_request(tmp_path, peer, how):
    state = tmp_path / "state"
    server = ServerProcess(state).start()
    uuids = [f"log-{n}" for n in range(6)]
    try:
        for n, uuid in enumerate(uuids):
            peer.open_log(uuid, luid=100 + n)
            peer.ok(T.FLUSH, protocol.pack_regions([n, 50]), uuid=uuid, luid=100 + n)
            peer.ok(T.SET_REGION_SYNC, protocol.pack_set_region_sync(60, False), uuid=uuid,
                    luid=100 + n)
        if how == "sigterm":
            assert server.stop() == 0
        else:
            server.kill()
    finally:
        server.close()
    restarted = ServerProcess(state, workers=3).start()  # another worker count, too
    try:
        for n, uuid in enumerate(uuids):
            assert records.load(state, uuid, 100 + n) == "8192 core 8 nosync"
            # Answered at once (no -ESRCH and 2 s reconnect), with the state as it was.
            assert peer.is_clean(n, uuid=uuid, luid=100 + n) == 0
            assert peer.is_clean(50, uuid=uuid, luid=100 + n) == 0
            assert peer.in_sync(60, uuid=uuid, luid=100 + n) == 0
            assert peer.in_sync(n, uuid=uuid, luid=100 + n) == 1
        assert "restored from its CTR record" in restarted.log
    finally:
        restarted.close()


def connector_sockets_of(pid: int) -> set[int]:
    """Inodes of the group-7 connector sockets that process ``pid`` holds open."""
    in_group_7 = set()
    with open("/proc/net/netlink") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1]) == 11 and int(fields[3], 16) & GROUP_7_MASK:
                in_group_7.add(int(fields[-1]))  # the socket's inode
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            held.add(int(target[len("socket:["):-1]))
    return held & in_group_7


def test_each_worker_holds_its_own_shard_socket_only(tmp_path, peer):
    server = ServerProcess(tmp_path / "state", workers=3).start()
    try:
        front = connector_sockets_of(server.process.pid)
        workers = [connector_sockets_of(pid) for pid in server.worker_pids()]
        # The front keeps all three (for the workers' successors); each worker one, its own:
        # a worker that outlived its front must not keep another shard's socket in group 7.
        assert len(front) == 3
        assert all(len(held) == 1 for held in workers), workers
        assert set().union(*workers) == front
    finally:
        server.close()


def test_workers_whose_front_died_leave_group_7_commit_and_exit(tmp_path, peer):
    server = ServerProcess(tmp_path / "state").start()
    try:
        peer.open_log("log-a")
        peer.ok(T.FLUSH, protocol.pack_regions([3]), uuid="log-a")
        workers = server.worker_pids()
        os.kill(server.process.pid, signal.SIGKILL)  # the front alone
        server.process.wait(10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their front"
            time.sleep(0.05)
        # No socket of theirs is left in group 7: the kernel's next request finds no
        # server (and reconnects to the next one) instead of waiting 15 s on a socket
        # nobody reads.
        assert group7_listeners(exclude_port=PEER_PORT) == []
        # They committed: a new server restores the log with its mark.
        server.close()
        server = ServerProcess(tmp_path / "state").start()
        assert peer.is_clean(3, uuid="log-a") == 0
    finally:
        server.close()
