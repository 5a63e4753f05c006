"""LVM2 inside the guest: its configuration in a scratch directory, and its commands.

The guest's root is the host's ``/`` read-only, with no udev, no lvmetad / lvmpolld /
dmeventd running and only ``/tmp`` and ``/run`` writable.  So LVM gets its own
``lvm.conf`` (``LVM_SYSTEM_DIR``): it scans only loop devices, waits for no udev event and
makes the device nodes itself, polls and monitors nothing, keeps its locks under /run and
writes no metadata backups.  ``python -m shardlog.harness.kernelvm.lvm DIR`` writes that
configuration for a shell in the guest (the README transcript); tests use :class:`Lvm`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Loop devices by default; the regular expression of the devices LVM may use.
LOOP_DEVICES = "^/dev/loop[0-9]+$"

LVM_CONF = """\
devices {
    dir = "/dev"
    scan = [ "/dev" ]
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    filter = [ "a|{accept}|", "r|.*|" ]
    use_devicesfile = 0
}
global {
    use_lvmpolld = 0
    event_activation = 0
    locking_dir = "/run/lock/lvm"
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
}
backup {
    backup = 0
    archive = 0
}
"""


def write_config(directory: Path, accept: str = LOOP_DEVICES) -> dict[str, str]:
    """``lvm.conf`` in ``directory`` and the lock directory; the environment LVM needs.
    LVM scans only the devices whose path matches ``accept`` (no ``|``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lvm.conf").write_text(LVM_CONF.replace("{accept}", accept))
    Path("/run/lock/lvm").mkdir(parents=True, exist_ok=True)
    return {"LVM_SYSTEM_DIR": str(directory), "LVM_SUPPRESS_FD_WARNINGS": "1",
            "DM_DISABLE_UDEV": "1"}


class LvmError(Exception):
    """An LVM command failed; the message has its output."""


class Lvm:
    """LVM commands with the scratch configuration."""

    def __init__(self, config_dir: Path, accept: str = LOOP_DEVICES):
        self.env = dict(os.environ, **write_config(config_dir, accept))

    def __call__(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env,
                                timeout=180)
        if check and result.returncode != 0:
            raise LvmError(f"{' '.join(command)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
        return result.stdout

    def report(self, lv: str, *fields: str) -> dict[str, str]:
        """``lvs`` fields of one LV (``VG/LV``), as LVM reports them."""
        out = self("lvs", "--reportformat", "json", "-o", ",".join(fields), lv)
        (row,) = json.loads(out)["report"][0]["lv"]
        return row


if __name__ == "__main__":
    env = write_config(Path(sys.argv[1]))
    print(" ".join(f"{key}={value}" for key, value in env.items()))
