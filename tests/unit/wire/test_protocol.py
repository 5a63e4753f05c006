"""Tests for the sans-IO dm-log-userspace codec, shardlog/wire/protocol.py.

Ground truth, in order: the datagrams a real 6.1 kernel sent (tests/fixtures/kernel-6.1),
then protocol.md §1-3 (wire format, payloads, §3.18 exact reply sizes).  Reply sizes and
field offsets are written out here independently of the module's own tables, so that a
wrong table in protocol.py makes a test fail instead of agreeing with itself.
"""

from __future__ import annotations

import errno
import json
import struct
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog.wire.protocol import (
    MAX_PAYLOAD,
    REPLY_SIZES,
    SUPPORTED_VERSIONS,
    ProtocolError,
    Reply,
    Request,
    RequestType,
    decode_datagram,
    decode_reply,
    encode_ack,
    encode_reply,
    encode_request,
    pack_bool,
    pack_regions,
    pack_remote_recovering,
    pack_resync_work,
    pack_set_region_sync,
    pack_string,
    pack_u64,
    peek_request,
)

from ...conftest import FIXTURES

RT = RequestType
CAPTURES = sorted(FIXTURES.glob("capture-*.jsonl"))

# --- wire layout, from protocol.md §1.2 (not from the module) ------------------------------

OFF_NLMSG_LEN = 0
OFF_NLMSG_TYPE = 4
OFF_CN_IDX = 16
OFF_CN_VAL = 20
OFF_CN_SEQ = 24
OFF_CN_ACK = 28
OFF_CN_LEN = 32
ULOG = 36  # dm_ulog_request starts here
OFF_LUID = ULOG + 0
OFF_UUID = ULOG + 8
OFF_VERSION = ULOG + 140
OFF_ERROR = ULOG + 144
OFF_SEQ = ULOG + 148
OFF_TYPE = ULOG + 152
OFF_DATA_SIZE = ULOG + 156
DATA = ULOG + 160  # 196
NLMSG_DONE = 3

#: §3.18: the kernel's result buffer for each request type.  None: variable size.
REPLY_SIZE: dict[RequestType, int | None] = {
    RT.CTR: None,
    RT.DTR: 0,
    RT.PRESUSPEND: 0,
    RT.POSTSUSPEND: 0,
    RT.RESUME: 0,
    RT.GET_REGION_SIZE: 8,
    RT.IS_CLEAN: 8,
    RT.IN_SYNC: 8,
    RT.FLUSH: 0,
    RT.MARK_REGION: 0,
    RT.CLEAR_REGION: 0,
    RT.GET_RESYNC_WORK: 16,
    RT.SET_REGION_SYNC: 0,
    RT.GET_SYNC_COUNT: 8,
    RT.STATUS_INFO: None,
    RT.STATUS_TABLE: None,
    RT.IS_REMOTE_RECOVERING: 16,
}
FIXED_REPLY_TYPES = [t for t, size in REPLY_SIZE.items() if size is not None]

NO_PAYLOAD_TYPES = [
    RT.PRESUSPEND,
    RT.POSTSUSPEND,
    RT.RESUME,
    RT.GET_REGION_SIZE,
    RT.GET_RESYNC_WORK,
    RT.GET_SYNC_COUNT,
    RT.STATUS_INFO,
    RT.STATUS_TABLE,
]
ONE_REGION_TYPES = [RT.IS_CLEAN, RT.IN_SYNC, RT.IS_REMOTE_RECOVERING]
REGION_LIST_TYPES = [RT.MARK_REGION, RT.CLEAR_REGION, RT.FLUSH]

#: A well-formed payload for every request type (version 3).
VALID_DATA: dict[RequestType, bytes] = {
    RT.CTR: b"131072 core 1024",
    RT.DTR: b"",
    RT.PRESUSPEND: b"",
    RT.POSTSUSPEND: b"",
    RT.RESUME: b"",
    RT.GET_REGION_SIZE: b"",
    RT.IS_CLEAN: struct.pack("=Q", 5),
    RT.IN_SYNC: struct.pack("=Q", 6),
    RT.FLUSH: struct.pack("=2Q", 7, 8),
    RT.MARK_REGION: struct.pack("=3Q", 1, 2, 3),
    RT.CLEAR_REGION: struct.pack("=Q", 4),
    RT.GET_RESYNC_WORK: b"",
    RT.SET_REGION_SYNC: struct.pack("=Qq", 9, 1),
    RT.GET_SYNC_COUNT: b"",
    RT.STATUS_INFO: b"",
    RT.STATUS_TABLE: b"",
    RT.IS_REMOTE_RECOVERING: struct.pack("=Q", 10),
}

SEQ = 0xC0FFEE
LUID = 0xFF44_0731_D2D8_B400
UUID = "LVM-test-uuid-0001"

type_ids = pytest.mark.parametrize("rtype", list(RT), ids=lambda t: t.name)


# --- helpers -------------------------------------------------------------------------------


@cache
def capture_records(name: str) -> tuple[dict, ...]:
    with open(FIXTURES / name) as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


@cache
def compact_records() -> tuple[dict, ...]:
    return capture_records("fixtures-compact.jsonl")


def all_capture_records() -> list[dict]:
    return [r for path in CAPTURES for r in capture_records(path.name)]


def u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("=I", buf, off)[0]


def with_u32(buf: bytes, off: int, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into("=I", out, off, value)
    return bytes(out)


def with_u16(buf: bytes, off: int, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into("=H", out, off, value)
    return bytes(out)


def request_bytes(
    rtype: RequestType | int,
    data: bytes | None = None,
    *,
    version: int = 3,
    seq: int = SEQ,
    uuid: str | bytes = UUID,
    luid: int = LUID,
) -> bytes:
    if data is None:
        data = VALID_DATA[RT(rtype)]
    return encode_request(rtype, seq=seq, uuid=uuid, luid=luid, data=data, version=version)


def request(rtype: RequestType, data: bytes | None = None, **kw) -> Request:
    return decode_datagram(request_bytes(rtype, data, **kw))


def reject(buf: bytes) -> ProtocolError:
    """decode_datagram(buf) must raise ProtocolError (no other exception) with a reason."""
    with pytest.raises(ProtocolError) as info:
        decode_datagram(buf)
    exc = info.value
    assert isinstance(exc.reason, str) and exc.reason
    assert str(exc) == exc.reason
    return exc


def assert_einval_answer(exc: ProtocolError, seq: int) -> Reply:
    """An answerable error: its reply is a well-formed -EINVAL for ``seq``, no data."""
    assert exc.seq == seq, exc.reason
    assert exc.reply is not None, f"not answered: {exc.reason}"
    reply = decode_reply(exc.reply)
    assert reply.seq == seq
    assert reply.error == -errno.EINVAL
    assert reply.data == b""
    assert u32(exc.reply, OFF_NLMSG_LEN) == len(exc.reply)
    assert struct.unpack_from("=H", exc.reply, OFF_NLMSG_TYPE)[0] == NLMSG_DONE
    assert struct.unpack_from("=II", exc.reply, OFF_CN_IDX) == (7, 1)
    if not reply.ack:
        assert len(exc.reply) == DATA
        assert struct.unpack_from("=H", exc.reply, OFF_CN_LEN)[0] == 160
        assert u32(exc.reply, OFF_DATA_SIZE) == 0
    return reply


def reject_answerably(buf: bytes, seq: int = SEQ) -> ProtocolError:
    exc = reject(buf)
    assert_einval_answer(exc, seq)
    return exc


def reject_full_einval(buf: bytes, seq: int = SEQ) -> ProtocolError:
    """Rejected with a full -EINVAL reply that echoes the request's header."""
    exc = reject_answerably(buf, seq)
    assert exc.reply is not None
    assert not decode_reply(exc.reply).ack
    assert exc.reply[ULOG:OFF_ERROR] == buf[ULOG:OFF_ERROR]  # luid, uuid, version
    assert exc.reply[OFF_TYPE : OFF_TYPE + 4] == buf[OFF_TYPE : OFF_TYPE + 4]
    return exc


def reject_unanswerably(buf: bytes) -> ProtocolError:
    exc = reject(buf)
    assert exc.reply is None, exc.reason
    assert exc.seq is None
    return exc


def valid_reply_data(rtype: RequestType) -> bytes:
    size = REPLY_SIZE[rtype]
    if size is None:
        return b"7:2\0" if rtype is RT.CTR else b"1 clustered-core\0"
    return bytes(range(1, size + 1))


def check_reply_frame(reply: bytes, req: Request, error: int, data: bytes) -> None:
    """The reply is nlmsghdr|cn_msg|echoed header|data with every length consistent."""
    assert len(reply) == DATA + len(data)
    nl_len, nl_type, nl_flags = struct.unpack_from("=IHH", reply, 0)
    assert nl_len == len(reply)
    assert (nl_type, nl_flags) == (NLMSG_DONE, 0)
    idx, val, _cn_seq, ack, cn_len, _flags = struct.unpack_from("=IIIIHH", reply, OFF_CN_IDX)
    assert (idx, val, ack) == (7, 1, 0)
    assert cn_len == 160 + len(data)
    assert nl_len == 16 + 20 + cn_len
    # The request header, echoed: luid, uuid (all 129 bytes), padding, version.
    assert reply[ULOG:OFF_ERROR] == req.header[:144]
    (luid,) = struct.unpack_from("=Q", reply, OFF_LUID)
    assert luid == req.luid
    assert reply[OFF_UUID : OFF_UUID + 129].split(b"\0")[0] == req.uuid.encode()
    assert u32(reply, OFF_VERSION) == req.version
    got_error, got_seq, got_type, got_size = struct.unpack_from("=iIII", reply, OFF_ERROR)
    assert (got_error, got_seq, got_type, got_size) == (
        error,
        req.seq,
        int(req.request_type),
        len(data),
    )
    assert reply[DATA:] == data
    decoded = decode_reply(reply)
    assert decoded == Reply(req.seq, error, data, ack=False)


# --- real kernel captures ------------------------------------------------------------------


def test_captures_are_present_and_cover_the_requests_a_kernel_sends():
    assert [p.name for p in CAPTURES] == [
        "capture-badcount.jsonl",
        "capture-disklog.jsonl",
        "capture-iflush.jsonl",
        "capture-plain.jsonl",
        "capture-resync.jsonl",
    ]
    seen = {r["request"]["request_type"] for r in all_capture_records()}
    # Every type except IS_CLEAN (no caller) and STATUS_TABLE (built in the kernel), §3.17.
    assert seen == {int(t) for t in RT} - {RT.IS_CLEAN, RT.STATUS_TABLE}


def _check_payload_view(req: Request, view: dict) -> None:
    rtype = req.request_type
    if rtype is RT.CTR:
        assert req.ctr_string == view["ctr_str"]
        assert req.reconnect is view["nul_terminated"]
        assert req.regions == ()
    elif rtype in ONE_REGION_TYPES:
        assert req.regions == (view["region"],)
    elif rtype is RT.SET_REGION_SYNC:
        assert req.regions == (view["region"],)
        assert req.in_sync is bool(view["in_sync"])
    elif rtype in REGION_LIST_TYPES:
        assert req.regions == tuple(view.get("regions", ()))
        assert len(req.regions) <= 32
    else:
        assert view == {}
        assert req.regions == ()
        assert req.data == b""
    if rtype is not RT.CTR:
        assert (req.ctr_string, req.reconnect) == ("", False)
    if rtype is not RT.SET_REGION_SYNC:
        assert req.in_sync is False


@pytest.mark.parametrize("capture", [p.name for p in CAPTURES])
def test_every_captured_request_decodes_to_its_recorded_fields(capture):
    records = capture_records(capture)
    assert records
    for rec in records:
        raw = bytes.fromhex(rec["raw_hex"])
        view = rec["request"]
        where = f"{capture} n={rec['n']} {view['name']}"
        req = decode_datagram(raw)
        assert req.luid == view["luid"], where
        assert req.uuid == view["uuid"], where
        assert req.version == view["version"], where
        assert req.seq == view["seq"], where
        assert req.request_type == view["request_type"], where
        assert req.name == view["name"], where
        assert len(req.data) == view["data_size"], where
        assert req.data.hex() == view["data_hex"], where
        assert req.header == raw[ULOG:DATA], where
        _check_payload_view(req, view["decoded"])


@pytest.mark.parametrize("capture", [p.name for p in CAPTURES])
def test_encode_request_reproduces_the_kernels_bytes(capture):
    for rec in capture_records(capture):
        raw = bytes.fromhex(rec["raw_hex"])
        view = rec["request"]
        nlmsg_len = u32(raw, OFF_NLMSG_LEN)
        assert 0 <= len(raw) - nlmsg_len <= 3
        built = encode_request(
            view["request_type"],
            seq=view["seq"],
            uuid=view["uuid"],
            luid=view["luid"],
            data=bytes.fromhex(view["data_hex"]),
            version=view["version"],
        )
        assert built == raw[:nlmsg_len], f"{capture} n={rec['n']} {view['name']}"


@pytest.mark.parametrize("capture", [p.name for p in CAPTURES])
def test_recorded_replies_decode_and_match_encode_reply(capture):
    for rec in capture_records(capture):
        where = f"{capture} n={rec['n']} {rec['request']['name']}"
        req = decode_datagram(bytes.fromhex(rec["raw_hex"]))
        sent = bytes.fromhex(rec["reply"]["raw_hex"])
        data = bytes.fromhex(rec["reply"]["data_hex"])
        reply = decode_reply(sent)
        assert reply.ack is False, where
        assert reply.seq == req.seq, where
        assert reply.error == rec["reply"]["error"], where
        assert reply.data == data, where
        assert len(reply.data) == rec["reply"]["data_size"], where
        assert len(sent) == rec["reply"]["sent_bytes"], where
        # The kernel accepted these bytes; ours differ only in nlmsg_seq/nlmsg_pid.
        ours = encode_reply(req, rec["reply"]["error"], data)
        assert ours[:8] + ours[16:] == sent[:8] + sent[16:], where


def test_compact_fixtures_decode_and_round_trip():
    records = compact_records()
    assert len(records) >= 15
    for rec in records:
        where = f"{rec['source']} {rec['name']} seq={rec['seq']}"
        raw = bytes.fromhex(rec["request_raw_hex"])
        req = decode_datagram(raw)
        assert (req.name, req.seq, req.uuid, req.luid, req.version) == (
            rec["name"],
            rec["seq"],
            rec["uuid"],
            rec["luid"],
            rec["version"],
        ), where
        assert len(req.data) == rec["data_size"], where
        _check_payload_view(req, rec["decoded"])
        nlmsg_len = u32(raw, OFF_NLMSG_LEN)
        assert (
            encode_request(
                req.request_type,
                seq=req.seq,
                uuid=req.uuid,
                luid=req.luid,
                data=req.data,
                version=req.version,
            )
            == raw[:nlmsg_len]
        ), where
        data = bytes.fromhex(rec["reply_data_hex"])
        ours = encode_reply(req, rec["reply_error"], data)
        expected = Reply(req.seq, rec["reply_error"], data, ack=False)
        assert decode_reply(ours) == expected, where
        if rec["reply_raw_hex"] is not None:  # a few records kept only the reply's fields
            sent = bytes.fromhex(rec["reply_raw_hex"])
            assert decode_reply(sent) == expected, where
            assert ours[:8] + ours[16:] == sent[:8] + sent[16:], where


def test_captured_ctr_with_two_pad_bytes_decodes():
    (rec,) = [r for r in capture_records("capture-badcount.jsonl") if r["request"]["name"] == "CTR"]
    raw = bytes.fromhex(rec["raw_hex"])
    assert len(raw) - u32(raw, OFF_NLMSG_LEN) == 2
    req = decode_datagram(raw)
    assert req.ctr_string == "131072 core 1024 2"
    assert req.data == b"131072 core 1024 2"  # the pad bytes are not payload
    assert req.reconnect is False


def test_integrated_flush_capture_carries_regions_in_flush():
    flushes = [
        decode_datagram(bytes.fromhex(r["raw_hex"]))
        for r in capture_records("capture-iflush.jsonl")
        if r["request"]["name"] == "FLUSH"
    ]
    assert any(f.regions for f in flushes)
    assert all(f.version == 3 for f in flushes)


def test_disklog_ctr_reply_returns_the_device_name():
    (rec,) = [r for r in capture_records("capture-disklog.jsonl") if r["request"]["name"] == "CTR"]
    req = decode_datagram(bytes.fromhex(rec["raw_hex"]))
    reply = encode_reply(req, 0, pack_string("7:2"))
    assert decode_reply(reply).data == b"7:2\0"
    assert reply == encode_reply(req, 0, bytes.fromhex(rec["reply"]["data_hex"]))


# --- decoding well-formed synthetic requests -----------------------------------------------


@type_ids
def test_every_request_type_decodes_with_its_payload_view(rtype):
    data = VALID_DATA[rtype]
    req = request(rtype)
    assert req.request_type is rtype
    assert req.name == rtype.name
    assert (req.seq, req.luid, req.uuid, req.version) == (SEQ, LUID, UUID, 3)
    assert req.data == data
    expected_regions = {
        RT.IS_CLEAN: (5,),
        RT.IN_SYNC: (6,),
        RT.FLUSH: (7, 8),
        RT.MARK_REGION: (1, 2, 3),
        RT.CLEAR_REGION: (4,),
        RT.SET_REGION_SYNC: (9,),
        RT.IS_REMOTE_RECOVERING: (10,),
    }.get(rtype, ())
    assert req.regions == expected_regions
    assert req.in_sync is (rtype is RT.SET_REGION_SYNC)
    assert req.ctr_string == ("131072 core 1024" if rtype is RT.CTR else "")
    assert req.reconnect is False


def test_reconnect_ctr_counts_its_nul_and_is_flagged():
    req = request(RT.CTR, b"131072 core 1024\0")
    assert req.reconnect is True
    assert req.ctr_string == "131072 core 1024"
    assert req.data == b"131072 core 1024\0"


@pytest.mark.parametrize("in_sync, expected", [(0, False), (1, True), (-1, True), (2, True)])
def test_set_region_sync_reads_region_and_state(in_sync, expected):
    req = request(RT.SET_REGION_SYNC, struct.pack("=Qq", 2**64 - 1, in_sync))
    assert req.regions == (2**64 - 1,)
    assert req.in_sync is expected


@pytest.mark.parametrize("rtype", REGION_LIST_TYPES, ids=lambda t: t.name)
def test_region_lists_of_zero_to_32_regions_decode(rtype):
    for count in (0, 1, 31, 32):
        regions = tuple(range(2**64 - count, 2**64))
        assert request(rtype, pack_regions(regions)).regions == regions


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_empty_flush_is_valid_in_every_version(version):
    req = request(RT.FLUSH, b"", version=version)
    assert (req.version, req.regions) == (version, ())


def test_dtr_payload_is_ignored():
    req = request(RT.DTR, b"some argv the uapi once promised")
    assert req.request_type is RT.DTR
    assert (req.regions, req.ctr_string) == ((), "")


def test_uuid_of_128_bytes_is_accepted():
    assert request(RT.RESUME, uuid="u" * 128).uuid == "u" * 128


def test_bytes_after_the_uuids_nul_are_ignored():
    req = request(RT.RESUME, uuid=b"abc\0garbage")
    assert req.uuid == "abc"


def test_seq_and_luid_extremes_are_read_back():
    req = request(RT.GET_SYNC_COUNT, seq=2**32 - 1, luid=2**64 - 1)
    assert (req.seq, req.luid) == (2**32 - 1, 2**64 - 1)
    req = request(RT.GET_SYNC_COUNT, seq=0, luid=0)
    assert (req.seq, req.luid) == (0, 0)


@pytest.mark.parametrize("pad", [b"\0", b"\0\0", b"\xff\xff\xff"])
def test_up_to_three_pad_bytes_are_accepted(pad):
    raw = request_bytes(RT.MARK_REGION)
    req = decode_datagram(raw + pad)
    assert req.regions == (1, 2, 3)
    assert req.data == VALID_DATA[RT.MARK_REGION]


def test_decode_accepts_bytearray_and_memoryview():
    raw = request_bytes(RT.IN_SYNC)
    assert decode_datagram(bytearray(raw)) == decode_datagram(raw)
    assert decode_datagram(memoryview(raw)) == decode_datagram(raw)


def test_largest_ctr_payload_is_accepted():
    text = "1" * MAX_PAYLOAD
    assert MAX_PAYLOAD == 332
    assert request(RT.CTR, text.encode()).ctr_string == text
    assert request(RT.CTR, b"1" * (MAX_PAYLOAD - 1) + b"\0").reconnect is True


# --- reply building ------------------------------------------------------------------------


def test_reply_size_table_matches_protocol_md_3_18():
    assert dict(REPLY_SIZES) == REPLY_SIZE


@pytest.mark.parametrize("rtype", FIXED_REPLY_TYPES, ids=lambda t: t.name)
def test_reply_of_the_exact_size_is_framed_and_echoes_the_request(rtype):
    req = request(rtype)
    data = valid_reply_data(rtype)
    assert len(data) == REPLY_SIZE[rtype]
    check_reply_frame(encode_reply(req, 0, data), req, 0, data)


@pytest.mark.parametrize("rtype", FIXED_REPLY_TYPES, ids=lambda t: t.name)
def test_reply_of_a_wrong_size_is_rejected(rtype):
    req = request(rtype)
    want = REPLY_SIZE[rtype]
    for size in sorted({0, 1, 4, 7, 8, 9, 15, 16, 17, 24, 128} - {want}):
        with pytest.raises(ValueError):
            encode_reply(req, 0, bytes(size))


@pytest.mark.parametrize("rtype", [RT.STATUS_INFO, RT.STATUS_TABLE], ids=lambda t: t.name)
def test_status_replies_have_a_variable_size(rtype):
    req = request(rtype)
    for data in (b"", b"1 clustered-core", pack_string("3 clustered-disk 253:2 A"), b"x" * 300):
        check_reply_frame(encode_reply(req, 0, data), req, 0, data)


@pytest.mark.parametrize("data", [b"", b"\0", b"7:2\0", b"d" * 127 + b"\0"], ids=len)
def test_ctr_reply_of_up_to_128_bytes_including_its_nul_is_accepted(data):
    req = request(RT.CTR)
    check_reply_frame(encode_reply(req, 0, data), req, 0, data)


@pytest.mark.parametrize("size", [129, 200, 1000])
def test_ctr_reply_longer_than_128_bytes_is_rejected(size):
    with pytest.raises(ValueError):
        encode_reply(request(RT.CTR), 0, b"d" * (size - 1) + b"\0")


def test_ctr_reply_without_a_terminating_nul_is_rejected():
    # protocol.md §3.1: the kernel checks that the last byte of a CTR reply is NUL and
    # otherwise fails the table load with -EINVAL ("device return string not properly
    # terminated").  Such a reply can never succeed, so the encoder must refuse it.
    req = request(RT.CTR)
    for data in (b"7:2", b"253:2", b"d" * 128):
        with pytest.raises(ValueError):
            encode_reply(req, 0, data)


def test_reconnect_ctr_reply_is_empty():
    req = request(RT.CTR, b"131072 core 1024\0")
    assert req.reconnect
    check_reply_frame(encode_reply(req, 0, b""), req, 0, b"")
    for data in (b"\0", b"7:2\0", pack_string("253:2")):
        with pytest.raises(ValueError):
            encode_reply(req, 0, data)


@type_ids
@pytest.mark.parametrize("error", [-errno.EINVAL, -errno.EIO, -errno.ESRCH, -errno.EAGAIN])
def test_error_reply_drops_data(rtype, error):
    req = request(rtype)
    for data in (b"", valid_reply_data(rtype), b"junk that fits no buffer" * 20):
        reply = encode_reply(req, error, data)
        check_reply_frame(reply, req, error, b"")


def test_error_reply_to_a_reconnect_ctr_drops_data():
    req = request(RT.CTR, b"131072 core 1024\0")
    check_reply_frame(encode_reply(req, -errno.EINVAL, b"7:2\0"), req, -errno.EINVAL, b"")


@type_ids
def test_positive_error_is_rejected(rtype):
    req = request(rtype)
    for error in (1, errno.EINVAL, errno.EAGAIN):
        with pytest.raises(ValueError):
            encode_reply(req, error, b"")
        with pytest.raises(ValueError):
            encode_reply(req, error, valid_reply_data(rtype))


def test_reply_echoes_the_whole_request_header():
    raw = request_bytes(RT.IN_SYNC, seq=2**32 - 1, luid=2**64 - 2, uuid="x" * 128, version=2)
    req = decode_datagram(raw)
    reply = encode_reply(req, 0, pack_bool(True))
    assert reply[ULOG:OFF_ERROR] == raw[ULOG:OFF_ERROR]
    assert reply[OFF_SEQ:OFF_DATA_SIZE] == raw[OFF_SEQ:OFF_DATA_SIZE]  # seq, type
    assert struct.unpack_from("=iI", reply, OFF_ERROR) == (0, 2**32 - 1)
    assert u32(reply, OFF_DATA_SIZE) == 8
    assert decode_reply(reply) == Reply(2**32 - 1, 0, struct.pack("=q", 1), ack=False)


def test_reply_clears_an_error_field_set_in_the_request():
    raw = encode_request(RT.RESUME, seq=5, uuid=UUID, error=-errno.EIO)
    req = decode_datagram(raw)
    assert struct.unpack_from("=i", encode_reply(req, 0), OFF_ERROR)[0] == 0


def test_reply_carries_the_seq_the_kernel_waits_on():
    req = request(RT.GET_SYNC_COUNT, seq=77)
    reply = encode_reply(req, 0, pack_u64(123))
    # Full replies are matched on dm_ulog_request.seq (§1.3).
    assert u32(reply, OFF_SEQ) == 77
    assert decode_reply(reply) == Reply(77, 0, pack_u64(123), ack=False)


@pytest.mark.parametrize("positive_errno", [0, errno.EINVAL, errno.EAGAIN, errno.ESRCH])
def test_ack_is_read_as_an_ack_with_minus_errno(positive_errno):
    ack = encode_ack(4242, positive_errno)
    assert len(ack) == 36
    assert u32(ack, OFF_NLMSG_LEN) == 36
    assert struct.unpack_from("=H", ack, OFF_NLMSG_TYPE)[0] == NLMSG_DONE
    assert struct.unpack_from("=IIIIHH", ack, OFF_CN_IDX) == (7, 1, 4242, positive_errno, 0, 0)
    assert decode_reply(ack) == Reply(4242, -positive_errno, b"", ack=True)


def test_ack_defaults_to_success():
    assert decode_reply(encode_ack(9)) == Reply(9, 0, b"", ack=True)


# --- typed reply payloads ------------------------------------------------------------------


def test_pack_bool_is_exactly_zero_or_one():
    # The kernel compares IN_SYNC with == 1 (§3.8): never a bit value.
    assert pack_bool(True) == struct.pack("=q", 1)
    assert pack_bool(False) == struct.pack("=q", 0)
    assert pack_bool(8) == struct.pack("=q", 1)  # type: ignore[arg-type]


def test_typed_payload_packers():
    assert pack_u64(2**64 - 1) == b"\xff" * 8
    assert pack_resync_work(True, 17) == struct.pack("=qQ", 1, 17)
    assert pack_resync_work(False, 0) == struct.pack("=qQ", 0, 0)
    assert pack_remote_recovering(True, 3) == struct.pack("=qQ", 1, 3)
    assert pack_remote_recovering(False, 2**64 - 1) == struct.pack("=qQ", 0, 2**64 - 1)
    assert pack_string("7:2") == b"7:2\0"
    assert pack_regions([1, 2]) == struct.pack("=2Q", 1, 2)
    assert pack_regions(()) == b""
    assert pack_set_region_sync(5, True) == struct.pack("=Qq", 5, 1)
    assert pack_set_region_sync(5, False) == struct.pack("=Qq", 5, 0)


def test_typed_payloads_have_the_reply_sizes_the_kernel_expects():
    for rtype, data in [
        (RT.GET_REGION_SIZE, pack_u64(1024)),
        (RT.IS_CLEAN, pack_bool(True)),
        (RT.IN_SYNC, pack_bool(False)),
        (RT.GET_SYNC_COUNT, pack_u64(128)),
        (RT.GET_RESYNC_WORK, pack_resync_work(True, 3)),
        (RT.IS_REMOTE_RECOVERING, pack_remote_recovering(False, 4)),
    ]:
        req = request(rtype)
        check_reply_frame(encode_reply(req, 0, data), req, 0, data)


# --- decode_reply on bad input -------------------------------------------------------------


def test_decode_reply_rejects_malformed_replies():
    good = encode_reply(request(RT.GET_SYNC_COUNT), 0, pack_u64(1))
    bad = [
        good[:35],
        b"",
        with_u32(good, OFF_NLMSG_LEN, len(good) + 1),
        with_u32(good, OFF_NLMSG_LEN, 20),
        with_u32(good, OFF_CN_IDX, 8),
        with_u32(good, OFF_CN_VAL, 2),
        with_u16(good, OFF_CN_LEN, 100),
        with_u16(good, OFF_CN_LEN, len(good)),  # runs past nlmsg_len
        with_u32(good, OFF_DATA_SIZE, 9),  # runs past the datagram
    ]
    for buf in bad:
        with pytest.raises(ProtocolError) as info:
            decode_reply(buf)
        assert info.value.reason


# --- bad input: rejected with ProtocolError, answered when the seq is readable -------------


def _real_request() -> bytes:
    """A real captured CTR request (seq 1, 212 bytes, no pad)."""
    raw = bytes.fromhex(capture_records("capture-plain.jsonl")[0]["raw_hex"])
    assert u32(raw, OFF_SEQ) == 1 and len(raw) == u32(raw, OFF_NLMSG_LEN)
    return raw


def _real_samples() -> list[bytes]:
    """One real datagram of each request shape, trimmed to nlmsg_len."""
    out = []
    for rec in compact_records():
        raw = bytes.fromhex(rec["request_raw_hex"])
        out.append(raw[: u32(raw, OFF_NLMSG_LEN)])
    return out


def test_every_prefix_of_a_real_request_raises_protocol_error():
    for raw in _real_samples():
        for n in range(len(raw)):
            exc = reject(raw[:n])
            if exc.reply is not None:
                assert_einval_answer(exc, u32(raw, OFF_SEQ))


def test_truncated_request_shorter_than_its_headers_is_not_answerable():
    raw = _real_request()
    for n in range(36):
        reject_unanswerably(raw[:n])


def test_truncated_request_with_a_readable_seq_is_answered_with_einval():
    # Past 36 bytes the connector id {7,1} and cn_msg.seq (= the request's seq) are there;
    # past 196 the whole dm_ulog_request header is.  The kernel waits for an answer either way.
    for raw in _real_samples():
        seq = u32(raw, OFF_SEQ)
        for n in range(36, len(raw)):
            reply = assert_einval_answer(reject(raw[:n]), seq)
            assert reply.ack is (n < DATA), n


@pytest.mark.parametrize("excess", [1, 4, 100, 2**32 - 1 - 212])
def test_nlmsg_len_past_the_buffer_is_answered_with_einval(excess):
    raw = _real_request()
    reject_answerably(with_u32(raw, OFF_NLMSG_LEN, len(raw) + excess), seq=1)


@pytest.mark.parametrize("nlmsg_len", [0, 1, 16, 35])
def test_nlmsg_len_below_the_headers_is_answered_with_einval(nlmsg_len):
    raw = _real_request()
    reject_answerably(with_u32(raw, OFF_NLMSG_LEN, nlmsg_len), seq=1)


@pytest.mark.parametrize("nlmsg_len", [36, 100, 195, 196, 211])
def test_nlmsg_len_shorter_than_the_request_is_answered_with_einval(nlmsg_len):
    raw = _real_request()
    reject_answerably(with_u32(raw, OFF_NLMSG_LEN, nlmsg_len), seq=1)


@pytest.mark.parametrize("idx, val", [(7, 0), (7, 2), (1, 1), (0, 0), (8, 1), (2**32 - 1, 1)])
def test_other_connector_ids_are_not_answered(idx, val):
    raw = request_bytes(RT.IN_SYNC)
    buf = with_u32(with_u32(raw, OFF_CN_IDX, idx), OFF_CN_VAL, val)
    reject_unanswerably(buf)
    # ... even when the rest of the datagram is also wrong.
    reject_unanswerably(buf + b"\0" * 10)
    reject_unanswerably(with_u32(buf, OFF_NLMSG_LEN, 2**31))


@pytest.mark.parametrize("nlmsg_type", [0, 1, 2, 4, 16, 0xFFFF])
def test_other_nlmsg_types_are_not_answered(nlmsg_type):
    raw = request_bytes(RT.IN_SYNC)
    reject_unanswerably(with_u16(raw, OFF_NLMSG_TYPE, nlmsg_type))


@pytest.mark.parametrize("cn_len", [0, 1, 100, 159])
def test_cn_msg_len_below_160_is_answered_with_einval(cn_len):
    raw = request_bytes(RT.GET_SYNC_COUNT)
    reject_full_einval(with_u16(raw, OFF_CN_LEN, cn_len))


@pytest.mark.parametrize("cn_len", [0, 100, 159])
def test_cn_msg_len_below_160_in_a_short_datagram_is_acked_with_einval(cn_len):
    # Only nlmsghdr + cn_msg (+ a little): no dm_ulog_request header, so the answer is a
    # connector ACK on cn_msg.seq.
    raw = request_bytes(RT.GET_SYNC_COUNT)[:100]
    raw = with_u32(with_u16(raw, OFF_CN_LEN, cn_len), OFF_NLMSG_LEN, 100)
    reply = assert_einval_answer(reject(raw), SEQ)
    assert reply.ack is True


def test_cn_msg_len_disagreeing_with_data_size_is_answered_with_einval():
    raw = request_bytes(RT.GET_SYNC_COUNT)
    # data_size says 8, cn_msg.len says 160.
    reject_full_einval(with_u32(raw, OFF_DATA_SIZE, 8))
    # cn_msg.len and nlmsg_len say 8 more bytes than data_size.
    longer = with_u32(with_u16(raw + bytes(8), OFF_CN_LEN, 168), OFF_NLMSG_LEN, len(raw) + 8)
    reject_full_einval(longer)
    # A MARK whose data_size undercounts its regions.
    mark = request_bytes(RT.MARK_REGION)
    reject_full_einval(with_u32(mark, OFF_DATA_SIZE, 16))
    reject_full_einval(with_u32(mark, OFF_DATA_SIZE, 2**32 - 1))


def test_cn_msg_len_past_nlmsg_len_is_answered_with_einval():
    raw = request_bytes(RT.MARK_REGION)
    reject_full_einval(with_u16(raw, OFF_CN_LEN, 160 + 32))


def test_data_size_beyond_the_kernels_buffer_is_answered_with_einval():
    reject_full_einval(request_bytes(RT.CTR, b"1" * (MAX_PAYLOAD + 1)))


@pytest.mark.parametrize("extra", [4, 5, 8, 100])
def test_more_than_three_trailing_bytes_are_answered_with_einval(extra):
    raw = request_bytes(RT.IN_SYNC)
    reject_full_einval(raw + bytes(extra))
    reject_full_einval(raw + b"\xff" * extra)


@pytest.mark.parametrize("rtype", REGION_LIST_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("size", [1, 4, 7, 9, 12, 15, 255])
def test_region_payload_not_a_multiple_of_8_is_answered_with_einval(rtype, size):
    reject_full_einval(request_bytes(rtype, bytes(size)))


@pytest.mark.parametrize("rtype", REGION_LIST_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("count", [33, 40, 41])
def test_more_than_32_regions_are_answered_with_einval(rtype, count):
    reject_full_einval(request_bytes(rtype, pack_regions(list(range(count)))))


@pytest.mark.parametrize("rtype", ONE_REGION_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("size", [0, 1, 4, 7, 9, 16, 24])
def test_one_region_request_of_a_wrong_size_is_answered_with_einval(rtype, size):
    reject_full_einval(request_bytes(rtype, bytes(size)))


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24, 32])
def test_set_region_sync_of_a_wrong_size_is_answered_with_einval(size):
    reject_full_einval(request_bytes(RT.SET_REGION_SYNC, bytes(size)))


@pytest.mark.parametrize("rtype", NO_PAYLOAD_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("size", [1, 8, 16])
def test_payload_on_a_no_payload_request_is_answered_with_einval(rtype, size):
    reject_full_einval(request_bytes(rtype, bytes(size)))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("count", [1, 32])
def test_flush_with_regions_before_version_3_is_answered_with_einval(version, count):
    raw = request_bytes(RT.FLUSH, pack_regions(list(range(count))), version=version)
    reject_full_einval(raw)


@pytest.mark.parametrize("version", [0, 4, 5, 0x100, 2**32 - 1])
def test_unsupported_version_is_answered_with_einval(version):
    reject_full_einval(request_bytes(RT.IN_SYNC, version=version))


@pytest.mark.parametrize(
    "data",
    [
        b"131072 core 1024\0\0",  # two NULs: the string ends before data_size says
        b"131072 core 1024\0garbage",
        b"131072\0core 1024",
        b"\0131072 core 1024",
        b"131072 c\xc3\xb6re 1024",
        b"131072 core 1024\xff",
        b"131072\tcore 1024",
        b"131072 core 1024\n",
        b"131072 core\r1024",
        b"131072 core 1024\x7f",
        b"\x1b[0m",
    ],
)
def test_malformed_ctr_string_is_answered_with_einval(data):
    reject_full_einval(request_bytes(RT.CTR, data))


@pytest.mark.parametrize("data", [b"", b"\0"])
def test_empty_ctr_string_is_answered_with_einval(data):
    reject_full_einval(request_bytes(RT.CTR, data))


def test_uuid_of_129_bytes_without_nul_is_answered_with_einval():
    reject_full_einval(request_bytes(RT.RESUME, uuid=b"u" * 129))


@pytest.mark.parametrize("uuid", [b"uu\xffid", b"\xc3\xa9t\xc3\xa9", b"uuid\x80"])
def test_non_ascii_uuid_is_answered_with_einval(uuid):
    reject_full_einval(request_bytes(RT.RESUME, uuid=uuid))


@pytest.mark.parametrize("uuid", [b"", b"\0abc", b"uu\nid", b"uu\tid", b"\x7f"])
def test_empty_or_unprintable_uuid_is_answered_with_einval(uuid):
    reject_full_einval(request_bytes(RT.RESUME, uuid=uuid))


@pytest.mark.parametrize("raw_type", [0, 18, 19, 100, 255])
def test_unknown_request_type_is_answered_with_einval(raw_type):
    reject_full_einval(request_bytes(raw_type, b""))


@pytest.mark.parametrize(
    "raw_type", [0x100 | RT.FLUSH, 0x8000_0000 | RT.GET_SYNC_COUNT, 0x100, 0xFFFF_FFFF]
)
def test_reserved_request_type_bits_are_answered_with_einval(raw_type):
    raw = with_u32(request_bytes(RT.GET_SYNC_COUNT, b""), OFF_TYPE, raw_type)
    exc = reject_full_einval(raw)
    # The reply echoes the type field as the kernel sent it.
    assert u32(exc.reply, OFF_TYPE) == raw_type


def test_error_reply_is_matched_on_the_dm_ulog_seq_not_the_netlink_seq():
    raw = request_bytes(RT.IN_SYNC, b"", seq=1234)
    raw = with_u32(with_u32(raw, 8, 99), OFF_CN_SEQ, 98)  # nlmsg_seq, cn_msg.seq
    exc = reject_full_einval(raw, seq=1234)
    assert u32(exc.reply, OFF_SEQ) == 1234


# --- property tests ------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def valid_requests(draw) -> dict:
    rtype = draw(st.sampled_from(list(RT)))
    version = draw(st.sampled_from(SUPPORTED_VERSIONS))
    fields = {
        "request_type": rtype,
        "version": version,
        "seq": draw(U32),
        "luid": draw(U64),
        "uuid": draw(st.text(PRINTABLE, min_size=1, max_size=128)),
        "regions": (),
        "in_sync": False,
        "ctr_string": "",
        "reconnect": False,
    }
    if rtype in ONE_REGION_TYPES:
        fields["regions"] = (draw(U64),)
        data = pack_u64(fields["regions"][0])
    elif rtype in REGION_LIST_TYPES:
        most = 0 if rtype is RT.FLUSH and version < 3 else 32
        fields["regions"] = tuple(draw(st.lists(U64, max_size=most)))
        data = pack_regions(fields["regions"])
    elif rtype is RT.SET_REGION_SYNC:
        region, state = draw(U64), draw(st.integers(-(2**63), 2**63 - 1))
        fields["regions"], fields["in_sync"] = (region,), state != 0
        data = struct.pack("=Qq", region, state)
    elif rtype is RT.CTR:
        reconnect = draw(st.booleans())
        text = draw(st.text(PRINTABLE, min_size=1, max_size=MAX_PAYLOAD - int(reconnect)))
        fields["ctr_string"], fields["reconnect"] = text, reconnect
        data = text.encode() + (b"\0" if reconnect else b"")
    else:
        data = b""
    fields["data"] = data
    return fields


@FAST
@given(valid_requests(), st.binary(max_size=3))
def test_codec_round_trip(fields, pad):
    raw = encode_request(
        fields["request_type"],
        seq=fields["seq"],
        uuid=fields["uuid"],
        luid=fields["luid"],
        data=fields["data"],
        version=fields["version"],
    )
    assert len(raw) == DATA + len(fields["data"]) == u32(raw, OFF_NLMSG_LEN)
    req = decode_datagram(raw + pad)
    for name, value in fields.items():
        assert getattr(req, name) == value, name
    assert req.header == raw[ULOG:DATA]

    # ... and the reply to it reads back as the kernel would read it.
    data = valid_reply_data(req.request_type)
    if req.reconnect:
        data = b""
    reply = encode_reply(req, 0, data)
    check_reply_frame(reply, req, 0, data)
    check_reply_frame(encode_reply(req, -errno.EIO, data), req, -errno.EIO, b"")


def check_decode_outcome(buf: bytes) -> None:
    """decode_datagram raises only ProtocolError; its reply, if any, is a sound -EINVAL."""
    try:
        req = decode_datagram(buf)
    except ProtocolError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        if exc.reply is None:
            assert exc.seq is None
            return
        # Only what is addressed to the dm-log-userspace connector is ever answered ...
        assert struct.unpack_from("=II", buf, OFF_CN_IDX) == (7, 1)
        assert struct.unpack_from("=H", buf, OFF_NLMSG_TYPE)[0] == NLMSG_DONE
        # ... and on the seq the kernel waits for: the request's, or cn_msg's without one.
        seq = u32(buf, OFF_SEQ) if len(buf) >= DATA else u32(buf, OFF_CN_SEQ)
        reply = assert_einval_answer(exc, seq)
        if not reply.ack:
            assert exc.reply[ULOG:OFF_ERROR] == buf[ULOG:OFF_ERROR]
        return
    # Accepted: it must really be a well-formed request.
    nlmsg_len = u32(buf, OFF_NLMSG_LEN)
    assert 0 <= len(buf) - nlmsg_len <= 3
    assert struct.unpack_from("=II", buf, OFF_CN_IDX) == (7, 1)
    assert req.version in SUPPORTED_VERSIONS
    assert req.header == buf[ULOG:DATA]
    assert req.seq == u32(buf, OFF_SEQ)
    assert u32(buf, OFF_TYPE) == int(req.request_type)
    assert len(req.data) == u32(buf, OFF_DATA_SIZE) <= MAX_PAYLOAD
    assert req.data == buf[DATA : DATA + len(req.data)]
    assert 1 <= len(req.uuid) <= 128 and req.uuid.isprintable()
    assert len(req.regions) <= 32
    # Any accepted request can be answered with an error.
    check_reply_frame(encode_reply(req, -errno.EIO), req, -errno.EIO, b"")


@FAST
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_protocol_error(buf):
    check_decode_outcome(buf)


@st.composite
def near_requests(draw) -> bytes:
    """Datagrams built field by field, mostly addressed to us, with plausible lengths."""
    data = draw(st.binary(max_size=300))
    uuid = draw(st.binary(min_size=129, max_size=129))
    cn_len = draw(st.one_of(st.just(160 + len(data)), st.integers(0, 0xFFFF)))
    data_size = draw(st.one_of(st.just(len(data)), U32))
    body = struct.pack(
        "=Q129s3xIiIII",
        draw(U64),
        uuid,
        draw(st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1])),
        draw(st.integers(-(2**31), 2**31 - 1)),
        draw(U32),
        draw(st.one_of(st.integers(0, 20), U32)),
        data_size,
    )
    conn = draw(st.sampled_from([(7, 1), (7, 1), (7, 1), (7, 2), (1, 1)]))
    cn = struct.pack("=IIIIHH", *conn, draw(U32), draw(U32), cn_len, draw(st.integers(0, 0xFFFF)))
    length = 36 + len(body) + len(data)
    nlmsg_len = draw(st.one_of(st.just(length), st.integers(0, length + 8)))
    nlmsg_type = draw(st.sampled_from([NLMSG_DONE, NLMSG_DONE, 0, 2]))
    nl = struct.pack("=IHHII", nlmsg_len, nlmsg_type, 0, draw(U32), draw(U32))
    return nl + cn + body + data + draw(st.binary(max_size=5))


@FAST
@given(near_requests())
def test_near_miss_datagrams_raise_only_protocol_error(buf):
    check_decode_outcome(buf)


INTERESTING_U32 = [0, 1, 3, 7, 8, 35, 36, 159, 160, 168, 196, 212, 332, 2**31, 2**32 - 1]
FIELD_OFFSETS = [
    OFF_NLMSG_LEN,
    OFF_NLMSG_TYPE,
    OFF_CN_IDX,
    OFF_CN_VAL,
    OFF_CN_SEQ,
    OFF_CN_ACK,
    OFF_CN_LEN,
    OFF_VERSION,
    OFF_ERROR,
    OFF_SEQ,
    OFF_TYPE,
    OFF_DATA_SIZE,
    OFF_UUID + 125,
]

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16)),
    st.tuples(st.just("truncate"), st.integers(0, 600)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("byte"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(
        st.just("field"),
        st.sampled_from(FIELD_OFFSETS),
        st.one_of(st.sampled_from(INTERESTING_U32), U32),
    ),
)


def mutate(raw: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(raw)
    for op in ops:
        kind = op[0]
        if kind == "flip" and buf:
            bit = op[1] % (8 * len(buf))
            buf[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1) :]
        elif kind == "append":
            buf += op[1]
        elif kind == "byte" and buf:
            buf[op[1] % len(buf)] = op[2]
        elif kind == "field" and len(buf) >= op[1] + 4:
            struct.pack_into("=I", buf, op[1], op[2])
    return bytes(buf)


@FAST
@given(st.sampled_from(_real_samples()), st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_kernel_datagrams_raise_only_protocol_error(raw, ops):
    check_decode_outcome(mutate(raw, ops))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_real_samples()), st.integers(0, 2**16))
def test_a_single_bit_flip_is_never_silently_misread_as_another_seq(raw, bit):
    """A flipped bit outside the seq fields either decodes or is answered on the real seq."""
    buf = mutate(raw, [("flip", bit)])
    flipped = bit % (8 * len(raw)) // 8
    if flipped in range(OFF_SEQ, OFF_SEQ + 4):
        return
    try:
        req = decode_datagram(buf)
    except ProtocolError as exc:
        if exc.reply is not None:
            assert exc.seq == u32(raw, OFF_SEQ)
        else:
            # Only a datagram no longer addressed to us goes unanswered.
            addressing = {
                *range(OFF_NLMSG_TYPE, OFF_NLMSG_TYPE + 2),
                *range(OFF_CN_IDX, OFF_CN_SEQ),
            }
            assert flipped in addressing, (flipped, exc.reason)
    else:
        assert req.seq == u32(raw, OFF_SEQ)


# -- routing without a decode -------------------------------------------------------------------


@pytest.mark.parametrize("capture", [p.name for p in CAPTURES])
def test_peek_reads_the_routing_fields_of_every_captured_request(capture):
    for rec in capture_records(capture):
        raw = bytes.fromhex(rec["raw_hex"])
        req = decode_datagram(raw)
        assert peek_request(raw) == (req.uuid.encode(), req.seq, req.request_type)


def test_peek_routes_one_log_alike_whatever_follows_its_uuids_nul():
    raw = bytearray(encode_request(RT.IN_SYNC, seq=5, uuid="lv", luid=1,
                                            data=pack_u64(0)))
    raw[36 + 8 + 3 : 36 + 8 + 10] = b"garbage"  # after "lv\0"
    assert peek_request(bytes(raw))[0] == b"lv"


def test_peek_declines_what_it_cannot_route():
    raw = encode_request(RT.IN_SYNC, seq=5, uuid="lv", luid=1,
                                  data=pack_u64(0))
    assert peek_request(raw[:195]) is None  # no whole request header
    assert peek_request(raw[:16] + (9).to_bytes(4, "little") + raw[20:]) is None
    assert peek_request(raw[:4] + (1).to_bytes(2, "little") + raw[6:]) is None
