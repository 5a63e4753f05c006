"""Request sequences recorded from the real kernel by the VM harness
(``scripts/kernel-vm test --captures DIR``), kept as fixtures: every datagram decodes (the
codec and the pyroute2 message class agree), and the sequences show what shardlog's
design relies on."""

from __future__ import annotations

import json

import pytest

from shardlog.wire import nlmessages, protocol
from shardlog.wire.protocol import Request, RequestType

from ...conftest import FIXTURES

HARNESS_CAPTURES = ("reload", "reconnect")


def load_capture(scenario: str) -> list[dict]:
    with open(FIXTURES / f"harness-{scenario}.jsonl") as f:
        return [json.loads(line) for line in f]


def requests(scenario: str) -> list[Request]:
    return [protocol.decode_datagram(bytes.fromhex(record["raw_hex"]))
            for record in load_capture(scenario)]


@pytest.mark.parametrize("scenario", HARNESS_CAPTURES)
def test_every_recorded_request_decodes_alike_in_both_decoders(scenario):
    records = load_capture(scenario)
    assert 0 < len(records) <= 400  # small fixtures
    for record in records:
        raw = bytes.fromhex(record["raw_hex"])
        request = protocol.decode_datagram(raw)
        assert record["request"]["type"] == request.name
        decoded = nlmessages.decode(raw)
        assert decoded["request"]["seq"] == request.seq
        assert decoded["request"]["luid"] == request.luid


def test_a_reload_constructs_the_new_instance_before_the_old_one_goes():
    sequence = [(r.request_type, r.luid) for r in requests("reload")]
    ctrs = [luid for kind, luid in sequence if kind is RequestType.CTR]
    dtrs = [luid for kind, luid in sequence if kind is RequestType.DTR]
    assert len(ctrs) == 1 and len(dtrs) == 1
    new, old = ctrs[0], dtrs[0]
    assert new != old  # same uuid, a new luid
    assert {r.uuid for r in requests("reload")} == {"uuid-reload"}
    first = sequence.index
    # dmsetup load: the new instance's CTR; suspend: the old one's POSTSUSPEND; resume:
    # the new one's RESUME, and only then the old one's DTR.
    assert first((RequestType.CTR, new)) < first((RequestType.POSTSUSPEND, old)) \
        < first((RequestType.RESUME, new)) < first((RequestType.DTR, old))
    ctr = next(r for r in requests("reload") if r.request_type is RequestType.CTR)
    assert not ctr.reconnect and ctr.ctr_string.split()[1] == "disk"


def test_the_kernel_comes_back_to_a_restarted_server_with_ctr_then_resume():
    recorded = requests("reconnect")
    ctr_at = next(i for i, r in enumerate(recorded) if r.request_type is RequestType.CTR)
    ctr = recorded[ctr_at]
    assert ctr.reconnect  # the reconnect CTR counts its NUL
    resume = recorded[ctr_at + 1]
    assert (resume.request_type, resume.luid) == (RequestType.RESUME, ctr.luid)
