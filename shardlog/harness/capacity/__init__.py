"""Capacity testing: how many mirrors, regions and requests one shardlog serves, measured.

Theory of operation
-------------------
A capacity run drives a real ``shardlog serve`` over real netlink sockets with the
simulated kernel's lean load generator (:func:`shardlog.harness.kernelsim.load.run_load`), in a
private network namespace, point by point along one swept parameter (mirrors = 1, 10,
100, ...).  At each point:

1. **Logs** are constructed and resumed as the kernel would (CTR, GET_REGION_SIZE,
   RESUME per mirror, pipelined), then every mirror's request cycle of the chosen
   workload (:mod:`.workloads`) runs for a bounded time: a closed loop with at most
   ``in_flight`` mirrors waiting (each mirror has at most one request outstanding, as its
   kmirrord does), optionally paced to an offered rate.
2. **The same streams** run against the minimal echo peer (:mod:`shardlog.harness.kernelsim.echo`)
   in a network namespace of their own, right after, so that every figure is also a ratio
   to the cost of any server at all on this machine at this moment.
3. **What the server costs** is read from outside: RSS and PSS of the front and every
   worker (:mod:`shardlog.harness.procstat`), CPU seconds per request, and the per-worker
   balance — predicted from the front's own routing function and the requests each
   mirror completed, and cross-checked against the server's ``shardlog_worker_requests``
   counters when its metrics are reachable.
4. Optionally the server is **restarted** after a SIGKILL and every log asked once:
   how long until all of them answer from their restored state.

:mod:`.spec` says what a load is, :mod:`.workloads` what each one sends,
:mod:`.servers` which server is driven, :mod:`.runner` measures one point, :mod:`.results`
turns points into JSON, CSV and a summary that names the knee, :mod:`.plots` draws them,
:mod:`.command` is the ``shardlog capacity`` command (``scripts/capacity.py`` runs it).
"""
