"""A capacity run's points as JSON, CSV and a text summary that names the knee.

Every shardlog figure stands beside the echo peer's for the same streams, measured in the
same run, and as a ratio: throughput shardlog/echo (1.0 = as fast as a server that does
nothing), latencies shardlog/echo (1.0 = no cost over the round trip itself).

The knee is the largest value of the swept parameter at which the p99 latency of FLUSH
(the request every mirrored write waits for) stays under the stated limit.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardlog.harness.capacity.runner import Point
from shardlog.harness.capacity.spec import SWEEPABLE
from shardlog.harness.hostinfo import describe

MiB = 1 << 20


@dataclass
class Run:
    """What was asked, where, and what each point measured."""

    command: list[str]
    machine: dict[str, object]
    filesystem: str
    parameter: str | None  # swept, or None for a single point
    flush_p99_limit_ms: float
    points: list[Point]

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "machine": self.machine,
                "filesystem": self.filesystem, "parameter": self.parameter,
                "flush_p99_limit_ms": self.flush_p99_limit_ms,
                "knee": knee(self.points, self.flush_p99_limit_ms),
                "points": [dict(asdict(p), derived=derived(p)) for p in self.points]}


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def flush_p99_us(figures: dict[str, Any] | None) -> float:
    if figures is None:
        return float("nan")
    return figures["by_type"].get("FLUSH", {}).get("p99_us", float("nan"))


def derived(point: Point) -> dict[str, float]:
    """The figures a reader compares: totals, per log and per region, and ratios."""
    load, base = point.load, point.baseline or {}
    rss = sum(row["rss"] for row in point.memory)
    pss = sum(row["pss"] for row in point.memory)
    # What the logs added: the same processes' PSS before they existed, subtracted.
    added = pss - sum(row["pss"] for row in point.memory_empty)
    logs = point.spec["mirrors"]
    regions = logs * point.spec["regions"]
    flush = load["by_type"].get("FLUSH", {})
    base_flush = base.get("by_type", {}).get("FLUSH", {}) if base else {}
    out = {
        "requests_per_second": load["requests_per_second"],
        "p50_us": load["p50_us"], "p99_us": load["p99_us"], "p999_us": load["p999_us"],
        "flush_p50_us": flush.get("p50_us", float("nan")),
        "flush_p99_us": flush.get("p99_us", float("nan")),
        "flush_p999_us": flush.get("p999_us", float("nan")),
        "baseline_requests_per_second": base.get("requests_per_second", float("nan")),
        "baseline_p50_us": base.get("p50_us", float("nan")),
        "baseline_p99_us": base.get("p99_us", float("nan")),
        "baseline_p999_us": base.get("p999_us", float("nan")),
        "baseline_flush_p99_us": base_flush.get("p99_us", float("nan")),
        "rss_bytes": rss, "pss_bytes": pss,
        "pss_added_bytes": added, "pss_per_log": added / logs,
        "pss_per_region": added / regions,
        "balance_max_over_mean": point.balance["max_over_mean"],
        "setup_seconds": point.setup_seconds,
        "cpu_us_per_request_server": (point.cpu_us_per_request.get("front", 0.0)
                                      + point.cpu_us_per_request.get("workers", 0.0)),
        "restart_seconds": (point.restart or {}).get("seconds_to_all_answered",
                                                     float("nan")),
    }
    out["ratio_requests_per_second"] = _ratio(out["requests_per_second"],
                                              out["baseline_requests_per_second"])
    for name in ("p50_us", "p99_us", "p999_us", "flush_p99_us"):
        out[f"ratio_{name}"] = _ratio(out[name], out[f"baseline_{name}"])
    return out


def knee(points: Sequence[Point], limit_ms: float) -> dict[str, Any]:
    """Walking the points in order: the last one before FLUSH p99 first reaches the limit
    (a later point back under it is noise, not capacity), and that first one over."""
    under: Point | None = None
    over: Point | None = None
    for point in points:
        if flush_p99_us(point.load) < limit_ms * 1000:
            under = point
        else:
            over = point
            break
    return {"limit_ms": limit_ms,
            "largest_under": under.value if under else None,
            "largest_under_label": under.label if under else None,
            "first_over": over.value if over else None,
            "first_over_label": over.label if over else None}


def read_json(path: Path) -> Run:
    """A run back from its results.json (to draw its plots again)."""
    saved = json.loads(path.read_text())
    points = []
    for point in saved["points"]:
        point = dict(point)
        point.pop("derived", None)
        points.append(Point(**point))
    return Run(command=saved["command"], machine=saved["machine"],
               filesystem=saved["filesystem"], parameter=saved["parameter"],
               flush_p99_limit_ms=saved["flush_p99_limit_ms"], points=points)


def write_json(run: Run, path: Path) -> None:
    path.write_text(json.dumps(run.as_dict(), indent=2, allow_nan=True) + "\n")


CSV_SPEC = ("mirrors", "regions", "region_size", "workload", "integrated_flush", "workers",
            "in_flight", "rate", "duration")


def write_csv(run: Run, path: Path) -> None:
    rows = []
    for point in run.points:
        row: dict[str, Any] = {"label": point.label, "value": point.value}
        row.update({name: point.spec[name] for name in CSV_SPEC})
        row.update(derived(point))
        rows.append(row)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summary(run: Run) -> str:
    """The text a reader reads first."""
    lines = []
    machine = run.machine
    lines.append(f"machine: {describe(machine)}; state on {run.filesystem}")
    lines.append("command: " + " ".join(run.command))
    first = dict(run.points[0].spec)
    if run.parameter is not None:  # not the first point's value: every point has its own
        first[SWEEPABLE[run.parameter]] = "(swept)"
    pace = (f"rate {first['rate']}" if isinstance(first["rate"], str)
            else f"rate {first['rate']:,.0f}/s" if first["rate"] else "closed loop")
    lines.append(f"load: {first['workload']}"
                 f"{' (integrated flush)' if first['integrated_flush'] else ''}, "
                 f"{first['regions']} regions x {first['region_size']} sectors per log, "
                 f"{first['workers']} workers, {first['in_flight']} in flight, "
                 f"{pace}, "
                 f"{first['duration']:g} s per point"
                 + (f"; swept: {run.parameter}" if run.parameter else ""))
    lines.append("")
    head = (f"{'point':<16} {'req/s':>9} {'x echo':>7} {'p50 us':>8} {'p99 us':>8} "
            f"{'p999 us':>8} {'x echo':>7} {'FLUSH p99':>10} {'x echo':>7} {'PSS MiB':>8} "
            f"{'KiB/log':>8} {'balance':>7}")
    lines.append(head)
    lines.append("-" * len(head))
    for point in run.points:
        d = derived(point)
        lines.append(
            f"{point.label:<16} {d['requests_per_second']:>9,.0f} "
            f"{d['ratio_requests_per_second']:>6.2f}x {d['p50_us']:>8.0f} {d['p99_us']:>8.0f} "
            f"{d['p999_us']:>8.0f} {d['ratio_p99_us']:>6.2f}x {d['flush_p99_us']:>10.0f} "
            f"{d['ratio_flush_p99_us']:>6.2f}x {d['pss_bytes'] / MiB:>8.1f} "
            f"{d['pss_per_log'] / 1024:>8.1f} {d['balance_max_over_mean']:>6.2f}x")
    lines.append("")
    lines.append("x echo: shardlog / the minimal echo peer, same streams, same run "
                 "(req/s: higher is better; latencies: lower). PSS: the server's processes "
                 "after the load; KiB/log: what the logs added to it. balance: the busiest "
                 "worker's requests / the mean.")
    for point in run.points:
        d = derived(point)
        rss = sum(row["rss"] for row in point.memory)
        extra = [f"RSS {rss / MiB:.1f} MiB (front + {point.workers} workers, shared pages "
                 f"counted per process)",
                 f"logs added PSS {d['pss_added_bytes'] / MiB:.1f} MiB = "
                 f"{d['pss_per_region']:.2f} B/region",
                 f"logs created in {point.setup_seconds:.1f} s"]
        if point.restart:
            extra.append(f"restart: serving in {point.restart['seconds_to_serving']:.1f} s, "
                         f"all {point.restart['logs']} logs answered in "
                         f"{point.restart['seconds_to_all_answered']:.1f} s")
        if point.balance["reported"] is not None:
            agree = point.balance["reported"] == point.balance["predicted"]
            extra.append("per-worker counts " + ("match the routing function" if agree else
                         f"reported {point.balance['reported']} vs predicted "
                         f"{point.balance['predicted']}"))
        lines.append(f"  {point.label}: " + "; ".join(extra))
        lines.extend(f"  {point.label}: note: {note}" for note in point.notes)
    k = knee(run.points, run.flush_p99_limit_ms)
    lines.append("")
    name = run.parameter
    if name is None:  # one point: no knee to find, only which side of the limit it is on
        flush = flush_p99_us(run.points[0].load)
        side = ("no FLUSH was measured against" if math.isnan(flush) else
                "FLUSH p99 is under" if k["largest_under_label"] is not None else
                "FLUSH p99 is over")
        lines.append(f"{side} the {run.flush_p99_limit_ms:g} ms limit (one point: no knee)")
    elif k["largest_under_label"] is None:
        lines.append(f"knee: FLUSH p99 was over {run.flush_p99_limit_ms:g} ms at every point "
                     f"(from {k['first_over_label']})")
    elif k["first_over"] is None:
        lines.append(f"knee: not reached: FLUSH p99 stayed under {run.flush_p99_limit_ms:g} ms"
                     f" up to {name} = {k['largest_under']:g}, the largest point measured")
    else:
        lines.append(f"knee: {name} = {k['largest_under']:g} is the largest at which FLUSH "
                     f"p99 stays under {run.flush_p99_limit_ms:g} ms (over it at "
                     f"{name} = {k['first_over']:g})")
    return "\n".join(lines) + "\n"
