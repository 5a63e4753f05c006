"""The simulated kernel (shardlog.harness.kernelsim) against a real `shardlog serve`.

Mirrors of both log types across several workers, through dm-raid1's request sequences
over real connector sockets in a private namespace; then the faults a server meets: a
worker or the whole server killed under load, a full or read-only state directory, a log
device that goes away.  After each, every mirror's oracle checks that no region whose legs
may differ is called clean or in sync, i.e. that nothing acknowledged was lost.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.harness.kernelsim import Connector, LogConstructError, Mirror
from shardlog.storage import records
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType

from ..harness import PEER_PORT, ServerProcess

pytestmark = pytest.mark.usefixtures("private_netns")

REGION_SECTORS = 8
REGIONS = 256
SECTORS = REGIONS * REGION_SECTORS


@pytest.fixture
def kernel() -> Iterator[Connector]:
    # Short timeouts keep the tests quick; the kernel's are 15 s, 2 s and 250 ms.
    with Connector(PEER_PORT, retry_timeout=2.0, reconnect_delay=0.1,
                   remote_recovering_interval=0.01, history=200_000) as conn:
        yield conn


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "state", workers=3).start()
    yield process
    process.close()


def core_mirror(kernel: Connector, uuid: str, *args: str, **kw) -> Mirror:
    return Mirror.create(kernel, uuid, "core", [str(REGION_SECTORS), *args], SECTORS, **kw)


def disk_mirror(kernel: Connector, uuid: str, device: Path, *args: str, **kw) -> Mirror:
    return Mirror.create(kernel, uuid, "disk", [str(device), str(REGION_SECTORS), *args],
                         SECTORS, **kw)


def scratch_device(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


def write(mirror: Mirror, regions: list[int], complete: bool = True) -> None:
    """A write, retried while the kernel's IS_REMOTE_RECOVERING throttle requeues it (it
    re-asks at most every 250 ms, here 10 ms, for regions above the server's hint)."""
    while mirror.write(regions, complete=complete):
        regions = []  # the requeued writes wait in the mirror for its next pass
        time.sleep(0.01)


def exercise(mirror: Mirror, rng: random.Random, rounds: int = 5) -> None:
    """Writes (some wider than one request's 32 regions), reads and worker passes."""
    for _ in range(rounds):
        write(mirror, rng.sample(range(REGIONS), rng.choice((1, 3, 40))), complete=False)
        mirror.read(rng.randrange(REGIONS))
        mirror.verify()
        mirror.complete_writes()
        mirror.update_states()


# -- many mirrors, every request type --------------------------------------------------------


def test_mirrors_of_both_log_types_across_workers(server, kernel, tmp_path):
    rng = random.Random(1)
    mirrors = [
        core_mirror(kernel, "core-resync"),
        core_mirror(kernel, "core-nosync", "nosync"),
        core_mirror(kernel, "core-iflush", "nosync", integrated_flush=True, flush_delay=0.2),
        disk_mirror(kernel, "disk-resync", scratch_device(tmp_path / "dev1")),
        disk_mirror(kernel, "disk-iflush", scratch_device(tmp_path / "dev2"), "nosync",
                    integrated_flush=True, flush_delay=0.2),
        *(core_mirror(kernel, f"more-{n}", "nosync") for n in range(7)),
    ]
    workers = {line.split("]")[0] for line in server.log.splitlines()
               if "constructed (" in line}
    assert len(workers) == 3, "the logs should spread over every worker"
    seen = {sent.request_type for sent in kernel.history}
    for mirror in mirrors:
        exercise(mirror, rng)
        mirror.recover()  # GET_RESYNC_WORK, SET_REGION_SYNC, GET_SYNC_COUNT
        assert mirror.in_sync and mirror.log.get_sync_count() == REGIONS
        log_type = mirror.log.ctr_string.split()[1]
        status = mirror.status()
        assert status.endswith("1 core" if log_type == "core" else " A"), status
        # dm-raid1 answers a table status itself; ask the server as a tool would.
        error, table = kernel.consult(mirror.log.uuid, mirror.log.luid,
                                      RequestType.STATUS_TABLE, reply_size=4096)
        assert error == 0 and table.decode().startswith(log_type)
        mirror.verify()
        seen |= {sent.request_type for sent in kernel.history}
    # Integrated flush: marks rode in FLUSHes, never in a MARK_REGION.
    sent = [(r.uuid, r.request_type.name) for r in kernel.history]
    assert ("core-iflush", "FLUSH") in sent and ("core-iflush", "MARK_REGION") not in sent
    assert ("core-nosync", "MARK_REGION") in sent
    # Only clears pending: the kernel's delayed flush comes 3 s (here 0.2 s) later.
    iflush = mirrors[2]
    write(iflush, [5])
    iflush.update_states()
    assert iflush.log.delayed_flush_scheduled
    time.sleep(0.5)
    assert not iflush.log.delayed_flush_scheduled
    for mirror in mirrors:
        mirror.suspend()
        mirror.resume()
        exercise(mirror, rng, rounds=2)
        mirror.destroy()
        seen |= {sent.request_type for sent in kernel.history}
    assert seen == set(RequestType)
    assert not list(server.state_dir.glob("logs/*"))  # every DTR removed its files


def test_a_reload_keeps_two_live_instances_apart(server, kernel, tmp_path):
    device = scratch_device(tmp_path / "dev")
    old = disk_mirror(kernel, "reloaded", device, "nosync")
    exercise(old, random.Random(2))
    write(old, [7, 8], complete=False)  # writes in flight: the suspend drains them
    # A leg write failed in region 9 (what dm-raid1 reports with SET_REGION_SYNC(r, 0)).
    error, _ = kernel.consult("reloaded", old.log.luid, RequestType.SET_REGION_SYNC,
                              protocol.pack_set_region_sync(9, False))
    assert error == 0
    new = old.reload("disk", [str(device), str(REGION_SECTORS)])
    assert new.log.luid != old.log.luid
    # The new instance read the device after the old one's last commit: region 9 is
    # still to be resynced, everything else is clean and in sync.
    assert new.log.in_sync(9) == 0 and new.log.is_clean(9) == 0
    assert new.log.get_sync_count() == REGIONS - 1
    new.verify()
    state = server.state_dir
    assert not instance_file_path(state, "reloaded", old.log.luid).exists()  # its DTR
    assert records.load(state, "reloaded", new.log.luid) is not None
    # A core log's reload starts over, like the kernel's: a new leg may be there.
    core = core_mirror(kernel, "core-reloaded", "nosync")
    write(core, [3])
    fresh = core.reload("core", [str(REGION_SECTORS)])
    assert fresh.log.get_sync_count() == 0
    fresh.recover()
    assert fresh.in_sync
    fresh.destroy()
    assert not list(state.glob("logs/core-reloaded@*"))


# -- faults -----------------------------------------------------------------------------------


class Writers:
    """Mirrors written to by threads (one per mirror, like kmirrord) until stopped."""

    def __init__(self, mirrors: list[Mirror]):
        self.mirrors = mirrors
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.rounds = [0] * len(mirrors)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(len(mirrors))]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        mirror = self.mirrors[index]
        try:
            while not self.stop.is_set():
                write(mirror, rng.sample(range(REGIONS), rng.choice((1, 2, 33))),
                      complete=False)
                if rng.random() < 0.7:
                    mirror.complete_writes()
                    mirror.update_states()
                self.rounds[index] += 1
        except BaseException as exc:  # surfaced by finish()
            self.errors.append(exc)

    def wait_for_rounds(self, rounds: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        start = list(self.rounds)
        while any(now - then < rounds for now, then in zip(self.rounds, start, strict=True)):
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"writers stalled: {self.rounds}"
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors
        for mirror in self.mirrors:
            mirror.verify()
            mirror.complete_writes()
            mirror.update_states()
            mirror.verify()


def test_a_worker_killed_under_load_loses_nothing(server, kernel):
    mirrors = [core_mirror(kernel, f"load-{n}", "nosync") for n in range(9)]
    writers = Writers(mirrors)
    writers.wait_for_rounds(20)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    writers.wait_for_rounds(20)  # every mirror goes on: the other workers never stopped
    writers.finish()
    for mirror in mirrors:  # no resync was forced
        assert mirror.log.get_sync_count() == REGIONS
    metrics = server.metrics()
    assert metrics["shardlog_worker_restarts_total"] == 1
    assert metrics["shardlog_workers_up"] == 3
    assert kernel.stats.timeouts == 0  # no request was left unanswered
    # Every -EAGAIN the kernel took was re-sent, and recognised as a re-send.  The front
    # may have answered one more: a reply that had left as the worker died, not yet noted
    # in its ring (inflight.py), which the kernel, no longer waiting, ignores.
    eagain = metrics["shardlog_eagain_replies_total"]
    assert kernel.stats.eagain_resends <= eagain <= kernel.stats.eagain_resends + 1
    # A re-send is recognised by its bytes (all but the seqs), so that one extra -EAGAIN's
    # request, if the same request is sent again (the next IN_SYNC of a region), is
    # counted as re-sent too: never more re-sends than -EAGAIN answers.
    resent = metrics["shardlog_resent_requests_total"]
    assert kernel.stats.eagain_resends <= resent <= eagain
    if eagain == kernel.stats.eagain_resends:
        assert resent == kernel.stats.eagain_resends
    assert sum(value for name, value in metrics.items()
               if name.startswith("shardlog_requests_total{")
               and 'result="eagain"' in name) == eagain


def test_the_server_killed_under_load_and_restarted_loses_nothing(server, kernel, tmp_path):
    mirrors = [core_mirror(kernel, f"load-{n}", "nosync") for n in range(4)]
    mirrors += [disk_mirror(kernel, f"disk-{n}", scratch_device(tmp_path / f"dev{n}"),
                            "nosync") for n in range(2)]
    writers = Writers(mirrors)
    writers.wait_for_rounds(20)
    server.kill()  # the front and every worker, mid-request
    time.sleep(0.3)  # the kernel finds no server: -ESRCH, its reconnect loop
    server.start()
    writers.wait_for_rounds(20)
    writers.finish()
    assert "restored from its CTR record" in server.log or kernel.stats.reconnects
    for mirror in mirrors:  # and no resync was forced: every region is still in sync
        assert mirror.log.get_sync_count() == REGIONS


def test_a_full_state_dir_fails_new_logs_and_spares_the_others(tmp_path, kernel):
    state = tmp_path / "state"
    with small_tmpfs(state, "512k"):
        server = ServerProcess(state, workers=2, run_dir=tmp_path).start()
        try:
            first = core_mirror(kernel, "first", "nosync")
            filler = state / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                           capture_output=True)
            with pytest.raises(LogConstructError) as refused:
                Mirror.create(kernel, "second", "core", ["8", "nosync"], 1 << 22)
            assert refused.value.errno == -errno.ENOSPC
            exercise(first, random.Random(3))  # its pages were allocated at its CTR
            filler.unlink()
            core_mirror(kernel, "second", "nosync").verify()
        finally:
            server.close()


def test_a_read_only_state_dir_fails_new_logs_clearly(tmp_path, kernel):
    state = tmp_path / "state"
    with small_tmpfs(state, "1m"):
        (state / "logs").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        server = ServerProcess(state, workers=2, run_dir=tmp_path).start()
        try:
            with pytest.raises(LogConstructError) as refused:
                core_mirror(kernel, "refused")
            assert refused.value.errno == -errno.EROFS
            assert "Read-only file system" in server.log
            assert server.process.poll() is None
        finally:
            server.close()


def test_a_log_device_that_goes_away_fails_flushes_and_spares_other_logs(
        server, kernel, loop_device):
    lost = disk_mirror(kernel, "lost", loop_device, "nosync")
    other = core_mirror(kernel, "other", "nosync")
    write(lost, [1, 2], complete=False)  # acknowledged: marked durably on the device
    # The device's capacity drops to nothing (its backing file truncated, then resized).
    backing = subprocess.run(["losetup", "--noheadings", "--output", "BACK-FILE",
                              str(loop_device)], capture_output=True, text=True).stdout
    os.truncate(backing.strip(), 0)
    subprocess.run(["losetup", "--set-capacity", str(loop_device)], check=True)
    write(lost, [9])  # a new mark cannot be made durable: the FLUSH fails
    assert lost.log_failure
    assert lost.log.status_info().split()[-1] in ("D", "F")
    lost.verify()  # what was acknowledged before still stands
    exercise(other, random.Random(4))


class small_tmpfs:
    """A tmpfs of ``size`` mounted at ``path`` for the duration of a with-block."""

    def __init__(self, path: Path, size: str):
        self.path, self.size = path, size

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                        str(self.path)], check=True)
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], check=False)
