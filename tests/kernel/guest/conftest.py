"""Fixtures of the kernel scenarios, which run as root inside the guest against the real
kernel: loop devices over the guest's tmpfs, mirrors made with dmsetup, and a real
``shardlog serve`` (front + workers) answering the kernel over the connector."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim.serveprocess import ServeProcess
from shardlog.harness.kernelvm import guest
from shardlog.harness.kernelvm.guest import Loop, Mirror
from shardlog.harness.kernelvm.recorder import Recorder

LEG_SIZE = 16 << 20
REGION_SECTORS = 256  # 128 KiB regions: 128 of them on a 16 MiB leg
SECTORS = LEG_SIZE // guest.SECTOR


class SharedServer:
    """One ``shardlog serve`` for the scenarios, started again only when one killed it
    or needs another worker count: under emulation a start costs 5-10 s.  Never two at
    once (both would answer the kernel).  Between scenarios it holds no log: each
    scenario removes its mirrors."""

    def __init__(self, root: Path):
        self.state_dir = root / "state"
        self.server: ServeProcess | None = None
        self.workers = 0

    def get(self, workers: int) -> ServeProcess:
        server = self.server
        if server is not None and server.process.poll() is None and self.workers == workers:
            return server
        self.close()
        # A fresh log: the worker pids that close() kills are read from it.
        self.state_dir.parent.joinpath(f"{self.state_dir.name}.log").unlink(missing_ok=True)
        self.server, self.workers = guest.start_server(self.state_dir, workers), workers
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Rig:
    """Everything one scenario made, undone in the right order whatever happened: the
    mirrors first (their DTR needs a server: a userspace log's request with no server
    waits for one for ever), then the devices stacked on the loops, then the loops."""

    def __init__(self, root: Path, shared: SharedServer):
        self.root = root
        self.shared = shared
        self.state_dir = shared.state_dir
        self.loops: list[Loop] = []
        self.mirrors: list[Mirror] = []
        self.server: ServeProcess | None = None
        # Undone after the mirrors, before the loops: devices stacked between them.
        self.cleanup: list[Callable[[], object]] = []

    def clean_slate(self) -> None:
        """Remove whatever an earlier scenario left behind — a failed one may not have
        undone everything — so that each scenario starts with no device, no loop device
        and no instance file, and its outcome is its own.  What was found is said."""
        found = []
        devices = guest.device_names()
        if devices:
            found.append(f"devices {devices}")
            with contextlib.suppress(Exception):
                self.start_server(self.shared.workers or 2)  # userspace logs' DTRs
            guest.remove_every_device()
        loops = guest.loop_devices()
        if loops:
            found.append(f"loop devices {loops}")
            guest.run("losetup", "--detach-all", check=False)
        if self.state_dir.exists() and any(self.state_dir.rglob("*")):
            leftovers = [path.name for path in self.state_dir.rglob("*") if path.is_file()]
            if leftovers:
                found.append(f"state files {leftovers}")
                self.shared.close()
                shutil.rmtree(self.state_dir, ignore_errors=True)
        if found:
            print(f"clean slate: removed what an earlier scenario left: {'; '.join(found)}",
                  file=sys.stderr)

    def start_server(self, workers: int = 2) -> ServeProcess:
        """The shared server, alive (a new one if it was killed)."""
        self.server = self.shared.get(workers)
        return self.server

    def loop(self, size: int = LEG_SIZE, fill: bytes | None = None) -> Loop:
        loop = Loop.create(self.root / f"loop{len(self.loops)}.img", size, fill)
        self.loops.append(loop)
        return loop

    def legs(self, count: int = 2, size: int = LEG_SIZE,
             fills: tuple[bytes | None, ...] | None = None) -> list[Loop]:
        fills = fills or (None,) * count
        return [self.loop(size, fill) for fill in fills]

    def mirror(self, name: str, table: str) -> Mirror:
        mirror = Mirror(name, table)
        self.mirrors.append(mirror)
        return mirror.create()

    def close(self) -> None:
        if any(m.created for m in self.mirrors):
            with contextlib.suppress(Exception):
                self.start_server(self.shared.workers or 2)
        guest.remove_all(self.mirrors)
        for undo in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                undo()
        for loop in self.loops:
            loop.detach()


@contextlib.contextmanager
def recording(name: str) -> Iterator[None]:
    """Records the kernel's requests meanwhile, as a fixture-to-be, where the harness asks
    for captures (``python -m shardlog.harness.kernelvm test --captures DIR``).  Only around
    steps with a live server (recorder.py says why)."""
    directory = os.environ.get("SHARDLOG_CAPTURE_DIR")
    if not directory:
        yield
        return
    recorder = Recorder()
    try:
        yield
    finally:
        recorder.save(Path(directory) / f"harness-{name}.jsonl")


# A scenario stuck in the kernel (a request nobody answers is retried for ever) would
# take the whole boot to its timeout with no JUnit report: each outcome is therefore also
# appended to $SHARDLOG_PROGRESS as it comes, and a stuck scenario's stacks go to the
# console.
STUCK_AFTER = 240.0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("SHARDLOG_PROGRESS")
    if not path or (report.when != "call" and report.passed):
        return
    entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
             "text": None if report.passed else report.longreprtext}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


@pytest.fixture(autouse=True)
def stacks_if_stuck() -> Iterator[None]:
    faulthandler.dump_traceback_later(STUCK_AFTER)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> Iterator[SharedServer]:
    shared = SharedServer(tmp_path_factory.mktemp("shared"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def rig(tmp_path: Path, shared_server: SharedServer) -> Iterator[Rig]:
    rig = Rig(tmp_path, shared_server)
    rig.clean_slate()
    try:
        yield rig
    finally:
        rig.close()
