"""`shardlog inspect` on the files of a running server and its log device (a loop device,
a private network namespace: root)."""

from __future__ import annotations

from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..harness import RawPeer, ServerProcess
from ..unit.tools.test_inspection import inspect_json


def test_inspect_reads_a_running_servers_files_and_its_log_device(
        tmp_path, private_netns, loop_device):
    server = ServerProcess(tmp_path / "state").start()
    peer = RawPeer()
    try:
        peer.open_log("core-log", "2048 core 8 nosync")
        peer.open_log("disk-log", f"2048 disk {loop_device} 8 nosync")
        for uuid in ("core-log", "disk-log"):
            peer.ok(T.MARK_REGION, protocol.pack_regions([1, 2, 200]), uuid=uuid)
            peer.ok(T.FLUSH, uuid=uuid)
        core = inspect_json(instance_file_path(server.state_dir, "core-log", 1))
        assert core["dirty_ranges"] == [[1, 2], [200, 200]] and core["region_count"] == 256
        # The device itself, with O_DIRECT: what the server wrote, not a stale cache.
        device = inspect_json(loop_device)
        assert device["kind"] == "disk log image" and device["region_count"] == 256
        assert device["dirty_ranges"] == [[1, 2], [200, 200]]
        assert server.stop() == 0
    finally:
        peer.close()
        server.close()
