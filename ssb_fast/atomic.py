"""Atomic file writes: write a hidden temporary file beside the target, fsync, then os.replace.

A reader never sees half a file, a crash never leaves one, and a failed write keeps the previous
version of the file whole. `write_together` extends this to a set of files that belong together (a
model and its training state): a crash leaves either every old version, or the new versions of some and,
staged beside the others, their complete new versions (`staged_versions`), from which a reader can finish
the commit.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
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


# Tests that kill a process in the middle of a save set this to a number of seconds to sleep before each
# os.replace, which widens the moment between "staged" and "in place" enough to aim a SIGKILL at it.
REPLACE_DELAY_ENV = "SSB_FAST_TEST_REPLACE_DELAY"


def commit_file(tmp: Path, final: Path) -> None:
    """os.replace(tmp, final): the moment a staged file becomes the file."""
    delay = os.environ.get(REPLACE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    os.replace(tmp, final)


def write_atomic(final: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write `final` through `write(fh)` atomically; returns `final` as a Path."""
    final = Path(final)
    tmp = stage_file(final, write)
    try:
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_together(files: Sequence[tuple[str | os.PathLike, Callable[[BinaryIO], None]]]) -> list[Path]:
    """Write several files that must agree: stage them all (each written and fsync'd), then replace in order.

    A failure or crash while staging keeps every previous file and removes the staged ones. Once the first
    file is replaced, the others stay staged, complete, until they are replaced too, even if an exception
    stops the commit half-way; so after a crash between two replaces a reader finds the newer versions
    among `staged_versions` and can finish the commit instead of holding a mixed set.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for final, write in files:
            staged.append((stage_file(final, write), Path(final)))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        commit_file(tmp, final)
    return [final for _, final in staged]


def staged_versions(final: str | os.PathLike) -> list[Path]:
    """Staged files of `final` left beside it by a write that did not finish (a crash), newest first."""
    final = Path(final)
    found = []
    for path in final.parent.glob(f".{glob.escape(final.name)}-*.tmp"):
        try:
            found.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:  # committed or removed meanwhile
            continue
    return [path for _, path in sorted(found, reverse=True)]


def remove_staged(final: str | os.PathLike) -> list[Path]:
    """Delete what `staged_versions(final)` finds (call only while no other process writes `final`)."""
    found = staged_versions(final)
    for path in found:
        path.unlink(missing_ok=True)
    return found


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(final, lambda fh: fh.write(data))


def write_json_atomic(final: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """JSON (indent 2 unless told otherwise, trailing newline) written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    return write_bytes_atomic(final, (json.dumps(obj, **dumps_kwargs) + "\n").encode())
