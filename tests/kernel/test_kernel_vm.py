"""The kernel scenarios (tests/kernel/guest), run in one boot of a real Linux kernel under
qemu and reported here one by one, each with the guest's own failure text.

The guest runs pytest on tests/kernel/guest and leaves a JUnit report on the shared
directory; the scenarios' names come from those files, so a scenario that the guest did
not run (a crash, a timeout) fails here rather than disappearing.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from shardlog.harness.kernelvm import image, runner
from shardlog.harness.kernelvm.__main__ import guest_pytest_command

GUEST_TESTS = Path(__file__).parent / "guest"
VM_TIMEOUT = 900.0  # the scenarios take 4-8 minutes under TCG on a busy host; a hang must not last


def scenario_names() -> list[str]:
    names = []
    for path in sorted(GUEST_TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names += [f"{path.stem}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return names


class GuestReport:
    def __init__(self, run: runner.GuestRun, junit: Path, progress: Path):
        self.run = run
        self.cases: dict[str, list[tuple[str, str | None]]] = {}  # name -> [(case, failure)]
        if not junit.exists():
            self._read_progress(progress)  # the guest did not finish: what it reported
            return
        for case in ElementTree.parse(junit).iter("testcase"):
            module = case.get("classname", "").rsplit(".", 1)[-1]
            function = case.get("name", "").split("[", 1)[0]
            problem = next((child for child in case
                            if child.tag in ("failure", "error", "skipped")), None)
            text = None if problem is None else \
                f"{problem.tag}: {problem.get('message', '')}\n{problem.text or ''}"
            self.cases.setdefault(f"{module}::{function}", []).append(
                (case.get("name", ""), text))

    def _read_progress(self, progress: Path) -> None:
        if not progress.exists():
            return
        outcomes: dict[str, str | None] = {}
        for line in progress.read_text().splitlines():
            entry = json.loads(line)
            if entry["outcome"] != "passed":
                outcomes[entry["nodeid"]] = f"{entry['outcome']} ({entry['when']}):\n" \
                                            f"{entry['text']}"
            else:
                outcomes.setdefault(entry["nodeid"], None)
        for nodeid, text in outcomes.items():
            path, _, case = nodeid.partition("::")
            key = f"{Path(path).stem}::{case.split('[', 1)[0]}"
            self.cases.setdefault(key, []).append((case, text))

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.run.console.splitlines()[-lines:])


def require_vm_tools(what: str) -> None:
    """Fail (as root or in CI, where scripts/setup installs them) or skip, saying so, when
    the tools that build and boot the guest are missing."""
    missing = [c for c in ("qemu-system-x86_64", "dpkg-deb", "cpio", "depmod")
               if shutil.which(c) is None]
    if missing:
        message = (f"{what} need {', '.join(missing)} "
                   "(scripts/setup installs them as root on Debian)")
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def guest_report(tmp_path_factory) -> GuestReport:
    require_vm_tools("the real-kernel scenarios")
    share = tmp_path_factory.mktemp("kernel-vm")
    junit = "junit.xml"
    command = guest_pytest_command(["-v"], junit=f"{image.GUEST_SHARE}/{junit}")
    env = {"SHARDLOG_PROGRESS": f"{image.GUEST_SHARE}/progress.jsonl"}
    try:
        run = runner.boot(command, share, timeout=VM_TIMEOUT, env=env)
    except image.ImageError as exc:
        pytest.fail(f"the guest image could not be built: {exc}")
    return GuestReport(run, share / junit, share / "progress.jsonl")


@pytest.mark.parametrize("scenario", scenario_names())
def test_kernel_scenario(guest_report: GuestReport, scenario: str) -> None:
    cases = guest_report.cases.get(scenario)
    if not cases:
        pytest.fail(f"the guest did not report {scenario}: {guest_report.run.describe()}\n"
                    f"{guest_report.console_tail()}")
    failures = [f"{name}: {text}" for name, text in cases if text is not None]
    assert not failures, "\n\n".join(failures)
