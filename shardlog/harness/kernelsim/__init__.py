"""A faithful model of the kernel side of dm-log-userspace, over real netlink sockets.

The kernel's side of the protocol is three layers, and so is this package:

- :mod:`.connector` — dm-log-userspace-transfer.c (``dm_consult_userspace``: seq numbers,
  multicast to group 7, reply matching, 15 s retries, -EAGAIN resends) and the -ESRCH
  reconnect loop of dm-log-userspace-base.c (``userspace_do_request``);
- :mod:`.userlog` — dm-log-userspace-base.c's dirty log ops: the constructor string, the
  cached region size, the in-sync hint, and the flush algorithm (groups of 32, clears
  first, one-by-one fallback, integrated flush and its 3 s delayed flush);
- :mod:`.mirror` — dm-raid1 + dm-region-hash: when those ops are called for writes,
  reads, recovery, suspend/resume and table reloads, plus an oracle of which regions'
  legs may differ, to catch a server that calls them clean or in sync.

:mod:`.load` drives many logs at once for benchmarks and the capacity tool, and
:mod:`.echo` is the minimal server they set shardlog against.
:mod:`shardlog.harness.netns` puts the process in a private network namespace, the only
place where any of this may run (there, a connector socket reaches the namespace's other
sockets and never a real kernel).
"""

from shardlog.harness.kernelsim.connector import (
    Connector,
    ConnectorClosed,
    ConnectorStats,
    SentRequest,
)
from shardlog.harness.kernelsim.load import LoadResult, Stream, log_streams, run_load
from shardlog.harness.kernelsim.mirror import Mirror, RegionState
from shardlog.harness.kernelsim.userlog import LogConstructError, ShortReply, UserspaceLog

__all__ = [
    "Connector",
    "ConnectorClosed",
    "ConnectorStats",
    "LoadResult",
    "LogConstructError",
    "Mirror",
    "RegionState",
    "SentRequest",
    "ShortReply",
    "Stream",
    "UserspaceLog",
    "log_streams",
    "run_load",
]
