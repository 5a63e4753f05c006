"""Fuzzing shardlog as an outsider would: the inputs, and the contract they are judged by.

Inputs (:class:`Inputs`: seeded, cheap enough for a million) are datagrams of three kinds:
well-formed requests on a few logs that are kept live (every request type; regions in and
out of range; good and bad constructor strings, reconnect CTRs, a uuid of 128 characters
whose escaped name is long; versions 1-3), the same mutated (bits flipped, bytes set, cut,
appended, header fields overwritten with edge values), and random bytes.

The contract (:class:`TableFuzzer` in one process; :class:`LiveFuzzer` against a running
``shardlog serve``):

- a datagram the codec refuses never reaches a log; when the kernel would wait for it,
  it is answered -EINVAL;
- every well-formed request is answered, with its seq, in a reply the kernel can read;
- a refused request (a negative errno) changes nothing: no log's state or bits, no file
  of the state directory (names, inodes, sizes), no CTR record (in process only: the
  live server is judged by its answers and its log);
- nothing is answered from a swallowed exception (no traceback logged), no log whose
  storage is healthy answers -EIO, and (live) no worker dies.

In process the requests go through :class:`~shardlog.log.logtable.LogTable` as a worker
drives it: in batches, FLUSHes staged and group-committed at the end of each batch.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardlog.log.logtable import LogKey, LogTable
from shardlog.log.outcome import encode
from shardlog.server.nlsocket import GROUP_7_MASK
from shardlog.wire import protocol
from shardlog.wire.ctrargs import CtrArgsError, parse_ctr_string
from shardlog.wire.protocol import ProtocolError, Request, RequestType

T = RequestType

#: Uuids the well-formed requests use: few, so that most requests meet a live log.  The
#: last is a legal dm uuid whose escaped file name would exceed NAME_MAX.
UUIDS = ("log-a", "LVM-vg/lv mirror", "%" * 128)
LUIDS = (1, 0xFFFF8881)
_MOST_LOGS = 24  # in process, logs of mutated uuids beyond this are destroyed

# Where the fields of a request datagram are, for mutations that hit them on purpose:
# (offset, size) of nlmsg_len, nlmsg_type, cn_msg idx, val and len, luid, version, error,
# seq, request type, data_size.
_FIELDS = ((0, 4), (4, 2), (16, 4), (20, 4), (32, 2), (36, 8), (176, 4), (180, 4),
           (184, 4), (188, 4), (192, 4))
_EDGE_VALUES = (0, 1, 2, 3, 7, 17, 18, 160, 332, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_WEIGHTED_TYPES = (
    [T.IN_SYNC] * 4 + [T.IS_CLEAN] * 3 + [T.MARK_REGION] * 4 + [T.CLEAR_REGION] * 3
    + [T.FLUSH] * 5 + [T.GET_RESYNC_WORK] * 2 + [T.SET_REGION_SYNC] * 2
    + [T.IS_REMOTE_RECOVERING, T.GET_SYNC_COUNT, T.GET_REGION_SIZE, T.STATUS_INFO,
       T.STATUS_TABLE, T.PRESUSPEND, T.POSTSUSPEND, T.RESUME, T.DTR, T.CTR]
)


class Inputs:
    """Seeded datagrams, steered towards live logs by what their answers said
    (:meth:`note`)."""

    def __init__(self, rng: random.Random, device: Path, *, random_share: float = 0.1,
                 mutated_share: float = 0.35):
        self.rng = rng
        self.device = device  # a scratch file that disk logs may use as their device
        self.random_share = random_share
        self.mutated_share = mutated_share
        self.keys: list[LogKey] = [(uuid, luid) for uuid in UUIDS for luid in LUIDS]
        self.regions: dict[LogKey, int] = {}  # logs constructed (CTR answered 0): regions
        self.resumed: set[LogKey] = set()
        self.seq = 0

    def next(self) -> bytes:
        roll = self.rng.random()
        if roll < self.random_share:
            return self.rng.randbytes(self.rng.choice((0, 8, 36, 195, 196, 200, 300, 700)))
        datagram = self.well_formed()
        if roll < self.random_share + self.mutated_share:
            return self.mutate(datagram)
        return datagram

    def note(self, request: Request, error: int) -> None:
        """What an answer says about a log's life: steers the next requests."""
        key = (request.uuid, request.luid)
        if error:
            return
        if request.request_type is T.CTR and not request.reconnect:
            self.regions[key] = parse_ctr_string(request.ctr_string).region_count
            self.resumed.discard(key)
        elif request.request_type is T.RESUME and key in self.regions:
            self.resumed.add(key)
        elif request.request_type is T.DTR:
            self.regions.pop(key, None)
            self.resumed.discard(key)

    # -- well-formed requests -------------------------------------------------------------

    def well_formed(self) -> bytes:
        rng = self.rng
        key = rng.choice(self.keys)
        if key not in self.regions and rng.random() < 0.6:
            request_type = T.CTR
        elif key not in self.resumed and key in self.regions and rng.random() < 0.6:
            request_type = T.RESUME
        else:
            request_type = rng.choice(_WEIGHTED_TYPES)
        data = self._payload(request_type, self.regions.get(key, 64))
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        version = rng.choice((1, 2, 3, 3, 3))
        return protocol.encode_request(request_type, seq=self.seq, uuid=key[0], luid=key[1],
                                       data=data, version=version)

    def _payload(self, request_type: RequestType, region_count: int) -> bytes:
        rng = self.rng
        if request_type is T.CTR:
            return self.ctr_string().encode() + (b"\0" if rng.random() < 0.1 else b"")
        if request_type in protocol.ONE_REGION_TYPES:
            return protocol.pack_u64(self.region(region_count))
        if request_type is T.SET_REGION_SYNC:
            return protocol.pack_set_region_sync(self.region(region_count),
                                                 rng.random() < 0.7)
        if request_type in protocol.REGION_LIST_TYPES:
            if request_type is T.FLUSH and rng.random() < 0.5:
                return b""
            count = rng.choice((1, 1, 2, 3, 32))
            return protocol.pack_regions([self.region(region_count) for _ in range(count)])
        return b""

    def region(self, region_count: int) -> int:
        rng = self.rng
        if rng.random() < 0.93:
            return rng.randrange(region_count)
        return rng.choice((region_count, region_count + 1, 1 << 32, (1 << 63) - 1,
                           (1 << 64) - 1))

    def ctr_string(self) -> str:
        rng = self.rng
        sectors = rng.choice((64, 1000, 8192, 65536))
        region_size = rng.choice((2, 8, 64))
        flags = rng.choice(("", " nosync", " nosync", " sync", " nosync block_on_error"))
        if rng.random() < 0.8:
            kind = rng.choice(("core", "core", "clustered-core", "disk"))
            device = f" {self.device}" if kind == "disk" else ""
            return f"{sectors} {kind}{device} {region_size}{flags}"
        return rng.choice((
            f"{sectors} core 7{flags}",  # not a power of two
            f"{sectors} core 0",
            f"{sectors} core 3 nosync",
            "64 core 128",  # regions larger than the target
            f"{sectors} mirror 8",
            f"{sectors} core 8 nosync nosync",
            f"{sectors} core 8 whatever",
            f"{sectors} core",
            f"{sectors} disk 8",
            f"{sectors} disk /nonexistent/device 8",
            f"x{sectors} core 8",
            f"{sectors} core 8 nosync".ljust(protocol.MAX_PAYLOAD),  # no room for a NUL
        ))

    # -- mutations ----------------------------------------------------------------------------

    def mutate(self, datagram: bytes) -> bytes:
        rng = self.rng
        mutated = bytearray(datagram)
        for _ in range(rng.randint(1, 3)):
            operation = rng.randrange(6)
            if operation == 0 and mutated:
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            elif operation == 1 and mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            elif operation == 2:
                del mutated[rng.randrange(len(mutated) + 1):]
            elif operation == 3:
                mutated += rng.randbytes(rng.randint(1, 64))
            elif operation == 4:
                offset, size = rng.choice(_FIELDS)
                value = rng.choice((*_EDGE_VALUES, rng.getrandbits(32), len(mutated)))
                value &= (1 << (8 * size)) - 1
                mutated[offset:offset + size] = value.to_bytes(size, "little")
            elif operation == 5 and len(mutated) > 196:
                at = rng.randrange(196, len(mutated))  # in the payload: regions, CTR text
                mutated[at] = rng.choice(b"0123456789 \0%/x")
        return bytes(mutated)


# -- the contract, in one process ---------------------------------------------------------------


@dataclass
class Defect:
    what: str
    datagram: bytes

    def __str__(self) -> str:
        return f"{self.what}\n    datagram: {self.datagram.hex()}"


@dataclass
class Tally:
    """What a fuzzing run did: inputs, answers by errno, and any defect found."""

    inputs: int = 0
    seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)  # errno name ("ok") -> count
    refused_by_codec: int = 0  # of which answered -EINVAL by the codec: in answers too
    dropped: int = 0  # not for us: nothing to answer
    defects: list[Defect] = field(default_factory=list)
    defect_count: int = 0

    def defect(self, what: str, datagram: bytes, keep: int = 20) -> None:
        self.defect_count += 1
        if len(self.defects) < keep:
            self.defects.append(Defect(what, datagram))

    def decode(self, datagram: bytes) -> tuple[Request | None, bytes | None]:
        """One input, counted: its request, or None and the codec's -EINVAL reply (None
        too when it was not a request for us, and is dropped)."""
        self.inputs += 1
        try:
            return protocol.decode_datagram(datagram), None
        except ProtocolError as exc:
            self.refused_by_codec += 1
            if exc.reply is None:
                self.dropped += 1
            return None, exc.reply

    def answered(self, error: int) -> None:
        self.answers[errno_name(error)] += 1


def errno_name(error: int) -> str:
    if error == 0:
        return "ok"
    return "-" + errno.errorcode.get(-error, str(-error))


class Tracebacks(logging.Handler):
    """Counts log records that carry an exception: an answer made from a swallowed one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.records.append(record)


def table_state(table: LogTable) -> tuple:
    """What a refused request must not change: every log's state and bits (its instance
    file's mapping), and every file of the state directory (name, inode, size and
    modification time: an instance file or CTR record replaced, grown or written)."""
    logs = {
        key: (log.state, log.config.ctr_string, log.region_map.clean_bits.tobytes(),
              log.region_map.sync_bits.tobytes(), log.sync_count, log.sync_search,
              log.recovering, log.recovery_halted, log.health)
        for key, log in table.logs.items()
    }
    files = {}
    try:
        with os.scandir(table.state_dir / "logs") as entries:
            for entry in entries:
                st = entry.stat()
                files[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        pass
    return logs, files


def check_answer(tally: Tally, inputs: Inputs, request: Request, error: int, data: bytes,
                 datagram: bytes) -> None:
    """What the contract says of any answer to a well-formed request, in process or over
    the wire: never -EIO (the storage is healthy), the exact size when it succeeds; and
    what it tells the inputs of the logs now live."""
    if error == -errno.EIO:
        tally.defect(f"{request.name} answered -EIO with healthy storage", datagram)
    size = protocol.REPLY_SIZES[request.request_type]
    if error == 0 and size is not None and len(data) != size:
        tally.defect(f"{request.name} answered {len(data)} bytes, not {size}", datagram)
    try:
        inputs.note(request, error)
    except CtrArgsError:
        tally.defect(f"CTR {request.ctr_string!r} accepted, yet unparsable", datagram)


class TableFuzzer:
    """Datagrams through the codec and a LogTable, in batches as a worker answers them,
    each checked against the contract (module docstring)."""

    def __init__(self, state_dir: Path, inputs: Inputs, *, check_state: bool = True):
        self.table = LogTable(state_dir)
        self.inputs = inputs
        self.check_state = check_state
        self.tally = Tally()

    def run(self, count: int, batch: int = 8) -> Tally:
        tracebacks = Tracebacks()
        root = logging.getLogger("shardlog")
        root.addHandler(tracebacks)
        started = time.perf_counter()
        try:
            done = 0
            while done < count:
                size = min(count - done, self.inputs.rng.randint(1, batch))
                self.batch([self.inputs.next() for _ in range(size)], tracebacks)
                done += size
                if len(self.table.logs) > _MOST_LOGS:
                    self._destroy_strays()
        finally:
            root.removeHandler(tracebacks)
            self.tally.seconds += time.perf_counter() - started
        return self.tally

    def _destroy_strays(self) -> None:
        """DTR the logs that mutated uuids and luids made, as their kernel would: they
        would pile up over a million inputs."""
        for uuid, luid in list(self.table.logs):
            if (uuid, luid) not in self.inputs.keys:
                self.inputs.seq = (self.inputs.seq + 1) & 0xFFFFFFFF
                self.table.answer(protocol.decode_datagram(protocol.encode_request(
                    T.DTR, seq=self.inputs.seq, uuid=uuid, luid=luid)))

    def batch(self, datagrams: list[bytes], tracebacks: Tracebacks) -> None:
        tally = self.tally
        staged: list[tuple[bytes, Request]] = []
        for datagram in datagrams:
            request, refusal = tally.decode(datagram)
            if request is None:
                if refusal is not None:
                    self._check_reply(datagram, None, refusal, expect_error=-errno.EINVAL)
                continue
            before = table_state(self.table) if self.check_state else None
            seen = len(tracebacks.records)
            outcome = self.table.decide(request)
            if outcome is None:
                staged.append((datagram, request))
            else:
                error = self._check_reply(datagram, request, encode(request, outcome))
                if error and before is not None and table_state(self.table) != before:
                    tally.defect(f"refused {request.name} ({errno_name(error)}) changed "
                                 "a log's state or files", datagram)
            self._check_tracebacks(datagram, tracebacks, seen)
        if staged:
            seen = len(tracebacks.records)
            outcomes = self.table.commit_staged()
            if len(outcomes) != len(staged):
                tally.defect(f"{len(staged)} FLUSHes staged, {len(outcomes)} answered",
                             staged[0][0])
            for (datagram, request), outcome in zip(staged, outcomes, strict=False):
                self._check_reply(datagram, request, encode(request, outcome))
            self._check_tracebacks(staged[0][0], tracebacks, seen)

    def _check_reply(self, datagram: bytes, request: Request | None, reply: bytes,
                     expect_error: int | None = None) -> int:
        tally = self.tally
        try:
            decoded = protocol.decode_reply(reply)
        except ProtocolError as exc:
            tally.defect(f"unreadable reply ({exc}): {reply.hex()}", datagram)
            return 0
        tally.answered(decoded.error)
        if expect_error is not None and decoded.error != expect_error:
            tally.defect(f"codec refusal answered {errno_name(decoded.error)}", datagram)
        if request is None:
            return decoded.error
        if decoded.seq != request.seq:
            tally.defect(f"{request.name} answered with seq {decoded.seq}", datagram)
        check_answer(tally, self.inputs, request, decoded.error, decoded.data, datagram)
        return decoded.error

    def _check_tracebacks(self, datagram: bytes, tracebacks: Tracebacks, seen: int) -> None:
        for record in tracebacks.records[seen:]:
            self.tally.defect(f"answered from a swallowed exception: {record.getMessage()}"
                              f" ({record.exc_info[1]!r})", datagram)

    def close(self) -> None:
        self.table.close()


# -- the contract, against a live server --------------------------------------------------------


class LiveFuzzer:
    """Datagrams sent to a running ``shardlog serve`` (started with ``--test-peer``, in
    a private network namespace) from the peer's socket, a window at a time; every
    well-formed request must be answered.  ``server_alive`` and ``server_log`` are how
    the caller's server is watched."""

    def __init__(self, sock: socket.socket, inputs: Inputs, *,
                 server_alive: Callable[[], bool], server_log: Callable[[], str],
                 window: int = 32, reply_timeout: float = 10.0):
        self.sock = sock
        self.inputs = inputs
        self.server_alive = server_alive
        self.server_log = server_log
        self.window = window
        self.reply_timeout = reply_timeout
        self.tally = Tally()

    def run(self, count: int) -> Tally:
        started = time.perf_counter()
        log_before = len(self.server_log())
        try:
            done = 0
            while done < count:
                size = min(self.window, count - done)
                self._window([self.inputs.next() for _ in range(size)])
                done += size
                if not self.server_alive():
                    self.tally.defect("the server exited", b"")
                    break
        finally:
            self.tally.seconds += time.perf_counter() - started
        new_log = self.server_log()[log_before:]
        for marker in ("Traceback", " died ("):
            if marker in new_log:
                line = next(line for line in new_log.splitlines() if marker in line)
                self.tally.defect(f"server log: {line.strip()}", b"")
        return self.tally

    def _window(self, datagrams: list[bytes]) -> None:
        tally = self.tally
        expected: dict[int, tuple[bytes, Request]] = {}
        for datagram in datagrams:
            request, _refusal = tally.decode(datagram)
            if request is not None:
                # Seqs are unique among well-formed requests; a mutated one may reuse one.
                expected.setdefault(request.seq, (datagram, request))
            try:
                self.sock.sendto(datagram, (0, GROUP_7_MASK))
            except ConnectionRefusedError:
                pass  # delivered to the group; no kernel at port 0 here
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # netlink carries no empty datagram
                    raise
        deadline = time.monotonic() + self.reply_timeout
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for datagram, request in expected.values():
                    tally.defect(f"{request.name} (seq {request.seq}) never answered",
                                 datagram)
                return
            self.sock.settimeout(remaining)
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            self._reply(raw, expected)
        # Answers to mutated datagrams that were not well-formed may trail: take them.
        self.sock.settimeout(0.0)
        while True:
            try:
                raw = self.sock.recv(65536)
            except BlockingIOError:
                break
            self._reply(raw, expected)

    def _reply(self, raw: bytes, expected: dict[int, tuple[bytes, Request]]) -> None:
        tally = self.tally
        try:
            reply = protocol.decode_reply(raw)
        except ProtocolError as exc:
            tally.defect(f"unreadable reply ({exc}): {raw.hex()}", b"")
            return
        tally.answered(reply.error)
        pending = expected.pop(reply.seq, None)
        if pending is None:
            return  # a refused mutated datagram's -EINVAL
        datagram, request = pending
        if reply.error == -errno.EAGAIN:
            tally.defect(f"{request.name} answered -EAGAIN (a worker died?)", datagram)
        check_answer(tally, self.inputs, request, reply.error, reply.data, datagram)


def format_tally(title: str, tally: Tally) -> str:
    rate = tally.inputs / tally.seconds if tally.seconds else 0.0
    answers = ", ".join(f"{name} {count:,}" for name, count in tally.answers.most_common())
    lines = [f"{title}: {tally.inputs:,} inputs in {tally.seconds:.1f} s "
             f"({rate:,.0f} inputs/s)",
             f"  refused by the codec: {tally.refused_by_codec:,} "
             f"(of which dropped, not for us: {tally.dropped:,})",
             f"  answers by errno: {answers or 'none'}",
             f"  defects: {tally.defect_count}"]
    lines += [f"  {defect}" for defect in tally.defects]
    return "\n".join(lines)
