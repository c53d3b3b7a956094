"""Atomic writes: all or nothing, the previous file kept on failure, ordinary file permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ssb_fast import atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic.write_json_atomic(target, {"a": 1})
    atomic.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["x.json"]


def test_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic.write_bytes_atomic(target, b"old")

    def fail(fh):
        fh.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


def test_mode_follows_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_bytes_atomic(tmp_path / "x.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_together_keeps_every_old_file_when_staging_fails(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    atomic.write_together([(a, lambda fh: fh.write(b"old a")), (b, lambda fh: fh.write(b"old b"))])

    def fail(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_together([(a, lambda fh: fh.write(b"new a")), (b, fail)])
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


def test_write_together_cut_after_the_first_rename_leaves_the_rest_staged_whole(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    atomic.write_together([(a, lambda fh: fh.write(b"old a")), (b, lambda fh: fh.write(b"old b"))])
    real, calls = atomic.commit_file, []

    def commit_once(tmp, final):
        calls.append(final)
        if len(calls) > 1:
            raise KeyboardInterrupt  # e.g. a second Ctrl-C between the two renames
        real(tmp, final)

    monkeypatch.setattr(atomic, "commit_file", commit_once)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_together([(a, lambda fh: fh.write(b"new a")), (b, lambda fh: fh.write(b"new b"))])
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"old b"
    (staged,) = atomic.staged_versions(b)
    assert staged.read_bytes() == b"new b" and atomic.staged_versions(a) == []
    assert atomic.remove_staged(b) == [staged] and not staged.exists()


def test_staged_versions_match_only_their_own_file(tmp_path):
    odd = tmp_path / "run[1].bin"  # glob characters in the name are taken literally
    (tmp_path / ".run[1].bin-x1.tmp").write_bytes(b"1")
    (tmp_path / ".run1.bin-x2.tmp").write_bytes(b"2")
    (tmp_path / ".other.bin-x3.tmp").write_bytes(b"3")
    assert [p.name for p in atomic.staged_versions(odd)] == [".run[1].bin-x1.tmp"]


def test_test_hook_sleeps_before_each_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setenv(atomic.REPLACE_DELAY_ENV, "0.25")
    monkeypatch.setattr(atomic.time, "sleep", lambda s: events.append(("sleep", s)))
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda s, d: (events.append(("replace", Path(d).name)),
                                                            real_replace(s, d)))
    atomic.write_together([(tmp_path / "a", lambda fh: fh.write(b"a")), (tmp_path / "b", lambda fh: fh.write(b"b"))])
    assert events == [("sleep", 0.25), ("replace", "a"), ("sleep", 0.25), ("replace", "b")]
    monkeypatch.delenv(atomic.REPLACE_DELAY_ENV)
    events.clear()
    atomic.write_bytes_atomic(tmp_path / "c", b"c")
    assert events == [("replace", "c")]
