"""A real `shardlog serve` process, and a raw netlink peer that plays the kernel's socket.

Both live in the test's private network namespace (the ``private_netns`` fixture), where
the server takes requests from the peer's port (``--test-peer``) and replies to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

from shardlog import protocol
from shardlog.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.protocol import Reply, RequestType

PEER_PORT = 0x7E57


class ServerProcess:
    """``shardlog serve`` in its own session (so that a test can kill the whole server)."""

    def __init__(self, state_dir: Path, *, workers: int = 2, peer: int | None = PEER_PORT,
                 extra: tuple[str, ...] = (), run_dir: Path | None = None):
        self.state_dir = state_dir
        self.workers = workers
        self.peer = peer
        self.extra = extra
        run_dir = run_dir or state_dir.parent  # where its pid file and log go
        self.pid_file = run_dir / f"{state_dir.name}.pid"
        self.log_path = run_dir / f"{state_dir.name}.log"
        self.metrics_port = _free_port()
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.pid_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "shardlog.cli", "--log-level", "info", "serve",
                   "--workers", str(self.workers), "--state-dir", str(self.state_dir),
                   "--pid-file", str(self.pid_file),
                   "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *self.extra]
        if self.peer is not None:
            command += ["--test-peer", str(self.peer)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server not serving after {timeout} s:\n{self.log}")
            time.sleep(0.02)
        assert int(self.pid_file.read_text()) == self.process.pid
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The front's children, in worker-index order (from the log of their starts)."""
        pids: dict[int, int] = {}
        for line in self.log.splitlines():
            if "worker " in line and " started (pid " in line:
                words = line.split("worker ", 1)[1].split()
                pids[int(words[0])] = int(words[3].rstrip(")"))
        return [pids[index] for index in sorted(pids)]

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by its name with labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as systemd does; the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the front and every worker at once."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        else:
            # Workers of a front that died on its own must not outlive the test.
            for pid in self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RawPeer:
    """A connector socket that sends datagrams to group 7 as the kernel does and reads the
    server's replies: byte-level tests (the simulated kernel is shardlog.kernelsim)."""

    def __init__(self, port: int = PEER_PORT):
        self.sock = open_connector_socket(port)
        self.seq = 1000

    def send_raw(self, datagram: bytes) -> None:
        # The multicast is delivered; the send then finds no kernel at port 0 here.
        with contextlib.suppress(ConnectionRefusedError):
            self.sock.sendto(datagram, (0, GROUP_7_MASK))

    def send_anything(self, datagram: bytes) -> bool:
        """Like send_raw, for bytes netlink may refuse to carry (empty: ENODATA)."""
        try:
            self.send_raw(datagram)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            return False
        return True

    def request(self, request_type: RequestType, data: bytes = b"", *, uuid: str = "log-a",
                luid: int = 1) -> int:
        self.seq += 1
        self.send_raw(protocol.encode_request(request_type, seq=self.seq, uuid=uuid,
                                              luid=luid, data=data))
        return self.seq

    def receive(self, timeout: float = 5.0) -> Reply | None:
        self.sock.settimeout(timeout)
        try:
            return protocol.decode_reply(self.sock.recv(65536))
        except TimeoutError:
            return None

    def ask(self, request_type: RequestType, data: bytes = b"", **kw) -> Reply:
        seq = self.request(request_type, data, **kw)
        while True:
            reply = self.receive()
            assert reply is not None, f"no reply to {request_type.name} (seq {seq})"
            if reply.seq == seq:
                return reply

    def ok(self, request_type: RequestType, data: bytes = b"", **kw) -> bytes:
        reply = self.ask(request_type, data, **kw)
        assert reply.error == 0, f"{request_type.name}: error {reply.error}"
        return reply.data

    def open_log(self, uuid: str, ctr: str = "8192 core 8 nosync", luid: int = 1) -> None:
        self.ok(RequestType.CTR, ctr.encode(), uuid=uuid, luid=luid)
        self.ok(RequestType.RESUME, uuid=uuid, luid=luid)

    def in_sync(self, region: int, **kw) -> int:
        return protocol.S64.unpack(self.ok(RequestType.IN_SYNC, protocol.pack_u64(region),
                                           **kw))[0]

    def is_clean(self, region: int, **kw) -> int:
        return protocol.S64.unpack(self.ok(RequestType.IS_CLEAN, protocol.pack_u64(region),
                                           **kw))[0]

    def quiet(self, timeout: float = 0.3) -> bool:
        """Whether nothing arrives for ``timeout`` seconds."""
        return self.receive(timeout) is None

    def close(self) -> None:
        self.sock.close()


def uuids_for_worker(worker: int, workers: int, count: int, prefix: str = "log") -> list[str]:
    """Log uuids that the front routes to ``worker`` (its routing rule, restated)."""
    found, n = [], 0
    while len(found) < count:
        uuid = f"{prefix}-{n}"
        if zlib.crc32(uuid.encode()) % workers == worker:
            found.append(uuid)
        n += 1
    return found
