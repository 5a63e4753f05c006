"""``shardlog inspect PATH``: what an instance file or a log device holds, read offline.

The reading is storage's (:func:`~shardlog.storage.image.read_stored_image`: read-only,
O_DIRECT for a device, the format checked as the server checks it, and the instance's
uuid and luid found from its name or its CTR record); this module only counts and
prints.  Bits are shown as *compact intervals* — ``0-99,120,200-255`` — found with
bitarray's C search (one call per run), so a map of millions of regions with a few dirty
ones prints at once.

Exit codes: 0 the image was read, 1 it could not be read or is not a valid image (the
message says which: a bad magic, an unknown version, a file cut short), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bitarray import bitarray

from shardlog.storage.errors import StoreError
from shardlog.storage.image import StoredImage, instance_identity, read_stored_image
from shardlog.storage.layout import SYNC_MAGIC
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK

SHOWN_RANGES = 32  # per kind in the text output unless --all: a fragmented map is long

HELP = """\
Read an instance file (STATE_DIR/logs/<uuid>@<luid>.map) or a log device in the kernel's
disk log layout, read-only, and print its header, its counts and its dirty and out-of-sync
regions as compact intervals (0-99,120,...). Safe while the server runs: nothing is
written or locked; a block device is read with O_DIRECT, as it is written.

exit codes: 0 read, 1 cannot be read or not a valid image (bad magic, unknown version,
truncated), 2 usage
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="print an instance file or log device, offline",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="an instance file (.map) or a log device")
    parser.add_argument("--json", action="store_true", help="one JSON object, every range")
    parser.add_argument("--all", action="store_true",
                        help=f"every range (default: the first {SHOWN_RANGES} of each kind)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        image = read_stored_image(args.path)
    except StoreError as exc:
        print(f"shardlog inspect: {exc}", file=sys.stderr)
        return EXIT_ERROR
    summary = summarize(image)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_text(summary, limit=None if args.all else SHOWN_RANGES))
    return EXIT_OK


def summarize(image: StoredImage) -> dict:
    """Everything inspect shows, as plain data (the --json object)."""
    header = image.header
    nr = header.nr_regions
    clean = image.clean_bits.count(1)
    summary: dict = {
        "path": str(image.path),
        "kind": "instance file" if image.is_instance_file else "disk log image",
        "size": image.size,
        "magic": f"{header.magic:#010x}",
        "version": header.version,
        "region_count": nr,
        "clean": clean,
        "dirty": nr - clean,
        "dirty_ranges": ranges(image.clean_bits, 0),
    }
    if image.is_instance_file:
        uuid, luid = instance_identity(image.path)
        in_sync = image.sync_bits.count(1)
        summary.update({
            "uuid": uuid, "luid": None if luid is None else f"{luid:#018x}",
            "sync_magic": f"{SYNC_MAGIC:#010x}",
            "resumed": image.resumed, "in_sync": in_sync, "out_of_sync": nr - in_sync,
            "out_of_sync_ranges": ranges(image.sync_bits, 0),
        })
    return summary


def ranges(bits: bitarray, value: int) -> list[list[int]]:
    """The runs of ``value`` in ``bits`` as inclusive ``[first, last]`` pairs."""
    runs = []
    start = bits.find(value)
    while start >= 0:
        end = bits.find(1 - value, start)
        if end < 0:
            end = len(bits)
        runs.append([start, end - 1])
        start = bits.find(value, end)
    return runs


def compact(runs: list[list[int]], limit: int | None = None) -> str:
    """``0-99,120,200-255``; with ``limit``, the first ``limit`` runs and how many more."""
    shown = runs if limit is None else runs[:limit]
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in shown)
    if len(shown) < len(runs):
        text += f",... ({len(runs) - len(shown)} more ranges: --all)"
    return text or "none"


def format_text(summary: dict, limit: int | None = SHOWN_RANGES) -> str:
    nr = summary["region_count"]
    lines = [f"{summary['path']}: {summary['kind']}, {summary['size']} bytes"]
    if summary.get("uuid") is not None:
        lines.append(f"  uuid          {summary['uuid']}")
        lines.append(f"  luid          {summary['luid']}")
    lines.append(f"  header        magic {summary['magic']}, version {summary['version']}, "
                 f"{nr} regions")
    if summary["kind"] == "instance file":
        lines.append(f"  resumed       {'yes' if summary['resumed'] else 'no'}")
    lines.append(f"  clean         {summary['clean']} of {nr} ({summary['dirty']} dirty)")
    if "in_sync" in summary:
        lines.append(f"  in sync       {summary['in_sync']} of {nr} "
                     f"({summary['out_of_sync']} out of sync)")
    lines.append(f"  dirty         {compact(summary['dirty_ranges'], limit)}")
    if "out_of_sync_ranges" in summary:
        lines.append(f"  out of sync   {compact(summary['out_of_sync_ranges'], limit)}")
    return "\n".join(lines)
