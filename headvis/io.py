"""Writing the data tree: atomic files, 6-significant-digit floats, no NaN (CONTRACT section 2)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

__all__ = ["DIR_MODE", "FILE_MODE", "JsonList", "atomic_write_bytes", "dumps", "durable_replace", "publish_folder", "read_json", "round_sig",
           "write_json"]

SIG_DIGITS = 6


def round_sig(values: np.ndarray, digits: int = SIG_DIGITS) -> list:
    """Floats rounded to `digits` significant digits, as a (nested) Python list.

    k / 10**n with exact integers k and 10**n is correctly rounded by IEEE
    division, so the result prints with at most `digits` digits.
    """
    return _round_array(values, digits).tolist()


_POW10 = 10.0 ** np.arange(23)  # exact: every power of ten up to 1e22 is a float64


def _round_array(values: np.ndarray, digits: int = SIG_DIGITS) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("refusing to write NaN or Infinity")
    a = np.abs(x)
    nz = a != 0
    exponent = np.floor(np.log10(np.where(nz, a, 1.0))).astype(np.int64)
    shift = (digits - 1) - exponent  # decimal places to keep
    # whole arrays, no fancy indexing (1.5x faster): the scan rounds ~20 M floats, nearly all below 1e5
    if not shift.size or shift.min() >= 0:
        scale = _POW10[np.minimum(shift, 22)]
        out = np.round(x * scale) / scale
    else:
        scale = _POW10[np.clip(shift, 0, 22)]
        scale_big = 10.0 ** np.clip(-shift, 0, None)
        out = np.where(shift >= 0, np.round(x * scale) / scale, np.round(x / scale_big) * scale_big)
    return np.where(nz, out, 0.0)


_PLAIN = {int, str, bool, type(None)}  # JSON-ready as they are


class JsonList(list):
    """A list known to hold only str / int / bool / None: written as it is, never walked (orjson writes list
    subclasses). For the token strings and ids that every head file showing a sequence repeats."""


class _Rounder:
    """Every float of one body, rounded in one `_round_array` call (~40 us each alone; a scan file holds thousands)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.fixups: list[tuple[Any, Any, int, tuple, bool]] = []  # (container, key, start, shape, scalar)
        self.size = 0

    def defer(self, container: Any, key: Any, values: np.ndarray, scalar: bool) -> None:
        a = np.asarray(values, dtype=np.float64)
        container[key] = None
        self.parts.append(a.ravel())
        self.fixups.append((container, key, self.size, a.shape, scalar))
        self.size += a.size

    def finish(self) -> None:
        if not self.parts:
            return
        flat = _round_array(np.concatenate(self.parts))
        for container, key, start, shape, scalar in self.fixups:
            piece = flat[start : start + int(np.prod(shape))]
            # arrays stay numpy (C-contiguous views): orjson writes them itself, ~3x faster than via lists
            container[key] = float(piece[0]) if scalar else piece.reshape(shape)


def _clean_into(container: Any, key: Any, obj: Any, rounder: _Rounder) -> None:
    """container[key] = obj made JSON-ready: numpy values to Python ones, floats rounded (by `rounder`)."""
    if type(obj) is JsonList:
        container[key] = obj
    elif isinstance(obj, dict):
        out: dict = {}
        container[key] = out
        for k, v in obj.items():
            _clean_into(out, str(k), v, rounder)
    elif isinstance(obj, (list, tuple)):
        kinds = set(map(type, obj))
        if kinds and kinds <= _PLAIN:  # token strings, token ids: nothing to round
            container[key] = list(obj)
        elif kinds == {float}:
            rounder.defer(container, key, np.asarray(obj), False)
        else:
            items: list = [None] * len(obj)
            container[key] = items
            for i, v in enumerate(obj):
                _clean_into(items, i, v, rounder)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            rounder.defer(container, key, obj, False)
        elif obj.dtype.kind in "iub" and obj.ndim:
            container[key] = np.ascontiguousarray(obj)  # orjson writes integer and bool arrays as they are
        else:
            container[key] = obj.tolist()
    elif isinstance(obj, (float, np.floating)):
        rounder.defer(container, key, np.asarray([float(obj)]), True)
    elif isinstance(obj, np.integer):
        container[key] = int(obj)
    elif isinstance(obj, np.bool_):
        container[key] = bool(obj)
    else:
        container[key] = obj


def _clean(obj: Any) -> Any:
    """`obj` with floats rounded and numpy values turned into JSON-ready Python ones."""
    holder: dict = {}
    rounder = _Rounder()
    _clean_into(holder, "body", obj, rounder)
    rounder.finish()
    return holder["body"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: readable by a static web server
DIR_MODE = 0o777 & ~_umask()  # what mkdir() would give


def durable_replace(tmp: Path, path: Path) -> None:
    """os.replace(tmp, path) after the data reached the disk, and the rename too (fsync of the file, then of the
    folder): what a resume trusts after a power loss, not only after a kill. For the few files a resume reads
    (units, the prefix, the token rows); the tree's thousands of files are not worth an fsync each."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write to a temp file in the same folder, then rename over `path` (durable: `durable_replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600
        (durable_replace if durable else os.replace)(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: Any, *, rounded: bool = False) -> None:
    """Atomically write `obj` as compact UTF-8 JSON with rounded floats.

    rounded=True skips the rounding pass for bodies built from already rounded
    JSON values (the server's growing custom files).
    """
    atomic_write_bytes(Path(path), dumps(obj) if rounded else _dumps_checked(_clean(obj)))


def dumps(body: Any) -> bytes:
    """Compact UTF-8 JSON of a JSON-ready body; NaN and Infinity refused.

    orjson: the scan writes hundreds of MB of JSON, which the standard library encodes at ~50 MB/s on this
    CPU and orjson ~10x faster. A body orjson refuses (an integer past 64 bits) goes through `json`.
    """
    data = _dumps_checked(body)
    if b"null" in data and _has_nan(body):  # orjson writes NaN as null; JSON has no NaN
        raise ValueError("refusing to write NaN or Infinity")
    return data


def _dumps_checked(body: Any) -> bytes:
    """`dumps` of a body whose floats are known finite (`_clean` refuses the others); numpy arrays allowed."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                          default=_as_list).encode("utf-8")


def _as_list(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _has_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return not np.isfinite(obj)
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind == "f" and not bool(np.all(np.isfinite(obj)))
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_nan(v) for v in obj)
    return False


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot.

    Python's os has no renameat2; it is one libc call, so ctypes it is.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_folder(staging: Path, out: Path) -> None:
    """Swap a complete staging folder in for `out`, then remove the old one.

    On Linux the swap is one atomic exchange, so `out` exists at every moment and a reader sees the
    old folder or the new one. Elsewhere (or on a file system without exchange) it is two renames,
    with a moment in between when `out` is missing. A symlinked `out` stays a symlink: its target is
    replaced. Every folder of `staging` gets the usual permissions first (mkdtemp makes 0700; a
    static host may run as another user).
    """
    staging, out = Path(staging), Path(out)
    if out.is_symlink():
        out = out.resolve()
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        folder.chmod(DIR_MODE)
    if out.exists() and _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old tree
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def return_freed_memory() -> None:
    """glibc: give the free pages inside the heap back to the system (`malloc_trim`); a no-op elsewhere.

    Pass 1 frees many mid-sized arrays (score chunks, row statistics) between the long-lived kept rows,
    and glibc keeps such holes: without a trim after each unit the default scan's peak RSS grew from 3.1
    to 5.1 GB with the same live data (measured). A trim takes milliseconds; serving those arrays by
    mmap instead (M_MMAP_THRESHOLD) cost pass 1 35-50% more time.
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - absent outside glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
