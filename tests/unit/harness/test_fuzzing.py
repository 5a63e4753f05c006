"""A refused request changes nothing, and nothing is answered from a swallowed exception.

Random, mutated and well-formed requests against live logs, in process through the codec
and LogTable in worker-sized batches (group commit included), checked around every refused
request by shardlog.harness.fuzzing's contract: no log's state or bits, no state file and no CTR
record changed; no traceback logged; no -EIO from healthy storage.  Bounded: a few
seconds.  The same at scale, and against a live server, is scripts/fuzz.py (a smoke run
in tests/process/test_fuzzing.py; its numbers are in the README).
"""

from __future__ import annotations

import errno
import logging
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog.harness.fuzzing import UUIDS, Inputs, TableFuzzer, Tracebacks, format_tally
from shardlog.log import dirtylog
from shardlog.log.dirtylog import LogError
from shardlog.wire import protocol
from shardlog.wire.protocol import RequestType as T

FUZZ_SETTINGS = settings(max_examples=12, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


def fuzzer_in(directory: Path, rng: random.Random, **kw) -> TableFuzzer:
    state = directory / "state"
    state.mkdir()
    device = directory / "logdev"
    device.write_bytes(bytes(1 << 20))
    return TableFuzzer(state, Inputs(rng, device, **kw))


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), random_share=st.sampled_from((0.0, 0.1, 0.3)),
       mutated_share=st.sampled_from((0.0, 0.35, 0.7)), batch=st.integers(1, 16))
def test_refused_requests_change_nothing_on_live_logs(tmp_path_factory, seed, random_share,
                                                       mutated_share, batch):
    fuzzer = fuzzer_in(tmp_path_factory.mktemp("fuzz"), random.Random(seed),
                       random_share=random_share, mutated_share=mutated_share)
    try:
        tally = fuzzer.run(200, batch=batch)
    finally:
        fuzzer.close()
    assert tally.defect_count == 0, format_tally(f"seed {seed}", tally)
    assert tally.answers["ok"] and tally.inputs == 200


# Requests on two live logs that a mutation starts from: every request type.
def _base_datagrams() -> list[bytes]:
    datagrams, seq = [], 5000
    for request_type in T:
        seq += 1
        data = {T.CTR: b"8192 core 8 nosync", T.SET_REGION_SYNC: protocol.pack_set_region_sync(
            3, False)}.get(request_type, b"")
        if request_type in protocol.ONE_REGION_TYPES:
            data = protocol.pack_u64(5)
        elif request_type in protocol.REGION_LIST_TYPES:
            data = protocol.pack_regions([5, 1000])
        datagrams.append(protocol.encode_request(request_type, seq=seq, uuid=UUIDS[seq % 2],
                                                 luid=1, data=data))
    return datagrams


BASES = _base_datagrams()
mutated_datagrams = st.builds(
    lambda base, edits, cut: _apply(base, edits, cut),
    st.sampled_from(BASES),
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 400)),
)


def _apply(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    datagram = bytearray(base)
    for at, value in edits:
        if at < len(datagram):
            datagram[at] = value
    return bytes(datagram[:cut] if cut is not None else datagram)


@FUZZ_SETTINGS
@given(batches=st.lists(st.lists(st.one_of(mutated_datagrams, st.sampled_from(BASES),
                                           st.binary(max_size=300)), min_size=1, max_size=8),
                        max_size=6))
def test_mutated_requests_are_refused_without_a_trace(tmp_path_factory, batches):
    """Hypothesis's own datagrams (it shrinks a failure to the smallest batch)."""
    fuzzer = fuzzer_in(tmp_path_factory.mktemp("mutated"), random.Random(0))
    tracebacks = Tracebacks()
    logging.getLogger("shardlog").addHandler(tracebacks)
    try:
        for uuid in UUIDS[:2]:  # two live logs, one marked and flushed
            fuzzer.batch([protocol.encode_request(T.CTR, seq=1, uuid=uuid, luid=1,
                                                  data=b"8192 core 8 nosync"),
                          protocol.encode_request(T.RESUME, seq=2, uuid=uuid, luid=1),
                          protocol.encode_request(T.FLUSH, seq=3, uuid=uuid, luid=1,
                                                  data=protocol.pack_regions([7]))],
                         tracebacks)
        for batch in batches:
            fuzzer.batch(batch, tracebacks)
    finally:
        logging.getLogger("shardlog").removeHandler(tracebacks)
        fuzzer.close()
    assert fuzzer.tally.defect_count == 0, format_tally("mutated", fuzzer.tally)


def test_the_contract_catches_a_refusal_that_changed_a_bit(tmp_path, monkeypatch):
    """The oracle itself: a planted defect (IS_CLEAN marks its region, then refuses)."""
    def is_clean_that_marks(self, request):
        self.region_map.mark(request.regions[0])
        raise LogError(errno.EINVAL, "planted")

    monkeypatch.setitem(dirtylog.HANDLERS[dirtylog.LogState.RESUMED], T.IS_CLEAN,
                        is_clean_that_marks)
    fuzzer = fuzzer_in(tmp_path, random.Random(3))
    try:
        tally = fuzzer.run(800)
    finally:
        fuzzer.close()
    assert any("refused IS_CLEAN (-EINVAL) changed" in d.what for d in tally.defects)


def test_the_contract_catches_an_answer_from_a_swallowed_exception(tmp_path, monkeypatch):
    def status_that_breaks(self, request):
        raise KeyError("planted")

    monkeypatch.setitem(dirtylog.HANDLERS[dirtylog.LogState.RESUMED], T.STATUS_INFO,
                        status_that_breaks)
    fuzzer = fuzzer_in(tmp_path, random.Random(4))
    try:
        tally = fuzzer.run(800)
    finally:
        fuzzer.close()
    assert any("swallowed exception" in d.what and "KeyError" in d.what
               for d in tally.defects)
    assert any("-EIO" in d.what for d in tally.defects)


# -- the three defects the outside fuzzing found, against a live server ---------------------------
