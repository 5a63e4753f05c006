"""A real Linux kernel in a virtual machine, for the kernel's own ``dm-mirror`` with a
``userspace`` log to drive shardlog.

Theory of operation.  The development and CI machines run a kernel without
device-mapper, and KVM does not work there, so the real client runs under qemu's
software emulation:

- ``image`` builds (once, cached under ``.cache/kernel-vm/`` of the checkout) what the
  guest boots: Debian's kernel image package unpacked (never installed), and a tiny
  initramfs of busybox-static, the handful of modules the guest needs and an ``/init``
  that mounts the host's ``/`` read-only over virtio-9p and chroots into it.  The guest
  therefore runs the host's own Python, virtual environment, ``dmsetup`` and ``fio``.
- ``runner`` boots it with one shell script to run, under a hard timeout, in its own
  process group that is killed on any exit; a read-write 9p share carries the script in
  and the results (files the script writes, its exit code, the guest's dmesg) out.
- ``guest`` holds what code running *inside* the guest uses: loop devices, dmsetup,
  mirrors and their status, direct I/O, a shardlog server.

The tests (tests/kernel/), the demo (``shardlog.harness.kernelvm.demo``) and the benchmark
(scripts/bench_kernel.py) all boot through ``runner``; ``scripts/kernel-vm`` is the
one-command entry.
"""
