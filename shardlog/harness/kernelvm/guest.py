"""What code running inside the guest (or on a host with dm-log-userspace) uses: loop
devices over tmpfs files, dmsetup, mirror tables and status, direct I/O, a shardlog
server.  The kernel scenarios (tests/kernel/guest), the demo and the benchmark share it.

Everything here talks to the real kernel: dmsetup (with DM_DISABLE_UDEV, as there is no
udev in the guest), losetup, O_DIRECT reads and writes through the device-mapper device,
and ``dmsetup status`` for what the kernel reports.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitarray import bitarray

from shardlog.harness.kernelsim.serveprocess import ServeProcess

SECTOR = 512


class GuestError(Exception):
    """A command the kernel answered with an error; the message has its output."""


def run(*command: str, input: str | None = None, check: bool = True) -> str:
    env = dict(os.environ, DM_DISABLE_UDEV="1")
    result = subprocess.run(command, input=input, capture_output=True, text=True, env=env,
                            timeout=120)
    if check and result.returncode != 0:
        raise GuestError(f"{' '.join(command)} exited {result.returncode}: "
                         f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


def dmsetup(*args: str, input: str | None = None, check: bool = True) -> str:
    return run("dmsetup", *args, input=input, check=check)


def create_devices(tables: dict[str, str]) -> None:
    """Many device-mapper devices in one dmsetup call (``--concise``: name,uuid,minor,
    flags,table entries separated by ``;``), as each dmsetup run costs a process."""
    spec = ";".join(f"{name},,,rw,{table}" for name, table in tables.items())
    dmsetup("create", "--concise", spec)


def kernel_log() -> str:
    return run("dmesg")


def has_userspace_log() -> bool:
    """True where the running kernel can give a mirror a userspace log (loads modules)."""
    if not Path("/dev/mapper/control").exists() and \
            subprocess.run(["modprobe", "dm-mod"], capture_output=True).returncode != 0:
        return False
    if Path("/sys/module/dm_log_userspace").exists():
        return True
    return subprocess.run(["modprobe", "dm-log-userspace"],
                          capture_output=True).returncode == 0


# -- block devices ------------------------------------------------------------------------------


@dataclass
class Loop:
    """A loop device over a file (sparse unless ``fill``)."""

    backing: Path
    path: Path

    @classmethod
    def create(cls, backing: Path, size: int, fill: bytes | None = None) -> Loop:
        with open(backing, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                chunk = (fill * ((1 << 20) // len(fill) + 1))[:1 << 20]
                for _ in range(size >> 20):
                    f.write(chunk)
                f.write(chunk[:size & ((1 << 20) - 1)])
        device = run("losetup", "--find", "--show", str(backing)).strip()
        return cls(backing=backing, path=Path(device))

    @property
    def number(self) -> str:
        """``major:minor``, as a table names a log device."""
        rdev = os.stat(self.path).st_rdev
        return f"{os.major(rdev)}:{os.minor(rdev)}"

    def detach(self) -> None:
        run("losetup", "--detach", str(self.path), check=False)
        self.backing.unlink(missing_ok=True)


def direct_write(device: Path | str, offset: int, data: bytes) -> None:
    """One O_DIRECT write (``data`` a multiple of 4 KiB, ``offset`` aligned)."""
    buffer = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buffer.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        written = os.pwritev(fd, [buffer], offset)
    finally:
        os.close(fd)
        buffer.close()
    if written != len(data):
        raise GuestError(f"short direct write to {device}: {written} of {len(data)}")


def direct_read(device: Path | str, offset: int, length: int) -> bytes:
    buffer = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buffer], offset)
        return bytes(buffer[:got])
    finally:
        os.close(fd)
        buffer.close()


def device_size(device: Path | str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def differing_chunks(a: Path | str, b: Path | str, chunk: int = 1 << 20) -> list[int]:
    """Offsets of the ``chunk``-sized pieces in which two devices differ (direct reads:
    no stale page cache of either)."""
    size = min(device_size(a), device_size(b))
    return [offset for offset in range(0, size, chunk)
            if direct_read(a, offset, chunk) != direct_read(b, offset, chunk)]


# -- mirrors ------------------------------------------------------------------------------------


def mirror_table(sectors: int, legs: list[str], *, log: str = "core",
                 log_device: str | None = None, region_sectors: int = 1024,
                 nosync: bool = False, uuid: str | None = None,
                 integrated_flush: bool = False) -> str:
    """A ``mirror`` table line: with ``uuid`` a ``userspace`` log (shardlog's), without
    it the in-kernel ``core`` or ``disk`` log."""
    log_args = ([log_device] if log == "disk" else []) + [str(region_sectors)]
    if nosync:
        log_args.append("nosync")
    if uuid is None:
        log_part = [log, str(len(log_args)), *log_args]
    else:
        # The count covers the uuid, integrated_flush and the log's own words.
        extra = ["integrated_flush"] if integrated_flush else []
        words = [uuid, *extra, log, *log_args]
        log_part = ["userspace", str(len(words)), *words]
    leg_part = [str(len(legs))] + [word for leg in legs for word in (leg, "0")]
    return " ".join(["0", str(sectors), "mirror", *log_part, *leg_part])


@dataclass
class MirrorStatus:
    """``dmsetup status`` of a mirror, as the kernel reports it."""

    legs: list[str]
    in_sync: int
    regions: int
    health: str  # one letter per leg: A alive, D dead, S sync failure, ...
    log_status: list[str]  # what the log reports (for userspace: shardlog's STATUS_INFO)

    @classmethod
    def parse(cls, line: str) -> MirrorStatus:
        words = line.split()
        if len(words) < 4 or words[2] != "mirror":
            raise GuestError(f"not a mirror's status: {line!r}")
        nr_legs = int(words[3])
        legs = words[4:4 + nr_legs]
        in_sync, regions = map(int, words[4 + nr_legs].split("/"))
        nr_health = int(words[5 + nr_legs])
        health = " ".join(words[6 + nr_legs:6 + nr_legs + nr_health])
        return cls(legs, in_sync, regions, health, words[6 + nr_legs + nr_health:])

    @property
    def synced(self) -> bool:
        return self.in_sync == self.regions


@dataclass
class Mirror:
    name: str
    table: str
    created: bool = field(default=False, init=False)

    @property
    def path(self) -> Path:
        return Path("/dev/mapper") / self.name

    def create(self) -> Mirror:
        dmsetup("create", self.name, "--table", self.table)
        self.created = True
        return self

    def status(self) -> MirrorStatus:
        return MirrorStatus.parse(dmsetup("status", self.name).strip())

    def kernel_table(self) -> str:
        return dmsetup("table", self.name).strip()

    def suspend(self) -> None:
        dmsetup("suspend", self.name)

    def resume(self) -> None:
        dmsetup("resume", self.name)

    def reload(self, table: str) -> None:
        """Load a new table and swap it in (suspend + resume), as LVM does."""
        dmsetup("load", self.name, "--table", table)
        self.suspend()
        self.resume()
        self.table = table

    def wait_synced(self, timeout: float = 120.0) -> MirrorStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.synced:
                return status
            if time.monotonic() > deadline:
                raise GuestError(f"{self.name} not in sync after {timeout:.0f} s: "
                                 f"{status.in_sync}/{status.regions}")
            time.sleep(0.2)

    def remove(self) -> None:
        if self.created:
            dmsetup("remove", self.name)
            self.created = False


def remove_all(mirrors: list[Mirror]) -> None:
    """Best effort, for cleanup after a failure: nothing left for the next scenario."""
    for mirror in mirrors:
        if mirror.created:
            with contextlib.suppress(GuestError):
                dmsetup("resume", mirror.name, check=False)
                dmsetup("remove", "--force", mirror.name, check=False)
            mirror.created = False


# -- load ---------------------------------------------------------------------------------------


class WriteLoop:
    """O_DIRECT 4 KiB writes to a device in a thread, each block stamped with its offset
    and a counter, until stopped or ``count`` writes; errors are kept, not raised, and
    each completed write's time (monotonic) and offset are kept in ``completed``."""

    def __init__(self, device: Path | str, size: int, *, count: int | None = None,
                 block: int = 4096, stride: int = 7919, first_block: int = 0):
        self.device, self.size, self.count, self.block = device, size, count, block
        self.stride = stride  # a prime number of blocks: spreads writes over regions
        self.first_block = first_block
        self.written = 0
        self.errors: list[str] = []
        self.completed: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> WriteLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        blocks = self.size // self.block
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        buffer = mmap.mmap(-1, self.block)
        try:
            while not self._stop.is_set() and (self.count is None or
                                               self.written < self.count):
                offset = ((self.first_block + self.written * self.stride) % blocks) * self.block
                stamp = f"{offset}:{self.written};".encode()
                buffer.seek(0)
                buffer.write(stamp * (self.block // len(stamp)))
                try:
                    os.pwritev(fd, [buffer], offset)
                    self.completed.append((time.monotonic(), offset))
                except OSError as exc:
                    self.errors.append(f"write at {offset}: {exc}")
                    if len(self.errors) > 10:
                        return
                self.written += 1
        finally:
            os.close(fd)
            buffer.close()

    def stop(self, timeout: float = 120.0) -> WriteLoop:
        self._stop.set()
        return self.join(timeout)

    def join(self, timeout: float = 120.0) -> WriteLoop:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise GuestError(f"the write loop on {self.device} is stuck "
                             f"({self.written} writes done)")
        return self


# Under emulation a server starts in 5-10 s; on a host busy with another VM it has taken
# over 30 s.  A slow host may make a scenario slow, never make it fail.
SERVER_START_TIMEOUT = 180.0
SLOW_START = 30.0


def wait_for_writes(writers: list[WriteLoop], writes: int, timeout: float,
                    what: str) -> None:
    """Until every writer has completed ``writes`` more writes than now; GuestError
    saying ``what`` stalled after ``timeout`` seconds."""
    done = [writer.written for writer in writers]
    deadline = time.monotonic() + timeout
    while min(w.written - n for w, n in zip(writers, done, strict=True)) < writes:
        if time.monotonic() > deadline:
            raise GuestError(f"writes stalled {what}")
        time.sleep(0.05)


def start_server(state_dir: Path, workers: int = 2,
                 extra: tuple[str, ...] = ()) -> ServeProcess:
    """``shardlog serve`` for the real kernel: the front and workers in a session of
    their own (for one SIGKILL of everything), state, pid file and log under
    ``state_dir``'s parent, no metrics endpoint.  A slow start is said on stderr."""
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server = ServeProcess(state_dir, workers=workers, metrics_addr="", extra=extra)
    server.start(timeout=SERVER_START_TIMEOUT)
    took = time.monotonic() - started
    if took > SLOW_START:
        print(f"shardlog serve took {took:.0f} s to start (a busy host?)", file=sys.stderr)
    return server


def device_names() -> list[str]:
    """Every device-mapper device in the guest (all of them a scenario's)."""
    names = []
    for line in dmsetup("ls").splitlines():
        if line.strip() and line.strip() != "No devices found":
            names.append(line.split()[0])
    return names


def remove_every_device() -> None:
    """Every device-mapper device gone, stacked or suspended: resumed first (a suspended
    device holds its I/O), then removed, a device still open replaced by one that fails
    its I/O.  A mirror with a userspace log needs a server for it."""
    for name in device_names():
        dmsetup("resume", name, check=False)
    dmsetup("remove_all", "--force", check=False)


def loop_devices() -> list[str]:
    """Every attached loop device."""
    return [line.split()[0] for line in
            run("losetup", "--list", "--noheadings", "--output", "NAME").splitlines()
            if line.strip()]


# -- state on disk ------------------------------------------------------------------------------

DISK_LOG_MAGIC = 0x4D695272  # "MiRr", the kernel's dm-log.c
CLEAN_BITS_OFFSET = 1024


@dataclass
class LogImage:
    """The kernel ``disk`` log layout, read from a log device or an instance file.

    Deliberately not storage's image reader: the scenarios judge what shardlog left on disk
    by the layout as dm-log.c defines it, in code that shares nothing with the writer."""

    valid: bool
    region_count: int
    clean: set[int]

    @classmethod
    def read(cls, data: bytes) -> LogImage:
        magic, _version, region_count = struct.unpack_from("<IIQ", data)
        if magic != DISK_LOG_MAGIC:
            return cls(False, 0, set())
        bits = bitarray(endian="little")
        bits.frombytes(data[CLEAN_BITS_OFFSET:CLEAN_BITS_OFFSET + (region_count + 7) // 8])
        return cls(True, region_count, {i for i in range(region_count) if bits[i]})

    @classmethod
    def of_device(cls, device: Path | str) -> LogImage:
        return cls.read(direct_read(device, 0, 64 << 10))

    @classmethod
    def of_file(cls, path: Path) -> LogImage:
        return cls.read(path.read_bytes())


def instance_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "logs").glob("*.map"))
