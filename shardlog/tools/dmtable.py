"""Device-mapper ``mirror`` tables and statuses, and the table that moves a mirror's log
between the kernel's ``disk`` log and shardlog (``shardlog adopt`` / ``release``).

Sans-IO: strings in, strings and values out; adopt.py runs dmsetup.

A mirror table line (dm-raid1.c), as ``dmsetup table`` prints it::

    <start> <length> mirror <log type> <#log args> <log args...>
        <#legs> <dev> <offset>... [<#features> <feature>...]

The log arguments (dm-log.c, dm-log-userspace-base.c):

- ``core <region size> [sync|nosync]``
- ``disk <log device> <region size> [sync|nosync]``
- ``userspace <uuid> [integrated_flush] <type> <type's args...>`` — the count covers
  the uuid and ``integrated_flush`` too; shardlog serves ``core`` and ``disk`` types.

A ``disk`` log keeps its bits on the log device in a layout shardlog's ``disk`` log
shares, so the same device carries the state across the swap: no resync either way.  A
``core`` log's bits live only in kernel memory; no reload can carry them (the kernel's own
``core`` log starts over too), so such a mirror is refused, never moved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SYNC_OPTIONS = ("sync", "nosync")
INTEGRATED_FLUSH = "integrated_flush"
LVM_UUID_PREFIX = "LVM-"


class TableError(ValueError):
    """A table or status line that is not what this module takes it for."""


class Refusal(Exception):
    """A device that must not be changed; the message says why and what to do."""


@dataclass(frozen=True)
class MirrorLog:
    """A mirror's dirty log.  ``kind`` is the kernel's log type (``core``, ``disk``,
    ``userspace``); for ``userspace``, ``inner`` is the type the server is asked for and
    ``uuid`` / ``integrated_flush`` its options.  ``device`` is set for disk logs."""

    kind: str
    inner: str
    region_sectors: int
    device: str | None = None
    sync_option: str | None = None  # "sync", "nosync" or None (the default)
    uuid: str | None = None
    integrated_flush: bool = False

    @property
    def on_shardlog(self) -> bool:
        return self.kind == "userspace"

    def words(self) -> list[str]:
        """``<type> <#args> <args...>``, as a table has it."""
        inner = [self.inner] + ([self.device] if self.device is not None else []) + \
            [str(self.region_sectors)] + ([self.sync_option] if self.sync_option else [])
        if self.kind != "userspace":
            args = inner[1:]
            return [self.kind, str(len(args)), *args]
        assert self.uuid is not None
        args = [self.uuid, *([INTEGRATED_FLUSH] if self.integrated_flush else []), *inner]
        return ["userspace", str(len(args)), *args]


@dataclass(frozen=True)
class MirrorTable:
    """One ``mirror`` target line; legs and features are kept word for word."""

    start: int
    length: int
    log: MirrorLog
    legs: tuple[tuple[str, str], ...]  # (device, offset)
    features: tuple[str, ...]

    def line(self) -> str:
        legs = [word for leg in self.legs for word in leg]
        features = [str(len(self.features)), *self.features] if self.features else []
        return " ".join([str(self.start), str(self.length), "mirror", *self.log.words(),
                         str(len(self.legs)), *legs, *features])


def _int(word: str, what: str) -> int:
    if not word.isdigit():
        raise TableError(f"{what} is not a number: {word!r}")
    return int(word)


def _parse_log(kind: str, args: list[str]) -> MirrorLog:
    if kind == "userspace":
        if len(args) < 3:
            raise TableError(f"a userspace log needs a uuid, a type and its arguments: "
                             f"{' '.join(args)!r}")
        uuid, rest = args[0], args[1:]
        integrated = rest[0] == INTEGRATED_FLUSH
        if integrated:
            rest = rest[1:]
        inner = _parse_log(rest[0], rest[1:]) if rest and rest[0] in ("core", "disk") \
            else None
        if inner is None:
            raise TableError(f"a userspace log of type {rest[0] if rest else '?'!r}: "
                             "shardlog serves core and disk")
        return replace(inner, kind="userspace", uuid=uuid, integrated_flush=integrated)
    if kind == "core":
        device, rest = None, args
    elif kind == "disk":
        if not args:
            raise TableError("a disk log without its device")
        device, rest = args[0], args[1:]
    else:
        raise TableError(f"a log of type {kind!r}: not core, disk or userspace")
    if not 1 <= len(rest) <= 2:
        raise TableError(f"{kind} log arguments: {' '.join(args)!r}")
    if len(rest) == 2 and rest[1] not in SYNC_OPTIONS:
        raise TableError(f"{kind} log option {rest[1]!r}: not sync or nosync")
    return MirrorLog(kind=kind, inner=kind, region_sectors=_int(rest[0], "region size"),
                     device=device, sync_option=rest[1] if len(rest) == 2 else None)


def parse_mirror_table(text: str) -> MirrorTable:
    """A device's table as ``dmsetup table NAME`` prints it: exactly one line, a mirror."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TableError("an empty table (no live table loaded)")
    if len(lines) > 1:
        raise TableError(f"a table of {len(lines)} segments, not one mirror target")
    words = lines[0].split()
    if len(words) < 3:
        raise TableError(f"not a table line: {lines[0]!r}")
    if words[2] != "mirror":
        raise TableError(f"a {words[2]} target, not a mirror")
    try:
        start, length = _int(words[0], "start"), _int(words[1], "length")
        nr_log_args = _int(words[4], "log argument count")
        log_args = words[5:5 + nr_log_args]
        if len(log_args) != nr_log_args:
            raise TableError("fewer log arguments than their count")
        log = _parse_log(words[3], log_args)
        at = 5 + nr_log_args
        nr_legs = _int(words[at], "leg count")
        leg_words = words[at + 1:at + 1 + 2 * nr_legs]
        if nr_legs < 2 or len(leg_words) != 2 * nr_legs:
            raise TableError(f"{nr_legs} legs")
        at += 1 + 2 * nr_legs
        features: list[str] = []
        if at < len(words):
            nr_features = _int(words[at], "feature count")
            features = words[at + 1:]
            if len(features) != nr_features:
                raise TableError(f"{len(features)} features, counted {nr_features}")
    except IndexError:
        raise TableError(f"a mirror table cut short: {lines[0]!r}") from None
    legs = tuple((leg_words[i], leg_words[i + 1]) for i in range(0, len(leg_words), 2))
    return MirrorTable(start, length, log, legs, tuple(features))


@dataclass(frozen=True)
class MirrorStatus:
    """``dmsetup status NAME`` of a mirror: regions in sync, leg health, the log's part."""

    in_sync: int
    regions: int
    health: str
    log_status: tuple[str, ...]

    @property
    def synced(self) -> bool:
        return self.in_sync == self.regions


def parse_mirror_status(text: str) -> MirrorStatus:
    words = text.split()
    try:
        if words[2] != "mirror":
            raise TableError(f"not a mirror's status: {text.strip()!r}")
        nr_legs = _int(words[3], "leg count")
        in_sync, _, regions = words[4 + nr_legs].partition("/")
        nr_health = _int(words[5 + nr_legs], "health count")
        health = "".join(words[6 + nr_legs:6 + nr_legs + nr_health])
        return MirrorStatus(_int(in_sync, "in-sync count"), _int(regions, "region count"),
                            health, tuple(words[6 + nr_legs + nr_health:]))
    except IndexError:
        raise TableError(f"a mirror status cut short: {text.strip()!r}") from None


# -- the plans ------------------------------------------------------------------------------


def adopted_table(table: MirrorTable, uuid: str, *, integrated_flush: bool = False
                  ) -> MirrorTable | None:
    """The table that puts ``table``'s mirror on shardlog: the same legs, features,
    region size, sync option and log device, the log ``userspace <uuid> disk ...``.
    None if it is on shardlog already.  Raises :class:`Refusal` for what must not move."""
    log = table.log
    if log.on_shardlog:
        return None
    if log.kind == "core":
        raise Refusal("its log is the kernel's core log, whose bits live only in kernel "
                      "memory: any table reload resyncs the whole mirror (with the "
                      "kernel's own log too). Give it a disk log first (LVM: lvconvert "
                      "--mirrorlog disk VG/LV), then adopt it")
    if not uuid:
        raise Refusal("it has no device-mapper uuid, which would name its log: set one "
                      "(dmsetup rename NAME --setuuid UUID) and adopt it again")
    if any(c.isspace() for c in uuid):
        raise Refusal(f"its uuid {uuid!r} has white space: a table cannot carry it")
    return replace(table, log=replace(log, kind="userspace", uuid=uuid,
                                      integrated_flush=integrated_flush))


def released_table(table: MirrorTable) -> MirrorTable | None:
    """The table that gives ``table``'s mirror back the kernel's own ``disk`` log on
    the same device; None if its log is the kernel's already.  Raises
    :class:`Refusal` for a shardlog ``core`` log (no device holds its bits)."""
    log = table.log
    if not log.on_shardlog:
        return None
    if log.inner != "disk":
        raise Refusal("its log is shardlog's core log: no device holds its bits, so the "
                      "kernel's log would resync the whole mirror. Leave it on shardlog")
    return replace(table, log=replace(log, kind="disk", uuid=None, integrated_flush=False))


# -- names ----------------------------------------------------------------------------------


def lvm_dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives VG/LV: each ``-`` doubled, joined by one."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def split_lvm_dm_name(name: str) -> tuple[str, str] | None:
    """(VG, LV) of an LVM device-mapper name (the first single ``-`` splits them), or
    None if it is not one; a sub-LV layer (``vg-lv-real``) is not split."""
    i = 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1:i + 2] == "-":
                i += 2
                continue
            vg, lv = name[:i], name[i + 1:]
            if not vg or not lv or _single_dash(lv):
                return None
            return vg.replace("--", "-"), lv.replace("--", "-")
        i += 1
    return None


def _single_dash(text: str) -> bool:
    return "-" in text.replace("--", "")


def device_label(dm_name: str, dm_uuid: str) -> str:
    """What operators call a device: ``VG/LV`` for an LVM volume, its dm name otherwise."""
    if dm_uuid.startswith(LVM_UUID_PREFIX):
        split = split_lvm_dm_name(dm_name)
        if split is not None:
            return "/".join(split)
    return dm_name
