"""``python -m shardlog.harness.kernelvm COMMAND`` (``scripts/kernel-vm`` runs it):

- ``build``: build (or find cached) the guest's kernel and initramfs;
- ``run SCRIPT``: boot the guest and run a shell command line in it (as root, in the
  project directory, the virtual environment on PATH), the console on stdout;
- ``test [PYTEST ARGS]``: boot once and run the kernel scenarios (tests/kernel/guest)
  in the guest, as the default test suite does.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from shardlog.harness.kernelvm import image, runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardlog.harness.kernelvm",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the guest image (cached)")
    run = commands.add_parser("run", help="run a shell command line in the guest")
    run.add_argument("script")
    run.add_argument("--timeout", type=float, default=runner.DEFAULT_TIMEOUT)
    test = commands.add_parser("test", help="run the kernel scenarios in one boot")
    test.add_argument("--timeout", type=float, default=runner.DEFAULT_TIMEOUT)
    test.add_argument("--captures", type=Path, metavar="DIR",
                      help="record the kernel's requests in some scenarios into DIR "
                           "(harness-*.jsonl: requests only, no replies)")
    # Whatever `test` does not know goes to pytest in the guest.
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args and args.command != "test":
        parser.error(f"unrecognized arguments: {' '.join(pytest_args)}")
    try:
        if args.command == "build":
            guest = image.build()
            print(f"kernel {guest.kernel}\ninitrd {guest.initrd}")
            return 0
        script = args.script if args.command == "run" else \
            guest_pytest_command(pytest_args)
        captures = getattr(args, "captures", None)
        env = {"SHARDLOG_CAPTURE_DIR": f"{image.GUEST_SHARE}/captures"} if captures else {}
        with tempfile.TemporaryDirectory(prefix="shardlog-vm-") as share:
            result = runner.boot(script, Path(share), timeout=args.timeout,
                                 echo=sys.stdout, env=env)
            if captures:
                captures.mkdir(parents=True, exist_ok=True)
                for path in (Path(share) / "captures").glob("*.jsonl"):
                    shutil.copy(path, captures / path.name)
                    print(f"kernel-vm: recorded {captures / path.name}", file=sys.stderr)
            print(f"kernel-vm: {result.describe()}", file=sys.stderr)
            return 1 if result.exit_code is None else result.exit_code
    except image.ImageError as exc:
        print(f"kernel-vm: {exc}", file=sys.stderr)
        return 2


def guest_pytest_command(extra: list[str], junit: str | None = None) -> str:
    """The guest's command line that runs the kernel scenarios with pytest (no cache or
    bytecode written: the project is read-only there)."""
    words = ["python", "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
             "-o", "addopts=",
             "-ra", "tests/kernel/guest"]
    if junit:
        words.append(f"--junitxml={junit}")
    return shlex.join(words + list(extra))


if __name__ == "__main__":
    sys.exit(main())
