"""``shardlog demo``: the real thing in about a minute.

On a host whose kernel has ``dm-log-userspace`` (and as root), it runs here: a
``shardlog serve``, mirrors on loop devices whose log is shardlog, direct writes, a
kernel-driven resync, and what the kernel itself reports about them (``dmsetup
status``).  On a host without it (these project machines: no device-mapper), it boots
a Debian kernel under qemu (shardlog.harness.kernelvm) and runs the very same steps in there,
with the console shown as it comes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from shardlog.harness.kernelvm import guest
from shardlog.server.nlsocket import group7_listeners

DEMO_TIMEOUT = 300.0
LEG_SIZE = 32 << 20
REGION_SECTORS = 512  # 256 KiB regions: 128 per mirror


def main(here: bool = False) -> int:
    if here or (os.geteuid() == 0 and guest.has_userspace_log()):
        if group_7_taken():
            print("demo: another process already serves connector group 7 (a running "
                  "shardlog or cmirrord?): not starting a second server", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory(prefix="shardlog-demo-") as root:
            return show(Path(root))
    return in_vm()


def in_vm() -> int:
    from shardlog.harness.kernelvm import image, runner

    print("demo: this kernel has no dm-log-userspace; booting a Debian kernel under qemu "
          "(software emulation, ~10 s to boot) to run the demo in it\n", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="shardlog-demo-vm-") as share:
            result = runner.boot("python -m shardlog.harness.kernelvm.demo --here", Path(share),
                                 timeout=DEMO_TIMEOUT, echo=sys.stdout)
    except image.ImageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(f"\ndemo: {result.describe()}")
    return 1 if result.exit_code is None else result.exit_code


def group_7_taken() -> bool:
    """Whether a socket is already a member of connector group 7."""
    return bool(group7_listeners())


def show(root: Path) -> int:
    started = time.monotonic()

    def step(text: str) -> None:
        print(f"\n[{time.monotonic() - started:5.1f} s] {text}", flush=True)

    step(f"kernel {os.uname().release}: starting `shardlog serve --workers 2` "
         f"(state in {root / 'state'})")
    server = guest.start_server(root / "state", workers=2)
    loops: list[guest.Loop] = []
    mirrors: list[guest.Mirror] = []
    try:
        print(f"  serving: front pid {server.process.pid}, workers "
              f"{server.worker_pids()}")

        def loop(size: int, fill: bytes | None = None) -> guest.Loop:
            loops.append(guest.Loop.create(root / f"disk{len(loops)}.img", size, fill))
            return loops[-1]

        sectors = LEG_SIZE // guest.SECTOR
        plan = [("demo-core", "core", False, True), ("demo-iflush", "core", True, True),
                ("demo-disk", "disk", False, True), ("demo-resync", "core", False, False)]
        step("creating 4 mirrors whose dirty log is shardlog (dmsetup create)")
        for name, log, iflush, nosync in plan:
            fills = (None, None) if nosync else (b"old data on leg 0 only;", None)
            legs = [loop(LEG_SIZE, fill) for fill in fills]
            log_device = loop(1 << 20).number if log == "disk" else None
            table = guest.mirror_table(sectors, [str(leg.path) for leg in legs], log=log,
                                       log_device=log_device, region_sectors=REGION_SECTORS,
                                       nosync=nosync, uuid=f"uuid-{name}",
                                       integrated_flush=iflush)
            resync_legs = legs  # the last mirror's
            mirror = guest.Mirror(name, table)
            mirrors.append(mirror.create())
            print(f"  {name}: {table}")
        print("  demo-resync's legs differ everywhere and it was made without nosync: "
              "the kernel resyncs it, asking shardlog for the work")

        print(f"  demo-resync right after creation: {mirrors[3].status().in_sync}/"
              f"{mirrors[3].status().regions} regions in sync")
        step("writing 1 MiB to each mirror at once, with O_DIRECT (4 KiB writes: each "
             "waits for shardlog's FLUSH)")
        writers = [guest.WriteLoop(m.path, LEG_SIZE, count=256).start() for m in mirrors]
        for mirror, writer in zip(mirrors, writers, strict=True):
            writer.join(DEMO_TIMEOUT)
            seconds = writer.completed[-1][0] - writer.completed[0][0] \
                if len(writer.completed) > 1 else 0.0
            rate = f"({len(writer.completed) / seconds:,.0f} writes/s)" if seconds else ""
            print(f"  {mirror.name}: {writer.written} writes, {len(writer.errors)} errors "
                  f"{rate}")
            if writer.errors:
                print("   ", writer.errors[0])

        step("waiting for every mirror to be in sync")
        while not (status := mirrors[3].status()).synced:
            print(f"  demo-resync: {status.in_sync}/{status.regions}")
            time.sleep(1)
        for mirror in mirrors:
            mirror.wait_synced(DEMO_TIMEOUT)
        step("what the kernel reports (dmsetup status): <legs> <in sync>/<regions> 1 "
             "<health> <the log's STATUS_INFO, from shardlog>")
        print(guest.dmsetup("status").rstrip())

        step("suspend + resume demo-disk (PRESUSPEND, POSTSUSPEND, RESUME to shardlog)")
        mirrors[2].suspend()
        mirrors[2].resume()
        print(f"  {guest.dmsetup('status', 'demo-disk').strip()}")

        step("the same logs as shardlog sees them (shardlog status, over its control socket)")
        print(guest.run(sys.executable, "-m", "shardlog.cli", "status", "--socket",
                        str(server.control_socket)).rstrip())

        step("shardlog's state: one instance file per log instance, and a CTR record")
        for path in sorted((root / "state" / "logs").iterdir()):
            print(f"  {path.name} ({path.stat().st_size} bytes)")

        step("removing the mirrors (DTR) and stopping the server (SIGTERM)")
        for mirror in mirrors:
            mirror.remove()
        print(f"  the resynced mirror's legs are identical: "
              f"{guest.differing_chunks(resync_legs[0].path, resync_legs[1].path) == []}")
        print(f"  shardlog serve exited {server.stop()}")
        step("done")
        return 0
    finally:
        guest.remove_all(mirrors)
        server.close()
        for device in loops:
            device.detach()


if __name__ == "__main__":
    sys.exit(main(here="--here" in sys.argv[1:]))
