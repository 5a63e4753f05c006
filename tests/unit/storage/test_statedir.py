"""The state directory's one way of replacing a file: old content or new, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shardlog.storage import statedir
from shardlog.storage.statedir import ReplacementFile, write_atomically


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_a_written_file_holds_the_new_content_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "record.ctr"
    write_atomically(path, b"old\n")
    write_atomically(path, b"new content\n")
    assert path.read_bytes() == b"new content\n"
    assert names(tmp_path) == ["record.ctr"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_pid_file_mode_is_kept_as_asked_less_the_umask(tmp_path):
    path = tmp_path / "shardlog.pid"
    old_umask = os.umask(0o022)
    try:
        write_atomically(path, b"123\n", mode=0o666)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failure_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch, failing):
    path = tmp_path / "record.ctr"
    write_atomically(path, b"old content\n")

    def fail(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statedir.os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b"new content, longer than the old\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content\n"
    assert names(tmp_path) == ["record.ctr"]  # the temporary is gone too


def test_a_crash_before_the_rename_leaves_the_old_file_and_the_next_write_works(tmp_path):
    path = tmp_path / "record.ctr"
    write_atomically(path, b"old content\n")
    pid = os.fork()
    if pid == 0:  # the child dies the moment it would rename: a crash at the worst time
        try:
            os.replace = lambda *args: os._exit(17)
            write_atomically(path, b"new content\n" * 1000)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17
    assert path.read_bytes() == b"old content\n"
    write_atomically(path, b"after the crash\n")  # a crash's leftover is overwritten
    assert path.read_bytes() == b"after the crash\n"
    assert names(tmp_path) == ["record.ctr"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(statedir.os, "write", lambda fd, data: real_write(fd, data[:3]))
    path = tmp_path / "record.ctr"
    write_atomically(path, b"0123456789abcdef")
    monkeypatch.undo()
    assert path.read_bytes() == b"0123456789abcdef"


def test_an_abandoned_replacement_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.map"
    path.write_bytes(b"old")
    replacement = ReplacementFile(path, temporary_suffix=".new")
    os.write(replacement.fd, b"half")
    assert names(tmp_path) == ["x.map", "x.map.new"]
    replacement.abandon()
    assert path.read_bytes() == b"old" and names(tmp_path) == ["x.map"]


def test_a_failing_block_abandons_the_replacement(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), ReplacementFile(path) as replacement:
        os.write(replacement.fd, b"new")
        raise RuntimeError("the content could not be made")
    assert path.read_bytes() == b"old" and names(tmp_path) == ["x"]
