"""Shared test fixtures: the kernel captures, real loop devices, and request helpers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.log.logtable import LogTable
from shardlog.wire import protocol
from shardlog.wire.protocol import Request, RequestType

from .harness import PEER_PORT, STARTED, RawPeer, ServerProcess

# The checkout (scripts/, grafana/), whichever directory a test module sits in.
PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "kernel-6.1"
DISKLOG_IMAGES = FIXTURES / "disklog"
SCENARIOS = ("plain", "iflush", "resync", "disklog", "badcount")


# The layer markers, one per directory under tests/ (registered in pyproject.toml):
# ``pytest -m unit`` runs the fast tests that need no root.
LAYER_MARKERS = ("unit", "process", "kernel")
TESTS = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by these very markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue  # a file named on the command line from elsewhere: left unmarked
        directory = item.path.relative_to(TESTS).parts[0]
        if directory in LAYER_MARKERS:
            item.add_marker(directory)


def layer_markers_of(item: pytest.Item) -> list[str]:
    """The layer markers a collected test carries: exactly one, if it is where it belongs."""
    return [mark.name for mark in item.iter_markers() if mark.name in LAYER_MARKERS]


def load_capture(scenario: str) -> list[dict]:
    """The records of ``capture-<scenario>.jsonl``, in arrival order."""
    with open(FIXTURES / f"capture-{scenario}.jsonl") as f:
        return [json.loads(line) for line in f]


def requires_root(what: str) -> None:
    """Skip, loudly, where the test cannot run; on CI (root) it always runs, and a missing
    capability there is a failure, not a skip."""
    if os.geteuid() == 0:
        return
    message = f"{what} needs root (CI runs it as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def private_netns() -> Path:
    """Moves the test process into a private network namespace (once per session), where
    a simulated kernel and shardlog talk over real connector sockets and nothing can reach
    the real kernel (shardlog.harness.netns).  Later tests stay in it: none needs the
    host's network.  Returns a path to the namespace left behind (for ``nsenter``)."""
    requires_root("a private network namespace (unshare -n)")
    from shardlog.harness import netns

    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    netns.enter_private_netns()
    return Path(f"/proc/{os.getpid()}/fd/{host_fd}")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB block device (a loop device over a file), detached afterwards."""
    requires_root("a loop device")
    backing = tmp_path / "logdev.img"
    with open(backing, "wb") as f:
        f.truncate(4 << 20)
    result = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"losetup failed: {result.stderr.strip()}")
    device = Path(result.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


class FreezableFilesystem:
    """A small ext4 filesystem of its own (a loop mount), which a test may freeze
    (fsfreeze): writes to it then block, uninterruptibly, until it is thawed.  Holds a
    worker in the middle of a batch as long as a test needs."""

    def __init__(self, root: Path):
        requires_root("a loop-mounted filesystem")
        self.image, self.path = root / "freezable.img", root / "freezable"
        with open(self.image, "wb") as f:
            f.truncate(128 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        self.path.mkdir()
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.path)], check=True)

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", str(self.path)], check=True)

    def thaw(self) -> None:
        subprocess.run(["fsfreeze", "--unfreeze", str(self.path)], check=False,
                       capture_output=True)

    def close(self) -> None:
        self.thaw()
        subprocess.run(["umount", "--lazy", str(self.path)], check=False)


@pytest.fixture
def freezable(tmp_path: Path) -> Iterator[FreezableFilesystem]:
    filesystem = FreezableFilesystem(tmp_path)
    try:
        yield filesystem
    finally:
        filesystem.close()


def wait_until_blocked(pid: int, timeout: float = 10.0) -> None:
    """Until process ``pid`` sleeps uninterruptibly (state D: blocked in the kernel)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "D":
        assert time.monotonic() < deadline, f"process {pid} never blocked"
        time.sleep(0.01)


class Kernel:
    """Builds requests as dm-log-userspace does (through the real codec) for one log."""

    def __init__(self, table: LogTable, uuid: str = "test-uuid", luid: int = 0xFFFF0001):
        self.table = table
        self.uuid = uuid
        self.luid = luid
        self.seq = 0

    def request(self, request_type: RequestType, data: bytes = b"", *, version: int = 3,
                luid: int | None = None) -> Request:
        self.seq += 1
        raw = protocol.encode_request(
            request_type, seq=self.seq, uuid=self.uuid,
            luid=self.luid if luid is None else luid, data=data, version=version,
        )
        return protocol.decode_datagram(raw)

    def send(self, request_type: RequestType, data: bytes = b"", **kw) -> tuple[int, bytes]:
        """Send through LogTable.answer and read the reply as the kernel would."""
        request = self.request(request_type, data, **kw)
        reply = protocol.decode_reply(self.table.answer(request))
        assert reply.seq == request.seq and not reply.ack
        return reply.error, reply.data

    def ok(self, request_type: RequestType, data: bytes = b"", **kw) -> bytes:
        error, payload = self.send(request_type, data, **kw)
        assert error == 0, f"{request_type.name} failed with {error}"
        return payload

    def ctr(self, ctr_string: str, *, reconnect: bool = False, **kw) -> tuple[int, bytes]:
        data = ctr_string.encode() + (b"\0" if reconnect else b"")
        return self.send(RequestType.CTR, data, **kw)

    def regions(self, request_type: RequestType, *regions: int, **kw) -> tuple[int, bytes]:
        return self.send(request_type, protocol.pack_regions(regions), **kw)

    def in_sync(self, region: int, **kw) -> int:
        data = self.ok(RequestType.IN_SYNC, protocol.pack_u64(region), **kw)
        return protocol.S64.unpack(data)[0]

    def sync_count(self, **kw) -> int:
        return protocol.U64.unpack(self.ok(RequestType.GET_SYNC_COUNT, **kw))[0]

    def resync_work(self, **kw) -> tuple[int, int]:
        return protocol.S64_U64.unpack(self.ok(RequestType.GET_RESYNC_WORK, **kw))

    def set_region_sync(self, region: int, in_sync: bool, **kw) -> tuple[int, bytes]:
        data = protocol.pack_set_region_sync(region, in_sync)
        return self.send(RequestType.SET_REGION_SYNC, data, **kw)

    def status_info(self, **kw) -> str:
        return self.ok(RequestType.STATUS_INFO, **kw).decode("ascii")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def table(state_dir: Path) -> LogTable:
    return LogTable(state_dir)


@pytest.fixture
def kernel(table: LogTable) -> Kernel:
    return Kernel(table)


@pytest.fixture(autouse=True)
def no_server_outlives_its_test() -> Iterator[None]:
    """Closes every server the test started, whatever its outcome, and fails the test
    (not the next ones) if a group-7 socket other than the peer's is then left: a
    server left behind in the session's namespace answers the next tests' requests
    from its own state, and each then fails for a reason that is not its own."""
    yield
    if not STARTED:
        return
    from shardlog.server.nlsocket import group7_listeners

    while STARTED:
        STARTED.pop().close()
    deadline = time.monotonic() + 10  # a killed worker's socket goes with its exit
    while (left := group7_listeners(exclude_port=PEER_PORT)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"group-7 sockets outlived the test's servers: ports {left}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A started server with 2 workers, in the private namespace (the caller's module
    uses the ``private_netns`` fixture); nothing of it outlives the test."""
    process = ServerProcess(tmp_path / "state").start()
    yield process
    process.close()


@pytest.fixture
def peer() -> Iterator[RawPeer]:
    """A raw netlink peer on PEER_PORT that plays the kernel."""
    raw = RawPeer()
    yield raw
    raw.close()
