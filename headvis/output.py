"""The scan's `--out`: checked before the work, built in a staging folder beside it, published under its lock.

    target = ScanTarget.open(Path("data"))      # refuses a tree a server is serving
    ... write the new tree into target.staging ...
    target.publish(lambda old: carry_over(old, target.staging))

- A symlinked `--out` stays a symlink: the scan works beside the link's
  target and replaces the target.
- The staging folder (`.{name}.staging-XXXX`) holds its own `TreeLock` for as
  long as the scan runs, so the next scan can tell a killed scan's staging
  folder (no live holder) from a running one's and removes only the former
  (made and locked under a lock of the parent folder, so never seen unlocked).
- `publish` takes `--out`'s lock (waiting, with a message, if a server
  started serving it during the scan), runs `before` on the old tree while no
  one else can write it (the rescan carry-over of what people made), then
  swaps the trees in one step (`headvis.io.publish_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from headvis.errors import HeadvisError
from headvis.io import publish_folder
from headvis.lock import TreeLock, TreeLocked, holder_text

__all__ = ["ScanTarget", "remove_stale_staging"]


@contextlib.contextmanager
def _staging_guard(out: Path):
    """A lock on `out`'s parent folder itself (flock works on a folder's descriptor, so no file is left behind),
    held while a scan makes (and locks) its staging folder or cleans up: a clean-up never sees a staging
    folder that exists but is not locked yet."""
    fd = os.open(out.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_staging(out: Path) -> int:
    """Remove `.{name}.staging-*` and `.{name}.old-*` folders beside `out` that no live process holds.

    Call it under `_staging_guard(out)`."""
    removed = 0
    for path in sorted([*out.parent.glob(f".{out.name}.staging-*"), *out.parent.glob(f".{out.name}.old-*")]):
        if path.is_dir() and not path.is_symlink() and TreeLock.holder(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
    return removed


@dataclass
class ScanTarget:
    """`out` (resolved through a symlink), the staging folder beside it and the staging folder's lock."""

    given: Path  # --out as typed
    out: Path  # the folder replaced (the symlink's target for a symlinked --out)
    staging: Path
    _staging_lock: TreeLock

    @staticmethod
    def resolve_out(given: Path) -> Path:
        """The folder a scan of --out `given` replaces: the symlink's target for a symlinked one."""
        given = Path(given).expanduser()
        return given.resolve() if given.is_symlink() else given

    @classmethod
    def open(cls, given: Path) -> "ScanTarget":
        """Check `given` can be replaced, clean up after killed scans, make a locked staging folder."""
        given = Path(given).expanduser()
        out = cls.resolve_out(given)
        if out.exists() and not out.is_dir():
            raise HeadvisError(f"--out {given} exists and is not a folder")
        if out.is_dir() and any(p.name != ".headvis.lock" for p in out.iterdir()) and not (out / "config.json").exists():
            raise HeadvisError(f"--out {given} is a non-empty folder that is not a headvis data tree; "
                               "refusing to replace it")
        holder = TreeLock.holder(out) if out.is_dir() else None
        if holder is not None:
            raise HeadvisError(f"--out {given} is in use by {holder_text(holder)}; the scan would replace the tree "
                               "under it: stop it first, or scan into another --out")
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise HeadvisError(f"--out {given} is not writable (permissions): the scan could not replace it")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with _staging_guard(out):
                removed = remove_stale_staging(out)
                staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
                lock = TreeLock(staging, "scan").acquire()
        except OSError as e:
            raise HeadvisError(f"cannot write to --out {given}: {e.strerror or e}") from e
        if removed:
            print(f"headvis: removed {removed} staging folder(s) left beside {given} by killed scans", flush=True)
        return cls(given=given, out=out, staging=staging, _staging_lock=lock)

    def publish(self, before: Callable[[Path | None], None] | None = None) -> None:
        """Swap the staging folder in for `out` under `out`'s lock; `before(old tree or None)` runs first."""
        lock = TreeLock(self.out, "scan")
        self.out.mkdir(parents=True, exist_ok=True)  # an empty folder holds the lock of a first scan
        try:
            lock.acquire()
        except TreeLocked as e:
            print(f"headvis: {e}, which started during the scan; waiting for it to stop before replacing "
                  f"--out (Ctrl-C gives up; the same command then resumes from the saved units)", flush=True)
            lock.acquire(wait=True)
        try:
            if before is not None:
                before(self.out if (self.out / "config.json").is_file() else None)
            self._staging_lock.release()
            publish_folder(self.staging, self.out)
        finally:
            lock.release()

    def discard(self) -> None:
        """Remove the staging folder (a failed or interrupted scan)."""
        self._staging_lock.release()
        shutil.rmtree(self.staging, ignore_errors=True)
