"""shardlog.wire.nlmessages: the pyroute2 description of a request agrees with protocol.py and
with the bytes a real kernel (6.1) sent."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlog.wire import nlmessages, protocol
from shardlog.wire.protocol import MAX_PAYLOAD, MAX_REGIONS_PER_REQUEST, ProtocolError, RequestType

from ...conftest import FIXTURES

CAPTURES = sorted(FIXTURES.glob("capture-*.jsonl"))

ONE_REGION = {RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.IS_REMOTE_RECOVERING}
REGION_LIST = {RequestType.MARK_REGION, RequestType.CLEAR_REGION, RequestType.FLUSH}

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
PRINTABLE_ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def _records(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A capture that loads as nothing would make every test below pass vacuously.
    assert records, f"{path.name} holds no records"
    return records


def _nlmsg_len(raw: bytes) -> int:
    return struct.unpack_from("=I", raw, 0)[0]


def _capture_ids() -> list[str]:
    return [path.name for path in CAPTURES]


def test_the_kernel_captures_are_all_there() -> None:
    names = {path.name for path in CAPTURES}
    assert {
        "capture-badcount.jsonl",
        "capture-disklog.jsonl",
        "capture-iflush.jsonl",
        "capture-plain.jsonl",
        "capture-resync.jsonl",
    } <= names


@pytest.mark.parametrize("capture", CAPTURES, ids=_capture_ids())
def test_pyroute2_encoding_is_byte_identical_to_protocol_and_kernel(capture: Path) -> None:
    mismatches = []
    for record in _records(capture):
        raw = bytes.fromhex(record["raw_hex"])
        # The capture tool's own view supplies the fields, so neither decoder under test does.
        view = record["request"]
        fields = {
            "seq": view["seq"],
            "uuid": view["uuid"],
            "luid": view["luid"],
            "data": bytes.fromhex(view["data_hex"]),
            "version": view["version"],
        }
        ours = nlmessages.encode(view["request_type"], **fields)
        theirs = protocol.encode_request(view["request_type"], **fields)
        kernel = raw[: _nlmsg_len(raw)]
        if not ours == theirs == kernel:
            mismatches.append((record["n"], ours.hex(), theirs.hex(), kernel.hex()))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("capture", CAPTURES, ids=_capture_ids())
def test_decode_agrees_with_protocol_decode_datagram(capture: Path) -> None:
    mismatches = []
    for record in _records(capture):
        raw = bytes.fromhex(record["raw_hex"])
        request = protocol.decode_datagram(raw)
        view = nlmessages.decode(raw)["request"]
        ours = (
            view["luid"],
            view["uuid"],
            view["seq"],
            view["version"],
            view["request_type"],
            view["name"],
            bytes.fromhex(view["data_hex"]),
            _payload_as_protocol_sees_it(view),
        )
        theirs = (
            request.luid,
            request.uuid,
            request.seq,
            request.version,
            request.request_type,
            request.name,
            request.data,
            _protocol_payload(request),
        )
        if ours != theirs:
            mismatches.append((record["n"], ours, theirs))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("capture", CAPTURES, ids=_capture_ids())
def test_decode_matches_the_capture_tools_view(capture: Path) -> None:
    mismatches = []
    for record in _records(capture):
        view = nlmessages.decode(bytes.fromhex(record["raw_hex"]))
        expected_request = dict(record["request"])
        expected_request["decoded"] = _in_nlmessages_shape(
            RequestType(expected_request["request_type"]), expected_request["decoded"]
        )
        got = (view["nlmsghdr"], view["cn_msg"], view["request"])
        expected = (record["nlmsghdr"], record["cn_msg"], expected_request)
        if got != expected:
            mismatches.append((record["n"], got, expected))
    assert not mismatches, mismatches[:3]


def test_decode_reports_the_pad_bytes_a_real_kernel_sent() -> None:
    padded = [
        bytes.fromhex(record["raw_hex"])
        for capture in CAPTURES
        for record in _records(capture)
        if len(record["raw_hex"]) // 2 > record["nlmsghdr"]["len"]
    ]
    assert padded, "the captures were expected to hold a padded datagram"
    for raw in padded:
        view = nlmessages.decode(raw)
        assert view["nlmsghdr"]["len"] == _nlmsg_len(raw)
        assert view["pad_hex"] == raw[_nlmsg_len(raw) :].hex()
        assert (
            nlmessages.encode(
                view["request"]["request_type"],
                seq=view["request"]["seq"],
                uuid=view["request"]["uuid"],
                luid=view["request"]["luid"],
                data=bytes.fromhex(view["request"]["data_hex"]),
                version=view["request"]["version"],
            )
            == raw[: _nlmsg_len(raw)]
        )


def _payload_as_protocol_sees_it(view: dict[str, Any]) -> tuple:
    decoded = view["decoded"]
    if view["request_type"] == RequestType.SET_REGION_SYNC:
        return ((decoded["region"],), bool(decoded["in_sync"]), "", False)
    if view["request_type"] == RequestType.CTR:
        return ((), False, decoded["ctr_str"], decoded["nul_terminated"])
    return (tuple(decoded.get("regions", ())), False, "", False)


def _protocol_payload(request: protocol.Request) -> tuple:
    return (request.regions, request.in_sync, request.ctr_string, request.reconnect)


def _in_nlmessages_shape(request_type: RequestType, decoded: dict[str, Any]) -> dict[str, Any]:
    # The capture tool wrote {"region": r} for one-region requests and {} for a FLUSH with
    # nothing to mark; nlmessages always gives region-carrying types a "regions" list.
    if request_type in ONE_REGION:
        return {"regions": [decoded["region"]]}
    if request_type is RequestType.FLUSH and not decoded:
        return {"regions": []}
    return decoded


# --- generated requests -----------------------------------------------------------------------


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for encode, and the payload view decode should give back."""
    request_type = draw(st.sampled_from(RequestType))
    version = draw(st.integers(1, 3))
    data, decoded = draw(payloads(request_type, version))
    fields = {
        "request_type": request_type,
        "seq": draw(U32),
        "uuid": draw(st.text(PRINTABLE_ASCII, min_size=1, max_size=128)),
        "luid": draw(U64),
        "data": data,
        "version": version,
    }
    return fields, decoded


@st.composite
def payloads(
    draw: st.DrawFn, request_type: RequestType, version: int
) -> tuple[bytes, dict[str, Any]]:
    # Packed here with struct rather than protocol's helpers, so the expectation is not
    # derived from the code under comparison.
    if request_type in ONE_REGION:
        region = draw(U64)
        return struct.pack("=Q", region), {"regions": [region]}
    if request_type in REGION_LIST:
        if request_type is RequestType.FLUSH and version < 3:
            regions = []  # integrated flush, with regions in FLUSH, arrived in version 3
        else:
            regions = draw(st.lists(U64, max_size=MAX_REGIONS_PER_REQUEST))
        return struct.pack(f"={len(regions)}Q", *regions), {"regions": regions}
    if request_type is RequestType.SET_REGION_SYNC:
        region, in_sync = draw(U64), draw(st.integers(0, 1))
        return struct.pack("=Qq", region, in_sync), {"region": region, "in_sync": in_sync}
    if request_type is RequestType.CTR:
        nul_terminated = draw(st.booleans())
        text = draw(st.text(PRINTABLE_ASCII, min_size=1, max_size=MAX_PAYLOAD - 1))
        data = text.encode("ascii") + (b"\0" if nul_terminated else b"")
        return data, {"ctr_str": text, "nul_terminated": nul_terminated}
    return b"", {}


@settings(max_examples=300, deadline=None)
@given(requests(), st.integers(0, 3))
def test_generated_requests_encode_like_protocol_and_decode_back(
    case: tuple[dict[str, Any], dict[str, Any]], pad: int
) -> None:
    fields, decoded = case
    datagram = nlmessages.encode(**fields)
    assert datagram == protocol.encode_request(**fields)

    padded = datagram + bytes(pad)
    view = nlmessages.decode(padded)
    size = len(fields["data"])
    assert view == {
        "nlmsghdr": {"len": 196 + size, "type": 3, "flags": 0, "seq": fields["seq"], "pid": 0},
        "cn_msg": {
            "idx": 7,
            "val": 1,
            "seq": fields["seq"],
            "ack": 0,
            "len": 160 + size,
            "flags": 0,
        },
        "request": {
            "luid": fields["luid"],
            "uuid": fields["uuid"],
            "version": fields["version"],
            "error": 0,
            "seq": fields["seq"],
            "request_type": fields["request_type"],
            "name": fields["request_type"].name,
            "data_size": size,
            "data_hex": fields["data"].hex(),
            "decoded": decoded,
        },
        "pad_hex": "00" * pad,
    }
    # The server accepts every generated request, so both decoders are compared on all.
    request = protocol.decode_datagram(padded)
    assert _payload_as_protocol_sees_it(view["request"]) == _protocol_payload(request)


# --- arbitrary bytes ----------------------------------------------------------------------------


# Every integer field of nlmsghdr, cn_msg and dm_ulog_request (offset, unsigned format),
# and the byte that terminates a 128-character uuid.
HEADER_FIELDS = (
    *((offset, "=I") for offset in (0, 8, 12, 16, 20, 24, 28, 176, 180, 184, 188, 192)),
    *((offset, "=H") for offset in (4, 6, 32, 34)),
    (36, "=Q"),
    (36 + 8 + 128, "=B"),
)


@st.composite
def damaged_datagrams(draw: st.DrawFn) -> bytes:
    """Valid requests with header fields and bytes overwritten and the tail cut or extended,
    so that decode gets past its framing checks often, unlike with wholly random bytes."""
    fields, _decoded = draw(requests())
    buf = bytearray(nlmessages.encode(**fields))
    for offset, fmt in draw(st.lists(st.sampled_from(HEADER_FIELDS), max_size=4)):
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        # Small values hit the length checks near their boundaries; any value, the rest.
        struct.pack_into(
            fmt, buf, offset, draw(st.integers(0, min(top, 600)) | st.integers(0, top))
        )
    for _ in range(draw(st.integers(0, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        return bytes(buf[: draw(st.integers(0, len(buf)))])
    return bytes(buf) + draw(st.binary(max_size=8))


ARBITRARY_BYTES = st.one_of(st.binary(max_size=600), damaged_datagrams())


def _frameable(buf: bytes) -> bool:
    if len(buf) < 36:
        return False
    nlmsg_len = _nlmsg_len(buf)
    if not 196 <= nlmsg_len <= len(buf) <= nlmsg_len + 3:
        return False
    return struct.unpack_from("=I", buf, 192)[0] <= nlmsg_len - 196


@settings(max_examples=500, deadline=None)
@given(ARBITRARY_BYTES)
def test_decode_of_arbitrary_bytes_raises_nothing_but_protocol_error(buf: bytes) -> None:
    try:
        view = nlmessages.decode(buf)
    except ProtocolError:
        assert not _frameable(buf)
        return
    # A trace tool writes views out as JSON lines, as the captures are.
    json.dumps(view)


@settings(max_examples=300, deadline=None)
@given(damaged_datagrams())
def test_decode_shows_any_frameable_datagram_field_by_field(buf: bytes) -> None:
    if not _frameable(buf):
        with pytest.raises(ProtocolError):
            nlmessages.decode(buf)
        return
    view = nlmessages.decode(buf)
    nlmsg_len = _nlmsg_len(buf)
    luid, raw_uuid, version, error, seq, raw_type, data_size = protocol.ULOG_HEADER.unpack_from(
        buf, 36
    )
    request = view["request"]
    assert view["nlmsghdr"] == dict(
        zip(
            ("len", "type", "flags", "seq", "pid"),
            protocol.NLMSGHDR.unpack_from(buf, 0),
            strict=True,
        )
    )
    assert view["cn_msg"] == dict(
        zip(
            ("idx", "val", "seq", "ack", "len", "flags"),
            protocol.CN_MSG.unpack_from(buf, 16),
            strict=True,
        )
    )
    assert (request["luid"], request["version"], request["error"], request["seq"]) == (
        luid,
        version,
        error,
        seq,
    )
    assert (request["request_type"], request["data_size"]) == (raw_type, data_size)
    assert request["data_hex"] == buf[196 : 196 + data_size].hex()
    assert request["uuid"] == raw_uuid.split(b"\0")[0].decode("ascii", "backslashreplace")
    assert view["pad_hex"] == buf[nlmsg_len:].hex()
    try:
        name = RequestType(raw_type).name
    except ValueError:
        name = None
    assert request["name"] == name
    try:
        accepted = protocol.decode_datagram(buf)
    except ProtocolError:
        return
    assert _payload_as_protocol_sees_it(request) == _protocol_payload(accepted)


def _with_data_size(datagram: bytes, data_size: int) -> bytes:
    damaged = bytearray(datagram)
    struct.pack_into("=I", damaged, 192, data_size)
    return bytes(damaged)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (protocol.encode_request(RequestType.DTR, seq=1, uuid="u")[:195], "runs past"),
        (protocol.encode_request(RequestType.DTR, seq=1, uuid="u") + bytes(4), "pad bytes"),
        (protocol.encode_ack(1), "no room"),
        (_with_data_size(protocol.encode_request(RequestType.DTR, seq=1, uuid="u"), 1), "past"),
    ],
    ids=["empty", "cut-short", "four-trailing-bytes", "connector-ack", "data-size-too-big"],
)
def test_decode_refuses_what_it_cannot_frame(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        nlmessages.decode(raw)


def test_decode_shows_an_unknown_request_type_without_a_name_or_payload_view() -> None:
    view = nlmessages.decode(protocol.encode_request(0x107, seq=9, uuid="u", data=b"\1" * 8))
    assert view["request"]["request_type"] == 0x107
    assert view["request"]["name"] is None
    assert view["request"]["decoded"] is None
    assert view["request"]["data_hex"] == "01" * 8


@pytest.mark.parametrize(
    ("request_type", "data"),
    [
        (RequestType.IN_SYNC, b""),
        (RequestType.IS_CLEAN, bytes(16)),
        (RequestType.IS_REMOTE_RECOVERING, bytes(7)),
        (RequestType.MARK_REGION, bytes(12)),
        (RequestType.FLUSH, bytes(4)),
        (RequestType.SET_REGION_SYNC, bytes(8)),
        (RequestType.GET_SYNC_COUNT, b"\1"),
        (RequestType.RESUME, bytes(8)),
    ],
    ids=lambda value: value.name if isinstance(value, RequestType) else f"{len(value)}B",
)
def test_decode_shows_a_payload_of_the_wrong_shape_as_undecoded(
    request_type: RequestType, data: bytes
) -> None:
    view = nlmessages.decode(protocol.encode_request(request_type, seq=9, uuid="u", data=data))
    assert view["request"]["name"] == request_type.name
    assert view["request"]["decoded"] is None
    assert view["request"]["data_hex"] == data.hex()


def test_decode_takes_the_payload_length_from_data_size_not_nlmsg_len() -> None:
    # protocol.decode_datagram accepts this too: bytes inside nlmsg_len past cn_msg.len.
    datagram = bytearray(
        protocol.encode_request(RequestType.IN_SYNC, seq=9, uuid="u", data=struct.pack("=Q", 5))
    )
    struct.pack_into("=I", datagram, 0, len(datagram) + 4)
    view = nlmessages.decode(bytes(datagram) + b"junk")
    assert view["request"]["decoded"] == {"regions": [5]}
    assert view["request"]["data_hex"] == struct.pack("=Q", 5).hex()


def test_decode_shows_a_uuid_without_its_nul_in_full() -> None:
    uuid = b"u" * 129  # the kernel refuses such a uuid; a forged request may carry one
    view = nlmessages.decode(protocol.encode_request(RequestType.DTR, seq=9, uuid=uuid))
    assert view["request"]["uuid"] == "u" * 129


def test_decode_shows_a_non_ascii_uuid_escaped() -> None:
    view = nlmessages.decode(protocol.encode_request(RequestType.DTR, seq=9, uuid=b"a\xffb"))
    assert view["request"]["uuid"] == "a\\xffb"


def test_a_dtr_payload_is_shown_as_ignored_like_the_codec_ignores_it():
    raw = protocol.encode_request(RequestType.DTR, seq=9, uuid="u", luid=1, data=b"argv")
    assert protocol.decode_datagram(raw).regions == ()
    view = nlmessages.decode(raw)
    assert view["request"]["decoded"] == {} and view["request"]["data_hex"] == b"argv".hex()
