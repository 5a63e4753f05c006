"""The host's device-mapper devices, through ``dmsetup`` and sysfs: a thin layer, no
decisions (dmtable.py parses and plans, adopt.py decides).

``dmsetup`` is run as a process (as LVM's own tools and operators do), with the
environment as it is: on a host with udev it synchronises with udev; where there is none
(containers, the test VM) ``DM_DISABLE_UDEV=1`` must be set by the caller.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shardlog.tools.dmtable import device_label, lvm_dm_name

SYS_BLOCK = Path("/sys/block")
MAPPER = Path("/dev/mapper")


class DmError(Exception):
    """dmsetup failed or a device is unknown; the message has dmsetup's own words."""


def dmsetup(*args: str) -> str:
    try:
        result = subprocess.run(["dmsetup", *args], capture_output=True, text=True,
                                timeout=120)
    except FileNotFoundError:
        raise DmError("dmsetup is not installed (Debian: apt-get install dmsetup)") from None
    except subprocess.TimeoutExpired:
        raise DmError(f"dmsetup {' '.join(args[:2])} did not finish in 120 s") from None
    if result.returncode != 0:
        # The first two lines say what failed; the rest repeats it (libdevmapper's).
        words = "; ".join((result.stderr or result.stdout).strip().splitlines()[:2])
        raise DmError(f"dmsetup {' '.join(args[:2])}: {words or 'failed'}")
    return result.stdout


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    uuid: str
    suspended: bool
    inactive_table: bool  # a table loaded but not swapped in: someone is changing it


def info(name: str) -> DeviceInfo:
    """What the kernel says of one device (``dmsetup info -c``)."""
    line = dmsetup("info", "-c", "--noheadings", "--separator", "|", "-o",
                   "name,uuid,attr", name).strip()
    fields = line.split("|")
    if len(fields) != 3:
        raise DmError(f"dmsetup info {name}: unexpected answer {line!r}")
    dm_name, uuid, attr = fields
    return DeviceInfo(dm_name, uuid, suspended="s" in attr, inactive_table="I" in attr)


def table(name: str) -> str:
    return dmsetup("table", name)


def status(name: str) -> str:
    return dmsetup("status", name)


def mirror_names() -> list[str]:
    """Every device whose live table has a mirror target."""
    out = dmsetup("table", "--target", "mirror")
    names = {line.split(":", 1)[0] for line in out.splitlines()
             if ":" in line and " mirror " in line}
    return sorted(names)


def swap_table(name: str, new_table: str) -> None:
    """Load ``new_table`` and swap it in (suspend, resume), as LVM does.  A failed load
    or suspend leaves the old table live (what was loaded is cleared, a failed suspend
    resumed).  A failed resume, which comes after the swap, is tried once more; if that
    fails too the DmError says the device is left suspended, its I/O waiting: only an
    operator can tell what to load instead."""
    dmsetup("load", name, "--table", new_table)
    try:
        dmsetup("suspend", name)
    except DmError:
        _quietly("clear", name)
        _quietly("resume", name)
        raise
    try:
        dmsetup("resume", name)
    except DmError:
        try:
            dmsetup("resume", name)
        except DmError as again:
            raise DmError(f"{again}; {name} is left SUSPENDED, its I/O waiting: resume "
                          f"it (dmsetup resume {name}) or load its old table") from again


def clear_inactive(name: str) -> None:
    _quietly("clear", name)


def _quietly(*args: str) -> None:
    with contextlib.suppress(DmError):
        dmsetup(*args)


def resolve(spec: str) -> str:
    """The dm name of a device given as a dm name, ``/dev/mapper/NAME``, ``/dev/VG/LV``
    (any path to a dm block device) or ``VG/LV``."""
    if spec.startswith("/"):
        return _name_of_node(Path(spec))
    if "/" in spec:
        vg, _, lv = spec.partition("/")
        node = Path("/dev") / vg / lv
        if node.exists():
            return _name_of_node(node)
        name = lvm_dm_name(vg, lv)
    else:
        name = spec
    info(name)  # raises if there is no such device
    return name


def _name_of_node(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DmError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise DmError(f"{path} is not a block device")
    sysfs = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/dm/name")
    try:
        return sysfs.read_text().strip()
    except OSError:
        raise DmError(f"{path} is not a device-mapper device") from None


def names_by_uuid() -> dict[str, str]:
    """dm uuid → dm name of every device on the host that has a uuid (sysfs: no
    process, nothing if the host has no device-mapper)."""
    names: dict[str, str] = {}
    try:
        entries = list(SYS_BLOCK.glob("dm-*"))
    except OSError:
        return names
    for entry in entries:
        try:
            uuid = (entry / "dm" / "uuid").read_text().strip()
            name = (entry / "dm" / "name").read_text().strip()
        except OSError:
            continue  # removed meanwhile
        if uuid:
            names[uuid] = name
    return names


def label_logs(logs: list[dict]) -> None:
    """Adds ``device`` to each log row of a status answer: what operators call the
    device whose dm uuid is the log's uuid (``VG/LV`` for LVM's, else its dm name), or
    None where this host has no such device."""
    names = names_by_uuid()
    for log in logs:
        name = names.get(log["uuid"])
        log["device"] = None if name is None else device_label(name, log["uuid"])
