"""Log devices named in a CTR: a path or ``major:minor``, resolved to something to open."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from shardlog.storage.errors import LOG_DEVICE, StoreError


def resolve_device(device: str, node_dir: Path) -> tuple[Path, str | None]:
    """The path to open for a CTR's log device argument, and its ``major:minor`` name.

    ``major:minor`` is looked up in sysfs; when /dev has no matching node (no udev, a
    container) one is made in ``node_dir``.  A path must be a block device or a regular
    file; a file has no ``major:minor`` (None), so nothing is handed back to the kernel.
    """
    major_minor = _parse_major_minor(device)
    if major_minor is None:
        path = Path(device)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StoreError(exc.errno or errno.ENOENT,
                             f"cannot find log device {device}: {exc.strerror}",
                             source=LOG_DEVICE) from exc
        if stat.S_ISBLK(st.st_mode):
            return path, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return path, None
    major, minor = major_minor
    name = f"{major}:{minor}"
    rdev = os.makedev(major, minor)
    devname = _sysfs_devname(name)
    if devname is not None:
        candidate = Path("/dev") / devname
        try:
            st = os.stat(candidate)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return candidate, name
        except OSError:
            pass
    elif not Path("/sys/dev/block").is_dir():
        raise StoreError(errno.ENOENT, f"cannot resolve {name}: no /sys/dev/block",
                         source=LOG_DEVICE)
    else:
        raise StoreError(errno.ENOENT, f"no block device {name}", source=LOG_DEVICE)
    node = node_dir / name
    try:
        node_dir.mkdir(parents=True, exist_ok=True)
        try:
            st = os.stat(node)
            if not (stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev):
                os.unlink(node)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
    except OSError as exc:
        raise StoreError(exc.errno or errno.EIO,
                         f"cannot make a device node for {name} in {node_dir}: {exc}",
                         source=LOG_DEVICE) from exc
    return node, name


def _parse_major_minor(device: str) -> tuple[int, int] | None:
    major, sep, minor = device.partition(":")
    if sep and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    return None


def _sysfs_devname(name: str) -> str | None:
    try:
        uevent = Path(f"/sys/dev/block/{name}/uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            return value
    return None
