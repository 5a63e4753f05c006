"""`shardlog status`, `trace` and `top` against a real `shardlog serve`, over its real
control socket, and what they do when the server is not there or the caller is not root."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from shardlog.harness.kernelsim.serveprocess import ServeFailed
from shardlog.server import control
from shardlog.server.nlsocket import group7_listeners
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import wait_until_blocked
from ..harness import ServerProcess, uuids_for_worker
from ..unit.cli.test_cli import shardlog

pytestmark = pytest.mark.usefixtures("private_netns")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def status_json(server: ServerProcess) -> dict:
    result = shardlog("status", "--json", "--socket", str(server.control_socket))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_trace(server: ServerProcess, *options: str) -> subprocess.Popen:
    """``shardlog trace``, returned once it is subscribed (it says so on stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shardlog.cli", "trace", "--socket", str(server.control_socket),
         *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()
    assert first.startswith("shardlog trace: tracing the server at"), first
    return process


# -- status --------------------------------------------------------------------------------


def test_status_shows_every_log_and_worker_with_fresh_figures(server, peer):
    (on_0,), (on_1,) = uuids_for_worker(0, 2, 1), uuids_for_worker(1, 2, 1)
    peer.open_log(on_0, "8192 core 8 nosync")  # 1024 regions, all in sync
    peer.open_log(on_1, "16384 core 16", luid=7)  # 1024 regions, none in sync yet
    peer.ok(T.MARK_REGION, protocol.pack_regions([3, 4, 9]), uuid=on_0)
    assert protocol.S64_U64.unpack(peer.ok(T.GET_RESYNC_WORK, uuid=on_1, luid=7)) == (1, 0)
    # No second wait: the status asks the workers for reports made now.
    answer = status_json(server)
    logs = {log["uuid"]: log for log in answer["logs"]}
    assert set(logs) == {on_0, on_1}
    first, second = logs[on_0], logs[on_1]
    assert (first["luid"], first["type"], first["state"], first["worker"]) == (1, "core",
                                                                              "resumed", 0)
    assert (first["region_size"], first["region_count"]) == (8, 1024)
    assert (first["in_sync"], first["dirty"], first["health"]) == (1024, 3, "A")
    assert first["requests"] == 2  # RESUME, MARK: the CTR made it
    assert (second["luid"], second["worker"], second["region_size"]) == (7, 1, 16)
    assert second["in_sync"] == 0 and second["recovering"] == 0
    pids = server.worker_pids()
    assert [(w["index"], w["pid"], w["logs"], w["restarts"], w["ready"])
            for w in answer["workers"]] == [(0, pids[0], 1, 0, True), (1, pids[1], 1, 0, True)]
    assert answer["server"]["pid"] == server.process.pid
    # Its shard sockets, by netlink port: what `adopt` looks for in group 7.
    ports = answer["server"]["ports"]
    assert len(ports) == 2 and set(ports) <= set(group7_listeners())
    assert answer["server"]["requests"]["MARK_REGION"] == 1
    assert answer["server"]["tracing"] is False

    text = shardlog("status", "--socket", str(server.control_socket))
    assert text.returncode == 0, text.stderr
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines() if line}
    assert rows[on_0][:8] == [on_0, "1", "core", "resumed", "8", "1024", "1024", "3"]
    assert rows[on_1][:9] == [on_1, "7", "core", "resumed", "16", "1024", "0", "1024",
                              "at"]
    assert rows["Worker"] == ["Worker", "PID", "Logs", "Restarts", "InFlight", "Req/s",
                              "Ready"]


def test_status_counts_a_restarted_worker_and_shows_its_new_pid(server, peer):
    (uuid,) = uuids_for_worker(1, 2, 1)
    peer.open_log(uuid)
    old_pid = server.worker_pids()[1]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while server.worker_pids()[1] == old_pid:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    assert peer.in_sync(0, uuid=uuid) == 1  # restored from its record by the new worker
    worker = status_json(server)["workers"][1]
    assert (worker["pid"], worker["restarts"]) == (server.worker_pids()[1], 1)
    assert status_json(server)["workers"][0]["restarts"] == 0


def test_status_of_a_server_that_is_not_running_exits_1(server, tmp_path):
    socket_path = server.control_socket
    assert server.stop() == 0
    assert not socket_path.exists()  # a clean stop removes it
    result = shardlog("status", "--socket", str(socket_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"shardlog status: shardlog is not running (nothing "
                                     f"answers at {socket_path})")
    # Killed: the socket file stays, nobody listens.
    killed = ServerProcess(tmp_path / "killed").start()
    killed.kill()
    assert killed.control_socket.exists()
    result = shardlog("status", "--socket", str(killed.control_socket))
    assert result.returncode == 1 and "shardlog is not running" in result.stderr
    # ...and the next server takes its place.
    again = ServerProcess(tmp_path / "killed").start()
    try:
        assert status_json(again)["server"]["pid"] == again.process.pid
    finally:
        again.close()


def test_a_non_root_caller_is_denied(server):
    socket_path = str(server.control_socket)
    command = [sys.executable, "-m", "shardlog.cli", "status", "--socket", socket_path]
    # The directory (0700) and the socket (0600) keep an ordinary user out...
    result = subprocess.run(NOBODY + command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"shardlog status: permission denied: {socket_path} "
                                     "is root's (run as root)")
    # ...and one who may bypass file permissions is refused by its credentials.
    bypass = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    result = subprocess.run(NOBODY + bypass + command, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert "the server refused: permission denied: the control socket is root's" \
        in result.stderr
    assert "control socket: refused pid" in server.log and "(uid 65534)" in server.log
    assert status_json(server)["server"]["serving"]  # and it still serves root


def test_the_socket_is_root_only_and_a_second_server_cannot_take_it(server, tmp_path):
    path = server.control_socket
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
    second = ServerProcess(tmp_path / "second", extra=("--control-socket", str(path)))
    with pytest.raises(ServeFailed, match="exited 1"):
        second.start()
    assert f"control socket {path}: another shardlog serve answers there" in second.log
    assert status_json(server)["server"]["pid"] == server.process.pid


def test_an_unsafe_socket_directory_or_path_fails_the_start(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    server = ServerProcess(tmp_path / "a", extra=("--control-socket", str(shared / "c.sock")))
    with pytest.raises(ServeFailed, match="exited 1"):
        server.start()
    assert "is writable by others or not owned by uid 0" in server.log
    (tmp_path / "file.sock").write_text("")
    server = ServerProcess(tmp_path / "b",
                           extra=("--control-socket", str(tmp_path / "file.sock")))
    with pytest.raises(ServeFailed, match="exited 1"):
        server.start()
    assert "exists and is not a socket" in server.log
    deep = tmp_path / ("d" * 100) / "control.sock"
    server = ServerProcess(tmp_path / "c", extra=("--control-socket", str(deep)))
    with pytest.raises(ServeFailed, match="exited 1"):
        server.start()
    assert "a Unix socket's path may have at most 107 bytes" in server.log


def test_bad_control_requests_get_an_error_and_the_server_serves_on(server, peer):
    peer.open_log("log-a")
    with control.connect(server.control_socket) as sock, sock.makefile("rwb") as stream:
        # The nested one is within the line limit and too deep for the JSON parser.
        lines = (b"not json\n", b'{"cmd": "reboot"}\n', b'{"cmd": "trace", "type": '
                 b'["NOPE"]}\n', b'{"cmd": "trace", "uuid": [1]}\n', b"[" * 5000 + b"\n")
        errors = []
        for line in lines:
            stream.write(line)
            stream.flush()
            errors.append(json.loads(stream.readline())["error"])
        assert errors[0].startswith("not a request: not json; commands: ")
        assert "reboot" in errors[1] and "commands: " in errors[1]
        assert "NOPE" in errors[2]
        assert "lists of strings" in errors[3]
        assert errors[4].startswith("not a request: [[[")
        stream.write(b"x" * (control.LINE_LIMIT + 10))
        stream.flush()
        assert "request line longer than" in json.loads(stream.readline())["error"]
        assert stream.readline() == b""  # closed
    assert peer.in_sync(0, uuid="log-a") == 1
    assert status_json(server)["server"]["serving"]


# -- trace ---------------------------------------------------------------------------------


def test_trace_shows_the_requests_it_is_asked_for_decoded(server, peer):
    peer.open_log("log-a")
    peer.open_log("log-b")
    trace = start_trace(server, "--uuid", "log-a", "--type", "MARK_REGION", "--type",
                        "flush", "--json", "--count", "3")
    peer.ok(T.MARK_REGION, protocol.pack_regions([5, 6, 7]), uuid="log-b")  # other log
    peer.in_sync(5, uuid="log-a")  # other type
    peer.ok(T.MARK_REGION, protocol.pack_regions([5, 6, 7]), uuid="log-a")
    peer.ok(T.FLUSH, uuid="log-a")
    peer.ask(T.MARK_REGION, protocol.pack_regions([1 << 40]), uuid="log-a")  # -EINVAL
    out, err = trace.communicate(timeout=30)
    assert trace.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["uuid"], e["luid"], e["args"], e["errno"], e["result"])
            for e in events] == [
        ("MARK_REGION", "log-a", 1, "[5,6,7]", 0, "ok"),
        ("FLUSH", "log-a", 1, "", 0, "ok"),
        ("MARK_REGION", "log-a", 1, f"[{1 << 40}]", -22, "error -22"),
    ]
    assert all(e["latency_us"] > 0 and e["worker"] in (0, 1) for e in events)
    assert len({e["seq"] for e in events}) == 3


def test_trace_text_lines_and_tracing_stops_with_the_last_tracer(server, peer):
    peer.open_log("log-a")
    trace = start_trace(server, "--count", "1")
    assert status_json(server)["server"]["tracing"] is True
    peer.in_sync(3, uuid="log-a")
    out, err = trace.communicate(timeout=30)
    assert trace.returncode == 0, err
    words = out.split()
    assert words[2:8] == ["IN_SYNC", "log-a@1", "[3]", "->", "1", words[7]]
    assert words[-1] == "µs"
    deadline = time.monotonic() + 10
    while status_json(server)["server"]["tracing"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_trace_the_server_ends_says_so_and_exits_1(server):
    """The server stops while someone traces: the trace does not end as if Ctrl-C or
    --count had stopped it; it says the server ended it (exit codes: --help)."""
    trace = start_trace(server)
    assert server.stop() == 0
    out, err = trace.communicate(timeout=30)
    assert trace.returncode == 1, err
    assert f"the server at {server.control_socket} ended the trace" in err
    assert out == ""


def test_a_tracer_that_does_not_read_loses_lines_counted_and_never_stalls_the_server(
        server, peer):
    peer.open_log("log-a")
    sock = control.connect(server.control_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b'{"cmd": "trace"}\n')
    stream = sock.makefile("rb")
    assert "subscribed" in json.loads(stream.readline())
    sent = 12000
    started = time.monotonic()
    for n in range(sent):
        assert peer.in_sync(n % 1024, uuid="log-a") == 1  # every request answered
    elapsed = time.monotonic() - started
    # The workers send their trace lines after their replies: a status, whose fresh
    # reports come down the same pipes after them, is a barrier.
    status_json(server)
    sock.shutdown(socket.SHUT_WR)
    events = dropped = 0
    sock.settimeout(10)
    for line in stream:
        message = json.loads(line)
        if "dropped" in message:
            dropped += message["dropped"]  # sent once the backlog was read
        else:
            events += 1
    sock.close()
    assert dropped > 0, f"{events} events, none dropped: the buffer limit was not reached"
    assert events + dropped == sent
    print(f"{sent} requests in {elapsed:.1f} s with a stuck tracer: {events} traced, "
          f"{dropped} dropped")


def test_a_front_that_stops_reading_its_workers_leaves_tracers_told_what_went_untraced(
        server, peer):
    """The front SIGSTOPped while someone traces: the workers answer on (the front is off
    the request path), stop queueing trace frames past worker.TRACE_BACKLOG rather than
    grow, and once the front reads again the tracer is told how many went untraced."""
    peer.open_log("log-a")
    sock = control.connect(server.control_socket)
    sock.sendall(b'{"cmd": "trace"}\n')
    stream = sock.makefile("rb")
    assert "subscribed" in json.loads(stream.readline())
    # More frames (~370 bytes each) than the events pipe (1 MiB) and the backlog (4 MiB).
    sent = 20000
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        for n in range(sent):
            assert peer.in_sync(n % 1024, uuid="log-a") == 1
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    status_json(server)  # the front has read what the worker queued
    assert peer.in_sync(1, uuid="log-a") == 1  # its trace frame counts what was dropped
    status_json(server)
    sock.shutdown(socket.SHUT_WR)
    traced = dropped = untraced = 0
    sock.settimeout(10)
    for line in stream:
        message = json.loads(line)
        if "untraced" in message:
            untraced += message["untraced"]
        elif "dropped" in message:
            dropped += message["dropped"]  # this client's own backlog, a different limit
        else:
            traced += 1
    sock.close()
    assert untraced > 0
    assert traced + dropped + untraced == sent + 1


def test_a_worker_death_shows_in_the_trace_as_eagain(tmp_path, peer, freezable):
    # The worker blocks on its frozen state directory holding the CTR it read.
    server = ServerProcess(freezable.path / "state", run_dir=tmp_path).start()
    try:
        (uuid,) = uuids_for_worker(0, 2, 1)
        worker = server.worker_pids()[0]
        trace = start_trace(server, "--json", "--count", "1")
        freezable.freeze()
        seq = peer.request(T.CTR, b"8192 core 8 nosync", uuid=uuid)
        wait_until_blocked(worker)
        os.kill(worker, signal.SIGKILL)
        freezable.thaw()
        out, err = trace.communicate(timeout=30)
        assert trace.returncode == 0, err
        event = json.loads(out)
        assert (event["seq"], event["type"], event["errno"], event["result"]) == (
            seq, "CTR", -11, "ack, error -11")
        assert event["note"] == "worker died: answered -EAGAIN"
    finally:
        freezable.thaw()
        server.close()


def test_trace_without_a_server_exits_1_and_a_bad_type_exits_2(tmp_path):
    result = shardlog("trace", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and "shardlog is not running" in result.stderr
    result = shardlog("trace", "--socket", str(tmp_path / "none.sock"), "--type", "FLUSHH")
    assert result.returncode == 2 and "unknown request type FLUSHH" in result.stderr


# -- top -----------------------------------------------------------------------------------


def test_top_once_shows_rates_latencies_progress_and_workers(server, peer):
    peer.open_log("busy", "8192 core 8")
    peer.open_log("idle", "8192 core 8 nosync")
    top = subprocess.Popen(
        [sys.executable, "-m", "shardlog.cli", "top", "--once", "--interval", "1.5",
         "--sample", "1", "--socket", str(server.control_socket)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while top.poll() is None:
        peer.in_sync(1, uuid="busy")
        peer.ok(T.FLUSH, uuid="busy")
    out, err = top.communicate()
    assert top.returncode == 0, err
    assert "\x1b[" not in out  # not a terminal: plain frames
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert float(rows["IN_SYNC"][1]) > 0 and int(rows["IN_SYNC"][2]) > 0
    assert float(rows["IN_SYNC"][3]) > 0  # p50 µs
    assert rows["busy"][4:6] == ["[..........]", "0.0%"]
    assert rows["idle"][4:6] == ["[##########]", "100.0%"]
    assert float(rows["busy"][-2]) > 0 and rows["idle"][-2] == "0.0"
    pids = server.worker_pids()
    assert rows["0"][:3] == ["0", str(pids[0]), "yes"]


def test_top_once_on_a_terminal_prints_a_plain_frame(server):
    """--once is for scripts and for a frame kept in the scrollback: no screen clearing,
    even on a terminal (a live top clears before each frame)."""
    leader, follower = pty.openpty()
    try:
        top = subprocess.run(
            [sys.executable, "-m", "shardlog.cli", "top", "--once", "--interval", "0.2",
             "--socket", str(server.control_socket)],
            stdout=follower, stderr=subprocess.PIPE, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        out = b""
        while select.select([leader], [], [], 0.5)[0]:
            out += os.read(leader, 1 << 16)
    finally:
        os.close(leader)
        os.close(follower)
    assert b"shardlog pid" in out
    assert b"\x1b[" not in out


def test_top_without_a_server_or_as_non_root_exits_1(server, tmp_path):
    result = shardlog("top", "--once", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and "shardlog is not running" in result.stderr
    command = [sys.executable, "-m", "shardlog.cli", "top", "--once", "--socket",
               str(server.control_socket)]
    result = subprocess.run([*NOBODY, *command], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "permission denied" in result.stderr
    assert shardlog("top", "--interval", "0").returncode == 2


# -- SIGUSR1 -------------------------------------------------------------------------------


def test_sigusr1_dumps_every_log_and_worker_to_the_log_and_serving_goes_on(server, peer):
    (uuid,) = uuids_for_worker(1, 2, 1)
    peer.open_log(uuid, "8192 core 8")
    peer.ok(T.MARK_REGION, protocol.pack_regions([7]), uuid=uuid)
    os.killpg(server.process.pid, signal.SIGUSR1)  # front and workers: kill -USR1 -PGID
    deadline = time.monotonic() + 10
    while f"dump: {uuid}" not in server.log:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    dumped = [line.split("dump: ", 1)[1].split()
              for line in server.log.splitlines() if f"dump: {uuid}" in line]
    assert dumped[-1][:8] == [uuid, "1", "core", "resumed", "8", "1024", "0", "1024"]
    assert any("dump: Worker" in line for line in server.log.splitlines())
    assert peer.in_sync(7, uuid=uuid) == 0  # the workers ignored it, the front serves on
    assert [w["pid"] for w in status_json(server)["workers"]] == server.worker_pids()
