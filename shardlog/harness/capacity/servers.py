"""The server a capacity run drives: one it starts per point, or one already running.

:class:`SpawnedServer` is a fresh ``shardlog serve`` and state directory per point (the
convenient default: nothing carries over between points, and the tool may SIGKILL it to
measure a restart).  :class:`AttachedServer` was started by the operator with
``--test-peer PORT`` in this network namespace; the tool only adds and removes its own
logs.  Either way it must be the one server in connector group 7 besides the load's
socket (:func:`check_reachable`: one socket per shard), or nothing is measured.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from shardlog.harness.capacity.spec import LoadSpec
from shardlog.harness.kernelsim.serveprocess import ServeFailed, ServeProcess
from shardlog.harness.procstat import server_processes
from shardlog.observability.metrics import free_local_port, parse_samples
from shardlog.server.nlsocket import group7_listeners


class CapacityError(Exception):
    """The load could not be delivered, or the server could not be reached: no figure."""


class Server:
    """What the runner needs of a server."""

    peer_port: int
    metrics_url: str | None = None
    shard_sockets: int | None = None  # its sockets in group 7, where the tool knows it
    can_restart = False  # the tool may SIGKILL it
    disposable = False  # its state goes with the point: no need to remove the logs

    def front_pid(self) -> int:
        raise NotImplementedError

    def processes(self) -> dict[str, list[int]]:
        return server_processes(self.front_pid())

    def begin_point(self, spec: LoadSpec, label: str) -> None:
        """Ready for a point's logs."""

    def end_point(self) -> None:
        """The point's logs are done with."""

    def restart(self) -> float:
        """SIGKILL every process, start again on the same state: seconds to serving."""
        raise CapacityError("this server was not started by the tool: it cannot crash it")

    def close(self) -> None:
        pass

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log, where the tool has it."""
        return ""


class SpawnedServer(Server):
    """A ``shardlog serve`` per point, in a state directory of its own under ``base``."""

    can_restart = True
    disposable = True

    def __init__(self, base: Path, peer_port: int, log_level: str = "warning"):
        self.base = base
        self.peer_port = peer_port
        self.log_level = log_level
        self.process: ServeProcess | None = None

    def begin_point(self, spec: LoadSpec, label: str) -> None:
        run_dir = self.base / label
        run_dir.mkdir(parents=True)
        port = free_local_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.shard_sockets = spec.workers
        self.process = ServeProcess(run_dir / "state", workers=spec.workers,
                                    test_peer=self.peer_port,
                                    metrics_addr=f"127.0.0.1:{port}",
                                    log_level=self.log_level, run_dir=run_dir)
        self._start()

    def _start(self) -> float:
        assert self.process is not None
        started = time.monotonic()
        try:
            self.process.start(timeout=60)
        except ServeFailed as exc:
            raise CapacityError(str(exc)) from exc
        return time.monotonic() - started

    def front_pid(self) -> int:
        assert self.process is not None and self.process.process is not None
        return self.process.process.pid

    def restart(self) -> float:
        assert self.process is not None
        self.process.kill()
        return self._start()

    def end_point(self) -> None:
        if self.process is None:
            return
        try:
            code = self.process.stop()
        except ServeFailed as exc:
            raise CapacityError(f"{exc}:\n{self.process.log}") from exc
        finally:
            self.process.close()
        if code != 0:
            raise CapacityError(f"shardlog serve exited {code} after SIGTERM:\n"
                                f"{self.process.log}")
        shutil.rmtree(self.process.state_dir.parent, ignore_errors=True)
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.close()

    def log_tail(self, lines: int = 15) -> str:
        if self.process is None:
            return ""
        return "\n".join(self.process.log.splitlines()[-lines:])


class AttachedServer(Server):
    """A server the operator started (``shardlog serve --test-peer PORT``)."""

    def __init__(self, peer_port: int, pid_file: Path, metrics_url: str | None):
        self.peer_port = peer_port
        self.pid_file = pid_file
        self.metrics_url = metrics_url

    def front_pid(self) -> int:
        try:
            pid = int(self.pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError) as exc:
            raise CapacityError(f"no running server behind pid file {self.pid_file} "
                                f"({exc})") from exc
        return pid


def check_reachable(server: Server) -> None:
    """CapacityError unless the server's shard sockets, and no other socket but the
    load's, are in connector group 7 (a server the tool did not start: any sockets)."""
    members = group7_listeners(exclude_port=server.peer_port)
    if not members or server.shard_sockets not in (None, len(members)):
        raise CapacityError(
            f"expected one server in connector group 7 in this network namespace, found "
            f"{len(members)} sockets (netlink ports {members}): start it here with "
            f"`shardlog serve --test-peer {server.peer_port}` (unshare -n), or let the tool "
            "start one")


def scrape(url: str | None) -> dict[str, float] | None:
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            return parse_samples(page.read().decode())
    except (OSError, urllib.error.URLError):
        return None
