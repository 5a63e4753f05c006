"""Take-over's decision, directly: what a new server's fingerprint covers, and which
differences refuse a take-over (take-overs of running servers: tests/process/test_take_over.py)."""

from __future__ import annotations

from pathlib import Path

from shardlog.server import handover


def test_the_fingerprint_covers_routing_and_formats():
    mine = handover.fingerprint()
    assert set(mine) == {"version", "protocol", "routing", "formats"}
    # Another version (an upgrade) is welcome; another routing hash is not.
    upgrade = {**mine, "version": "99.0"}
    assert handover.refusal({"fingerprint": upgrade, "workers": 2, "state_dir": "/x",
                             "test_peer": None}, workers=2, state_dir=Path("/x"),
                            test_peer=None) is None
    assert handover.refusal({"fingerprint": mine, "workers": 2, "state_dir": "/x",
                             "test_peer": None}, workers=2, state_dir=Path("/x"),
                            test_peer=None) is None
    assert "worker count" in handover.refusal(
        {"fingerprint": mine, "workers": 3, "state_dir": "/x", "test_peer": None},
        workers=2, state_dir=Path("/x"), test_peer=None)
