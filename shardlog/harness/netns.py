"""A private network namespace: where a simulated kernel and shardlog can talk safely.

The kernel's connector socket exists only in the initial network namespace
(protocol.md §1.1).  In a fresh namespace (``unshare -n``) a NETLINK_CONNECTOR socket
still works between user processes, but nothing there reaches a real kernel: a request
sent to group 7 reaches only this namespace's sockets, and a send to port 0 (the kernel)
is refused.  So tests and benchmarks that play the kernel enter one first, and check that
they did.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

from shardlog.server.nlsocket import kernel_connector_reachable

CLONE_NEWNET = 0x40000000


def enter_private_netns() -> None:
    """Move this process (its calling thread: call it before starting threads) into a new
    network namespace with its loopback up.  Needs CAP_SYS_ADMIN; OSError otherwise."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    loopback_up()
    if kernel_connector_reachable():
        raise RuntimeError("a kernel connector answers in the new network namespace")


def enter_or_say_why(script: str) -> bool:
    """Enter a private network namespace, or say on stderr why not (a script's servers
    and peers must never meet a real kernel's connector): whether it did."""
    try:
        enter_private_netns()
    except OSError as exc:
        print(f"{script}: cannot enter a private network namespace ({exc.strerror}): "
              "run as root (CAP_SYS_ADMIN)", file=sys.stderr)
        return False
    return True


def loopback_up() -> None:
    """Bring this network namespace's "lo" up (SIOCSIFFLAGS; no binary needed): a new
    namespace's loopback, or a bare guest's, starts down, and metrics scrapes need it."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
