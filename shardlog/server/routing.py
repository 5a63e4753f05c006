"""The routing hash: which shard serves a log, decided inside the kernel.

Every request of dm-log-userspace is multicast to every member of connector group 7, and
the kernel runs each member socket's filter before it delivers (``do_one_broadcast`` in
net/netlink/af_netlink.c).  So the front opens one group-7 socket per shard and attaches a
classic BPF program that hashes the request's uuid field and accepts only its own shard's
requests: each request wakes exactly one worker, with no process hop in between.

The hash exists twice, and the two must agree bit for bit (tests/process/test_routing.py sends
datagrams through the real kernel's filters to prove it):

- :func:`route_hash` / :func:`shard_of_datagram`, in Python, for status, capacity's
  balance prediction and tests;
- :func:`compile_filter`, the same arithmetic as a ``struct sock_filter`` program.

So the hash uses only what classic BPF does on its 32-bit registers: absolute loads (which
are big-endian), xor, multiply by a constant, shifts, modulo.  It covers the *whole*
129-byte uuid field (the kernel zero-pads it after the NUL), read as 32 big-endian words
and the last byte: ``h = ((h ^ w) * P) mod 2**32; h ^= h >> 15`` per word, then murmur3's
``fmix32`` finalizer.  A multiply pushes a difference only towards the high bits: the
xorshift in each round folds it back (without it, flipping bit 31 of any word gave one
and the same hash), and the finalizer mixes the last words' differences into the low bits
that ``% shards`` reads — LVM uuids (``LVM-`` + a VG uuid shared by many mirrors + an LV
uuid) differ only in a few words.

Changing any constant here moves logs between the shards of a running server (the old
workers' filters stay attached until restart): the tests pin known values on purpose.

A datagram that cannot be hashed (too short) or is not a dm-log-userspace request (another
nlmsg type or connector id) goes to exactly one socket, :data:`DESIGNATED_SHARD`'s, which
answers or drops it: a request that no socket accepts makes the kernel believe no server
runs.

Everything here is sans-IO except :func:`attach_filter`.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from shardlog.wire.protocol import (
    CN_IDX_DM,
    CN_MSG,
    CN_VAL_DM_USERSPACE_LOG,
    DM_UUID_LEN,
    NLMSG_DONE,
    NLMSGHDR,
)

#: Where the uuid field starts in a datagram: nlmsghdr (16) + cn_msg (20) + luid (8).
UUID_FIELD_OFFSET = NLMSGHDR.size + CN_MSG.size + 8
UUID_FIELD_LEN = DM_UUID_LEN
#: The shortest datagram whose uuid field can be hashed.
HASHABLE_LEN = UUID_FIELD_OFFSET + UUID_FIELD_LEN
#: The shard whose socket takes every datagram that cannot be routed by its uuid.
DESIGNATED_SHARD = 0

_NLMSG_TYPE_OFFSET = 4  # nlmsghdr: len u32, type u16, ...
_CN_IDX_OFFSET = NLMSGHDR.size  # cn_msg: idx u32, val u32, ...
_CN_VAL_OFFSET = NLMSGHDR.size + 4

# The hash's constants.  Odd multipliers, so each step is a bijection of h for a given
# word; the finalizer is murmur3's fmix32.
_SEED = 0x811C9DC5
_WORD_MULTIPLIER = 0x9E3779B1  # 2**32 / golden ratio, made odd: spreads bits well
#: Folded back after each word's multiply: a multiply carries a difference only towards
#: the high bits, so without it a flip of bit 31 of *any* word gave the same hash.
_ROUND_SHIFT = 15
_FMIX_MULTIPLIER_1 = 0x85EBCA6B
_FMIX_MULTIPLIER_2 = 0xC2B2AE35
_FMIX_SHIFTS = (16, 13, 16)
_MASK32 = 0xFFFFFFFF

_WORDS = struct.Struct(f">{UUID_FIELD_LEN // 4}I{UUID_FIELD_LEN % 4}x")
_WORD_COUNT = UUID_FIELD_LEN // 4  # 32 words, then the 129th byte alone

# The header fields as the filter sees them.  They are in the host's order on the wire
# but BPF's halfword and word loads are big-endian, so the filter compares against the
# big-endian reading of their native bytes.
_NATIVE_U16 = struct.Struct("=H")
_NATIVE_U32 = struct.Struct("=I")
_CONNECTOR_ID = struct.Struct("=II")  # cn_msg's idx and val


def _as_loaded_u16(value: int) -> int:
    return int.from_bytes(_NATIVE_U16.pack(value), "big")


def _as_loaded_u32(value: int) -> int:
    return int.from_bytes(_NATIVE_U32.pack(value), "big")


# --- the hash, in Python --------------------------------------------------------------


def route_hash(uuid_field: bytes) -> int:
    """The 32-bit routing hash of a whole 129-byte uuid field (as it sits in a datagram)."""
    if len(uuid_field) != UUID_FIELD_LEN:
        raise ValueError(f"a uuid field is {UUID_FIELD_LEN} bytes, not {len(uuid_field)}")
    h = _SEED
    for word in (*_WORDS.unpack_from(uuid_field), uuid_field[-1]):
        h = ((h ^ word) * _WORD_MULTIPLIER) & _MASK32
        h ^= h >> _ROUND_SHIFT
    first, second, third = _FMIX_SHIFTS
    h ^= h >> first
    h = (h * _FMIX_MULTIPLIER_1) & _MASK32
    h ^= h >> second
    h = (h * _FMIX_MULTIPLIER_2) & _MASK32
    h ^= h >> third
    return h


def shard_of_uuid(uuid: str | bytes, shards: int) -> int:
    """The shard of a log: its uuid NUL-padded to the field's 129 bytes, as the kernel
    sends it (a longer one is cut, as ``encode_request`` and strlcpy do)."""
    raw = uuid.encode("ascii") if isinstance(uuid, str) else uuid
    field = raw[:UUID_FIELD_LEN].ljust(UUID_FIELD_LEN, b"\0")
    return route_hash(field) % shards


def shard_of_datagram(datagram: bytes, shards: int) -> int:
    """The shard whose filter accepts ``datagram``: what :func:`compile_filter` decides."""
    if len(datagram) < HASHABLE_LEN:
        return DESIGNATED_SHARD
    (nlmsg_type,) = _NATIVE_U16.unpack_from(datagram, _NLMSG_TYPE_OFFSET)
    connector_id = _CONNECTOR_ID.unpack_from(datagram, _CN_IDX_OFFSET)
    if nlmsg_type != NLMSG_DONE or connector_id != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG):
        return DESIGNATED_SHARD
    return route_hash(bytes(datagram[UUID_FIELD_OFFSET:HASHABLE_LEN])) % shards


# --- the hash, as a classic BPF program -----------------------------------------------

# Opcodes of linux/filter.h (classic BPF) that the program uses.
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_LEN = 0x00, 0x20, 0x80
BPF_MUL, BPF_RSH, BPF_MOD, BPF_XOR = 0x20, 0x70, 0x90, 0xA0
BPF_JEQ, BPF_JGE = 0x10, 0x30
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX = 0x00

#: A socket filter's verdict: the bytes to keep (all of them) or 0 (drop).
ACCEPT = 0xFFFFFFFF
REJECT = 0
#: The kernel's limit on a classic program (BPF_MAXINSNS).
MAX_INSTRUCTIONS = 4096
#: ``struct sock_filter``: u16 code, u8 jt, u8 jf, u32 k, in the host's order.
SOCK_FILTER = struct.Struct("=HBBI")

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def _stmt(code: int, k: int = 0) -> Instruction:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> Instruction:
    return (code, jt, jf, k)


def _xorshift_right(bits: int) -> list[Instruction]:
    """A ^= A >> bits, with X as the copy of A that the shift leaves behind."""
    return [
        _stmt(BPF_MISC | BPF_TAX),
        _stmt(BPF_ALU | BPF_RSH | BPF_K, bits),
        _stmt(BPF_ALU | BPF_XOR | BPF_X),
    ]


def _mix_in(load: Instruction) -> list[Instruction]:
    """h = (h ^ loaded) * P; h ^= h >> 15.  Between rounds the running hash lives in X,
    because every load overwrites A; each round ends with A = X = h."""
    return [
        load,
        _stmt(BPF_ALU | BPF_XOR | BPF_X),
        _stmt(BPF_ALU | BPF_MUL | BPF_K, _WORD_MULTIPLIER),
        *_xorshift_right(_ROUND_SHIFT),
        _stmt(BPF_MISC | BPF_TAX),
    ]


def _hash_program() -> list[Instruction]:
    """A = route_hash(the datagram's uuid field); the length was checked before."""
    program = [_stmt(BPF_LDX | BPF_W | BPF_IMM, _SEED)]
    for index in range(_WORD_COUNT):
        program += _mix_in(_stmt(BPF_LD | BPF_W | BPF_ABS, UUID_FIELD_OFFSET + 4 * index))
    program += _mix_in(_stmt(BPF_LD | BPF_B | BPF_ABS, HASHABLE_LEN - 1))
    # fmix32 (its first TAX is redundant after a round's last: kept for readability).
    first, second, third = _FMIX_SHIFTS
    program += _xorshift_right(first)
    program.append(_stmt(BPF_ALU | BPF_MUL | BPF_K, _FMIX_MULTIPLIER_1))
    program += _xorshift_right(second)
    program.append(_stmt(BPF_ALU | BPF_MUL | BPF_K, _FMIX_MULTIPLIER_2))
    program += _xorshift_right(third)
    return program


def _header_checks(designated_verdict: int) -> list[Instruction]:
    """Send what cannot be routed by its uuid to the designated verdict, and fall
    through to the hash otherwise.  The verdict sits right after the checks, so that
    every jump to it is short (a classic jump offset is a u8)."""
    checks = [
        # Too short: loading the uuid field would abort the program, which drops the
        # datagram on every socket — and the kernel would think no server runs.
        (_stmt(BPF_LD | BPF_W | BPF_LEN), BPF_JGE, HASHABLE_LEN),
        # Not a connector message: routed to the designated socket to be answered/dropped.
        (_stmt(BPF_LD | BPF_H | BPF_ABS, _NLMSG_TYPE_OFFSET), BPF_JEQ,
         _as_loaded_u16(NLMSG_DONE)),
        # Another connector user's id: not a dm-log-userspace request.
        (_stmt(BPF_LD | BPF_W | BPF_ABS, _CN_IDX_OFFSET), BPF_JEQ, _as_loaded_u32(CN_IDX_DM)),
        (_stmt(BPF_LD | BPF_W | BPF_ABS, _CN_VAL_OFFSET), BPF_JEQ,
         _as_loaded_u32(CN_VAL_DM_USERSPACE_LOG)),
    ]
    program: list[Instruction] = []
    for position, (load, comparison, expected) in enumerate(checks):
        checks_after = len(checks) - 1 - position
        to_verdict = 2 * checks_after  # each later check is a load and a jump
        # A check that passes falls through to the next one; the last one jumps over the
        # verdict into the hash, and fails by falling through to the verdict.
        if checks_after:
            program += [load, _jump(BPF_JMP | comparison | BPF_K, expected, 0, to_verdict)]
        else:
            program += [load, _jump(BPF_JMP | comparison | BPF_K, expected, 1, 0)]
    program.append(_stmt(BPF_RET | BPF_K, designated_verdict))
    return program


def _shard_check(shard: int, shards: int) -> list[Instruction]:
    """Accept when hash % shards is this shard."""
    return [
        _stmt(BPF_ALU | BPF_MOD | BPF_K, shards),
        _jump(BPF_JMP | BPF_JEQ | BPF_K, shard, 0, 1),
        _stmt(BPF_RET | BPF_K, ACCEPT),
        _stmt(BPF_RET | BPF_K, REJECT),
    ]


def filter_instructions(shard: int, shards: int) -> list[Instruction]:
    """The program of :func:`compile_filter`, as ``(code, jt, jf, k)`` tuples."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of {shards}")
    designated = ACCEPT if shard == DESIGNATED_SHARD else REJECT
    return _header_checks(designated) + _hash_program() + _shard_check(shard, shards)


def compile_filter(shard: int, shards: int) -> bytes:
    """The ``struct sock_filter`` array of a program that accepts exactly the datagrams
    :func:`shard_of_datagram` gives to ``shard`` and rejects the rest."""
    return b"".join(SOCK_FILTER.pack(*instruction)
                    for instruction in filter_instructions(shard, shards))


# --- attaching it ---------------------------------------------------------------------

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_LOCK_FILTER = 44


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog``: the program's length in instructions and its address."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_filter(sock: socket.socket, shard: int, shards: int) -> None:
    """Attach ``shard``'s filter to ``sock`` and lock it (SO_LOCK_FILTER), so that it can
    be neither replaced nor detached for the socket's life.  Raises OSError."""
    program = compile_filter(shard, shards)
    # The kernel copies the program during setsockopt: the buffer only has to outlive it.
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
