"""Facts about the machine a measurement ran on, printed and saved beside its figures:
numbers from these 2-core VMs mean little without them."""

from __future__ import annotations

import os
import platform
from contextlib import suppress
from pathlib import Path


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point above it)."""
    path = path.resolve()
    best, kind = "", "?"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = fields[1].replace("\\040", " ")
            inside = path == Path(mount_point) or Path(mount_point) in path.parents
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fields[2]
    return kind


def cpu_model() -> str:
    with suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine() -> dict[str, object]:
    return {"nproc": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version()}


def describe(host: dict[str, object]) -> str:
    """A :func:`machine` in one line, as every benchmark and report heads its output."""
    return (f"nproc {host['nproc']} ({host['cpu']}), kernel {host['kernel']}, "
            f"Python {host['python']}")
