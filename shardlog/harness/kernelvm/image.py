"""The guest's kernel and initramfs, built from Debian packages and cached.

Debian's ``linux-image-amd64`` is a metapackage; the kernel itself is its ABI package
(``linux-image-6.1.0-NN-amd64``).  It is downloaded and unpacked with ``dpkg-deb -x``,
never installed: its postinst would run update-initramfs twice and write the host's
/boot.  The package carries no ``modules.dep``, so ``depmod -b`` makes one, from which
the modules the guest needs are put in load order.

The initramfs holds busybox-static, those modules and ``/init`` (INIT_SCRIPT below).
Everything lands in the cache directory under a name that includes the kernel version
and a hash of the init script and module list, so a new kernel package or a changed
initramfs builds anew and an unchanged one costs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What the guest needs, by module name; their dependencies are added from modules.dep.
# dm-delay slows a leg's writes down, to hold writes in flight across a server crash.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "loop", "dm-mirror", "dm-log-userspace",
                 "dm-delay")

# Tags of the 9p shares (runner.py passes them to qemu).
HOSTROOT_TAG = "hostroot"
SHARE_TAG = "vmshare"
PROJECT_TAG = "project"
# Where the read-write share appears inside the guest's root.
GUEST_SHARE = "/run/vmshare"

# The guest's /init.  The host's / is the guest's root (read-only); /tmp and /run are
# the guest's own tmpfs.  The project is mounted again at its own path, because a
# checkout under /tmp would otherwise be hidden by that tmpfs.  The kernel command line
# carries the project's path (shardlog.project=).  Whatever happens, the guest powers
# off: the host's timeout is the last resort, not the normal end.
INIT_SCRIPT = f"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod "/modules/$module" || echo "init: insmod $module failed"
done
project=
for word in $(cat /proc/cmdline); do
    case "$word" in shardlog.project=*) project="${{word#shardlog.project=}}";; esac
done
nine="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /newroot
mount -t 9p -o "$nine,ro,cache=loose" {HOSTROOT_TAG} /newroot || poweroff -f
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mkdir -p /newroot{GUEST_SHARE}
mount -t 9p -o "$nine" {SHARE_TAG} /newroot{GUEST_SHARE} || poweroff -f
if [ -n "$project" ]; then
    mkdir -p "/newroot$project"
    mount -t 9p -o "$nine,ro,cache=loose" {PROJECT_TAG} "/newroot$project"
fi
chroot /newroot /bin/sh {GUEST_SHARE}/guest.sh
echo $? > /newroot{GUEST_SHARE}/exit-code
dmesg > /newroot{GUEST_SHARE}/dmesg.txt
sync
poweroff -f
"""


class ImageError(Exception):
    """The guest's image could not be built; the message says what is missing."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # vmlinuz
    initrd: Path
    version: str  # e.g. 6.1.0-56-amd64


def project_root() -> Path:
    return Path(__file__).resolve().parents[3]


def default_cache_dir() -> Path:
    override = os.environ.get("SHARDLOG_VM_CACHE")
    return Path(override) if override else project_root() / ".cache" / "kernel-vm"


def build(cache_dir: Path | None = None) -> GuestImage:
    """The guest image, built into ``cache_dir`` unless it is there already."""
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    version = package.removeprefix("linux-image-")
    tree = _unpacked(package, cache_dir)
    kernel = tree / "boot" / f"vmlinuz-{version}"
    init_hash = hashlib.sha256((INIT_SCRIPT + repr(GUEST_MODULES)).encode()).hexdigest()[:12]
    initrd = cache_dir / f"initrd-{version}-{init_hash}.cpio.gz"
    if not initrd.exists():
        busybox = _unpacked("busybox-static", cache_dir) / "bin" / "busybox"
        _build_initrd(initrd, tree / "lib" / "modules" / version, busybox)
    return GuestImage(kernel=kernel, initrd=initrd, version=version)


def _kernel_package() -> str:
    """The ABI package behind linux-image-amd64 (``apt-cache depends``)."""
    result = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in result.splitlines():
        words = line.split()
        if words[:1] == ["Depends:"] and words[1].startswith("linux-image-"):
            return words[1]
    raise ImageError("apt-cache depends linux-image-amd64 names no kernel package "
                     "(run apt-get update; scripts/setup-kernel-vm does)")


def _unpacked(package: str, cache_dir: Path) -> Path:
    """``package`` downloaded and unpacked under the cache (once)."""
    tree = cache_dir / package
    if (tree / ".unpacked").exists():
        return tree
    with tempfile.TemporaryDirectory(dir=cache_dir) as download:
        _run(["apt-get", "download", package], cwd=download)
        (deb,) = Path(download).glob("*.deb")
        shutil.rmtree(tree, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
    modules = tree / "lib" / "modules"
    for version_dir in modules.iterdir() if modules.is_dir() else ():
        _run(["depmod", "-b", str(tree), version_dir.name])
    (tree / ".unpacked").touch()
    return tree


def modules_in_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The module files for ``wanted`` and everything they depend on, dependencies first
    (from modules.dep; a module built into the kernel is left out)."""
    depends: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        depends[path] = rest.split()
    by_name = {_module_name(path): path for path in depends}
    builtin_file = modules_dir / "modules.builtin"
    builtin = {_module_name(p) for p in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists every (indirect) dependency; visit them first, deepest first.
        for dependency in reversed(depends[path]):
            visit(dependency)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise ImageError(f"module {name} is neither in modules.dep nor built in")
    return [modules_dir / path for path in order]


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _build_initrd(initrd: Path, modules_dir: Path, busybox: Path) -> None:
    with tempfile.TemporaryDirectory(dir=initrd.parent) as staging:
        root = Path(staging)
        for directory in ("bin", "modules", "proc", "sys", "dev", "newroot"):
            (root / directory).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in ("sh", "mount", "insmod", "mkdir", "cat", "chroot", "poweroff",
                       "dmesg", "sync", "echo"):
            (root / "bin" / applet).symlink_to("busybox")
        names = []
        for module in modules_in_load_order(modules_dir, GUEST_MODULES):
            name = _module_name(str(module)) + ".ko"
            data = module.read_bytes()
            if module.suffix == ".xz":  # busybox insmod takes plain modules only
                data = lzma.decompress(data)
            elif module.suffix != ".ko":
                raise ImageError(f"cannot unpack the module {module}")
            (root / "modules" / name).write_bytes(data)
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root,
                                 input="\n".join(files).encode(), capture_output=True)
        if archive.returncode != 0:
            raise ImageError(f"cpio failed: {archive.stderr.decode(errors='replace')}")
        partial = initrd.with_suffix(".partial")
        partial.write_bytes(gzip.compress(archive.stdout, compresslevel=6))
        partial.rename(initrd)


def _run(command: list[str], cwd: str | Path | None = None) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ImageError(f"{command[0]} is missing (scripts/setup-kernel-vm installs it)") \
            from exc
    if result.returncode != 0:
        raise ImageError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout
