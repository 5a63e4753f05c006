#!/usr/bin/env python3
"""Capacity test of shardlog: the same as `shardlog capacity` (see its --help).

    sudo .venv/bin/python scripts/capacity.py --sweep mirrors=1,10,100,1000 --out results/
"""

import sys

from shardlog.harness.capacity.command import main

if __name__ == "__main__":
    sys.exit(main())
