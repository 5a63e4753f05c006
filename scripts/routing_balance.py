#!/usr/bin/env python3
"""How evenly the routing hash (shardlog.server.routing) spreads logs over shards.

Each sample is ``--logs`` uuids, LVM-shaped (``LVM-`` + one of 3 VG uuids + an LV uuid,
32 characters each from [A-Za-z0-9], as lvm2 names mirrors) or random (1-128 such
characters).  For each shard count it reports the busiest shard's share against the mean
(what a worker's load is; 1.0 is perfect), as the median and worst over ``--samples``
samples and how many samples exceed 1.2x.  The same samples through an ideal hash
(blake2b) are the baseline: at 1,000 logs the binomial spread alone puts some samples
above 1.2x at 8 shards, whatever the hash.

    .venv/bin/python scripts/routing_balance.py [--logs N] [--samples N] [--shards 2,3,4,8]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import string
from collections import Counter
from collections.abc import Callable

from shardlog.server.routing import shard_of_uuid

CHARS = string.ascii_letters + string.digits


def chars(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(CHARS, k=length))


def lvm_uuids(rng: random.Random, count: int) -> list[str]:
    groups = [chars(rng, 32) for _ in range(3)]
    return [f"LVM-{rng.choice(groups)}{chars(rng, 32)}" for _ in range(count)]


def random_uuids(rng: random.Random, count: int) -> list[str]:
    return [chars(rng, rng.randint(1, 128)) for _ in range(count)]


def ideal_shard(uuid: str, shards: int) -> int:
    digest = hashlib.blake2b(uuid.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % shards


def busiest_over_mean(uuids: list[str], shards: int,
                      shard_of: Callable[[str, int], int]) -> float:
    sizes = Counter(shard_of(uuid, shards) for uuid in uuids)
    return max(sizes.values()) / (len(uuids) / shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--shards", default="2,3,4,8")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    shard_counts = [int(n) for n in args.shards.split(",")]
    print(f"{args.logs} logs a sample, {args.samples} samples: busiest shard / mean "
          "(median, worst, samples over 1.2x)")
    for shape in (lvm_uuids, random_uuids):
        samples = [shape(random.Random(args.seed + n), args.logs) for n in range(args.samples)]
        for name, shard_of in (("route_hash", shard_of_uuid), ("blake2b", ideal_shard)):
            cells = []
            for shards in shard_counts:
                ratios = [busiest_over_mean(uuids, shards, shard_of) for uuids in samples]
                over = sum(ratio > 1.2 for ratio in ratios)
                cells.append(f"{shards}: {statistics.median(ratios):.3f} {max(ratios):.3f} "
                             f"{over}/{len(ratios)}")
            print(f"{shape.__name__:<13} {name:<10} " + " | ".join(cells))


if __name__ == "__main__":
    main()
