"""Crash durability at scale: the whole server SIGKILLed at random moments under load.

Each round writes marks into a set of logs (core and disk, every one with a request in
flight at all times: integrated FLUSHes, MARK + FLUSH, CLEARs), SIGKILLs the front and
every worker at once at a random moment, and then checks the promise a FLUSH reply makes:

- **in the files**: every region whose mark an answered FLUSH covered (and that no CLEAR
  was sent for since) is dirty in the log's instance file (core) or on its log device
  (disk), as a restarted server or the kernel's own ``disk`` log would read them
  (:func:`dirty_regions`, storage's image reader);
- **after a restart**: a new server, restoring each log from its CTR record at its first
  request, answers IS_CLEAN 0 for every such region, and no resync was forced (the sync
  count is still every region).

Then the load goes on against the restarted server, and the next round kills it again.
Requests are sent from a connector socket on the server's ``--test-peer`` port in a
private network namespace: the server's public behaviour only.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardlog.harness.kernelsim.serveprocess import ServeProcess
from shardlog.server.nlsocket import GROUP_7_MASK, open_connector_socket
from shardlog.storage.image import read_stored_image
from shardlog.storage.statedir import instance_file_path
from shardlog.wire import protocol
from shardlog.wire.protocol import ProtocolError, RequestType

T = RequestType


def dirty_regions(path: Path) -> set[int]:
    """The regions whose clean bit is 0 in an instance file or a log device image."""
    image = read_stored_image(path)
    return set(image.clean_bits.search(0))


@dataclass
class LogUnderLoad:
    """One log and what its answered FLUSHes promised."""

    uuid: str
    ctr: str
    region_count: int
    device: Path | None  # a disk log's device, else None
    promised: set[int] = field(default_factory=set)  # durable marks, not cleared since
    unflushed: set[int] = field(default_factory=set)  # marked, no FLUSH sent since
    flushing: set[int] = field(default_factory=set)  # marked before the FLUSH in flight
    queue: list[tuple[RequestType, bytes]] = field(default_factory=list)
    in_flight: tuple[int, RequestType] | None = None  # (seq, type)
    luid: int = 1  # one instance per log: no reloads here


@dataclass
class Result:
    rounds: int = 0
    acknowledged: int = 0  # marks promised by FLUSH replies, summed over rounds
    checked_in_files: int = 0  # promised marks found dirty in the files after a kill
    checked_after_restart: int = 0  # ... and answered dirty by the restarted server
    requests: int = 0
    problems: list[str] = field(default_factory=list)


class CrashCampaign:
    """``rounds`` of load, SIGKILL, check, restart against one state directory."""

    def __init__(self, run_dir: Path, *, logs: int = 8, workers: int = 2,
                 regions: int = 4096, seed: int = 1, peer_port: int = 0x7E57,
                 progress: Callable[[str], None] = lambda line: None):
        self.rng = random.Random(seed)
        self.run_dir = run_dir
        self.progress = progress
        state_dir = run_dir / "state"
        self.server = ServeProcess(state_dir, workers=workers, test_peer=peer_port,
                                   log_level="warning")
        self.peer_port = peer_port
        self.logs: list[LogUnderLoad] = []
        for n in range(logs):
            if n % 4 == 3:
                device = run_dir / f"logdev-{n}"
                device.write_bytes(bytes(1 << 20))
                ctr = f"{regions * 8} disk {device} 8 nosync"
            else:
                device, ctr = None, f"{regions * 8} core 8 nosync"
            self.logs.append(LogUnderLoad(f"crash-{n}", ctr, regions, device))
        self.seq = 0
        self.result = Result()
        self.sock: socket.socket | None = None

    # -- the campaign -----------------------------------------------------------------------

    def run(self, rounds: int, *, load_seconds: tuple[float, float] = (0.05, 1.0)) -> Result:
        self.server.start()
        self.sock = open_connector_socket(self.peer_port, receive_buffer=4 << 20)
        try:
            for log in self.logs:
                self._ask(log, T.CTR, log.ctr.encode())
                self._ask(log, T.RESUME)
            for number in range(1, rounds + 1):
                stop = threading.Event()
                loader = threading.Thread(target=self._load, args=(stop,), daemon=True)
                loader.start()
                time.sleep(self.rng.uniform(*load_seconds))  # a random moment ...
                self.server.kill()  # ... the front and every worker at once
                stop.set()
                loader.join(30)
                self._check_files()
                self.server.start()
                self._check_after_restart()
                self.result.rounds = number
                self.progress(f"round {number}/{rounds}: {self.result.acknowledged:,} marks "
                              f"acknowledged so far, {len(self.result.problems)} problems")
            return self.result
        finally:
            self.sock.close()
            self.server.close()

    # -- load -------------------------------------------------------------------------------

    def _load(self, stop: threading.Event) -> None:
        """Every log with one request in flight, until ``stop`` (the server was killed):
        a request unanswered then simply promised nothing."""
        assert self.sock is not None
        by_seq: dict[int, LogUnderLoad] = {}
        for log in self.logs:
            log.queue.clear()
            log.in_flight = None
            log.unflushed.clear()
            log.flushing.clear()
            self._send_next(log, by_seq)
        self.sock.settimeout(0.05)
        while not stop.is_set():
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = protocol.decode_reply(raw)
            except ProtocolError as exc:
                self.result.problems.append(f"unreadable reply under load: {exc}")
                continue
            log = by_seq.pop(reply.seq, None)
            if log is None or log.in_flight is None:
                continue
            _, request_type = log.in_flight
            log.in_flight = None
            if reply.error:
                # Only a kill may cost an answer (-EAGAIN from a dying worker's front).
                if reply.error != -errno.EAGAIN:
                    self.result.problems.append(
                        f"{log.uuid}: {request_type.name} answered {reply.error} under load")
                log.queue.clear()
            elif request_type is T.FLUSH:
                log.promised |= log.flushing
                self.result.acknowledged += len(log.flushing)
                log.flushing = set()
            self._send_next(log, by_seq)

    def _send_next(self, log: LogUnderLoad, by_seq: dict[int, LogUnderLoad]) -> None:
        if not log.queue:
            log.queue = self._operation(log)
        request_type, data = log.queue.pop(0)
        if request_type is T.FLUSH:
            regions = set(_unpack_regions(data))
            log.flushing = log.unflushed | regions
            log.unflushed = set()
        elif request_type is T.MARK_REGION:
            log.unflushed |= set(_unpack_regions(data))
        elif request_type is T.CLEAR_REGION:
            # From now on the region may be clean: it promises nothing.
            for region in _unpack_regions(data):
                log.promised.discard(region)
                log.unflushed.discard(region)
                log.flushing.discard(region)
        seq = self._send(log, request_type, data)
        log.in_flight = (seq, request_type)
        by_seq[seq] = log

    def _operation(self, log: LogUnderLoad) -> list[tuple[RequestType, bytes]]:
        """What dm-raid1 does for a batch of writes: marks made durable, and clears of
        regions whose writes completed — often enough that few regions stay dirty, so
        that most marks land on clean regions, where a lost one would show."""
        rng = self.rng
        regions = rng.sample(range(log.region_count), rng.choice((1, 3, 8, 32)))
        roll = rng.random()
        if roll < 0.35:
            return [(T.FLUSH, protocol.pack_regions(regions))]  # integrated flush
        if roll < 0.7 or not log.promised:
            return [(T.MARK_REGION, protocol.pack_regions(regions)), (T.FLUSH, b"")]
        cleared = rng.sample(sorted(log.promised), min(len(log.promised), 32))
        return [(T.CLEAR_REGION, protocol.pack_regions(cleared)), (T.FLUSH, b"")]

    # -- checks -----------------------------------------------------------------------------

    def _check_files(self) -> None:
        for log in self.logs:
            path = log.device or instance_file_path(self.server.state_dir, log.uuid, log.luid)
            missing = log.promised - dirty_regions(path)
            if missing:
                self.result.problems.append(
                    f"round {self.result.rounds + 1}: {log.uuid}: acknowledged marks "
                    f"{sorted(missing)[:10]} are clean in {path}")
            self.result.checked_in_files += len(log.promised - missing)

    def _check_after_restart(self) -> None:
        for log in self.logs:
            clean = [region for region in sorted(log.promised)
                     if protocol.S64.unpack(self._ask(log, T.IS_CLEAN,
                                                      protocol.pack_u64(region)))[0]]
            if clean:
                self.result.problems.append(
                    f"round {self.result.rounds + 1}: {log.uuid}: acknowledged marks "
                    f"{clean[:10]} answered clean after the restart")
            self.result.checked_after_restart += len(log.promised) - len(clean)
            count = protocol.U64.unpack(self._ask(log, T.GET_SYNC_COUNT))[0]
            if count != log.region_count:
                self.result.problems.append(
                    f"{log.uuid}: sync count {count} after the restart, not "
                    f"{log.region_count}: a resync was forced")

    # -- requests ---------------------------------------------------------------------------

    def _send(self, log: LogUnderLoad, request_type: RequestType, data: bytes = b"") -> int:
        assert self.sock is not None
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        datagram = protocol.encode_request(request_type, seq=self.seq, uuid=log.uuid,
                                           luid=log.luid, data=data)
        # Delivered to the group; the send then finds no kernel at port 0 here.
        with contextlib.suppress(ConnectionRefusedError):
            self.sock.sendto(datagram, (0, GROUP_7_MASK))
        self.result.requests += 1
        return self.seq

    def _ask(self, log: LogUnderLoad, request_type: RequestType, data: bytes = b"",
             timeout: float = 10.0) -> bytes:
        """One request, its answer's payload (a problem recorded if it failed)."""
        assert self.sock is not None
        seq = self._send(log, request_type, data)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{log.uuid}: no answer to {request_type.name}")
            self.sock.settimeout(remaining)
            reply = protocol.decode_reply(self.sock.recv(65536))
            if reply.seq != seq:
                continue  # a late answer from before a kill
            if reply.error:
                self.result.problems.append(
                    f"{log.uuid}: {request_type.name} answered {reply.error}")
                return bytes(protocol.REPLY_SIZES[request_type] or 0)
            return reply.data


def _unpack_regions(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"={len(data) // 8}Q", data) if data else ()
