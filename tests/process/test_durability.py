"""A FLUSH reply means every mark is durable.

Two kinds of proof:

- the syncs themselves: for a log device, spies on ``os.pwritev`` and ``os.fdatasync``
  show each mark written and then flushed before the reply; a FLUSH with nothing new
  syncs nothing (both in process: tests/unit/log/test_durability.py).  A core log syncs
  nothing at all (design.md): the kernel's own dirty flag of the page holding a mark
  (``/proc/self/pagemap`` + ``/proc/kpageflags``, root only) is still set when the FLUSH
  is answered, and the file already holds the mark;
- a process killed for real: a child serves one log through the real codec and log table
  and reports each FLUSH it answered; the parent SIGKILLs it while it keeps marking, then
  reads the instance file or log device as a restarted server would
  (``crashload.dirty_regions``, storage's image reader), and a restarted server continues
  from it.  The same check at scale, a whole `shardlog serve` SIGKILLed at random
  moments under load, is ``scripts/crash_durability.py`` (a short run at the end here).
  (A SIGKILL leaves the page cache, so this shows what a restarted server reads; that it
  reached stable storage is what the spies show.)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardlog.harness.kernelsim.crashload import dirty_regions
from shardlog.log.logtable import LogTable
from shardlog.storage import records
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import PROJECT, Kernel, requires_root
from ..unit.log.test_durability import REGIONS

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from shardlog.wire import protocol
    from shardlog.log.logtable import LogTable
    from shardlog.wire.protocol import RequestType as T

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


@pytest.mark.parametrize("integrated", [False, True], ids=["mark+flush", "integrated"])
def test_a_killed_core_log_server_loses_no_acknowledged_mark(state_dir, integrated):
    ctr = f"{REGIONS * 8} core 8 nosync"
    acknowledged = serve_and_kill(state_dir, ctr, integrated, acks_before_kill=300)
    assert acknowledged <= dirty_regions(instance_file_path(state_dir, "durable", 7))
    assert acknowledged
    # A restarted server continues where the dead one stopped: the marks stand, and the
    # regions are still in sync, as the kernel believes.  It restores the log from its CTR
    # record at the first request ...
    kernel = Kernel(LogTable(state_dir), uuid="durable", luid=7)
    assert kernel.sync_count() == REGIONS
    log = kernel.table.logs[("durable", 7)]
    assert not any(log.region_map.clean_bits[region] for region in acknowledged)
    kernel.table.close()
    # ... and without the record, the kernel's own reconnect brings back the same.
    records.record_path(state_dir, "durable", 7).unlink()
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
    # The device itself, read with O_DIRECT (bypassing the page cache) as the kernel's
    # disk log would read it.
    assert acknowledged and acknowledged <= dirty_regions(loop_device)


# -- the syncs, watched ------------------------------------------------------------------------


def page_dirty_in_the_page_cache(mapping: mmap.mmap, offset: int) -> bool:
    """The kernel's PG_dirty for the page of ``mapping`` at ``offset``: set from a store
    until the page is written back (msync), whatever Python-level code claims."""
    requires_root("reading /proc/kpageflags")
    anchor = ctypes.c_char.from_buffer(mapping, offset)
    address = ctypes.addressof(anchor)
    del anchor  # release the export at once
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // mmap.PAGESIZE * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    assert entry >> 63 & 1, "page not present"
    with open("/proc/kpageflags", "rb") as f:
        f.seek((entry & ((1 << 55) - 1)) * 8)
        (flags,) = struct.unpack("<Q", f.read(8))
    return bool(flags >> KPF_DIRTY & 1)


KPF_DIRTY = 4


def test_a_core_flush_writes_nothing_back_and_its_marks_are_in_the_file_at_once(
        kernel, state_dir):
    """A core log's FLUSH makes no syscall (design.md: its file is read back only by a
    server restarted under a live kernel, which finds the marks in the page cache): the
    marked page is still dirty in the page cache after the reply, and the file, read as a
    restarted server reads it, already holds the mark."""
    regions = 8 * 4096 * 3  # a bitmap over several pages
    kernel.ctr(f"{regions * 8} core 8 nosync")
    kernel.ok(T.RESUME)
    mapping = kernel.table.logs[(kernel.uuid, kernel.luid)].region_map._buffer
    path = instance_file_path(state_dir, kernel.uuid, kernel.luid)
    for marks, integrated in (([5, 40000], False), ([regions - 1], True), ([7, 90000], True)):
        if integrated:
            kernel.ok(T.FLUSH, protocol.pack_regions(marks))
        else:
            kernel.ok(T.MARK_REGION, protocol.pack_regions(marks))
            kernel.ok(T.FLUSH)
        image = path.read_bytes()
        for region in marks:
            assert page_dirty_in_the_page_cache(mapping, BITMAP_OFFSET + region // 8)
            assert not image[BITMAP_OFFSET + region // 8] >> (region & 7) & 1  # marked


# -- the whole server, killed at random moments under load --------------------------------------


def test_a_short_crash_durability_run_keeps_every_acknowledged_mark(tmp_path):
    requires_root("the crash durability script (a private network namespace)")
    result = subprocess.run(
        [sys.executable, PROJECT / "scripts" / "crash_durability.py",
         "--kills", "3", "--logs", "4", "--max-load-seconds", "0.5",
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith("3 SIGKILLs of the whole server") and "; 0 problems" in summary
    acknowledged = int(summary.split(" marks acknowledged")[0].split()[-1].replace(",", ""))
    assert acknowledged > 0
