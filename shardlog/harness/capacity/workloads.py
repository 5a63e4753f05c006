"""Each workload as the request cycles its mirrors repeat, and the logs they need.

A mirror's cycle is encoded once (:class:`shardlog.harness.kernelsim.load.Stream`) and repeated
for as long as the load runs; :func:`shardlog.harness.kernelsim.load.run_load` lets every mirror
take turns.  The cycles are the kernel's request sequences (kernelsim.load and
kernelsim.mirror say where each comes from), over ``CYCLE_REGIONS`` regions per mirror,
so that a sweep to 10,000 mirrors keeps its encoded streams small:

- ``seq-write``: writes to consecutive regions, each one IN_SYNC x2, MARK, FLUSH, then
  CLEAR, FLUSH (integrated flush: IN_SYNC x2, FLUSH carrying the region, CLEAR);
- ``random-write``: the same, to regions drawn across the whole log (seeded per mirror);
- ``read-heavy``: 16 reads (one IN_SYNC each, random regions) to one write;
- ``resync-storm``: every log created out of sync and, when the tool runs the server, the
  server SIGKILLed and restarted before the load: every mirror at once walks its
  recovery (GET_RESYNC_WORK, CLEAR_REGION + SET_REGION_SYNC of the region handed out,
  FLUSH, GET_SYNC_COUNT), its log restored from its CTR record by its first request;
- ``churn``: a write, a suspend/resume (PRESUSPEND, POSTSUSPEND, RESUME), then a table
  reload to a new instance (CTR + GET_REGION_SIZE of the new luid, the old one
  suspended, the new one resumed, the old one's DTR), and back: 30 requests per cycle,
  two of which create an instance file.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from shardlog.harness.capacity.spec import LoadSpec
from shardlog.harness.kernelsim.load import Stream, read_cycle, write_cycle
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

CYCLE_REGIONS = 8  # regions per mirror's cycle
READS_PER_WRITE = 16
LUIDS = (1, 2)  # churn's two instances; every other workload uses the first


def log_uuids(label: str, mirrors: int) -> list[str]:
    """Unique per point (``label``), so that an attached server never mixes two points."""
    return [f"cap-{label}-{n:05d}" for n in range(mirrors)]


def ctr_string(spec: LoadSpec) -> str:
    """A core log of ``regions`` regions; ``nosync`` unless the workload is a resync."""
    sectors = spec.regions * spec.region_size
    nosync = [] if spec.workload == "resync-storm" else ["nosync"]
    return " ".join([str(sectors), "core", str(spec.region_size), *nosync])


def setup_stream(uuid: str, spec: LoadSpec) -> Stream:
    """``mirror_ctr`` + ``mirror_resume``: CTR, GET_REGION_SIZE, RESUME."""
    return Stream.build(uuid, LUIDS[0], [(T.CTR, ctr_string(spec).encode("ascii")),
                                         (T.GET_REGION_SIZE, b""), (T.RESUME, b"")])


def teardown_streams(uuid: str, spec: LoadSpec) -> list[Stream]:
    """Device removal: PRESUSPEND, POSTSUSPEND, DTR of each instance that may be live."""
    luids = LUIDS if spec.workload == "churn" else LUIDS[:1]
    return [Stream.build(uuid, luid, [(T.PRESUSPEND, b""), (T.POSTSUSPEND, b""),
                                      (T.DTR, b"")]) for luid in luids]


def streams(spec: LoadSpec, uuids: Sequence[str]) -> list[Stream]:
    builders = {
        "seq-write": _seq_write, "random-write": _random_write, "read-heavy": _read_heavy,
        "resync-storm": _resync_storm, "churn": _churn,
    }
    build = builders[spec.workload]
    return [build(spec, index, uuid) for index, uuid in enumerate(uuids)]


def _regions(spec: LoadSpec) -> int:
    return min(CYCLE_REGIONS, spec.regions)


def _writes(spec: LoadSpec, regions: Sequence[int]):
    return write_cycle(regions, integrated=spec.integrated_flush)


def _seq_write(spec: LoadSpec, index: int, uuid: str) -> Stream:
    first = (index * CYCLE_REGIONS) % spec.regions
    regions = [(first + n) % spec.regions for n in range(_regions(spec))]
    return Stream.build(uuid, LUIDS[0], _writes(spec, regions))


def _random_write(spec: LoadSpec, index: int, uuid: str) -> Stream:
    draw = random.Random(index)
    regions = draw.sample(range(spec.regions), _regions(spec))
    return Stream.build(uuid, LUIDS[0], _writes(spec, regions))


def _read_heavy(spec: LoadSpec, index: int, uuid: str) -> Stream:
    draw = random.Random(index)
    reads = [draw.randrange(spec.regions) for _ in range(READS_PER_WRITE)]
    return Stream.build(uuid, LUIDS[0],
                        read_cycle(reads) + _writes(spec, [draw.randrange(spec.regions)]))


def _resync_storm(spec: LoadSpec, index: int, uuid: str) -> Stream:
    # The server hands out-of-sync regions out in order, so region n is the one the
    # n-th GET_RESYNC_WORK returns; past the cycle, its SET_REGION_SYNCs repeat
    # (idempotent) while the hand-out goes on: the same request mix, the same costs.
    cycle = []
    for region in range(_regions(spec)):
        one = protocol.pack_u64(region)
        # complete_resync_work sends SET_REGION_SYNC at once; the CLEAR waits in the
        # log's clear list for the pass's FLUSH.
        cycle += [(T.GET_RESYNC_WORK, b""),
                  (T.SET_REGION_SYNC, protocol.pack_set_region_sync(region, True)),
                  (T.CLEAR_REGION, one), (T.FLUSH, b""), (T.GET_SYNC_COUNT, b"")]
    return Stream.build(uuid, LUIDS[0], cycle)


def _churn(spec: LoadSpec, index: int, uuid: str) -> Stream:
    ctr = ctr_string(spec).encode("ascii")
    requests: list[tuple[int, T, bytes]] = []
    for old, new in (LUIDS, LUIDS[::-1]):
        requests += [(old, t, data) for t, data in _writes(spec, [index % spec.regions])]
        requests += [(old, T.PRESUSPEND, b""), (old, T.POSTSUSPEND, b""),
                     (old, T.RESUME, b"")]
        requests += [(new, T.CTR, ctr), (new, T.GET_REGION_SIZE, b""),
                     (old, T.PRESUSPEND, b""), (old, T.POSTSUSPEND, b""),
                     (new, T.RESUME, b""), (old, T.DTR, b"")]
    return Stream(uuid, LUIDS[0], [
        (t, bytearray(protocol.encode_request(t, seq=0, uuid=uuid, luid=luid, data=data)))
        for luid, t, data in requests])
