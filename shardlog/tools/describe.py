"""Requests and answers in one short line each, for people: ``shardlog replay`` and
``shardlog trace`` show them alike."""

from __future__ import annotations

import struct

from shardlog.wire import protocol
from shardlog.wire.protocol import Request, RequestType

_PAIR_ANSWERS = (RequestType.GET_RESYNC_WORK, RequestType.IS_REMOTE_RECOVERING)


def describe_payload(request: Request) -> str:
    """A request's arguments: ``[3,4,5]``, ``[7]=1``, a constructor string."""
    if request.request_type is RequestType.CTR:
        return repr(request.ctr_string) + (" (reconnect)" if request.reconnect else "")
    if request.request_type is RequestType.SET_REGION_SYNC:
        return f"[{request.regions[0]}]={int(request.in_sync)}"
    if request.regions:
        return "[" + ",".join(map(str, request.regions)) + "]"
    return ""


def describe_answer(request_type: RequestType | None, error: int, data: bytes) -> str:
    """A reply's meaning: ``error -5``, ``{1, 42}``, ``128``, a status string, ``ok``."""
    if error:
        return f"error {error}"
    if request_type in _PAIR_ANSWERS and len(data) == protocol.S64_U64.size:
        flag, region = protocol.S64_U64.unpack(data)
        return f"{{{flag}, {region}}}"
    if len(data) == 8:
        return str(struct.unpack("=q", data)[0])
    if data:
        return repr(data.rstrip(b"\0").decode("ascii", "backslashreplace"))
    return "ok"
