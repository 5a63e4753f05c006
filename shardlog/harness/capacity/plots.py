"""PNG plots of a capacity run (matplotlib, Agg backend: no display needed).

One file per question: how fast (throughput.png), how long a request waits
(latency.png), how evenly the workers share the work (balance.png), what memory it takes
(memory.png), and how FLUSH latencies spread (flush_latency.png).  The echo peer's
figures are drawn dashed beside shardlog's wherever they apply.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from shardlog.harness.capacity.results import MiB, Run, derived

PLOTS = ("throughput.png", "latency.png", "balance.png", "memory.png", "flush_latency.png")


def _axis(run: Run) -> tuple[list[float], str, bool]:
    """x values, their label, and whether a log scale suits them."""
    if run.parameter is None:
        return list(range(len(run.points))), "point", False
    values = [float(p.value) for p in run.points]
    logarithmic = min(values) > 0 and max(values) / min(values) >= 20
    return values, run.parameter, logarithmic


def _frame(ax, run: Run, title: str, ylabel: str) -> None:
    xs, label, logarithmic = _axis(run)
    if logarithmic:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([p.label.split("=")[-1] for p in run.points])
    ax.set_xlabel(label)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def draw(run: Run, out_dir: Path) -> list[Path]:
    """Every plot into ``out_dir``; their paths."""
    paths = [_throughput(run, out_dir / PLOTS[0]), _latency(run, out_dir / PLOTS[1]),
             _balance(run, out_dir / PLOTS[2]), _memory(run, out_dir / PLOTS[3]),
             _flush_latency(run, out_dir / PLOTS[4])]
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(run: Run, path: Path) -> Path:
    xs = _axis(run)[0]
    rows = [derived(p) for p in run.points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["requests_per_second"] for r in rows], "o-", label="shardlog")
    ax.plot(xs, [r["baseline_requests_per_second"] for r in rows], "s--", label="echo peer")
    _frame(ax, run, "Throughput", "requests / s")
    ax.set_ylim(bottom=0)
    ratio = ax.twinx()
    ratio.plot(xs, [r["ratio_requests_per_second"] for r in rows], "^:", color="gray",
               label="shardlog / echo")
    ratio.set_ylabel("shardlog / echo")
    ratio.set_ylim(0, max(1.05, *(r["ratio_requests_per_second"] for r in rows
                                  if not math.isnan(r["ratio_requests_per_second"]))))
    lines = ax.get_legend_handles_labels()
    more = ratio.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    return _save(fig, path)


def _latency(run: Run, path: Path) -> Path:
    xs = _axis(run)[0]
    rows = [derived(p) for p in run.points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in (("p50", "o"), ("p99", "s"), ("p999", "^")):
        line, = ax.plot(xs, [r[f"{name}_us"] for r in rows], marker + "-",
                        label=f"{name} shardlog")
        ax.plot(xs, [r[f"baseline_{name}_us"] for r in rows], marker + "--",
                color=line.get_color(), alpha=0.6, label=f"{name} echo")
    ax.plot(xs, [r["flush_p99_us"] for r in rows], "D-", color="black", label="FLUSH p99")
    ax.axhline(run.flush_p99_limit_ms * 1000, color="red", linestyle=":",
               label=f"FLUSH p99 limit ({run.flush_p99_limit_ms:g} ms)")
    ax.set_yscale("log")
    _frame(ax, run, "Latency of every request (and FLUSH)", "microseconds")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def _balance(run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    count = len(run.points)
    width = 0.8 / max(p.workers for p in run.points)
    for n, point in enumerate(run.points):
        counts = point.balance["reported"] or point.balance["predicted"]
        mean = sum(counts) / len(counts) if counts else 0
        for w, c in enumerate(counts):
            ax.bar(n + (w - (len(counts) - 1) / 2) * width, c / mean if mean else 0, width,
                   color=f"C{w % 10}", label=f"worker {w}" if n == 0 else None)
        predicted = point.balance["predicted"]
        pmean = sum(predicted) / len(predicted) if predicted else 0
        ax.plot([n + (w - (len(predicted) - 1) / 2) * width for w in range(len(predicted))],
                [c / pmean if pmean else 0 for c in predicted], "k_", markersize=14,
                label="predicted by routing" if n == 0 else None)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axhline(1.2, color="red", linestyle=":", label="1.2x the mean")
    ax.set_xticks(range(count))
    ax.set_xticklabels([p.label.split("=")[-1] for p in run.points])
    ax.set_xlabel(run.parameter or "point")
    ax.set_ylabel("requests / mean requests per worker")
    ax.set_title("Per-worker balance (as the server counted; bars)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _memory(run: Run, path: Path) -> Path:
    xs = _axis(run)[0]
    fig, (total, per) = plt.subplots(1, 2, figsize=(11, 4.5))
    for role, name, marker in (("front", "front", "o"), ("worker", "workers (sum)", "s")):
        total.plot(xs, [sum(r["rss"] for r in p.memory if r["role"] == role) / MiB
                        for p in run.points], marker + "--", label=f"RSS {name}")
        total.plot(xs, [sum(r["pss"] for r in p.memory if r["role"] == role) / MiB
                        for p in run.points], marker + "-", label=f"PSS {name}")
    total.plot(xs, [derived(p)["pss_bytes"] / MiB for p in run.points], "k-",
               label="PSS server total")
    _frame(total, run, "Memory of the server", "MiB")
    total.legend(fontsize="small")
    rows = [derived(p) for p in run.points]
    per.plot(xs, [r["pss_per_log"] / 1024 for r in rows], "o-", label="per log (KiB)")
    per.plot(xs, [r["pss_per_region"] for r in rows], "s-", label="per region (bytes)")
    per.set_yscale("symlog")
    _frame(per, run, "PSS the logs added, per log and per region",
           "KiB per log / bytes per region")
    per.legend(fontsize="small")
    return _save(fig, path)


def _flush_latency(run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, point in enumerate(run.points):
        histogram = point.load["flush_histogram"]
        counts, edges = histogram["counts"], histogram["edges_us"]
        total = sum(counts)
        if not total:
            continue
        # counts[0] is below the first edge, counts[-1] above the last.
        left = [edges[0] / 1.4, *edges]
        ax.step(left, [c / total for c in counts], where="post", color=f"C{n % 10}",
                label=point.label)
    ax.axvline(run.flush_p99_limit_ms * 1000, color="red", linestyle=":",
               label=f"limit {run.flush_p99_limit_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("FLUSH latency, microseconds")
    ax.set_ylabel("share of FLUSHes")
    ax.set_title("FLUSH latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
