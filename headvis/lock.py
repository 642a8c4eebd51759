"""One writer per data tree: an advisory lock file that a crashed process never leaves stuck.

    with TreeLock(Path("data"), "server", url="http://127.0.0.1:8765"):
        ...  # this process alone writes data/

The lock is `fcntl.flock` on `FOLDER/.headvis.lock`. The kernel drops it
when the holding process exits, however it exits (kill -9 included), so a
crash never needs a manual clean-up; the file itself stays behind, harmless.
While it is held the file names the holder (role, pid, url, since) for the
message another process prints. The server holds it on `--data` for as long
as it serves; the scan holds it on `--out` while it publishes, and on its
own staging folder for as long as it runs (so a clean-up can tell a live
scan's staging folder from a killed one's).

flock is per open file and local to one machine: a tree on a network file
system shared by two machines is not protected (docs/server.md says so).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from pathlib import Path

from headvis.errors import HeadvisError

__all__ = ["LOCK_NAME", "TreeLock", "TreeLocked", "holder_text"]

LOCK_NAME = ".headvis.lock"


class TreeLocked(HeadvisError):
    """The tree is locked by another live process; `holder` is what it wrote (may be {})."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def holder_text(holder: dict) -> str:
    """'a headvis server (pid 1234, http://127.0.0.1:8765, since 2026-12-01T12:00:00Z)'."""
    details = [f"pid {holder['pid']}"] if "pid" in holder else []
    if holder.get("url"):
        details.append(str(holder["url"]))
    if holder.get("since"):
        details.append(f"since {holder['since']}")
    role = holder.get("role", "process")
    return f"a headvis {role}" + (f" ({', '.join(details)})" if details else "")


class TreeLock:
    """The exclusive lock of one folder; `acquire()` raises TreeLocked when another process holds it."""

    def __init__(self, folder: Path, role: str, *, url: str | None = None):
        self.folder = Path(folder)
        self.role = role
        self.url = url
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False) -> "TreeLock":
        """Take the lock (blocking when `wait`), then write who holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise TreeLocked(f"{self.folder} is in use by {holder_text(holder)}", holder) from None
            except BaseException:
                os.close(fd)
                raise
            # the folder may have been swapped for another (a scan publishing) between open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"role": self.role, "pid": os.getpid(), "since": since, **({"url": self.url} if self.url else {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(body).encode("utf-8"), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "TreeLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def holder(folder: Path) -> dict | None:
        """Who holds `folder`'s lock now (its note, or {}), or None when nobody does; takes nothing."""
        path = Path(folder) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        finally:
            os.close(fd)
        return None


def _read_holder(fd: int) -> dict:
    try:
        body = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}
