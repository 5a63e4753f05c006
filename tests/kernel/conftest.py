"""tests/kernel/guest runs inside the guest only (``SHARDLOG_IN_GUEST``, set by
shardlog.harness.kernelvm.runner): on the host, test_kernel_vm.py boots the guest and reports each
of its scenarios."""

import os

collect_ignore = [] if os.environ.get("SHARDLOG_IN_GUEST") else ["guest"]
