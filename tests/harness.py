"""A real `shardlog serve` process, and a raw netlink peer that plays the kernel's socket.

Both live in the test's private network namespace (the ``private_netns`` fixture), where
the server takes requests from the peer's port (``--test-peer``) and replies to it.
"""

from __future__ import annotations

import contextlib
import errno
import urllib.request
from pathlib import Path

from shardlog.harness.kernelsim.serveprocess import ServeProcess
from shardlog.observability.metrics import free_local_port, parse_samples
from shardlog.server.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.server.routing import shard_of_uuid
from shardlog.wire import protocol
from shardlog.wire.protocol import Reply, RequestType

PEER_PORT = 0x7E57

# Every server a test started, closed after the test whatever its outcome (conftest.py's
# ``no_server_outlives_its_test``): one left running in the session's namespace would
# answer the next tests' requests from its own state.
STARTED: list[ServeProcess] = []


class ServerProcess(ServeProcess):
    """A test's ``shardlog serve``: taking requests from the test peer's port, with its
    metrics on a free local port."""

    def __init__(self, state_dir: Path, *, workers: int = 2, peer: int | None = PEER_PORT,
                 extra: tuple[str, ...] = (), run_dir: Path | None = None):
        self.metrics_port = free_local_port()
        super().__init__(state_dir, workers=workers, test_peer=peer,
                         metrics_addr=f"127.0.0.1:{self.metrics_port}", extra=extra,
                         run_dir=run_dir)

    def start(self, timeout: float = 20.0) -> ServerProcess:
        STARTED.append(self)
        super().start(timeout)
        assert int(self.pid_file.read_text()) == self.process.pid
        return self

    def take_over(self, extra: tuple[str, ...] = (), timeout: float = 60.0) -> ServerProcess:
        successor = super().take_over(extra, timeout)
        STARTED.append(successor)
        return successor

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by its name with labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return parse_samples(urllib.request.urlopen(url, timeout=5).read().decode())


class RawPeer:
    """A connector socket that sends datagrams to group 7 as the kernel does and reads the
    server's replies: byte-level tests (the simulated kernel is shardlog.harness.kernelsim)."""

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
    """Log uuids that the kernel routes to ``worker`` (routing.py's Python twin of the
    shard sockets' filters)."""
    found, n = [], 0
    while len(found) < count:
        uuid = f"{prefix}-{n}"
        if shard_of_uuid(uuid, workers) == worker:
            found.append(uuid)
        n += 1
    return found

