"""The dm-log-userspace request as a pyroute2 message class, for humans rather than speed.

:mod:`shardlog.wire.protocol` is the codec the server runs on: hand-written ``struct`` code that
packs a request in about 0.3 µs.  pyroute2 describes the same datagram declaratively
(``fields`` tuples on top of its ``nlmsghdr`` and ``cn_msg`` classes) but encodes it in
about 38 µs, far too slow for a dirty log that answers every write.  This module keeps that
second, independent description because it is what the slow paths want:

- the trace tool and the test peer print requests with :func:`decode`, which shows every
  field as it is on the wire, unknown request types and odd payloads included, where
  :func:`shardlog.wire.protocol.decode_datagram` refuses anything it would not serve;
- the tests check that two descriptions written separately (pyroute2's field list here,
  the ``struct`` formats in ``protocol``) agree byte for byte with each other and with
  captures from a real kernel, so a wrong offset in either one cannot hide.

:func:`decode` raises :class:`shardlog.wire.protocol.ProtocolError` (and nothing else) when the
bytes cannot even be framed as a request: too short, ``nlmsg_len`` inconsistent with the
datagram, or ``data_size`` running past ``nlmsg_len``.  Everything it can frame it shows.
"""

from __future__ import annotations

import struct
from typing import Any

from pyroute2.netlink.connector import cn_msg

from shardlog.wire.protocol import (
    CN_IDX_DM,
    CN_VAL_DM_USERSPACE_LOG,
    DM_UUID_LEN,
    NLMSG_DONE,
    ONE_REGION_TYPES,
    REGION_LIST_TYPES,
    ProtocolError,
    RequestType,
)

_NLMSGHDR_SIZE = 16
_CN_MSG_SIZE = 20
_ULOG_SIZE = 160
#: Where the payload starts: nlmsghdr + cn_msg + dm_ulog_request.
_PAYLOAD_OFFSET = _NLMSGHDR_SIZE + _CN_MSG_SIZE + _ULOG_SIZE
#: Netlink pads messages to 4 bytes; real kernels hand recv() up to 3 bytes past nlmsg_len.
_MAX_PAD = 3


# Lower-case, after the C struct, as pyroute2 names its own message classes.
class dm_ulog_msg(cn_msg):
    """``nlmsghdr | cn_msg | struct dm_ulog_request | data`` (dm-log-userspace.h).

    The request's ``seq`` is called ``request_seq`` here: pyroute2 keeps all fields of a
    message in one dict, and ``cn_msg`` already owns ``seq``.  ``uuid`` is the raw 129-byte
    field, NULs included, so that decoding and re-encoding give back the same bytes.
    """

    fields = (
        *cn_msg.fields,
        ("luid", "Q"),
        ("uuid", f"{DM_UUID_LEN}s"),
        ("padding", "3x"),
        ("version", "I"),
        ("error", "i"),
        ("request_seq", "I"),
        ("request_type", "I"),
        ("data_size", "I"),
        # A bare 's' is how pyroute2 spells "variable-length bytes" to its encoder (it packs
        # len(value) bytes); its decoder would read one byte, so ft_decode handles it.
        ("data", "s"),
    )
    defaults = {  # noqa: RUF012 -- pyroute2 reads this class attribute as a plain dict
        "header": {"type": NLMSG_DONE},
        "idx": CN_IDX_DM,
        "val": CN_VAL_DM_USERSPACE_LOG,
        "data": b"",
    }

    def ft_decode(self, offset: int) -> None:
        # The generic decoder would unpack the trailing 's' as a single byte, and fail with
        # struct.error on a request without payload, which ends right at the header.  The
        # payload length is the request's own data_size, as the kernel reads it.
        for name, fmt in self.fields[:-1]:
            self[name], offset = self.decode_field(fmt, self.data, offset)
        del self["padding"]  # '3x' decodes to an empty tuple: nothing to show
        self["data"] = bytes(self.data[offset : offset + self["data_size"]])
        # The generic decoder drops these placeholders when there is no NLA chain.
        del self["attrs"]
        del self["value"]


def encode(
    request_type: RequestType | int,
    *,
    seq: int,
    uuid: str | bytes,
    luid: int = 0,
    data: bytes = b"",
    version: int = 3,
) -> bytes:
    """A request datagram built by pyroute2, byte-identical to
    :func:`shardlog.wire.protocol.encode_request` (nlmsg seq = cn_msg seq = request seq)."""
    # ASCII, not pyroute2's implicit UTF-8: a non-ASCII uuid fails as in protocol.encode_request.
    raw_uuid = uuid.encode("ascii") if isinstance(uuid, str) else bytes(uuid)
    msg = dm_ulog_msg()
    msg["header"] = {"type": NLMSG_DONE, "flags": 0, "sequence_number": seq, "pid": 0}
    msg["seq"] = seq
    msg["ack"] = 0
    msg["len"] = _ULOG_SIZE + len(data)
    msg["flags"] = 0
    msg["luid"] = luid
    msg["uuid"] = raw_uuid
    msg["version"] = version
    msg["error"] = 0
    msg["request_seq"] = seq
    msg["request_type"] = int(request_type)
    msg["data_size"] = len(data)
    msg["data"] = bytes(data)
    msg.encode()
    # pyroute2 pads its buffer to 4 bytes but leaves the padding out of nlmsg_len; the
    # kernel's request, and protocol.encode_request, end at nlmsg_len.
    return bytes(msg.data[: msg["header"]["length"]])


def decode(datagram: bytes) -> dict[str, Any]:
    """A human-readable view of one request datagram, parsed by :class:`dm_ulog_msg`.

    Returns ``{"nlmsghdr": {...}, "cn_msg": {...}, "request": {...}, "pad_hex": str}`` with
    the same keys as the ``tests/fixtures`` captures.  ``request["name"]`` is None for an
    unknown type; ``request["decoded"]`` is the payload read according to the type, or None
    when the payload does not have the shape that type needs.  Values are shown as sent,
    not checked: that is :func:`shardlog.wire.protocol.decode_datagram`'s job.
    """
    buf = bytes(datagram)
    if len(buf) < _NLMSGHDR_SIZE + _CN_MSG_SIZE:
        raise ProtocolError(f"truncated datagram: {len(buf)} bytes, a header needs 36")
    (nlmsg_len,) = struct.unpack_from("=I", buf, 0)
    if nlmsg_len > len(buf):
        raise ProtocolError(f"nlmsg_len {nlmsg_len} runs past the {len(buf)}-byte datagram")
    if len(buf) - nlmsg_len > _MAX_PAD:
        raise ProtocolError(
            f"{len(buf) - nlmsg_len} bytes after nlmsg_len {nlmsg_len} (at most 3 pad bytes)"
        )
    if nlmsg_len < _PAYLOAD_OFFSET:
        raise ProtocolError(f"nlmsg_len {nlmsg_len} leaves no room for a dm_ulog_request")
    # Checked here so that pyroute2's decoder never reads past nlmsg_len (it trusts lengths).
    (data_size,) = struct.unpack_from("=I", buf, _PAYLOAD_OFFSET - 4)
    if data_size > nlmsg_len - _PAYLOAD_OFFSET:
        raise ProtocolError(f"data_size {data_size} runs past nlmsg_len {nlmsg_len}")

    msg = dm_ulog_msg(buf[:nlmsg_len])
    msg.decode()
    header = msg["header"]
    raw_type = msg["request_type"]
    request_type = _request_type(raw_type)
    data = msg["data"]
    return {
        "nlmsghdr": {
            "len": header["length"],
            "type": header["type"],
            "flags": header["flags"],
            "seq": header["sequence_number"],
            "pid": header["pid"],
        },
        "cn_msg": {name: msg[name] for name, _fmt in cn_msg.fields},
        "request": {
            "luid": msg["luid"],
            "uuid": _c_string(msg["uuid"]),
            "version": msg["version"],
            "error": msg["error"],
            "seq": msg["request_seq"],
            "request_type": raw_type,
            "name": None if request_type is None else request_type.name,
            "data_size": msg["data_size"],
            "data_hex": data.hex(),
            "decoded": None if request_type is None else _decode_payload(request_type, data),
        },
        "pad_hex": buf[nlmsg_len:].hex(),
    }


def _request_type(raw_type: int) -> RequestType | None:
    # Looked up unmasked: a type with reserved bits set (which the server refuses) then shows
    # as unknown instead of passing for the valid type in its low byte.
    try:
        return RequestType(raw_type)
    except ValueError:
        return None


def _c_string(raw: bytes) -> str:
    nul = raw.find(b"\0")
    text = raw if nul < 0 else raw[:nul]
    return text.decode("ascii", "backslashreplace")


def _decode_payload(request_type: RequestType, data: bytes) -> dict[str, Any] | None:
    size = len(data)
    if request_type in ONE_REGION_TYPES:
        return {"regions": [struct.unpack("=Q", data)[0]]} if size == 8 else None
    if request_type in REGION_LIST_TYPES:
        if size % 8:
            return None
        return {"regions": list(struct.unpack(f"={size // 8}Q", data))}
    if request_type is RequestType.SET_REGION_SYNC:
        if size != 16:
            return None
        region, in_sync = struct.unpack("=Qq", data)
        # The raw s64, not a bool: the kernel sends 0 or 1, and a trace should show it if not.
        return {"region": region, "in_sync": in_sync}
    if request_type is RequestType.CTR:
        # Only the CTR re-sent from the kernel's reconnect loop counts its NUL (protocol.md
        # §3.1), so whether it did is worth seeing.
        nul_terminated = data.endswith(b"\0")
        text = data[:-1] if nul_terminated else data
        return {
            "ctr_str": text.decode("ascii", "backslashreplace"),
            "nul_terminated": nul_terminated,
        }
    if request_type is RequestType.DTR:
        return {}  # an argv the uapi header once promised; ignored, as protocol.py does
    # Every other type carries no payload.
    return {} if not size else None
