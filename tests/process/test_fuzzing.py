"""The fuzzing contract over the wire: a live `shardlog serve` in a private network
namespace (root), and scripts/fuzz.py's smoke run, in process and live."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

from ..conftest import PROJECT, requires_root
from ..harness import RawPeer, ServerProcess

SCRIPTS = PROJECT / "scripts"


@pytest.fixture
def live(tmp_path, private_netns):
    server = ServerProcess(tmp_path / "state").start()
    peer = RawPeer()
    yield server, peer
    peer.close()
    server.close()


def test_a_flush_and_a_dtr_sent_back_to_back_are_both_answered_0(live):
    server, peer = live
    for attempt in range(5):
        uuid = f"back-to-back-{attempt}"
        peer.open_log(uuid)
        flush = peer.request(T.FLUSH, protocol.pack_regions([5]), uuid=uuid)
        dtr = peer.request(T.DTR, uuid=uuid)
        replies = {reply.seq: reply.error for reply in (peer.receive(), peer.receive())}
        assert replies == {flush: 0, dtr: 0}
    assert "Traceback" not in server.log


def test_a_refused_ctr_and_a_long_uuid_over_the_wire(live):
    server, peer = live
    peer.open_log("log-a")
    peer.ok(T.FLUSH, protocol.pack_regions([5]), uuid="log-a")
    assert peer.ask(T.CTR, b"8192 core 7 nosync", uuid="log-a").error == -errno.EINVAL
    assert peer.is_clean(5, uuid="log-a") == 0 and peer.in_sync(5, uuid="log-a") == 1
    long_uuid = "%" * 128
    assert peer.ask(T.DTR, uuid=long_uuid, luid=9).error == -errno.ESRCH
    peer.open_log(long_uuid, luid=9)
    peer.ok(T.FLUSH, protocol.pack_regions([3]), uuid=long_uuid, luid=9)
    assert peer.is_clean(3, uuid=long_uuid, luid=9) == 0
    peer.ok(T.DTR, uuid=long_uuid, luid=9)
    assert "Traceback" not in server.log


def test_the_fuzz_script_runs_in_process_and_live(tmp_path):
    requires_root("the live part of scripts/fuzz.py (a private network namespace)")
    result = subprocess.run(
        [sys.executable, SCRIPTS / "fuzz.py", "--inputs", "2000", "--live", "500",
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "codec + log table, in process: 2,000 inputs" in out
    assert "live `shardlog serve --workers 2`: 500 inputs" in out
    assert "answers by errno: ok " in out and out.rstrip().endswith("0 defects")
