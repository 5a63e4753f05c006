"""A FLUSH reply means every mark is durable: SIGKILL right after one and read back.

A child process serves one log through the real codec and log table and reports each
FLUSH it has answered; the parent kills it with SIGKILL while it keeps marking, then reads
the instance file or log device as a restarted server would.  Every acknowledged mark must be
there, and a restarted server must see those regions as out of sync.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardlog import protocol
from shardlog.logtable import LogTable
from shardlog.protocol import RequestType as T
from shardlog.regionmap import BITMAP_OFFSET, instance_file_path

from .conftest import Kernel

REGIONS = 4096
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from shardlog import protocol
    from shardlog.logtable import LogTable
    from shardlog.protocol import RequestType as T

    state_dir, ctr, integrated = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    table = LogTable(state_dir)
    seq = 0

    def ask(request_type, data=b""):
        global seq
        seq += 1
        raw = protocol.encode_request(request_type, seq=seq, uuid="durable", luid=7, data=data)
        reply = protocol.decode_reply(table.answer(protocol.decode_datagram(raw)))
        assert reply.error == 0, (request_type, reply.error)

    ask(T.CTR, ctr.encode())
    ask(T.RESUME)
    print("ready", flush=True)
    region = 0
    while True:
        # Spread the marks so that they land on every page of the bitmap.
        regions = [(region * 37 + i * 997) % {regions} for i in range(3)]
        if integrated:
            ask(T.FLUSH, protocol.pack_regions(regions))
        else:
            ask(T.MARK_REGION, protocol.pack_regions(regions))
            ask(T.FLUSH)
        print(*regions, flush=True)  # the FLUSH was answered: these marks are promised
        region += 1
    """
).format(regions=REGIONS)


def serve_and_kill(state_dir: Path, ctr: str, integrated: bool, acks_before_kill: int) -> set:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir), ctr, "1" if integrated else "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"
        acknowledged: set[int] = set()
        for _ in range(acks_before_kill):
            acknowledged.update(int(r) for r in child.stdout.readline().split())
        os.kill(child.pid, signal.SIGKILL)  # while it is busy marking more
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return acknowledged


def dirty_regions(image: bytes) -> set[int]:
    bitmap = image[BITMAP_OFFSET : BITMAP_OFFSET + REGIONS // 8]
    return {r for r in range(REGIONS) if not bitmap[r >> 3] >> (r & 7) & 1}


@pytest.mark.parametrize("integrated", [False, True], ids=["mark+flush", "integrated"])
def test_a_killed_core_log_server_loses_no_acknowledged_mark(state_dir, integrated):
    ctr = f"{REGIONS * 8} core 8 nosync"
    acknowledged = serve_and_kill(state_dir, ctr, integrated, acks_before_kill=300)
    image = instance_file_path(state_dir, "durable", 7).read_bytes()
    assert acknowledged and acknowledged <= dirty_regions(image)
    # A restarted server, through the kernel's reconnect, continues where the dead one
    # stopped: the marks stand, and the regions are still in sync, as the kernel believes.
    kernel = Kernel(LogTable(state_dir), uuid="durable", luid=7)
    assert kernel.send(T.GET_SYNC_COUNT) == (-errno.ESRCH, b"")
    assert kernel.ctr(ctr, reconnect=True) == (0, b"")
    kernel.ok(T.RESUME)
    log = kernel.table.logs[("durable", 7)]
    assert not any(log.region_map.clean_bits[region] for region in acknowledged)
    assert kernel.sync_count() == REGIONS


def test_a_killed_disk_log_server_loses_no_acknowledged_mark(state_dir, loop_device):
    ctr = f"{REGIONS * 8} disk {loop_device} 8 nosync"
    acknowledged = serve_and_kill(state_dir, ctr, True, acks_before_kill=300)
    # Read the device itself, bypassing the page cache, as the kernel's disk log would.
    import mmap

    buffer = mmap.mmap(-1, 8192)
    fd = os.open(loop_device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buffer], 0)
    finally:
        os.close(fd)
    assert acknowledged and acknowledged <= dirty_regions(bytes(buffer))


def test_a_flush_that_changed_nothing_does_not_sync(kernel, state_dir):
    kernel.ctr("131072 core 1024 nosync")
    kernel.ok(T.RESUME)
    log = kernel.table.logs[(kernel.uuid, kernel.luid)]
    before = log.region_map.commits
    kernel.ok(T.FLUSH)
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([1]))  # clean already: no change
    kernel.ok(T.FLUSH)
    assert log.region_map.commits == before
    kernel.ok(T.FLUSH, protocol.pack_regions([1]))
    assert log.region_map.commits == before + 1
    kernel.ok(T.CLEAR_REGION, protocol.pack_regions([1]))
    kernel.ok(T.FLUSH)  # only a clear: committed lazily
    assert log.region_map.commits == before + 1
    kernel.ok(T.POSTSUSPEND)  # but written at suspend
    assert log.region_map.commits == before + 2
