"""One boot of the guest: a shell script in, its results out, nothing left running.

The script runs in the guest as root, in the project directory, with the project's
virtual environment first on PATH and ``$SHARE`` naming the read-write share (the host's
``share_dir``), where it leaves whatever the host should read.  The guest's ``/init``
writes the script's exit code and the kernel log there after it, then powers off.

qemu runs under ``timeout`` (an unanswered log request stalls the kernel for 15 s and is
retried for ever, so a guest can hang), in a session of its own, and that whole process
group is SIGKILLed when :func:`boot` returns or raises for any reason, including the
caller's own KeyboardInterrupt.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shardlog.harness.kernelvm import image as vmimage

# TCG's boot to the first command takes ~3 s; most of a run is the script itself.
DEFAULT_TIMEOUT = 300.0


@dataclass
class GuestRun:
    exit_code: int | None  # None: the guest never reported one (timeout, panic)
    timed_out: bool
    seconds: float
    console: str  # everything on the serial console (the guest script's output included)
    share: Path

    @property
    def dmesg(self) -> str:
        path = self.share / "dmesg.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self) -> str:
        if self.timed_out:
            return f"the guest was killed after {self.seconds:.0f} s (timeout)"
        if self.exit_code is None:
            return "the guest stopped without reporting an exit code (see its console)"
        return f"the guest script exited {self.exit_code} after {self.seconds:.0f} s"


def qemu_command(guest: vmimage.GuestImage, share_dir: Path, *, memory_mb: int,
                 cpus: int) -> list[str]:
    project = vmimage.project_root()
    append = f"console=ttyS0 panic=-1 loglevel=4 shardlog.project={project}"

    def share(path: Path, tag: str, *, readonly: bool) -> list[str]:
        spec = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        return ["-virtfs", spec + (",readonly=on" if readonly else "")]

    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb),
            "-smp", str(cpus), "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", append,
            *share(Path("/"), vmimage.HOSTROOT_TAG, readonly=True),
            *share(share_dir, vmimage.SHARE_TAG, readonly=False),
            *share(project, vmimage.PROJECT_TAG, readonly=True)]


def guest_script(script: str, env: dict[str, str] | None = None) -> str:
    """``script`` with the guest's environment set up before it."""
    project = vmimage.project_root()
    venv_bin = Path(sys.executable).parent
    lines = ["#!/bin/sh",
             f"export PATH={shlex.quote(str(venv_bin))}:/usr/local/sbin:/usr/local/bin:"
             "/usr/sbin:/usr/bin:/sbin:/bin",
             "export HOME=/tmp TMPDIR=/tmp DM_DISABLE_UDEV=1 PYTHONDONTWRITEBYTECODE=1",
             "export SHARDLOG_IN_GUEST=1 PYTHONUNBUFFERED=1",
             f"export SHARE={vmimage.GUEST_SHARE}",
             f"export PYTHON={shlex.quote(sys.executable)}"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    lines += [f"cd {shlex.quote(str(project))} || exit 99", script]
    return "\n".join(lines) + "\n"


def boot(script: str, share_dir: Path, *, timeout: float = DEFAULT_TIMEOUT,
         memory_mb: int = 1024, cpus: int = 2, env: dict[str, str] | None = None,
         echo: TextIO | None = None, guest: vmimage.GuestImage | None = None) -> GuestRun:
    """Boots the guest, runs ``script`` in it and returns when it has powered off or
    ``timeout`` seconds have passed.  ``echo`` gets the console as it comes."""
    guest = guest or vmimage.build()
    _precompile(vmimage.project_root())
    share_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "dmesg.txt"):
        (share_dir / stale).unlink(missing_ok=True)
    (share_dir / "guest.sh").write_text(guest_script(script, env))
    command = ["timeout", "--signal=KILL", f"{timeout:.0f}",
               *qemu_command(guest, share_dir, memory_mb=memory_mb, cpus=cpus)]
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    console: list[str] = []
    reader = threading.Thread(target=_read_console, args=(process, console, echo),
                              daemon=True)
    reader.start()
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout + 10)  # timeout(1) normally ends it first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # qemu and timeout(1), whatever they do
        process.wait()
        reader.join(5)
    seconds = time.monotonic() - started
    exit_file = share_dir / "exit-code"
    exit_code = int(exit_file.read_text()) if exit_file.exists() else None
    return GuestRun(exit_code=exit_code, timed_out=exit_code is None and seconds >= timeout,
                    seconds=seconds, console="".join(console), share=share_dir)


def _precompile(project: Path) -> None:
    """Byte-compile the project's Python on the host, where it takes a second: the guest
    reads the project read-only and under emulation compiling it again at every server
    start took seconds (the guest runs with PYTHONDONTWRITEBYTECODE, and so may the
    host, so no cached bytecode would exist otherwise)."""
    for directory in ("shardlog", "tests", "scripts"):
        if (project / directory).is_dir():
            compileall.compile_dir(project / directory, quiet=1)


# The firmware's screen-clearing escapes and banner, before the kernel's first word.
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")
_FIRMWARE = re.compile(r"^(SeaBIOS .*\n|Booting from ROM\.\.\.\n|Probing EDD \(edd=off to "
                       r"disable\)\.\.\. o?k?)")


def _read_console(process: subprocess.Popen, into: list[str], echo: TextIO | None) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        line = _ESCAPES.sub("", raw.decode(errors="replace").replace("\r\n", "\n"))
        line = _FIRMWARE.sub("", line)
        if not line:
            continue
        into.append(line)
        if echo is not None:
            echo.write(line)
            echo.flush()
