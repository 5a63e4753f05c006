"""``shardlog adopt`` and ``shardlog release``: a live mirror's kernel ``disk`` log swapped
for shardlog's ``disk`` log on the same log device, and back, with no resync.

Theory of operation
-------------------
shardlog's ``disk`` log keeps the kernel's own layout on the log device, and a table
reload hands the log device from the old log instance to the new one (the new one reads
it at RESUME, after the old one wrote it at POSTSUSPEND).  So a mirror moves by loading a
table identical but for the log (dmtable.py plans it), then ``suspend`` + ``resume`` —
what LVM does for any change — and its sync count must not drop.

Everything that could make the reload hurt is checked first, and a device that fails a
check is left exactly as it was:

- a ``userspace`` log with no server serving would stall the mirror's I/O (the kernel
  retries for ever): the server must answer on its control socket, be serving, and its
  front be in connector group 7 here (checked once, before the first load);
- not a mirror, a ``core`` log (its bits are in kernel memory only: any reload resyncs),
  a suspended device or one with a table already loaded by someone else (an LVM command
  under way), a log device that cannot be opened for direct I/O.

The dmsetup calls are dmdevices.py's.  Exit codes: 0 every device is (or would be) where
it was asked to go, or was skipped by ``--all``; 1 a device was refused or failed; 2 usage.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardlog.server import control
from shardlog.server.nlsocket import group7_listeners
from shardlog.storage.devices import resolve_device
from shardlog.storage.errors import StoreError
from shardlog.tools import dmdevices, dmtable
from shardlog.tools.dmdevices import DmError
from shardlog.tools.dmtable import MirrorTable, Refusal, TableError
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_USAGE

# What each device came to.  Only "refused" and "failed" make the exit code 1.
ADOPTED, RELEASED, ALREADY, WOULD, SKIPPED, REFUSED, FAILED = (
    "adopted", "released", "already", "would", "skipped", "refused", "failed")


@dataclass
class Outcome:
    device: str  # as the operator named it
    result: str
    name: str | None = None  # dm name
    label: str | None = None  # VG/LV for LVM's, else the dm name
    reason: str | None = None
    table: str | None = None
    new_table: str | None = None
    in_sync: list[int] = field(default_factory=list)  # before, after
    regions: int | None = None

    @property
    def ok(self) -> bool:
        return self.result not in (REFUSED, FAILED)


class ServerCheck:
    """Whether a shardlog server answers the kernel here; asked once, when a device is
    about to be loaded with a userspace log."""

    def __init__(self, socket_path: Path, wait: float):
        self.socket_path, self.wait = socket_path, wait
        self._asked = False
        self._problem: str | None = None

    def problem(self) -> str | None:
        """Why no server would answer the kernel here, or None."""
        if not self._asked:
            deadline = time.monotonic() + self.wait
            while (problem := self._ask()) is not None and time.monotonic() < deadline:
                time.sleep(0.5)
            self._asked, self._problem = True, problem
        return self._problem

    def _ask(self) -> str | None:
        why = ("a userspace log with no server stalls the mirror's I/O (and a suspend): "
               "start `shardlog serve` first")
        try:
            answer = control.ask(self.socket_path, {"cmd": "status"}, timeout=10.0)
        except control.ControlError as exc:
            return f"no shardlog server is serving ({exc}); {why}"
        server = answer.get("server", {})
        if not server.get("serving") or server.get("stopping"):
            return f"the shardlog server (pid {server.get('pid')}) is not serving " \
                   f"(starting or stopping); {why}"
        try:
            listeners = group7_listeners()
        except OSError as exc:
            return f"cannot read /proc/net/netlink ({exc.strerror}) to see the server"
        ports = server.get("ports") or [server.get("pid")]  # an older server: its pid
        if not set(ports) <= set(listeners):
            return f"the shardlog server (pid {server.get('pid')}) is not in connector " \
                   f"group 7 of this network namespace; {why}"
        return None


def check_log_device(device: str) -> str | None:
    """Why shardlog could not use ``device`` (``major:minor`` or a path) as a disk log's
    device, or None: it is resolved as the server resolves it and read with O_DIRECT."""
    with tempfile.TemporaryDirectory(prefix="shardlog-adopt-") as nodes:
        try:
            path, _ = resolve_device(device, Path(nodes))
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except StoreError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot open the log device {device}: {exc.strerror}"
        buffer = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buffer], 0)
        except OSError as exc:
            return f"cannot read the log device {device}: {exc.strerror}"
        finally:
            buffer.close()
            os.close(fd)
    return None


class Mover:
    """Moves devices one way (``adopt``: onto shardlog; ``release``: back)."""

    def __init__(self, args: argparse.Namespace, adopting: bool):
        self.adopting = adopting
        self.dry_run = args.dry_run
        self.integrated_flush = getattr(args, "integrated_flush", False)
        self.server = ServerCheck(args.socket, getattr(args, "wait", 0.0))

    def plan(self, table: MirrorTable, uuid: str) -> MirrorTable | None:
        if self.adopting:
            return dmtable.adopted_table(table, uuid, integrated_flush=self.integrated_flush)
        return dmtable.released_table(table)

    def move(self, spec: str, from_all: bool = False) -> Outcome:
        outcome = Outcome(device=spec, result=FAILED)
        try:
            name = outcome.name = dmdevices.resolve(spec)
            info = dmdevices.info(name)
            outcome.label = dmtable.device_label(name, info.uuid)
            live = dmdevices.table(name)
            outcome.table = live.strip()
            try:
                table = dmtable.parse_mirror_table(live)
            except TableError as exc:
                return self._refuse(outcome, f"not a mirror shardlog can take: {exc}",
                                    skip=from_all)
            try:
                new = self.plan(table, info.uuid)
            except Refusal as exc:
                return self._refuse(outcome, str(exc), skip=from_all)
            if new is None:
                outcome.result = ALREADY
                outcome.reason = ("on shardlog already" if self.adopting else
                                  f"on the kernel's {table.log.kind} log already")
                return outcome
            outcome.new_table = new.line()
            if info.suspended:
                return self._refuse(outcome, "it is suspended: resume it first (a reload "
                                             "now would resume it behind its owner's back)")
            if info.inactive_table:
                return self._refuse(outcome, "it has an inactive table loaded (another "
                                             "tool is changing it): try again when done")
            assert table.log.device is not None
            if self.adopting:
                problem = check_log_device(table.log.device)
                if problem is not None:
                    return self._refuse(outcome, problem)
            # Both ways: the userspace log of the live or the new table needs a server
            # (the old one's POSTSUSPEND, the new one's CTR and RESUME), or the suspend
            # or the mirror's I/O waits for one for ever.  Asked before the status: a
            # live userspace log's status is the server's answer too.
            problem = self.server.problem()
            if problem is not None and (not self.dry_run or table.log.on_shardlog):
                return self._refuse(outcome, problem)
            before = dmtable.parse_mirror_status(dmdevices.status(name))
            outcome.regions = before.regions
            outcome.in_sync = [before.in_sync]
            if self.dry_run:
                outcome.result = WOULD
                outcome.reason = problem
                return outcome
            dmdevices.swap_table(name, outcome.new_table)
            after = dmtable.parse_mirror_status(dmdevices.status(name))
            outcome.in_sync.append(after.in_sync)
            if after.in_sync < before.in_sync:
                outcome.reason = f"the sync count dropped from {before.in_sync} to " \
                                 f"{after.in_sync} of {after.regions}: the mirror resyncs"
                return outcome
            now = dmtable.parse_mirror_table(dmdevices.table(name))
            if now.log.on_shardlog != self.adopting:
                outcome.reason = f"the kernel shows another log: {now.line()}"
                return outcome
            outcome.result = ADOPTED if self.adopting else RELEASED
        except (DmError, TableError) as exc:
            outcome.reason = str(exc)
        return outcome

    @staticmethod
    def _refuse(outcome: Outcome, reason: str, skip: bool = False) -> Outcome:
        outcome.result = SKIPPED if skip else REFUSED
        outcome.reason = reason
        return outcome

    def candidates(self) -> list[str]:
        """``--all``: every mirror on the host (those the move does not apply to are
        reported as skipped or already there)."""
        return dmdevices.mirror_names()


# -- the command -----------------------------------------------------------------------------

ADOPT_HELP = """\
Move live dm-mirror devices from the kernel's disk log to shardlog's, on the same log
device, with no resync: a table identical but for the log (userspace, the device's dm
uuid as the log's uuid) is loaded, then the device is suspended and resumed, and its sync
count checked. DEVICE is a dm name, /dev/mapper/NAME, /dev/VG/LV or VG/LV; --all takes
every mirror on the host whose log is the kernel's disk log. A device already on
shardlog is reported and left alone.

Refused, and left unchanged: no shardlog server serving, not a mirror, a core-log mirror
(any reload would resync it: give it a disk log), a suspended device, an unusable log
device. Any LVM command that reloads the mirror (lvchange --refresh, lvextend,
lvconvert, activation) puts the kernel's disk log back, with no resync: adopt it again.

exit codes: 0 ok, 1 a device was refused or failed, 2 usage
"""

RELEASE_HELP = """\
Give devices adopted by shardlog back the kernel's own disk log on the same log device,
with no resync (the reverse of adopt). --all: every mirror whose log is shardlog's disk
log. Refused, and left unchanged: no shardlog server serving (the userspace log must
write the log device at the suspend), a mirror on shardlog's core log (the kernel's log
would resync it), a suspended device.

exit codes: 0 ok, 1 a device was refused or failed, 2 usage
"""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for verb, help_text, summary in (
            ("adopt", ADOPT_HELP, "move mirrors from the kernel's disk log to shardlog"),
            ("release", RELEASE_HELP, "give adopted mirrors the kernel's disk log back")):
        parser = commands.add_parser(verb, help=summary, description=help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("devices", nargs="*", metavar="DEVICE")
        parser.add_argument("--all", action="store_true",
                            help="every mirror on the host that can move")
        parser.add_argument("--dry-run", action="store_true",
                            help="check and print the tables it would load; change nothing")
        parser.add_argument("--json", action="store_true", help="one JSON object per device")
        if verb == "adopt":
            parser.add_argument("--integrated-flush", action="store_true",
                                help="the userspace log's integrated_flush (marks carried "
                                     "in FLUSH: fewer round trips per write)")
        parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                            help="wait this long for the server to serve (boot)")
        parser.add_argument("--socket", type=Path, default=control.DEFAULT_PATH,
                            help=f"the server's control socket (default "
                                 f"{control.DEFAULT_PATH})")
        parser.set_defaults(run=lambda args, verb=verb: run(args, verb))


def run(args: argparse.Namespace, verb: str) -> int:
    if bool(args.devices) == bool(args.all):
        print(f"shardlog {verb}: name the devices or give --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    mover = Mover(args, adopting=verb == "adopt")
    if args.all:
        try:
            specs = mover.candidates()
        except DmError as exc:
            print(f"shardlog {verb}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    else:
        specs = list(dict.fromkeys(args.devices))
    outcomes = []
    for spec in specs:
        outcome = mover.move(spec, from_all=args.all)
        outcomes.append(outcome)
        if args.json:
            print(json.dumps(outcome.__dict__), flush=True)
        else:
            _print_text(verb, outcome, args.dry_run)
    if args.all and not specs and not args.json:
        print(f"shardlog {verb}: no mirror on this host")
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_ERROR


def _print_text(verb: str, outcome: Outcome, dry_run: bool) -> None:
    who = outcome.label or outcome.device
    if outcome.name and outcome.name != who:
        who = f"{who} ({outcome.name})"
    sync = f", {outcome.in_sync[-1]}/{outcome.regions} in sync" if outcome.in_sync else ""
    if outcome.result in (REFUSED, FAILED):
        print(f"shardlog {verb}: {who}: {outcome.result}: {outcome.reason}", file=sys.stderr)
        return
    if outcome.result == WOULD:
        print(f"{who}: would {verb}{sync}")
        print(f"  live:  {outcome.table}")
        print(f"  load:  {outcome.new_table}")
        if outcome.reason:
            print(f"  but now: {outcome.reason}")
        return
    if outcome.result == ALREADY:
        print(f"{who}: {outcome.reason}")
    elif outcome.result == SKIPPED:
        print(f"{who}: skipped: {outcome.reason}")
    else:
        print(f"{who}: {outcome.result}{sync}")
