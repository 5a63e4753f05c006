"""The shardlog command, run as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ...conftest import FIXTURES, PROJECT


def shardlog(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlog.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_replay_of_the_embedded_default_resyncs_128_regions(tmp_path):
    result = shardlog("replay", "--all", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "embedded kernel-6.1-resync.hex.gz: 832 requests" in result.stdout
    lines = result.stdout.splitlines()
    handed_out = [
        line.rsplit("-> ", 1)[1] for line in lines if " GET_RESYNC_WORK " in line and "->" in line
    ]
    assert handed_out == [f"{{1, {r}}}" for r in range(128)] + ["{0, 0}", "{0, 0}"]
    assert any(line.endswith("GET_SYNC_COUNT                      -> 128") for line in lines)
    assert "STATUS_INFO ok x6" in result.stdout
    assert list((tmp_path / "logs").iterdir()) == []  # the DTR removed the instance file


def test_replay_of_a_capture_file_reports_refused_requests(tmp_path):
    result = shardlog("replay", str(FIXTURES / "capture-badcount.jsonl"))
    assert result.returncode == 1
    assert "CTR -22 x1" in result.stdout and "GET_REGION_SIZE -3 x1" in result.stdout
    assert "unexpected argument '2'" in result.stderr


def test_replay_never_opens_the_log_device_a_capture_names(tmp_path):
    # capture-disklog names 7:2, which on this host may be somebody's loop device.
    result = shardlog("replay", "--all", str(FIXTURES / "capture-disklog.jsonl"),
                      "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    scratch = tmp_path / "replay-devices" / "device-0"
    assert f"log device 7:2 of the capture replaced by the scratch file {scratch}" in (
        result.stdout)
    ctr_lines = [line for line in result.stdout.splitlines() if " CTR " in line and "->" in line]
    assert len(ctr_lines) == 1 and f"'131072 disk {scratch} 1024'" in ctr_lines[0]
    assert "STATUS_INFO ok x2" in result.stdout
    assert scratch.read_bytes()[:4] == b"rRiM"  # the disk log was written there instead


def test_replay_shows_malformed_datagrams_and_goes_on(tmp_path):
    capture = tmp_path / "c.hex"
    good = json.loads((FIXTURES / "capture-plain.jsonl").read_text().splitlines()[0])["raw_hex"]
    capture.write_text(f"# a comment\n00ff\n{good}\n")
    result = shardlog("replay", str(capture))
    assert result.returncode == 0
    assert "malformed: truncated datagram" in result.stdout and "CTR ok x1" in result.stdout


def test_decode_prints_each_datagram_as_json():
    lines = (FIXTURES / "capture-iflush.jsonl").read_text().splitlines()[:20]
    result = shardlog("decode", stdin="\n".join(lines))
    assert result.returncode == 0
    decoded = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["request"]["name"] for d in decoded] == [
        json.loads(line)["request"]["name"] for line in lines
    ]


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path):
    result = shardlog("decode", stdin="not hex\n")
    assert result.returncode == 2 and "line 1: neither a hex datagram" in result.stderr
    result = shardlog("decode", stdin='{"no_raw_hex": 1}\n')
    assert result.returncode == 2 and "line 1: neither a hex datagram" in result.stderr
    result = shardlog("replay", str(tmp_path / "missing.hex"))
    assert result.returncode == 2 and "No such file" in result.stderr
    result = shardlog("decode", stdin="00\n")
    assert result.returncode == 2 and "truncated datagram" in result.stdout


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "shardlog"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("shardlog ")


def test_the_systemd_unit_starts_serve_with_options_it_has():
    unit = (PROJECT / "scripts" / "shardlog.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    binary, *args = exec_start.removeprefix("ExecStart=").split()
    assert binary.endswith("/shardlog") and args[0] == "serve"
    from shardlog.cli import _parser

    parsed = _parser().parse_args(args)  # SystemExit on an option serve does not have
    assert parsed.pid_file == Path("/run/shardlog.pid")
    assert f"PIDFile={parsed.pid_file}" in unit
    assert "KillMode=mixed" in unit  # SIGTERM to the front only: it orders the stop


def test_serve_help_lists_its_options():
    result = shardlog("serve", "--help")
    assert result.returncode == 0
    for option in ("--workers", "--state-dir", "--metrics-addr", "--pid-file",
                   "--log-level", "--receive-buffer", "--worker-timeout", "--test-peer"):
        assert option in result.stdout


def test_serve_does_not_load_the_development_harness():
    # In a fresh interpreter: this test process has imported the harness already.
    probe = ("import sys\n"
             "from shardlog import cli\n"
             "args = cli._parser().parse_args(['serve', '--workers', '1'])\n"
             "loaded = sorted(m for m in sys.modules if m.startswith('shardlog.harness'))\n"
             "print(args.run.__name__, loaded)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["_serve", "[]"]


def test_capacity_loads_its_options_when_parsed():
    from shardlog.cli import _parser

    parsed = _parser().parse_args(["capacity", "--mirrors", "3"])
    assert parsed.mirrors == 3 and parsed.run.__module__ == "shardlog.harness.capacity.command"


def test_operator_tools_pointed_at_another_programs_socket_say_so_and_exit_1(tmp_path):
    """--socket naming something that is not shardlog's control socket: a one-line error
    and exit 1 (the server is not usable), not a JSON traceback or a usage exit."""
    path = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def answer_like_another_daemon() -> None:
        for _ in range(3):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    impostor = threading.Thread(target=answer_like_another_daemon, daemon=True)
    impostor.start()
    try:
        for command in (["status"], ["trace", "--count", "1"], ["top", "--once"]):
            result = shardlog(*command, "--socket", str(path))
            assert result.returncode == 1, (command, result.stderr)
            assert f"{path} does not answer as shardlog does: 'HTTP/1.0 400" in \
                result.stderr, (command, result.stderr)
            assert "Traceback" not in result.stderr
    finally:
        listener.close()


@pytest.mark.parametrize("args", [
    ["serve", "--worker-timeout", "0"],  # would kill every worker busy at a hang check
    ["serve", "--worker-timeout", "nan"],
    ["serve", "--workers", "0"],
    ["top", "--interval", "inf"],
    ["top", "--sample", "0"],
    ["top", "--count", "0"],
    ["trace", "--count", "0"],
])
def test_numbers_that_make_no_sense_are_usage_errors(args):
    result = shardlog(*args)
    assert result.returncode == 2, result.stderr
    assert f"argument {args[1]}: must be" in result.stderr
