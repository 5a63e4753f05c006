"""``shardlog serve`` as a child process, for whatever plays the kernel against it.

Tests, the benchmark (and capacity scripts) all start a real server the same way: in its
own session, so that one ``killpg`` kills the front and every worker at once (a server
crash, for real); with its pid file and log beside its state directory; started means
"its pid file appeared" (the server writes it once subscribed to group 7 with every worker
up), and a server that exits first fails the start with its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


class ServeFailed(Exception):
    """The server did not start, or did not stop as it should; the message has its log."""


class ServeProcess:
    """One ``shardlog serve``; :meth:`start` it, then :meth:`stop` or :meth:`kill` it."""

    def __init__(self, state_dir: Path, *, workers: int = 2, test_peer: int | None = None,
                 metrics_addr: str = "", log_level: str = "info",
                 extra: tuple[str, ...] = (), run_dir: Path | None = None):
        self.state_dir = state_dir
        run_dir = run_dir or state_dir.parent  # where its pid file and log go
        self.pid_file = run_dir / f"{state_dir.name}.pid"
        self.log_path = run_dir / f"{state_dir.name}.log"
        # Its own control socket: never the host's /run/shardlog/control.sock.  In a
        # directory of its own under /tmp: a socket's path must fit in 108 bytes, which a
        # test's or a benchmark's run directory need not.
        self._control_dir: Path | None = Path(tempfile.mkdtemp(prefix="shardlog-control-"))
        self.control_socket = self._control_dir / "control.sock"
        self.command = [sys.executable, "-m", "shardlog.cli", "--log-level", log_level,
                        "serve", "--workers", str(workers), "--state-dir", str(state_dir),
                        "--pid-file", str(self.pid_file), "--metrics-addr", metrics_addr,
                        "--control-socket", str(self.control_socket)]
        if test_peer is not None:
            self.command += ["--test-peer", str(test_peer)]
        self.command += extra  # last: an option given here wins
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ServeProcess:
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log,
                                            start_new_session=True)
        self._wait_until_serving(self.pid_file.exists, "shardlog serve", timeout)
        return self

    def _wait_until_serving(self, serving: Callable[[], bool], what: str,
                            timeout: float) -> None:
        """Until ``serving()``; ServeFailed with the log if the process exits first, or
        is not serving within ``timeout`` seconds (then it is killed: it would serve,
        and write the same pid file, later, beside whatever server the caller starts
        next)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not serving():
            if self.process.poll() is not None:
                raise ServeFailed(f"{what} exited {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                self.close()
                raise ServeFailed(f"{what} not serving after {timeout:.0f} s:\n{self.log}")
            time.sleep(0.005)

    def take_over(self, extra: tuple[str, ...] = (), timeout: float = 60.0) -> ServeProcess:
        """Start a server that takes this one over (``--take-over``, the same options
        plus ``extra``, its log in a file of its own) and return it once it serves,
        i.e. once the pid file names it; ServeFailed with its log if it exits first.
        The control socket's directory passes to it with the socket."""
        successor = type(self).__new__(type(self))
        successor.__dict__.update(self.__dict__)
        base = [word for word in self.command if word != "--take-over"]
        successor.command = [*base, "--take-over", *extra]
        successor.log_path = self.log_path.with_name(
            f"{self.state_dir.name}.{time.monotonic_ns()}.log")
        with open(successor.log_path, "ab") as log:
            successor.process = subprocess.Popen(successor.command, stdout=log, stderr=log,
                                                 start_new_session=True)

        def named_in_pid_file() -> bool:
            try:
                return int(self.pid_file.read_text()) == successor.process.pid
            except (OSError, ValueError):
                return False

        successor._wait_until_serving(named_in_pid_file, "shardlog serve --take-over",
                                      timeout)
        self._control_dir = None  # the successor's now
        return successor

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The workers' pids in worker-index order, the current process of each slot last
        (from the front's "worker N started (pid P)" lines: log level info or lower)."""
        pids: dict[int, int] = {}
        for line in self.log.splitlines():
            if "worker " in line and " started (pid " in line:
                words = line.split("worker ", 1)[1].split()
                pids[int(words[0])] = int(words[3].rstrip(")"))
        return [pids[index] for index in sorted(pids)]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as systemd does; the exit code (ServeFailed if it does not stop)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServeFailed(f"shardlog serve did not stop within {timeout:.0f} s") from exc

    def kill(self) -> None:
        """SIGKILL the front and every worker at once."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def close(self) -> None:
        """Nothing of this server outlives the caller, whatever state it is in."""
        self.kill()
        # Workers of a front that died on its own.
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
