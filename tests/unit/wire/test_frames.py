"""Frames between the front and its workers: reassembled whatever the reads' boundaries."""

from __future__ import annotations

import os

import pytest

from shardlog.wire.frames import HEADER, MAX_PAYLOAD, FrameError, FrameReader, Kind, pack

FRAMES = [(Kind.TRACE, 1, b"a" * 200), (Kind.WORKER_REPORT, 2**32 - 1, b""),
          (Kind.READY, 0, b""), (Kind.WORKER_REPORT, 7, bytes(range(256)) * 3)]
STREAM = b"".join(pack(*frame) for frame in FRAMES)


@pytest.mark.parametrize("cut", [1, 3, 9, 10, 100, 777, len(STREAM)])
def test_frames_are_reassembled_across_any_read_boundary(cut):
    reader = FrameReader()
    got = []
    for start in range(0, len(STREAM), cut):
        got += reader.feed(STREAM[start : start + cut])
    assert got == FRAMES and not reader.partial


def test_a_pipe_read_yields_every_whole_frame_and_none_at_eof():
    read, write = os.pipe()
    try:
        os.write(write, STREAM + pack(Kind.WORKER_REPORT, 9, b"xyz")[:-1])  # the last one cut off
        reader = FrameReader()
        assert reader.read(read) == FRAMES
        assert reader.partial  # the writer died mid-frame
        os.close(write)
        assert reader.read(read) is None
    finally:
        os.close(read)


def test_an_impossible_length_is_a_corrupt_stream():
    with pytest.raises(FrameError):
        FrameReader().feed(HEADER.pack(MAX_PAYLOAD + 1, Kind.WORKER_REPORT, 1))
