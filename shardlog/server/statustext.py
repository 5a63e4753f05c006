"""A ``status`` answer as text: what ``shardlog status`` prints and SIGUSR1 logs.

Both the client (shardlog.tools.status) and the server (its SIGUSR1 dump, as cmirrord's
debug dump did) print the same table, so it lives in the server layer, below the tools.
"""

from __future__ import annotations


def recovery(log: dict) -> str:
    """Where resync stands: the region being recovered, the next one looked at, or done."""
    if log["in_sync"] >= log["region_count"]:
        return "done"
    if log["recovering"] is not None:
        return f"at {log['recovering']}"
    return f"next {log['sync_search']}"


def table(header: list[str], rows: list[list], right: set[int]) -> list[str]:
    """Plain columns, as lvs prints them: widths from the content, numbers right-aligned."""
    cells = [header] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join((cell.rjust(w) if i in right else cell.ljust(w))
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in cells]


def format_text(answer: dict) -> str:
    server = answer["server"]
    lines = [f"shardlog pid {server['pid']}, up {server['uptime_s']:.0f} s, "
             f"{server['workers']} workers, {len(answer['logs'])} logs, "
             f"{server['requests_total']} requests, state in {server['state_dir']}"
             + ("" if server["serving"] else " (not serving yet)")
             + (" (stopping)" if server["stopping"] else "")]
    lines.append("")
    lines += table(["Worker", "PID", "Logs", "Restarts", "InFlight", "Req/s", "Ready"],
                   [[w["index"], w["pid"], w["logs"], w["restarts"], w["in_flight"],
                     f"{w['requests_per_s']:.1f}", "yes" if w["ready"] else "no"]
                    for w in answer["workers"]], right={0, 1, 2, 3, 4, 5})
    lines.append("")
    if not answer["logs"]:
        lines.append("no logs")
    else:
        # Where this host has the log's device: its VG/LV or dm name (label_logs).
        devices = any(log.get("device") for log in answer["logs"])
        lines += table(
            ["UUID"] + (["Device"] if devices else []) +
            ["LUID", "Type", "State", "RegionSz", "Regions", "InSync", "Dirty", "Recovery",
             "Worker", "Req/s", "Health"],
            [[log["uuid"]] + ([log.get("device") or "-"] if devices else []) +
             [f"{log['luid']:x}", log["type"], log["state"],
              log["region_size"], log["region_count"], log["in_sync"], log["dirty"],
              recovery(log), log["worker"], f"{log['requests_per_s']:.1f}", log["health"]]
             for log in sorted(answer["logs"], key=lambda x: (x["uuid"], x["luid"]))],
            right={i + devices for i in (4, 5, 6, 7, 9, 10)})
    return "\n".join(lines)
