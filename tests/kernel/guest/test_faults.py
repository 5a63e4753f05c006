"""The real kernel against shardlog under faults and change: a server SIGKILLed mid-write,
table reloads under I/O, a mirror moved between the in-kernel disk log and shardlog's,
many mirrors at once, and a forged request from an unprivileged process."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from pathlib import Path

from shardlog.harness.kernelvm import guest
from shardlog.harness.kernelvm.guest import LogImage, WriteLoop, direct_read, direct_write
from shardlog.server.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.server.routing import shard_of_uuid
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from .conftest import LEG_SIZE, REGION_SECTORS, SECTORS, Rig, recording

REGIONS = SECTORS // REGION_SECTORS
REGION_BYTES = REGION_SECTORS * guest.SECTOR
WRITE_DELAY_MS = 2000


def delayed(rig: Rig, name: str, loop: guest.Loop, write_delay_ms: int) -> str:
    """A dm-delay device over ``loop`` whose writes take ``write_delay_ms`` longer."""
    table = f"0 {SECTORS} delay {loop.path} 0 0 {loop.path} 0 {write_delay_ms}"
    guest.dmsetup("create", name, "--table", table)
    rig.cleanup.append(lambda: guest.dmsetup("remove", "--force", name, check=False))
    return f"/dev/mapper/{name}"


def test_sigkill_of_the_whole_server_during_writes_costs_no_io_error_and_no_resync(rig):
    server = rig.start_server()
    before = guest.kernel_log()
    loops = rig.legs()
    # Slow legs hold each write in flight 2 s after its mark was flushed.  dm-raid1
    # handles the writers' writes in batches (marks, one FLUSH, data); a kill 1 s after a
    # batch completed lands while the next batch's data is being written: its marks were
    # answered, its writes complete with no server.
    legs = [delayed(rig, f"slow{i}", loop, WRITE_DELAY_MS) for i, loop in enumerate(loops)]
    table = guest.mirror_table(SECTORS, legs, region_sectors=REGION_SECTORS, nosync=True,
                               uuid="uuid-kill")
    mirror = rig.mirror("m-kill", table)
    (instance,) = guest.instance_files(rig.state_dir)
    writers = [WriteLoop(mirror.path, LEG_SIZE, count=3, first_block=i * 997).start()
               for i in range(4)]
    deadline = time.monotonic() + 60
    while not any(w.completed for w in writers) and time.monotonic() < deadline:
        time.sleep(0.05)
    batch_done = max(t for w in writers for t, _ in w.completed)
    time.sleep(max(0.0, batch_done + 1.0 - time.monotonic()))
    server.kill()  # front and workers at once
    killed_at = time.monotonic()
    time.sleep(WRITE_DELAY_MS / 1000 + 0.5)
    on_disk = LogImage.of_file(instance)  # nothing can change it now: no server
    snapshot_at = time.monotonic()
    # A write that completed while no server ran had its region marked, and the mark
    # flushed, before the kill; its clear cannot have been committed since.
    marked = {offset // REGION_BYTES for w in writers for t, offset in w.completed
              if killed_at < t < snapshot_at}
    assert marked, "no write completed while the server was dead: the test proved nothing"
    assert on_disk.valid
    assert not marked & on_disk.clean, f"marked before the crash but clean on disk: " \
                                       f"{sorted(marked & on_disk.clean)}"

    rig.start_server()
    with recording("reconnect"):  # the kernel's CTR (with its NUL), RESUME, retries
        for writer in writers:
            writer.join(180)
    for writer in writers:
        assert writer.errors == []
        assert writer.written == 3
    status = mirror.status()
    assert (status.in_sync, status.regions) == (REGIONS, REGIONS)  # no resync
    # The kernel did see it gone: a request it sent was lost with the server (re-sent
    # after its 15 s timeout), or found no server (then it reconnected).
    kernel = guest.kernel_log()[len(before):]
    assert "retrying" in kernel or "not found" in kernel, kernel
    mirror.remove()
    assert guest.differing_chunks(loops[0].path, loops[1].path) == []


def test_table_reload_under_io_carries_a_disk_logs_state_to_the_new_instance(rig):
    rig.start_server()
    legs = rig.legs()
    log_device = rig.loop(1 << 20)

    def table(nosync: bool) -> str:
        return guest.mirror_table(SECTORS, [str(leg.path) for leg in legs], log="disk",
                                  log_device=log_device.number,
                                  region_sectors=REGION_SECTORS, nosync=nosync,
                                  uuid="uuid-reload")

    mirror = rig.mirror("m-reload", table(nosync=True))
    (old_instance,) = guest.instance_files(rig.state_dir)
    writes = WriteLoop(mirror.path, LEG_SIZE).start()
    for attempt in range(3):
        time.sleep(0.5)
        # Without nosync: only the log device's bits can put the new instance in sync.
        with recording("reload") if attempt == 0 else contextlib.nullcontext():
            mirror.reload(table(nosync=False))
        status = mirror.status()
        assert (status.in_sync, status.regions) == (REGIONS, REGIONS)
    writes.stop()
    assert writes.errors == []
    assert writes.written > 0
    (new_instance,) = guest.instance_files(rig.state_dir)
    assert new_instance != old_instance  # a new luid, the same uuid
    assert new_instance.name.split("@")[0] == old_instance.name.split("@")[0]
    mirror.remove()
    assert guest.differing_chunks(legs[0].path, legs[1].path) == []


def test_a_mirror_moves_between_the_kernels_disk_log_and_shardlogs_without_resync(rig):
    rig.start_server()
    legs = rig.legs()
    log_device = rig.loop(1 << 20)
    paths = [str(leg.path) for leg in legs]

    def table(userspace: bool) -> str:
        return guest.mirror_table(SECTORS, paths, log="disk", log_device=log_device.number,
                                  region_sectors=REGION_SECTORS,
                                  uuid="uuid-move" if userspace else None)

    mirror = rig.mirror("m-move", table(userspace=False))
    mirror.wait_synced()  # the kernel's own resync, with its own log
    # A mark only a resync would erase: leg 1 differs from leg 0 in one region, behind
    # the mirror's back.  Every region is clean, so no one may copy it.
    witness_offset = 5 * REGION_BYTES
    witness = (b"only-on-leg-1;" * 300)[:4096]
    direct_write(legs[1].path, witness_offset, witness)
    for userspace in (True, False, True):
        direct_write(mirror.path, 9 * REGION_BYTES, os.urandom(4096))
        mirror.reload(table(userspace))
        status = mirror.status()
        assert (status.in_sync, status.regions) == (REGIONS, REGIONS), userspace
        assert ("userspace" in mirror.kernel_table()) == userspace
        time.sleep(0.5)  # a resync, if one were started, would copy regions now
    assert direct_read(legs[1].path, witness_offset, 4096) == witness  # never resynced
    mirror.remove()


def small_mirrors(rig: Rig, prefix: str, uuids: list[str],
                  leg_sectors: int) -> tuple[list[guest.Mirror], list[guest.Loop]]:
    """A mirror per uuid (``nosync``, 64 KiB regions, every other one with
    integrated_flush), its legs linear slices of two shared backing loop devices, which
    are returned too: after the mirrors are gone, identical backings mean identical
    legs."""
    count = len(uuids)
    backing = rig.legs(size=count * leg_sectors * guest.SECTOR)
    legs = {f"{prefix}{i}-leg{side}": f"0 {leg_sectors} linear {loop.path} {i * leg_sectors}"
            for i in range(count) for side, loop in enumerate(backing)}
    guest.create_devices(legs)
    rig.cleanup.append(lambda: guest.dmsetup("remove", "--force", *legs, check=False))
    mirrors = [rig.mirror(f"m-{prefix}{i}", guest.mirror_table(
        leg_sectors, [f"/dev/mapper/{prefix}{i}-leg{side}" for side in (0, 1)],
        region_sectors=128, nosync=True, uuid=uuid, integrated_flush=i % 2 == 0))
        for i, uuid in enumerate(uuids)]
    return mirrors, backing


def test_many_mirrors_at_once_spread_over_the_workers(rig):
    server = rig.start_server(workers=3)
    count, leg_sectors = 32, 2048  # 1 MiB legs of 16 regions of 64 KiB
    mirrors, backing = small_mirrors(rig, "many", [f"uuid-many-{i}" for i in range(count)],
                                     leg_sectors)
    # Every worker holds some of the logs: their instance files are mapped in it.
    holders = [Path(f"/proc/{pid}/maps").read_text().count("/logs/")
               for pid in server.worker_pids()]
    assert len(holders) == 3 and all(holders), holders
    assert sum(holders) == count
    writers = [WriteLoop(m.path, leg_sectors * guest.SECTOR, count=4, stride=37).start()
               for m in mirrors]
    for writer in writers:
        writer.join(240)
        assert writer.errors == []
    for mirror in mirrors:
        status = mirror.status()
        assert (status.in_sync, status.regions) == (16, 16), mirror.name
        assert status.log_status == ["1", "core"]
    for mirror in mirrors:
        mirror.remove()
    assert guest.instance_files(rig.state_dir) == []
    assert guest.differing_chunks(backing[0].path, backing[1].path) == []


def test_a_worker_killed_while_every_shard_writes_costs_no_io_error_and_no_resync(rig):
    """Each worker reads its own shard socket: killing one under writes costs the kernel
    an -EAGAIN for what it held (re-sent at once) and nothing for what waited in its
    socket (its successor answers it); the other shard never stops."""
    workers = 2
    server = rig.start_server(workers=workers)
    before = guest.kernel_log()
    per_shard, leg_sectors = 2, 4096  # 2 MiB legs of 32 regions of 64 KiB
    uuids = [uuid for shard in range(workers)
             for uuid in [f"uuid-wk-{n}" for n in range(64)
                          if shard_of_uuid(f"uuid-wk-{n}", workers) == shard][:per_shard]]
    mirrors, backing = small_mirrors(rig, "wk", uuids, leg_sectors)
    writers = [WriteLoop(m.path, leg_sectors * guest.SECTOR, stride=37).start()
               for m in mirrors]
    deadline = time.monotonic() + 60
    while min(w.written for w in writers) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    guest.wait_for_writes(writers, 10, 60, "after the worker died")
    for writer in writers:
        assert writer.stop(60).errors == []
    assert f"worker 0 (pid {victim}) died" in server.log
    assert server.process.poll() is None
    assert len(server.worker_pids()) == workers and server.worker_pids()[0] != victim
    for mirror in mirrors:  # no resync
        status = mirror.status()
        assert (status.in_sync, status.regions) == (32, 32), mirror.name
    # Nothing waited for the kernel's 15 s timeout, and no server was missed.
    kernel = guest.kernel_log()[len(before):]
    assert "retrying" not in kernel and "not found" not in kernel, kernel
    for mirror in mirrors:
        mirror.remove()
    assert guest.differing_chunks(backing[0].path, backing[1].path) == []


def forge_as_nobody(uuid: str, luid: int, server_port: int) -> dict[str, str]:
    """From a child that dropped root (uid/gid 65534), a SET_REGION_SYNC that would make
    region 3 out of sync and a DTR of the live log, sent to group 7 (as the kernel
    multicasts), to the server's port, and to the kernel itself; what each send did."""
    forged = {"set_region_sync": protocol.encode_request(
                  T.SET_REGION_SYNC, seq=90001, uuid=uuid, luid=luid,
                  data=protocol.pack_set_region_sync(3, False)),
              "dtr": protocol.encode_request(T.DTR, seq=90002, uuid=uuid, luid=luid)}
    destinations = {"group 7": (0, GROUP_7_MASK), "server": (server_port, 0),
                    "kernel": (0, 0)}
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            outcomes = {}
            sock = open_connector_socket()
            for where, destination in destinations.items():
                for what, datagram in forged.items():
                    try:
                        sock.sendto(datagram, destination)
                        outcomes[f"{what} to {where}"] = "sent"
                    except OSError as exc:
                        outcomes[f"{what} to {where}"] = errno.errorcode[exc.errno]
            os.write(write, json.dumps(outcomes).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as report:
        return json.loads(report.read() or "{}")


def test_a_forged_request_from_an_unprivileged_process_changes_nothing(rig):
    server = rig.start_server()
    legs = rig.legs()
    table = guest.mirror_table(SECTORS, [str(leg.path) for leg in legs],
                               region_sectors=REGION_SECTORS, nosync=True,
                               uuid="uuid-forged")
    mirror = rig.mirror("m-forged", table)
    (instance,) = guest.instance_files(rig.state_dir)
    luid = int(instance.stem.split("@")[1], 16)
    direct_write(mirror.path, 0, b"x" * 4096)
    time.sleep(1.0)  # the kernel clears region 0 again soon after the write: let it
    before = instance.read_bytes()
    # The front's socket is the first the server bound: its port is the front's pid.
    report = forge_as_nobody("uuid-forged", luid, server.process.pid)
    assert len(report) == 6, "the unprivileged child did not get to send"
    time.sleep(0.5)
    assert instance.exists(), report
    assert instance.read_bytes() == before, report
    status = mirror.status()
    assert (status.in_sync, status.regions) == (REGIONS, REGIONS)
    direct_write(mirror.path, 3 * REGION_BYTES, b"y" * 4096)  # region 3 still mirrored
    assert direct_read(legs[1].path, 3 * REGION_BYTES, 4096) == b"y" * 4096
    assert server.process.poll() is None
    mirror.remove()
