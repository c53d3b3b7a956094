"""Atomic writes: all or nothing, the previous file kept on failure, ordinary file permissions."""

from __future__ import annotations

import json
import os
import stat

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
