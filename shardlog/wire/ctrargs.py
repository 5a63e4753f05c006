"""The CTR constructor string: what kind of log the kernel asks for.

The kernel sends ``"<target sectors> <log type> <args…>"`` (protocol.md §3.1), with the
table's uuid and any ``integrated_flush`` token already removed:

- ``core|clustered-core <region_size> [sync|nosync] [block_on_error]``
- ``disk|clustered-disk <log device> <region_size> [sync|nosync] [block_on_error]``,
  the log device given as a path or ``major:minor``.

The kernel side of dm-log-userspace checks none of this, and dm-raid1 shifts by
``ffs(region_size) - 1``, so a region size that is not a power of two would silently map
I/O to the wrong regions.  The checks here are the in-kernel logs' (`_check_region_size`
in dm-log.c) and every rejection says why, for the kernel log line and for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class CtrArgsError(ValueError):
    """A constructor string that does not describe a log shardlog can serve."""


class SyncMode(Enum):
    """The optional sync argument: how regions start out (dm-log.c ``enum sync``)."""

    DEFAULT = "default"  # core: all out of sync; disk: whatever the device says
    SYNC = "sync"  # force a full resync
    NOSYNC = "nosync"  # declare every region in sync


#: The kernel truncates GET_REGION_SIZE's u64 reply to u32.
MAX_REGION_SIZE = 1 << 31
#: A bound on the bitmaps (two of 512 MiB per log) so that a typo cannot exhaust the host.
MAX_REGION_COUNT = 1 << 32

_CORE_TYPES = ("core", "clustered-core")
_DISK_TYPES = ("disk", "clustered-disk")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """A parsed constructor string.  ``ctr_string`` is kept verbatim (it names the log's
    configuration when the kernel re-sends it on reconnect)."""

    ctr_string: str
    target_sectors: int
    log_type: str  # as given: core, clustered-core, disk, clustered-disk
    device: str | None  # disk logs: the log device argument as given
    region_size: int  # sectors
    sync_mode: SyncMode
    block_on_error: bool

    @property
    def is_disk(self) -> bool:
        return self.device is not None

    @property
    def region_count(self) -> int:
        return -(-self.target_sectors // self.region_size)

    def table_args(self) -> str:
        """The in-kernel logs' STATUSTYPE_TABLE text: ``core <argc> <args> `` etc."""
        args = [self.device] if self.device is not None else []
        args.append(str(self.region_size))
        if self.sync_mode is not SyncMode.DEFAULT:
            args.append(self.sync_mode.value)
        if self.block_on_error:
            args.append("block_on_error")
        return f"{self.log_type} {len(args)} {' '.join(args)} "


def parse_ctr_string(ctr_string: str) -> LogConfig:
    """Parse a CTR string; raise :class:`CtrArgsError` with the reason when it is unusable."""
    tokens = ctr_string.split()
    if len(tokens) < 3:
        raise CtrArgsError(
            f"constructor {ctr_string!r} needs '<sectors> <log type> <args…>'"
        )
    target_sectors = _positive_int(tokens[0], "target length")
    log_type = tokens[1]
    args = tokens[2:]
    if log_type in _CORE_TYPES:
        device = None
    elif log_type in _DISK_TYPES:
        device = args.pop(0)
        if not args:
            raise CtrArgsError(f"{log_type} log needs '<log device> <region_size>'")
    else:
        raise CtrArgsError(
            f"unsupported log type {log_type!r}: expected one of "
            f"{', '.join(_CORE_TYPES + _DISK_TYPES)}"
        )
    region_size = _positive_int(args[0], "region size")
    _check_region_size(region_size, target_sectors)
    sync_mode, block_on_error = _parse_flags(args[1:], log_type)
    config = LogConfig(
        ctr_string=ctr_string,
        target_sectors=target_sectors,
        log_type=log_type,
        device=device,
        region_size=region_size,
        sync_mode=sync_mode,
        block_on_error=block_on_error,
    )
    if config.region_count > MAX_REGION_COUNT:
        raise CtrArgsError(
            f"{config.region_count} regions exceed shardlog's limit of {MAX_REGION_COUNT}: "
            "use a larger region size"
        )
    return config


def _positive_int(token: str, what: str) -> int:
    if not token.isdigit():
        raise CtrArgsError(f"{what} {token!r} is not a decimal number")
    value = int(token)
    if value == 0:
        raise CtrArgsError(f"{what} must not be 0")
    return value


def _check_region_size(region_size: int, target_sectors: int) -> None:
    if region_size < 2 or region_size & (region_size - 1):
        raise CtrArgsError(f"region size {region_size} is not a power of two >= 2")
    if region_size > MAX_REGION_SIZE:
        raise CtrArgsError(f"region size {region_size} exceeds {MAX_REGION_SIZE} sectors")
    if region_size > target_sectors:
        raise CtrArgsError(
            f"region size {region_size} is larger than the target ({target_sectors} sectors)"
        )


def _parse_flags(flags: list[str], log_type: str) -> tuple[SyncMode, bool]:
    sync_mode = SyncMode.DEFAULT
    block_on_error = False
    for flag in flags:
        if flag in ("sync", "nosync"):
            if sync_mode is not SyncMode.DEFAULT:
                raise CtrArgsError(f"{log_type} log: more than one of sync/nosync")
            sync_mode = SyncMode(flag)
        elif flag == "block_on_error" and not block_on_error:
            block_on_error = True
        else:
            raise CtrArgsError(f"{log_type} log: unexpected argument {flag!r}")
    return sync_mode, block_on_error
