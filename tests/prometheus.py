"""A real Prometheus server and its promtool, for the metrics tests.

Debian's ``prometheus`` package (scripts/setup installs it) ships both.  The server is
started on 127.0.0.1 of the test's private network namespace with a temporary
configuration and data directory, scrapes every second, and is killed afterwards: the
package's own service (if any) plays no part.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from shardlog.observability.metrics import free_local_port

SCRAPE_INTERVAL = "1s"


def tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; a loud skip where it is missing, and a
    failure as root or on CI (scripts/setup installs it there)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}")
                                  else None)
    if path is None:
        message = (f"{name} is missing: scripts/setup installs Debian's prometheus package "
                   "when run as root")
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


class Prometheus:
    """``prometheus`` scraping ``targets`` (``host:port``) every second."""

    def __init__(self, directory: Path, targets: list[str], *, job: str = "shardlog",
                 rule_files: tuple[Path, ...] = ()):
        self.directory = directory
        self.port = free_local_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        # JSON is YAML: no YAML library needed to write it.
        config.write_text(json.dumps({
            "global": {"scrape_interval": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }))
        self.log_path = directory / "prometheus.log"
        self.command = [tool("prometheus"), f"--config.file={config}",
                        f"--storage.tsdb.path={directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}:\n"
                                     f"{self.log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("prometheus not ready after 60 s:\n"
                                         f"{self.log_path.read_text()}") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> object:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expression: str) -> dict[tuple, float]:
        """An instant query's vector, keyed by the sorted label pairs of each series
        (``__name__`` left out)."""
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", data
        return {tuple(sorted((k, v) for k, v in sample["metric"].items()
                             if k != "__name__")): float(sample["value"][1])
                for sample in data["result"]}

    def value(self, expression: str) -> float | None:
        """The single value of a query that yields one series (None: no series)."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return next(iter(result.values()), None)

    def wait_until(self, expression: str, holds, timeout: float = 30.0) -> float:
        """Until ``holds(value)`` for the query's single value; returns that value."""
        deadline = time.monotonic() + timeout
        while (got := self.value(expression)) is None or not holds(got):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} is still {got} after {timeout:.0f} s")
            time.sleep(0.25)
        return got

    def wait_for(self, expression: str, expected: float, timeout: float = 30.0) -> None:
        """Until the query's single value is ``expected`` (scrapes come every second)."""
        deadline = time.monotonic() + timeout
        while (got := self.value(expression)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} is {got}, not {expected}, after "
                                     f"{timeout:.0f} s")
            time.sleep(0.25)
