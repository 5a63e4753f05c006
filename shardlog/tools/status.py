"""``shardlog status``: every log and every worker of a running server.

The client: it asks the server's control socket for ``status`` and prints the answer.
The server's side — fresh reports from every worker, the rates — is
shardlog.server.commands.StatusCommand; the text is shardlog.server.statustext's, which
the server's SIGUSR1 dump prints too.

Exit codes: 0 ok, 1 error (server not running, permission denied, no answer), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from shardlog.server import control
from shardlog.server.statustext import format_text
from shardlog.tools import dmdevices
from shardlog.tools.exitcodes import EXIT_ERROR, EXIT_OK

HELP = """\
Ask the running server (its control socket, root only) for every log — uuid, luid, type,
state, region size and count, regions in sync and dirty, recovery position, worker,
requests/s, health — and every worker: pid, logs, restarts, requests in flight. The
workers report fresh figures for it.

exit codes: 0 ok, 1 error (server not running, permission denied, no answer), 2 usage
"""

__all__ = ["add_parser", "format_text", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    from shardlog.tools.tracing import control_socket_option

    parser = commands.add_parser(
        "status", help="every log and worker of the running server",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    control_socket_option(parser)
    parser.add_argument("--json", action="store_true", help="the whole answer as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        answer = control.ask(args.socket, {"cmd": "status"})
    except control.ControlError as exc:
        print(f"shardlog status: {exc}", file=sys.stderr)
        return EXIT_ERROR
    dmdevices.label_logs(answer["logs"])
    print(json.dumps(answer, indent=2) if args.json else format_text(answer))
    return EXIT_OK
