"""The real kernel while shardlog is taken over (handover.py): mirrors of every kind keep
writing, and the kernel never learns that the server changed."""

from __future__ import annotations

import fcntl
import itertools
import socket
import struct
import sys
import time
import urllib.request

from shardlog.harness.kernelvm import guest
from shardlog.harness.kernelvm.guest import WriteLoop
from shardlog.observability.metrics import free_local_port, parse_samples

from .conftest import Rig

LEG_SECTORS = 4096  # 2 MiB legs of 32 regions of 64 KiB
REGION_SECTORS = 128
REGIONS = LEG_SECTORS // REGION_SECTORS


def longest_gap(writer: WriteLoop, start: float, end: float) -> float:
    """The longest time one write took, among those that completed in [start, end] (a
    writer writes one block at a time: a write takes from the previous completion)."""
    times = [t for t, _offset in writer.completed]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)
            if start <= later <= end]
    return max(gaps, default=0.0)


def loopback_up() -> None:
    """The guest's init leaves ``lo`` down; the metrics endpoint listens on it."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    ifreq = struct.Struct("16sH14x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _name, flags = ifreq.unpack(fcntl.ioctl(sock, siocgifflags, ifreq.pack(b"lo", 0)))
        fcntl.ioctl(sock, siocsifflags, ifreq.pack(b"lo", flags | iff_up))


def metric(port: int, name: str) -> float:
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
    return parse_samples(page.decode()).get(name, 0.0)


def test_a_take_over_under_writes_costs_no_io_error_no_resync_and_no_reconnect(rig: Rig):
    # A server of its own, with metrics: its reconnect CTR counter is what is asserted.
    rig.shared.close()
    loopback_up()
    port = free_local_port()
    server = guest.start_server(rig.state_dir, 2,
                                extra=("--metrics-addr", f"127.0.0.1:{port}"))
    rig.shared.server, rig.shared.workers = server, 2
    rig.server = server
    before = guest.kernel_log()
    kinds = [("core", False), ("disk", False), ("core", True)]  # (log, integrated flush)
    backing = rig.legs(size=len(kinds) * LEG_SECTORS * guest.SECTOR)
    legs = {f"to{i}-leg{side}": f"0 {LEG_SECTORS} linear {loop.path} {i * LEG_SECTORS}"
            for i in range(len(kinds)) for side, loop in enumerate(backing)}
    guest.create_devices(legs)
    rig.cleanup.append(lambda: guest.dmsetup("remove", "--force", *legs, check=False))
    mirrors = []
    for i, (log, integrated) in enumerate(kinds):
        log_device = str(rig.loop(1 << 20).path) if log == "disk" else None
        mirrors.append(rig.mirror(f"m-to{i}", guest.mirror_table(
            LEG_SECTORS, [f"/dev/mapper/to{i}-leg{side}" for side in (0, 1)], log=log,
            log_device=log_device, region_sectors=REGION_SECTORS, nosync=True,
            uuid=f"uuid-takeover-{i}", integrated_flush=integrated)))
    writers = [WriteLoop(m.path, LEG_SECTORS * guest.SECTOR, stride=37).start()
               for m in mirrors]
    deadline = time.monotonic() + 120
    while min(w.written for w in writers) < 5:
        assert time.monotonic() < deadline, "the mirrors do not write"
        time.sleep(0.05)

    started = time.monotonic()
    successor = server.take_over(timeout=guest.SERVER_START_TIMEOUT)
    rig.shared.server = rig.server = successor
    assert server.process.wait(120) == 0  # the old front exits 0 once the new one serves
    ended = time.monotonic()
    guest.wait_for_writes(writers, 10, 120, "after the take-over")
    for writer in writers:
        assert writer.stop(120).errors == []
    worst = max(longest_gap(w, started, time.monotonic()) for w in writers)
    ordinary = max(longest_gap(w, 0.0, started) for w in writers)
    print(f"\ntake-over in {ended - started:.1f} s (a Python start under emulation "
          f"included); longest write during it {worst * 1e3:.0f} ms, before it "
          f"{ordinary * 1e3:.0f} ms", file=sys.stderr)

    for mirror in mirrors:  # no resync
        status = mirror.status()
        assert (status.in_sync, status.regions) == (REGIONS, REGIONS), mirror.name
    # The kernel never missed the server: no request timed out, none found no server, so
    # no reconnect; and shardlog counted no reconnect CTR, its logs were restored.
    kernel = guest.kernel_log()[len(before):]
    for sign in ("retrying", "not found", "Attempting to contact", "Reconnected"):
        assert sign not in kernel, kernel
    assert metric(port, "shardlog_reconnect_ctrs_total") == 0
    assert metric(port, "shardlog_logs_restored_total") >= len(mirrors)
    assert "restored from its CTR record" in successor.log
    for mirror in mirrors:
        mirror.remove()
    assert guest.differing_chunks(backing[0].path, backing[1].path) == []
