"""Replays of the requests a real 6.1 kernel sent, through the real codec and log table.

The captures were answered by a minimal responder, so the kernel's sequence is real but
its answers are not a reference: each test checks the answers a correct log must give.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.log.logtable import LogTable
from shardlog.storage.layout import BITMAP_OFFSET
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import Request, RequestType

from ...conftest import DISKLOG_IMAGES, SCENARIOS, load_capture

REGIONS = 128


def replay(
    table: LogTable, scenario: str, ctr_string: str | None = None
) -> Iterator[tuple[Request, int, bytes]]:
    """Each captured request, decoded and answered; ``ctr_string`` replaces the CTR's."""
    for record in load_capture(scenario):
        request = protocol.decode_datagram(bytes.fromhex(record["raw_hex"]))
        if request.request_type is RequestType.CTR and ctr_string is not None:
            raw = protocol.encode_request(
                RequestType.CTR, seq=request.seq, uuid=request.uuid, luid=request.luid,
                data=ctr_string.encode(), version=request.version,
            )
            request = protocol.decode_datagram(raw)
        reply = protocol.decode_reply(table.answer(request))
        assert reply.seq == request.seq
        yield request, reply.error, reply.data


def dirty_regions_stored(path: Path) -> list[int]:
    """Dirty regions, read from the file the way a restarted server would."""
    bitmap = path.read_bytes()[BITMAP_OFFSET : BITMAP_OFFSET + REGIONS // 8]
    return [r for r in range(REGIONS) if not bitmap[r >> 3] >> (r & 7) & 1]


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "badcount"])
def test_every_captured_request_gets_an_exact_size_answer(table, tmp_path, scenario):
    ctr_string = None
    if scenario == "disklog":
        # Never the captured "7:2": on this host that may be somebody's loop device.
        ctr_string = f"131072 disk {kernel_disk_log(tmp_path)} 1024"
    for request, error, data in replay(table, scenario, ctr_string):
        assert error == 0, f"{request.name} #{request.seq}: {error}"
        size = protocol.REPLY_SIZES[request.request_type]
        if size is not None:
            assert len(data) == size, request.name


def kernel_disk_log(tmp_path: Path) -> Path:
    """A 4 MiB log device file holding the kernel's all-in-sync image."""
    device = tmp_path / "logdev"
    device.write_bytes((DISKLOG_IMAGES / "disklog-insync.bin").read_bytes())
    with open(device, "r+b") as f:
        f.truncate(4 << 20)
    return device


def test_plain_core_log_starts_out_of_sync_like_the_kernels(table, state_dir):
    answers = list(replay(table, "plain"))
    in_sync = {struct.unpack("=q", d)[0] for r, _, d in answers if r.name == "IN_SYNC"}
    assert in_sync == {0}  # no nosync: a fresh core log has every region out of sync
    counts = [struct.unpack("=Q", d)[0] for r, _, d in answers if r.name == "GET_SYNC_COUNT"]
    assert counts == [0, 0, 0]
    statuses = {d for r, _, d in answers if r.name == "STATUS_INFO"}
    assert statuses == {b"1 core\0"}
    assert table.logs == {}  # DTR forgot it
    assert list((state_dir / "logs").iterdir()) == []  # and its instance file


@pytest.mark.parametrize("scenario", ["plain", "iflush"])
def test_every_acknowledged_flush_leaves_its_marks_in_the_instance_file(table, state_dir, scenario):
    """A nosync log, so that marks show: after each FLUSH reply, every region marked
    and not cleared since is dirty in the instance file as a restarted server would read it."""
    marked: set[int] = set()
    path = None
    checked = 0
    for request, error, _ in replay(table, scenario, ctr_string="131072 core 1024 nosync"):
        assert error == 0
        if request.request_type is RequestType.CTR:
            path = instance_file_path(state_dir, request.uuid, request.luid)
        if request.request_type in (RequestType.MARK_REGION, RequestType.FLUSH):
            marked.update(request.regions)
        elif request.request_type is RequestType.CLEAR_REGION:
            marked.difference_update(request.regions)
        if request.request_type is RequestType.FLUSH and marked:
            assert set(dirty_regions_stored(path)) >= marked
            checked += 1
        if request.request_type is RequestType.POSTSUSPEND:
            assert dirty_regions_stored(path) == []  # every write completed and was cleared
    assert checked >= 100  # one per captured write


def test_resync_hands_out_every_region_once_in_order(table):
    work, counts, sets = [], [], []
    for request, error, data in replay(table, "resync"):
        assert error == 0
        if request.request_type is RequestType.GET_RESYNC_WORK:
            work.append(struct.unpack("=qQ", data))
        elif request.request_type is RequestType.GET_SYNC_COUNT:
            counts.append(struct.unpack("=Q", data)[0])
        elif request.request_type is RequestType.SET_REGION_SYNC:
            sets.append(request.regions[0])
        elif request.request_type is RequestType.IS_REMOTE_RECOVERING:
            # Work is left, so the hint stays just below region_count: the kernel keeps
            # asking for resync work and does not hold writes back (dirtylog.in_sync_hint).
            assert struct.unpack("=qQ", data) == (0, REGIONS - 1)
    assigned = [region for flag, region in work if flag == 1]
    assert assigned == list(range(REGIONS))
    assert work[len(assigned):] == [(0, 0), (0, 0)]  # done, and again after the resume
    assert counts == sorted(counts) and counts[-1] == REGIONS
    assert sets == list(range(REGIONS))


def test_disk_log_carries_the_kernels_bits_and_writes_its_layout(table, tmp_path):
    device = kernel_disk_log(tmp_path)
    seen_dirty = False
    for request, error, data in replay(table, "disklog", ctr_string=f"131072 disk {device} 1024"):
        assert error == 0, request.name
        if request.request_type is RequestType.IN_SYNC:
            assert data == struct.pack("=q", 1)  # the kernel's log said: all in sync
        if request.request_type is RequestType.FLUSH:
            seen_dirty |= bool(dirty_regions_stored(device))
        if request.request_type is RequestType.STATUS_INFO:
            assert data == b"3 disk 0:0 A\0"  # a regular file: no major:minor
    assert seen_dirty
    # Removed cleanly: the device holds the kernel's own all-clean image again.
    assert device.read_bytes()[:8192] == (DISKLOG_IMAGES / "disklog-after-remove.bin").read_bytes()


def test_badcount_ctr_is_refused_and_the_rest_answered_esrch(table):
    answers = [(r.name, e) for r, e, _ in replay(table, "badcount")]
    assert answers == [("CTR", -22), ("GET_REGION_SIZE", -3), ("DTR", -3)]
