"""The README's first command: ``shardlog demo`` boots the real kernel and shows mirrors on
shardlog created, written, resynced and removed — run here as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_kernel_vm import require_vm_tools

DEMO_TIMEOUT = 600.0  # the demo's own VM timeout is 300 s; a slow start is its to report


def test_the_demo_shows_mirrors_on_shardlog_in_the_real_kernel():
    require_vm_tools("the demo's VM and its kernel image")
    # The console script the package installs beside this interpreter (.venv/bin/shardlog).
    shardlog = Path(sys.executable).parent / "shardlog"
    assert shardlog.exists(), f"{shardlog}: the package's console script is not installed"
    result = subprocess.run([str(shardlog), "demo"], capture_output=True, text=True,
                            timeout=DEMO_TIMEOUT)
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-2000:]}"
    # Every demo mirror is reported by the server, in sync, healthy.
    for name in ("uuid-demo-core", "uuid-demo-disk", "uuid-demo-iflush", "uuid-demo-resync"):
        rows = [line.split() for line in out.splitlines() if line.startswith(name + " ")]
        assert rows, f"{name} missing from the demo's status:\n{out[-4000:]}"
        assert rows[-1][3] == "resumed" and rows[-1][-1] == "A", rows[-1]
    assert "the resynced mirror's legs are identical: True" in out
    assert "shardlog serve exited 0" in out
    assert "demo: the guest script exited 0" in out
