"""Sans-IO codec for the device-mapper userspace dirty log protocol.

Theory of operation
-------------------
The kernel's ``dm-log-userspace`` sends each log operation as one netlink datagram on the
connector (``NETLINK_CONNECTOR``, id ``{CN_IDX_DM=7, CN_VAL_DM_USERSPACE_LOG=1}``)::

    nlmsghdr (16) | cn_msg (20) | dm_ulog_request (160) | payload (data_size)

and waits for a reply carrying the same ``dm_ulog_request.seq``.  This module turns the
bytes of one datagram into a :class:`Request` and a result back into reply bytes.  It owns
no sockets, no files and no log state: the caller reads datagrams, decides what to answer
(``dirtylog``/``logtable``) and writes the bytes this module builds.

Everything the kernel can get wrong or an attacker can forge ends in exactly one exception
type, :class:`ProtocolError`, whose ``reason`` says what was wrong.  When the datagram was
recognisably a request for us (right connector id, a readable seq), ``ProtocolError.reply``
holds a ready -EINVAL answer: the kernel waits for every request it sends, and an
unanswered one stalls the mirror for 15 s before a retry (protocol.md §1.6).

Byte order is the host's (kernel and server share the machine); the kernel `disk` log's
on-disk layout is little-endian and lives in ``storage.layout``.  Reply payload sizes are exact
(protocol.md §3.18): the kernel reads an uninitialised variable after a short reply and
fails a long one with -ENOSPC.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

# --- constants from include/uapi/linux/{connector,dm-log-userspace}.h ---------------------

CN_IDX_DM = 7
CN_VAL_DM_USERSPACE_LOG = 1
NETLINK_CONNECTOR = 11
NLMSG_DONE = 3

DM_UUID_LEN = 129
DM_ULOG_REQUEST_MASK = 0xFF
SUPPORTED_VERSIONS = (1, 2, 3)
#: The kernel builds requests in a 512-byte buffer holding cn_msg + dm_ulog_request + data.
MAX_PAYLOAD = 512 - 20 - 160
#: MARK, CLEAR and integrated FLUSH group at most this many regions (MAX_FLUSH_GROUP_COUNT).
MAX_REGIONS_PER_REQUEST = 32
#: The kernel's buffer for the CTR reply (a NUL-terminated device name) is DM_NAME_LEN.
MAX_CTR_REPLY = 128

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
ULOG_HEADER = struct.Struct(f"=Q{DM_UUID_LEN}s3xIiIII")  # luid uuid version error seq type size
assert NLMSGHDR.size == 16 and CN_MSG.size == 20 and ULOG_HEADER.size == 160
_NL_CN_HEADERS = struct.Struct("=IHHII" "IIIIHH")  # both at once: one call on the hot path
# Every header field a request's decoding checks, in one call (the well-formed path).
_ALL_HEADERS = struct.Struct(f"=IH10xII8xH2xQ{DM_UUID_LEN}s3xIiIII")
assert _ALL_HEADERS.size == 196

_NL_CN = NLMSGHDR.size + CN_MSG.size  # 36: where dm_ulog_request starts in a datagram
_HEADERS_END = _NL_CN + ULOG_HEADER.size  # 196: where a request's payload starts
_ULOG_SIZE = ULOG_HEADER.size  # 160
_ULOG_OFFSET_ERROR = 140 + 4
_ULOG_OFFSET_SEQ = 148
_ULOG_TAIL = struct.Struct("=iIII")  # error seq type size, rewritten in a reply
# A full reply's error field, for the front to count results without decoding replies.
REPLY_ERROR = struct.Struct("=i")
REPLY_ERROR_OFFSET = _NL_CN + _ULOG_OFFSET_ERROR
REPLY_DATA_OFFSET = _NL_CN + ULOG_HEADER.size  # where a reply's payload starts

U64 = struct.Struct("=Q")
S64 = struct.Struct("=q")
S64_U64 = struct.Struct("=qQ")  # GET_RESYNC_WORK and IS_REMOTE_RECOVERING replies
U64_S64 = struct.Struct("=Qq")  # SET_REGION_SYNC payload


class RequestType(IntEnum):
    """``DM_ULOG_*`` request types (dm-log-userspace.h)."""

    CTR = 1
    DTR = 2
    PRESUSPEND = 3
    POSTSUSPEND = 4
    RESUME = 5
    GET_REGION_SIZE = 6
    IS_CLEAN = 7
    IN_SYNC = 8
    FLUSH = 9
    MARK_REGION = 10
    CLEAR_REGION = 11
    GET_RESYNC_WORK = 12
    SET_REGION_SYNC = 13
    GET_SYNC_COUNT = 14
    STATUS_INFO = 15
    STATUS_TABLE = 16
    IS_REMOTE_RECOVERING = 17


# How each request's payload is shaped; the decoder checks it and the encoder follows it.
_NO_PAYLOAD = frozenset(
    {
        RequestType.PRESUSPEND,
        RequestType.POSTSUSPEND,
        RequestType.RESUME,
        RequestType.GET_REGION_SIZE,
        RequestType.GET_RESYNC_WORK,
        RequestType.GET_SYNC_COUNT,
        RequestType.STATUS_INFO,
        RequestType.STATUS_TABLE,
    }
)
ONE_REGION_TYPES = frozenset(
    {RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.IS_REMOTE_RECOVERING}
)
REGION_LIST_TYPES = frozenset(
    {RequestType.MARK_REGION, RequestType.CLEAR_REGION, RequestType.FLUSH}
)

# Reply payload sizes the kernel's result buffer has (protocol.md §3.18).  None: variable.
REPLY_SIZES: dict[RequestType, int | None] = {
    RequestType.CTR: None,
    RequestType.DTR: 0,
    RequestType.PRESUSPEND: 0,
    RequestType.POSTSUSPEND: 0,
    RequestType.RESUME: 0,
    RequestType.GET_REGION_SIZE: 8,
    RequestType.IS_CLEAN: 8,
    RequestType.IN_SYNC: 8,
    RequestType.FLUSH: 0,
    RequestType.MARK_REGION: 0,
    RequestType.CLEAR_REGION: 0,
    RequestType.GET_RESYNC_WORK: 16,
    RequestType.SET_REGION_SYNC: 0,
    RequestType.GET_SYNC_COUNT: 8,
    RequestType.STATUS_INFO: None,
    RequestType.STATUS_TABLE: None,
    RequestType.IS_REMOTE_RECOVERING: 16,
}


_TYPES_BY_VALUE = {t.value: t for t in RequestType}


class ProtocolError(ValueError):
    """A datagram that is not a well-formed request.

    ``reason`` says what was wrong.  ``seq`` is the request's seq when it could be read from
    a datagram addressed to the dm-log-userspace connector; then ``reply`` holds the bytes
    of an -EINVAL answer, so the kernel is not left waiting.  Otherwise both are None and
    the datagram is simply dropped (it was not a request for us).
    """

    def __init__(self, reason: str, seq: int | None = None, reply: bytes | None = None):
        super().__init__(reason)
        self.reason = reason
        self.seq = seq
        self.reply = reply


class Request(NamedTuple):
    """One decoded request (a NamedTuple: built on every request, it must be cheap).

    ``header`` is the raw 160-byte ``dm_ulog_request`` header, echoed in the reply.
    Payload views, filled according to ``request_type``:

    - ``regions``: the u64 region(s) of IS_CLEAN, IN_SYNC, IS_REMOTE_RECOVERING,
      MARK_REGION, CLEAR_REGION and FLUSH (integrated flush: the regions to mark);
      for SET_REGION_SYNC the one region, with ``in_sync`` its new state;
    - ``ctr_string``: the CTR constructor string, ``"<target sectors> <log args…>"``;
      ``reconnect`` is True when the kernel counted its NUL, which it does only on the
      CTR it re-sends from its reconnect loop (protocol.md §1.6), which takes no reply data.
    """

    luid: int
    uuid: str
    version: int
    seq: int
    request_type: RequestType
    data: bytes
    header: bytes
    regions: tuple[int, ...] = ()
    in_sync: bool = False
    ctr_string: str = ""
    reconnect: bool = False

    @property
    def name(self) -> str:
        return self.request_type.name


def _error_reply_for(header: bytes, reason: str, seq: int) -> ProtocolError:
    return ProtocolError(reason, seq, encode_reply_raw(header, -errno.EINVAL, b""))


def decode_datagram(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one kernel request datagram.

    Raises :class:`ProtocolError` (and nothing else) for anything malformed.  Up to three
    pad bytes after ``nlmsg_len`` (netlink alignment, seen from real kernels) are ignored.
    """
    if type(buf) is not bytes:
        buf = bytes(buf)
    # The well-formed request, checked with one unpack and one test; anything else takes
    # the careful path below, which says what is wrong.
    if len(buf) >= _HEADERS_END:
        (nlmsg_len, nlmsg_type, idx, val, cn_len, luid, raw_uuid, version, _error, seq,
         raw_type, data_size) = _ALL_HEADERS.unpack_from(buf)
        end = _HEADERS_END + data_size
        uuid = _uuid_cache.get(raw_uuid)
        request_type = _TYPES_BY_VALUE.get(raw_type)
        if (nlmsg_len == end and nlmsg_type == NLMSG_DONE and idx == CN_IDX_DM
                and val == CN_VAL_DM_USERSPACE_LOG and cn_len == _ULOG_SIZE + data_size
                and data_size <= MAX_PAYLOAD and end <= len(buf) <= end + 3
                and version in SUPPORTED_VERSIONS and uuid is not None
                and request_type is not None):
            data = buf[_HEADERS_END:end]
            if version == 3:
                unpack = _WELL_FORMED_V3.get(raw_type << 16 | data_size)
                if unpack is not None:
                    return _new_tuple(Request, (luid, uuid, 3, seq, request_type, data,
                                                buf[_NL_CN:_HEADERS_END], unpack(data),
                                                False, "", False))
            try:
                fields = _PAYLOAD_DECODERS[request_type](request_type, version, data)
            except ValueError:
                pass  # the careful path says why
            else:
                # tuple.__new__: a NamedTuple's own __new__ is a Python call (~0.6 µs).
                return _new_tuple(Request, (luid, uuid, version, seq, request_type, data,
                                            buf[_NL_CN:_HEADERS_END], *fields))
    return _decode_carefully(buf)


_new_tuple = tuple.__new__


def _decode_carefully(buf: bytes) -> Request:
    """:func:`decode_datagram` checking one thing at a time, for a precise reason."""
    buf = bytes(buf)
    if len(buf) < _NL_CN:
        raise ProtocolError(f"truncated datagram: {len(buf)} bytes, a header needs {_NL_CN}")
    (nlmsg_len, nlmsg_type, _flags, _nl_seq, _pid,
     idx, val, cn_seq, _ack, cn_len, _cn_flags) = _NL_CN_HEADERS.unpack_from(buf, 0)
    if (idx, val) != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG):
        raise ProtocolError(f"connector id {{{idx},{val}}} is not dm-log-userspace {{7,1}}")
    if nlmsg_type != NLMSG_DONE:
        raise ProtocolError(f"nlmsg_type {nlmsg_type} is not NLMSG_DONE")
    # From here on the datagram is addressed to us: answer what can be answered.
    if nlmsg_len > len(buf):
        reason = f"nlmsg_len {nlmsg_len} runs past the {len(buf)}-byte datagram"
        raise _partial_error(buf, reason, cn_seq)
    if nlmsg_len < _NL_CN:
        reason = f"nlmsg_len {nlmsg_len} is shorter than nlmsghdr + cn_msg"
        raise _partial_error(buf, reason, cn_seq)
    padding = len(buf) - nlmsg_len
    if padding > 3:
        reason = f"{padding} bytes after nlmsg_len {nlmsg_len} (at most 3 pad bytes)"
        raise _partial_error(buf, reason, cn_seq)
    if cn_len < ULOG_HEADER.size:
        raise _partial_error(buf, f"cn_msg.len {cn_len} is below the 160-byte request", cn_seq)
    if _NL_CN + cn_len != nlmsg_len:
        reason = f"cn_msg.len {cn_len} disagrees with nlmsg_len {nlmsg_len} (+36)"
        raise _partial_error(buf, reason, cn_seq)
    header = buf[_NL_CN : _NL_CN + ULOG_HEADER.size]
    luid, raw_uuid, version, _error, seq, raw_type, data_size = ULOG_HEADER.unpack(header)
    if cn_len != ULOG_HEADER.size + data_size:
        reason = f"cn_msg.len {cn_len} disagrees with data_size {data_size} (+160)"
        raise _error_reply_for(header, reason, seq)
    if data_size > MAX_PAYLOAD:
        reason = f"data_size {data_size} exceeds the kernel's {MAX_PAYLOAD}-byte maximum"
        raise _error_reply_for(header, reason, seq)
    if version not in SUPPORTED_VERSIONS:
        reason = f"protocol version {version} is not one of {SUPPORTED_VERSIONS}"
        raise _error_reply_for(header, reason, seq)
    uuid = _uuid_cache.get(raw_uuid)
    if uuid is None:
        uuid = _decode_uuid(raw_uuid, header, seq)
    request_type = _TYPES_BY_VALUE.get(raw_type)
    if request_type is None:
        if raw_type & ~DM_ULOG_REQUEST_MASK:
            reason = f"reserved bits set in request type {raw_type:#x}"
        else:
            reason = f"unknown request type {raw_type}"
        raise _error_reply_for(header, reason, seq)
    data = buf[_NL_CN + ULOG_HEADER.size : _NL_CN + ULOG_HEADER.size + data_size]
    try:
        fields = _decode_payload(request_type, version, data)
    except ValueError as exc:
        raise _error_reply_for(header, f"{request_type.name}: {exc}", seq) from None
    return Request(luid, uuid, version, seq, request_type, data, header, *fields)


_PEEK_MIN = _NL_CN + ULOG_HEADER.size
# nlmsg_type, then cn_msg.id, then (in dm_ulog_request) uuid, seq and request_type.
_PEEK = struct.Struct(f"=4xH10xII12x8x{DM_UUID_LEN}s3x8xII")


def peek_request(buf: bytes) -> tuple[bytes, int, int] | None:
    """What routing needs from a datagram, read without decoding it: ``(uuid_field,
    seq, request_type)`` — the uuid's bytes up to their NUL (the routing key), the seq the
    kernel waits on, the raw type (not yet checked) — for a datagram addressed to
    dm-log-userspace with a whole request header; otherwise None (then
    :func:`decode_datagram` says what is wrong).  Nothing past the header is checked:
    whoever answers the request decodes it in full.  One unpack: it runs per request in
    the front."""
    if len(buf) < _PEEK_MIN:
        return None
    nlmsg_type, idx, val, uuid_field, seq, request_type = _PEEK.unpack_from(buf)
    if nlmsg_type != NLMSG_DONE or idx != CN_IDX_DM or val != CN_VAL_DM_USERSPACE_LOG:
        return None
    return uuid_field.partition(b"\0")[0], seq, request_type


# Every request of a log carries the same 129-byte uuid field: remember the ones that were
# already checked.  Bounded, so that forged uuids cannot grow it without limit.
_uuid_cache: dict[bytes, str] = {}
_UUID_CACHE_LIMIT = 65536


def _decode_uuid(raw_uuid: bytes, header: bytes, seq: int) -> str:
    nul = raw_uuid.find(b"\0")
    if nul < 0:
        raise _error_reply_for(header, "uuid is longer than 128 bytes (no NUL)", seq)
    try:
        uuid = raw_uuid[:nul].decode("ascii")
    except UnicodeDecodeError:
        raise _error_reply_for(header, "uuid is not ASCII", seq) from None
    if not uuid.isprintable() or not uuid:
        raise _error_reply_for(header, f"uuid {uuid!r} is empty or unprintable", seq)
    if len(_uuid_cache) >= _UUID_CACHE_LIMIT:
        _uuid_cache.clear()
    _uuid_cache[raw_uuid] = uuid
    return uuid


def _partial_error(buf: bytes, reason: str, cn_seq: int) -> ProtocolError:
    """An error for a request whose dm_ulog_request header may not be usable.

    If the 160-byte header is there its seq is the one the kernel waits on; otherwise the
    kernel's cn_msg.seq (which it sets equal to it) is answered with a connector ACK.
    """
    if len(buf) >= _NL_CN + ULOG_HEADER.size:
        header = buf[_NL_CN : _NL_CN + ULOG_HEADER.size]
        (seq,) = struct.unpack_from("=I", header, _ULOG_OFFSET_SEQ)
        return _error_reply_for(header, reason, seq)
    return ProtocolError(reason, cn_seq, encode_ack(cn_seq, errno.EINVAL))


# Payload views in Request's field order: regions, in_sync, ctr_string, reconnect.
_PayloadFields = tuple[tuple[int, ...], bool, str, bool]
_NO_FIELDS: _PayloadFields = ((), False, "", False)


def _decode_payload(request_type: RequestType, version: int, data: bytes) -> _PayloadFields:
    return _PAYLOAD_DECODERS[request_type](request_type, version, data)


def _no_payload(request_type: RequestType, version: int, data: bytes) -> _PayloadFields:
    if data:
        raise ValueError(f"carries no payload, got {len(data)} bytes")
    return _NO_FIELDS


def _one_region(request_type: RequestType, version: int, data: bytes) -> _PayloadFields:
    if len(data) != 8:
        raise ValueError(f"payload is one u64 region, got {len(data)} bytes")
    return U64.unpack(data), False, "", False


def _region_list(request_type: RequestType, version: int, data: bytes) -> _PayloadFields:
    size = len(data)
    if not size:
        return _NO_FIELDS  # an empty FLUSH, the most frequent request of all
    unpack = _REGION_LISTS_BY_SIZE.get(size)
    if unpack is not None and (version >= 3 or request_type is not RequestType.FLUSH):
        return unpack(data), False, "", False
    if size % 8:
        raise ValueError(f"region payload of {size} bytes is not a multiple of 8")
    count = size // 8
    if count > MAX_REGIONS_PER_REQUEST:
        raise ValueError(f"{count} regions, at most {MAX_REGIONS_PER_REQUEST}")
    if request_type is RequestType.FLUSH and count and version < 3:
        raise ValueError(f"regions in a FLUSH need protocol version 3, not {version}")
    return _REGION_LISTS[count].unpack(data), False, "", False


def _set_region_sync(request_type: RequestType, version: int,
                     data: bytes) -> _PayloadFields:
    if len(data) != U64_S64.size:
        raise ValueError(f"payload is {{u64 region; s64 in_sync}}, got {len(data)} bytes")
    region, in_sync = U64_S64.unpack(data)
    return (region,), bool(in_sync), "", False


def _ignored_payload(request_type: RequestType, version: int,
                     data: bytes) -> _PayloadFields:
    # DTR: the uapi header once promised an argv payload; the kernel sends none and
    # nothing in it matters, so whatever is there is ignored.
    return _NO_FIELDS


_REGION_LISTS = [struct.Struct(f"={count}Q") for count in range(MAX_REGIONS_PER_REQUEST + 1)]
# The well-formed region lists' unpackers by payload size: one lookup on the hot path.
_REGION_LISTS_BY_SIZE = {s.size: s.unpack for s in _REGION_LISTS}


def _decode_ctr(request_type: RequestType, version: int, data: bytes) -> _PayloadFields:
    reconnect = data.endswith(b"\0")
    text = data[:-1] if reconnect else data
    if not text:
        raise ValueError("empty constructor string")
    if b"\0" in text:
        raise ValueError("constructor string is not terminated where data_size says")
    try:
        ctr_string = text.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("constructor string is not ASCII") from None
    if not ctr_string.isprintable():
        raise ValueError(f"constructor string {ctr_string!r} has control characters")
    return (), False, ctr_string, reconnect


# The region-carrying and empty payloads of the current protocol (version 3) that are
# well formed, by ``type << 16 | size``: the unpacker of their ``regions`` (an empty one
# for no payload), so that the kernel's everyday requests are decoded with one lookup and
# no call of a payload decoder.  Anything else (other versions, sizes, types) goes
# through _PAYLOAD_DECODERS, which says what is wrong.
_WELL_FORMED_V3 = {
    **{int(t) << 16: _REGION_LISTS[0].unpack for t in _NO_PAYLOAD},
    **{int(t) << 16 | U64.size: U64.unpack for t in ONE_REGION_TYPES},
    **{int(t) << 16 | s.size: s.unpack for t in REGION_LIST_TYPES for s in _REGION_LISTS},
}

# One payload decoder per request type: one lookup on the hot path.
_PAYLOAD_DECODERS = {
    **dict.fromkeys(_NO_PAYLOAD, _no_payload),
    **dict.fromkeys(ONE_REGION_TYPES, _one_region),
    **dict.fromkeys(REGION_LIST_TYPES, _region_list),
    RequestType.SET_REGION_SYNC: _set_region_sync,
    RequestType.CTR: _decode_ctr,
    RequestType.DTR: _ignored_payload,
}
assert set(_PAYLOAD_DECODERS) == set(RequestType)


# --- replies --------------------------------------------------------------------------------


def encode_reply(request: Request, error: int, data: bytes = b"") -> bytes:
    """A full reply to ``request``: its header echoed with ``error`` and ``data``.

    ``error`` is 0 or a negative errno.  An error reply carries no data (the kernel keeps
    no data from a failed request).  The payload size is checked against what the kernel's
    buffer for this request type holds.
    """
    size = len(data)
    if not error and size == _FIXED_REPLY_SIZES.get(request.request_type):
        # The common answer (a success of a fixed size), checked with one lookup and
        # packed here: a call less per request (_encode's pack, inline).
        seq = request.seq
        return _REPLY_HEADERS.pack(_HEADERS_END + size, NLMSG_DONE, 0, 0, 0, CN_IDX_DM,
                                   CN_VAL_DM_USERSPACE_LOG, seq, 0, _ULOG_SIZE + size, 0,
                                   request.header, 0, seq, request.request_type,
                                   size) + data
    if not -4095 <= error <= 0:
        raise ValueError(f"error must be 0 or a negative errno, not {error}")
    if error:
        data = b""
    else:
        want = REPLY_SIZES[request.request_type]
        if request.request_type is RequestType.CTR and request.reconnect:
            want = 0
        if want is not None and len(data) != want:
            raise ValueError(f"{request.name} reply is {want} bytes, not {len(data)}")
        if request.request_type is RequestType.CTR:
            if len(data) > MAX_CTR_REPLY:
                raise ValueError(f"CTR reply of {len(data)} bytes exceeds {MAX_CTR_REPLY}")
            if data and not data.endswith(b"\0"):
                # The kernel fails the table load on an unterminated device name.
                raise ValueError("CTR reply must be a NUL-terminated device name")
    return _encode(request.header, request.seq, request.request_type, error, data)


def encode_reply_raw(header: bytes, error: int, data: bytes) -> bytes:
    """Reply bytes for a raw request header, without any size policy."""
    seq, request_type = struct.unpack_from("=II", header, _ULOG_OFFSET_SEQ)
    return _encode(header, seq, request_type, error, data)


# A reply's headers at once: nlmsghdr, cn_msg, then the request's dm_ulog_request echoed
# up to its error field (the ``s`` field takes the first bytes of the whole header) and
# the rewritten error, seq, type and size.
_REPLY_HEADERS = struct.Struct(f"=IHHIIIIIIHH{_ULOG_OFFSET_ERROR}s" + _ULOG_TAIL.format[1:])
assert _REPLY_HEADERS.size == _HEADERS_END
# Request types whose successful reply always has one size (not CTR, not the statuses).
_FIXED_REPLY_SIZES = {t: size for t, size in REPLY_SIZES.items() if size is not None}


def _encode(header: bytes, seq: int, request_type: int, error: int, data: bytes) -> bytes:
    cn_len = ULOG_HEADER.size + len(data)
    return _REPLY_HEADERS.pack(_NL_CN + cn_len, NLMSG_DONE, 0, 0, 0, CN_IDX_DM,
                               CN_VAL_DM_USERSPACE_LOG, seq, 0, cn_len, 0, header, error,
                               seq, request_type, len(data)) + data


def encode_ack(seq: int, positive_errno: int = 0) -> bytes:
    """A connector ACK (``cn_msg.len == 0``): the kernel matches it on ``cn_msg.seq`` and
    takes ``-ack`` as the result.  Used only where no dm_ulog_request header is readable."""
    return NLMSGHDR.pack(_NL_CN, NLMSG_DONE, 0, 0, 0) + CN_MSG.pack(
        CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, seq, positive_errno, 0, 0
    )


# Typed reply payloads, so that callers never pack wire formats themselves.


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def pack_bool(value: bool) -> bytes:
    """IN_SYNC and IS_CLEAN answer exactly 0 or 1: the kernel compares with ``== 1``."""
    return S64.pack(1 if value else 0)


def pack_resync_work(assigned: bool, region: int) -> bytes:
    return S64_U64.pack(1 if assigned else 0, region)


def pack_remote_recovering(recovering: bool, in_sync_hint: int) -> bytes:
    return S64_U64.pack(1 if recovering else 0, in_sync_hint)


def pack_string(text: str) -> bytes:
    """A NUL-terminated ASCII string (CTR device name, STATUS_INFO / STATUS_TABLE)."""
    return text.encode("ascii") + b"\0"


# --- requests (for the simulated kernel and the tests) ---------------------------------------


def encode_request(
    request_type: RequestType | int,
    *,
    seq: int,
    uuid: str | bytes,
    luid: int = 0,
    data: bytes = b"",
    version: int = 3,
    error: int = 0,
) -> bytes:
    """A request datagram as ``dm_consult_userspace`` builds it (nlmsg seq = request seq).

    It checks nothing, so that tests can also build what a kernel never would (a uuid of
    129 bytes fills the field with no NUL; a longer one is cut).
    """
    raw_uuid = uuid.encode("ascii") if isinstance(uuid, str) else uuid
    header = ULOG_HEADER.pack(luid, raw_uuid, version, error, seq, int(request_type), len(data))
    cn_len = ULOG_HEADER.size + len(data)
    return (
        NLMSGHDR.pack(_NL_CN + cn_len, NLMSG_DONE, 0, seq, 0)
        + CN_MSG.pack(CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, seq, 0, cn_len, 0)
        + header
        + data
    )


def pack_regions(regions: list[int] | tuple[int, ...]) -> bytes:
    return struct.pack(f"={len(regions)}Q", *regions)


def pack_set_region_sync(region: int, in_sync: bool) -> bytes:
    return U64_S64.pack(region, 1 if in_sync else 0)


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply, as the kernel's ``cn_ulog_callback`` + ``fill_pkg`` read it."""

    seq: int
    error: int
    data: bytes
    ack: bool  # True for a connector ACK (cn_msg.len == 0)


def decode_reply(buf: bytes | bytearray | memoryview) -> Reply:
    """Read a reply the way the kernel does; :class:`ProtocolError` if it would drop it."""
    buf = bytes(buf)
    if len(buf) < _NL_CN:
        raise ProtocolError(f"truncated reply: {len(buf)} bytes")
    nlmsg_len = NLMSGHDR.unpack_from(buf, 0)[0]
    if nlmsg_len > len(buf) or nlmsg_len < _NL_CN:
        raise ProtocolError(f"reply nlmsg_len {nlmsg_len} does not fit {len(buf)} bytes")
    idx, val, cn_seq, ack, cn_len, _flags = CN_MSG.unpack_from(buf, NLMSGHDR.size)
    if (idx, val) != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG):
        raise ProtocolError(f"reply connector id {{{idx},{val}}} is not {{7,1}}")
    if cn_len == 0:
        return Reply(cn_seq, -ack, b"", ack=True)
    if cn_len < ULOG_HEADER.size or _NL_CN + cn_len > nlmsg_len:
        raise ProtocolError(f"incomplete reply: cn_msg.len {cn_len}")
    _luid, _uuid, _v, error, seq, _t, data_size = ULOG_HEADER.unpack_from(buf, _NL_CN)
    start = _NL_CN + ULOG_HEADER.size
    if start + data_size > len(buf):
        raise ProtocolError(f"reply data_size {data_size} runs past the datagram")
    return Reply(seq, error, buf[start : start + data_size], ack=False)
