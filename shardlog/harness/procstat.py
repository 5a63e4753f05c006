"""What /proc says about a server's processes: who they are, their CPU time, their memory.

Benchmarks and the capacity tool measure ``shardlog serve`` from outside, as an operator
would: the front is the process they started (or whose pid file they read), its workers
are its children, and the kernel keeps the figures.

Memory, per process, from ``/proc/PID/smaps_rollup``:

- **RSS** counts every page mapped and present, shared or not: a worker's mmap'd instance
  files (file pages of the page cache, shared with whoever maps them) count in full, and
  so do pages a forked worker still shares with the front (copy-on-write).  Summed over
  processes it counts shared pages more than once: an upper bound.
- **PSS** divides each page by the number of processes mapping it: summed over the
  server's processes it is what the server costs the host, counted once.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass


def stat_fields(pid: int) -> tuple[float, float, int]:
    """(user CPU seconds, system CPU seconds, parent pid) of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks, int(fields[1])


def children(pid: int) -> list[int]:
    """The live children of a process (a front's workers), in pid order."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                if stat_fields(int(entry.name))[2] == pid:
                    found.append(int(entry.name))
    return sorted(found)


def server_processes(front: int) -> dict[str, list[int]]:
    """The front and its workers."""
    return {"front": [front], "workers": children(front)}


def cpu_seconds(processes: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each named group of processes and of this one (``load``, the
    simulated kernel): ``name`` is user + system, ``name sys`` the system part."""
    times = os.times()
    cpu = {"load": times.user + times.system, "load sys": times.system}
    for name, pids in processes.items():
        user = system = 0.0
        for pid in pids:
            with suppress(OSError):
                pid_user, pid_system, _ = stat_fields(pid)
                user += pid_user
                system += pid_system
        cpu[name], cpu[f"{name} sys"] = user + system, system
    return cpu


@dataclass
class Memory:
    """One process's memory, in bytes."""

    rss: int
    pss: int
    pss_anon: int  # of the PSS: anonymous pages (the Python heap, objects per log)
    pss_file: int  # of the PSS: file pages (mapped instance files, the interpreter's code)


def memory(pid: int) -> Memory:
    """From /proc/PID/smaps_rollup (OSError if the process is gone)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            words = rest.split()
            if len(words) == 2 and words[1] == "kB":
                values[name] = int(words[0]) * 1024
    return Memory(rss=values.get("Rss", 0), pss=values.get("Pss", 0),
                  pss_anon=values.get("Pss_Anon", 0), pss_file=values.get("Pss_File", 0))
