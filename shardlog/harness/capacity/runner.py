"""One point of a capacity run: set up the logs, drive the load, measure the server.

The server is one the tool starts per point or one already running (:mod:`.servers`).

Nothing here is a pass/fail on speed: a load that cannot be delivered (no server,
requests unanswered and re-sent, error replies) is an error (:class:`CapacityError`);
anything else is a figure.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shardlog.harness.capacity import workloads
from shardlog.harness.capacity.progress import Progress
from shardlog.harness.capacity.servers import CapacityError, Server, check_reachable, scrape
from shardlog.harness.capacity.spec import LoadSpec
from shardlog.harness.kernelsim.echo import running_echo_peer
from shardlog.harness.kernelsim.load import LoadResult, Stream, percentile_us, run_load
from shardlog.harness.netns import enter_private_netns
from shardlog.harness.procstat import cpu_seconds, memory
from shardlog.server.nlsocket import open_connector_socket
from shardlog.server.routing import shard_of_uuid
from shardlog.wire.protocol import RequestType

LOAD_RCVBUF = 32 << 20
SETUP_BATCH = 500  # logs per setup round trip of the progress bar
# Logs being created at once.  Each RESUME of a new instance lists the state directory
# (logtable: stale instance files of its uuid), so with 10,000 logs one costs tens of ms,
# and a worker handed 64 of them at once can stay silent past --worker-timeout.
SETUP_IN_FLIGHT = 16
# FLUSH latency histogram: log-spaced bins from 10 us to 10 s.
HISTOGRAM_EDGES_US = [10 * 10 ** (n / 8) for n in range(6 * 8 + 1)]


# --- figures -------------------------------------------------------------------------------


def load_figures(result: LoadResult) -> dict[str, Any]:
    """Throughput and latency percentiles (us) of a load, overall and per request type,
    and the FLUSH latency histogram."""
    every = sorted(ns for values in result.latencies_ns.values() for ns in values)
    by_type = {}
    for name, values in sorted(result.latencies_ns.items()):
        ordered = sorted(values)
        by_type[name] = {"count": len(ordered), "p50_us": percentile_us(ordered, 50),
                         "p99_us": percentile_us(ordered, 99),
                         "p999_us": percentile_us(ordered, 99.9)}
    flushes = result.latencies_ns.get("FLUSH", [])
    counts = [0] * (len(HISTOGRAM_EDGES_US) + 1)
    for ns in flushes:
        us = ns / 1000
        counts[sum(1 for edge in HISTOGRAM_EDGES_US if us >= edge)] += 1
    return {
        "requests": result.requests, "seconds": result.elapsed,
        "requests_per_second": result.requests_per_second,
        "p50_us": percentile_us(every, 50), "p99_us": percentile_us(every, 99),
        "p999_us": percentile_us(every, 99.9), "by_type": by_type,
        "errors": result.errors, "resends": result.resends,
        "stray_replies": result.stray_replies,
        "flush_histogram": {"edges_us": HISTOGRAM_EDGES_US, "counts": counts},
    }


def check_delivered(result: LoadResult, what: str, reply_timeout: float) -> None:
    """CapacityError when the load was not delivered: requests unanswered, answered with
    an error, or nothing answered at all."""
    if result.unanswered or result.resends:
        raise CapacityError(f"{what}: {result.unanswered + result.resends} requests went "
                            f"unanswered for {reply_timeout:g} s: the load was not delivered "
                            "(server gone, overloaded, or not taking requests from this "
                            "peer port?)")
    if result.errors:
        raise CapacityError(f"{what}: error replies by request type {result.errors}")
    if result.requests == 0:
        raise CapacityError(f"{what}: no request was answered")


@dataclass
class Balance:
    """Requests per worker: predicted by the front's routing function from what each
    mirror completed, and as the server counted them (None: metrics not reachable)."""

    predicted: list[int]
    reported: list[int] | None
    max_over_mean: float


def balance(uuids: Sequence[str], completed: Sequence[int], workers: int,
            reported: list[int] | None) -> Balance:
    predicted = [0] * workers
    for uuid, count in zip(uuids, completed, strict=True):
        predicted[shard_of_uuid(uuid, workers)] += count
    basis = reported if reported is not None else predicted
    mean = sum(basis) / workers
    return Balance(predicted, reported, max(basis) / mean if mean else float("nan"))


def worker_counts(before: dict[str, float] | None, after: dict[str, float] | None,
                  workers: int) -> list[int] | None:
    if before is None or after is None:
        return None
    key = 'shardlog_worker_requests_total{{worker="{}"}}'
    try:
        return [int(after[key.format(n)] - before.get(key.format(n), 0.0))
                for n in range(workers)]
    except KeyError:
        return None  # a server without per-worker counters


def memory_of(processes: dict[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for role, pids in processes.items():
        for pid in pids:
            try:
                rows.append({"role": role.rstrip("s"), "pid": pid, **asdict(memory(pid))})
            except OSError:
                continue  # it went away meanwhile
    return rows


# --- the baseline --------------------------------------------------------------------------


def in_own_netns(work: Callable[[], Any]) -> Any:
    """``work()`` in a forked child in a network namespace of its own (so that the echo
    peer never shares group 7 with a server); its result, pickled back."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            enter_private_netns()
            payload = pickle.dumps((True, work()))
        except BaseException as exc:
            payload = pickle.dumps((False, f"{type(exc).__name__}: {exc}"))
        with os.fdopen(write_fd, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        raise CapacityError("the baseline process died")
    ok, value = pickle.loads(data)
    if not ok:
        raise CapacityError(f"baseline: {value}")
    return value


def baseline(streams: list[Stream], spec: LoadSpec, peer_port: int) -> dict[str, Any]:
    """The same streams, in flight and rate against the echo peer."""

    def work() -> dict[str, Any]:
        with open_connector_socket(peer_port, receive_buffer=LOAD_RCVBUF) as sock, \
                running_echo_peer(peer_port) as pid:
            cpu_before = cpu_seconds({"server": [pid]})
            result = run_load(sock, streams, in_flight=spec.effective_in_flight,
                              duration=spec.duration, rate=spec.rate,
                              reply_timeout=spec.reply_timeout, resend=False)
            cpu_after = cpu_seconds({"server": [pid]})
        check_delivered(result, "echo peer", spec.reply_timeout)
        figures = load_figures(result)
        figures["cpu_us_per_request"] = _cpu_per_request(cpu_before, cpu_after,
                                                         result.requests)
        return figures

    return in_own_netns(work)


def _cpu_per_request(before: dict[str, float], after: dict[str, float],
                     requests: int) -> dict[str, float]:
    return {name: (after[name] - before.get(name, 0.0)) * 1e6 / requests
            for name in after if not name.endswith(" sys")}


# --- one point ---------------------------------------------------------------------------------


@dataclass
class Point:
    """Everything measured at one point of a sweep (JSON as it stands)."""

    label: str
    value: float | None  # of the swept parameter
    spec: dict[str, Any]
    workers: int
    setup_seconds: float
    load: dict[str, Any]
    baseline: dict[str, Any] | None
    memory: list[dict[str, Any]]  # per process, after the load
    memory_empty: list[dict[str, Any]]  # per process, before the point's logs existed
    balance: dict[str, Any]
    cpu_us_per_request: dict[str, float]
    restart: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def measure_point(server: Server, spec: LoadSpec, label: str, value: float | None, *,
                  with_baseline: bool = True, restart: bool = False,
                  progress: Progress | None = None) -> Point:
    progress = progress or Progress(enabled=False)
    notes: list[str] = []
    uuids = workloads.log_uuids(label, spec.mirrors)
    server.begin_point(spec, label)
    try:
        try:
            driven = _drive(server, spec, label, uuids, restart, notes, progress)
        except CapacityError as exc:
            tail = server.log_tail()
            raise CapacityError(f"{exc}\nthe server's log ends:\n{tail}" if tail
                                else str(exc)) from exc
    finally:
        server.end_point()
    base = None
    if with_baseline:
        progress.phase(f"{label}: baseline (echo peer), {spec.duration:g} s")
        base = baseline(driven.streams, spec, server.peer_port)
    return Point(label=label, value=value, spec=spec.as_dict(), workers=driven.workers,
                 setup_seconds=driven.setup_seconds, load=load_figures(driven.result),
                 baseline=base, memory=driven.memory, memory_empty=driven.memory_empty,
                 balance=asdict(driven.balance),
                 cpu_us_per_request=driven.cpu_us_per_request, restart=driven.restart,
                 notes=notes)


@dataclass
class _Driven:
    """What one point measured while its server ran."""

    streams: list[Stream]
    result: LoadResult
    workers: int
    setup_seconds: float
    memory_empty: list[dict[str, Any]]
    memory: list[dict[str, Any]]
    balance: Balance
    cpu_us_per_request: dict[str, float]
    restart: dict[str, Any] | None


def _drive(server: Server, spec: LoadSpec, label: str, uuids: list[str], restart: bool,
           notes: list[str], progress: Progress) -> _Driven:
    check_reachable(server)
    empty = memory_of(server.processes())
    sock = open_connector_socket(server.peer_port, receive_buffer=LOAD_RCVBUF)
    try:
        setup_seconds = _set_up(sock, spec, uuids, progress)
        if spec.workload == "resync-storm":
            if server.can_restart:
                server.restart()
                notes.append("server SIGKILLed and restarted before the load: every "
                             "log restored from its CTR record by its first request")
            else:
                notes.append("attached server: the resync storm ran without a crash")
        streams = workloads.streams(spec, uuids)
        processes = server.processes()
        workers = len(processes["workers"])
        metrics_before = scrape(server.metrics_url)
        cpu_before = cpu_seconds(processes)
        result = progress.timed(
            f"{label}: {spec.workload}, {spec.mirrors} mirrors, {spec.duration:g} s",
            spec.duration,
            lambda: run_load(sock, streams, in_flight=spec.effective_in_flight,
                             duration=spec.duration, rate=spec.rate,
                             reply_timeout=spec.reply_timeout, resend=False))
        cpu_after = cpu_seconds(processes)
        metrics_after = scrape(server.metrics_url)
        check_delivered(result, "shardlog", spec.reply_timeout)
        used = memory_of(server.processes())
        reported = worker_counts(metrics_before, metrics_after, workers)
        if reported is None:
            notes.append("per-worker counts not cross-checked: metrics not reachable")
        shares = balance(uuids, result.completed_by_stream, workers, reported)
        restarted = _restart(server, sock, spec, uuids, progress) if restart else None
        if not server.disposable:
            _tear_down(sock, spec, uuids)
    finally:
        sock.close()
    return _Driven(streams, result, workers, setup_seconds, empty, used, shares,
                   _cpu_per_request(cpu_before, cpu_after, result.requests), restarted)


def _set_up(sock: socket.socket, spec: LoadSpec, uuids: Sequence[str],
            progress: Progress) -> float:
    """CTR, GET_REGION_SIZE, RESUME for every log, pipelined; seconds taken."""
    progress.phase(f"creating {len(uuids)} logs of {spec.regions} regions")
    started = time.monotonic()
    for first in range(0, len(uuids), SETUP_BATCH):
        batch = [workloads.setup_stream(uuid, spec)
                 for uuid in uuids[first:first + SETUP_BATCH]]
        result = run_load(sock, batch, in_flight=SETUP_IN_FLIGHT, cycles=1,
                          reply_timeout=spec.reply_timeout, resend=False)
        check_delivered(result, "creating logs", spec.reply_timeout)
        progress.update((first + len(batch)) / len(uuids),
                        f"created {first + len(batch)}/{len(uuids)} logs")
    progress.done()
    return time.monotonic() - started


def _tear_down(sock: socket.socket, spec: LoadSpec, uuids: Sequence[str]) -> None:
    """Device removal of every log (an attached server keeps only what it had)."""
    streams = [s for uuid in uuids for s in workloads.teardown_streams(uuid, spec)]
    result = run_load(sock, streams, in_flight=SETUP_IN_FLIGHT, cycles=1,
                      reply_timeout=spec.reply_timeout, resend=False)
    # Errors are expected here (churn: one of the two instances is gone already); only
    # unanswered requests mean the server is in trouble.
    if result.unanswered:
        raise CapacityError("removing the logs: requests unanswered")


def _restart(server: Server, sock: socket.socket, spec: LoadSpec, uuids: Sequence[str],
             progress: Progress) -> dict[str, Any]:
    """SIGKILL the server, start it again, ask every log once (GET_SYNC_COUNT): each is
    restored from its files by that request.  Seconds to serving and to all answered."""
    progress.phase(f"restart: SIGKILL, then every one of {len(uuids)} logs asked once")
    started = time.monotonic()
    to_serving = server.restart()
    check_reachable(server)
    streams = [Stream.build(uuid, workloads.LUIDS[0], [(RequestType.GET_SYNC_COUNT, b"")])
               for uuid in uuids]
    result = run_load(sock, streams, in_flight=SETUP_IN_FLIGHT, cycles=1,
                      reply_timeout=spec.reply_timeout, resend=False)
    all_answered = time.monotonic() - started
    check_delivered(result, "after the restart", spec.reply_timeout)
    return {"seconds_to_serving": to_serving, "seconds_to_all_answered": all_answered,
            "logs": len(uuids), "memory": memory_of(server.processes())}
