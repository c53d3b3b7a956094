"""An exclusive lock on a folder, so that two processes never write the same run.

`RunLock(folder).acquire()` takes `folder/.train.lock` with `flock` and keeps the file open until
`release()` (or the end of the process). The kernel drops the lock when its holder exits, however it
exits (SIGKILL included), so a killed run leaves no stale lock: the file stays, the lock does not. The
holder writes its pid and host into the file, for the message the next process gets.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".train.lock"


class FolderBusyError(FileExistsError):
    """Another live process holds the folder's lock."""


class RunLock:
    def __init__(self, folder: str | os.PathLike, what: str = "ssb-fast train"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock at once, or raise FolderBusyError naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            warnings.warn(f"{self.path}: no file locks on this system; nothing stops two runs writing "
                          f"{self.folder} at once", stacklevel=2)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)  # a file system without locks: say so, and go on unguarded
                    warnings.warn(f"{self.path}: cannot lock ({err}); nothing stops two runs writing "
                                  f"{self.folder} at once", stacklevel=2)
                    return self
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderBusyError(f"{self.folder} is in use by another {self.what} ({holder}); wait for it "
                                      f"to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
