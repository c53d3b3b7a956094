"""Atomic file writes: write a hidden temporary file beside the target, fsync, then os.replace.

A reader never sees half a file, a crash never leaves one, and a failed write keeps the previous
version of the file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def stage_file(final: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write(fh)` into a hidden temporary file in `final`'s folder; return its path.

    The caller moves it into place with `os.replace` (several staged files can be committed
    together) and removes it on failure. The folder is created if needed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}-", suffix=".tmp")
    tmp = Path(name)
    try:
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(final: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write `final` through `write(fh)` atomically; returns `final` as a Path."""
    final = Path(final)
    tmp = stage_file(final, write)
    try:
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(final, lambda fh: fh.write(data))


def write_json_atomic(final: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """JSON (indent 2 unless told otherwise, trailing newline) written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    return write_bytes_atomic(final, (json.dumps(obj, **dumps_kwargs) + "\n").encode())
