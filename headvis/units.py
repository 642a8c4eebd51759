"""Pass 1 in work units: fixed groups of sequences, one state file each, folded in unit order.

A scan's sequences are cut into units of `unit_size` consecutive ids (the
last one shorter); the size depends on the scan (its sequence count and batch
size, or `--unit-size`), never on how many processes run it. Each unit is
summed on its own (`ScanAccumulator.begin_unit` / `end_unit`) and saved to
`unit-{u:06d}.safetensors` in the resume folder beside `--out` (temp file,
then rename); the totals are the units folded in unit order. So the tree is
bit-identical whether one process or several scanned it, and a killed scan,
rerun with the same settings and any number of processes, scans only the
units that have no file yet. `key.json` names the scan (settings and the
packed token ids' digest); a folder of another scan is discarded, saying so.
A finished scan removes the folder.

A folded prefix keeps the folder's size bounded by what is in flight, not by
the corpus: once the units folded since the last snapshot weigh as much as
the totals themselves (and at least `SNAPSHOT_MIN_BYTES`), the process that
folds writes the per-sequence values of those units to
`seqs-{a:06d}-{b:06d}.safetensors`, then the totals after unit b - 1 to
`prefix.safetensors` (which names b), then deletes those unit files. A resume
starts from the prefix; a crash between the steps leaves files that the
next open recognises (a segment past the prefix, units below it) and drops.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from headvis.errors import HeadvisError
from headvis.io import atomic_write_bytes, durable_replace

__all__ = ["UnitFiles", "load_pass2", "pass2_path", "read_shown", "save_pass2", "scan_key", "snapshot_due",
           "unit_ranges", "unit_size_for",
           "write_shown"]

MIN_UNIT = 32  # sequences: smaller units cost more files than they save on a resume
SNAPSHOT_MIN_BYTES = 256 << 20  # folded unit files to gather before a prefix snapshot is worth writing
MAX_BATCHES = 32  # batches per unit at most
TARGET_UNITS = 64  # a scan is cut into about this many units, within those bounds


def scan_key(settings: dict, sequences_sha256: str, shape: tuple[int, int]) -> dict:
    """What must match for saved units to be reused: the settings and the exact token ids (the SHA-256 of
    their int64 bytes, row-major: `TokenStore.sha256`) and their shape."""
    return {**settings, "sequences_sha256": sequences_sha256, "shape": list(shape)}


def unit_size_for(n_sequences: int, batch_size: int, requested: int | None = None) -> int:
    """Sequences per unit: `requested`, else a whole number of batches giving about TARGET_UNITS units."""
    if requested is not None:
        return requested
    batches = math.ceil(n_sequences / (TARGET_UNITS * batch_size))
    return batch_size * min(MAX_BATCHES, max(math.ceil(MIN_UNIT / batch_size), batches))


def unit_ranges(n_sequences: int, unit_size: int) -> list[range]:
    """The units' sequence ids, in unit order."""
    return [range(start, min(start + unit_size, n_sequences)) for start in range(0, n_sequences, unit_size)]


class UnitFiles:
    """The saved units of one scan in `folder` (`.{out}.resume/`)."""

    def __init__(self, folder: Path, key: dict | None = None):
        self.folder = Path(folder)
        self._lock = None
        self.set_key(key or {})

    def set_key(self, key: dict) -> None:
        """The scan's key (its settings and token digest), known once the corpus is tokenized."""
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()

    def lock(self) -> None:
        """Lock the folder against a second scan of the same --out (rank 0, before it touches anything beside
        --out: the token rows, the units); the lock file stays while this scan runs, whatever it removes."""
        if self._lock is not None:
            return
        from headvis.lock import TreeLock, TreeLocked

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = TreeLock(self.folder, "scan")
        try:
            lock.acquire()
        except TreeLocked as e:
            raise HeadvisError(f"another scan of the same --out is running ({e}); wait for it or scan into "
                               "another --out") from None
        self._lock = lock

    def clear(self) -> None:
        """Everything in the folder but the lock (--no-resume, under the lock)."""
        from headvis.lock import LOCK_NAME

        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def open(self, writer: bool) -> None:
        """The writer (rank 0, or the only process) locks the folder against a second scan (if `lock` has not),
        drops the temp files of killed scans, discards another scan's folder and writes the key."""
        if not writer:
            return
        self.lock()
        for stale in self.folder.glob(".*.tmp"):  # a killed scan's half-written files: no writer is running
            stale.unlink(missing_ok=True)
        try:
            stored = json.loads((self.folder / "key.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            stored = None
        except (OSError, ValueError):
            stored = "unreadable"
        if stored is not None and stored != self.key:
            print("headvis: a resume checkpoint of another scan was found and is discarded", flush=True)
            self.clear()
        atomic_write_bytes(self.folder / "key.json", json.dumps(self.key, sort_keys=True).encode("utf-8"))

    def check(self, rank: int) -> None:
        """A rank other than 0, after rank 0's `open`: it sees the same folder and the same scan."""
        try:
            stored = json.loads((self.folder / "key.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeadvisError(f"{self.folder}/key.json, which rank 0 wrote, is not visible from rank {rank}: every "
                               "process needs the same folder for --out (a shared filesystem across machines)") from None
        except (OSError, ValueError) as e:
            raise HeadvisError(f"cannot read {self.folder}/key.json: {e}") from e
        if stored != self.key:
            differ = sorted(k for k in set(stored) | set(self.key) if stored.get(k) != self.key.get(k))
            raise HeadvisError(f"this process's scan differs from rank 0's in {', '.join(differ)}: every process must "
                               "see the same model, corpus and settings")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def path(self, unit: int) -> Path:
        return self.folder / f"unit-{unit:06d}.safetensors"

    def done(self) -> set[int]:
        """The units whose file exists (complete: a file appears only by rename)."""
        if not self.folder.is_dir():
            return set()
        found = (re.fullmatch(r"unit-(\d{6})\.safetensors", p.name) for p in self.folder.iterdir())
        return {int(m[1]) for m in found if m}

    def save(self, unit: int, state: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".unit-{unit:06d}.{os.getpid()}.tmp"
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"scan": self.digest})
        except SafetensorError as e:  # Rust's IO error, e.g. "... (os error 28)": back to an OSError
            tmp.unlink(missing_ok=True)
            found = re.search(r"os error (\d+)", str(e))
            raise OSError(int(found[1]) if found else errno.EIO, str(e), str(tmp)) from e
        durable_replace(tmp, self.path(unit))

    def load(self, unit: int, seq_ids: range) -> dict[str, torch.Tensor]:
        """Unit `unit`'s state, checked: written for this scan (its key's digest) and holding `seq_ids`."""
        path = self.path(unit)
        try:
            with safe_open(path, framework="pt") as f:
                written_for = (f.metadata() or {}).get("scan")
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise HeadvisError(f"the saved unit {unit} is unreadable ({type(e).__name__}: {e}); remove "
                               f"{path} (that unit is then scanned again) or run with --no-resume") from e
        if written_for != self.digest or state["seq_ids"].tolist() != list(seq_ids):
            raise HeadvisError(f"the saved unit {path} belongs to another scan (another process with other settings, "
                               "or a second scan of the same --out); remove it (that unit is then scanned again)")
        return state

    # -- the folded prefix

    def prefix_units(self) -> int:
        """How many units the prefix snapshot holds (0: none). Read from its metadata alone."""
        path = self.folder / "prefix.safetensors"
        if not path.exists():
            return 0
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise HeadvisError(f"the saved prefix {path} is unreadable ({type(e).__name__}: {e}); run with "
                               "--no-resume") from e
        if meta.get("scan") != self.digest:
            raise HeadvisError(f"the saved prefix {path} belongs to another scan; run with --no-resume")
        return int(meta.get("units", 0))

    def save_prefix(self, units: int, sums: dict[str, torch.Tensor], first: int,
                    sequences: dict[str, torch.Tensor]) -> None:
        """Units [first, units) are folded: their per-sequence values to a segment, the totals to the prefix,
        then their unit files go (in that order: a crash between leaves a state `load_prefix` sorts out)."""
        self._write(self.folder / f"seqs-{first:06d}-{units:06d}.safetensors", sequences, {})  # >= 6 digits
        self._write(self.folder / "prefix.safetensors", sums, {"units": str(units)})
        for u in range(first, units):
            self.path(u).unlink(missing_ok=True)

    def load_prefix(self) -> tuple[int, dict[str, torch.Tensor] | None, list[dict[str, torch.Tensor]]]:
        """(units folded, their totals or None, the per-sequence segments of those units), checked; the files
        a crash left behind (segments past the prefix, unit files below it) are removed."""
        units = self.prefix_units()
        sums = self._read(self.folder / "prefix.safetensors") if units else None
        segments, stale, covered = [], [], 0
        found = [(re.fullmatch(r"seqs-(\d+)-(\d+)\.safetensors", p.name), p) for p in self.folder.glob("seqs-*")]
        for (first, last), path in sorted(((int(m[1]), int(m[2])), p) for m, p in found if m):
            if last > units:
                stale.append(path)  # written before a prefix that never came
                continue
            if first != covered:
                raise HeadvisError(f"the saved prefix in {self.folder} lacks the segment of units {covered}-{first}; "
                                   "run with --no-resume")
            segments.append(self._read(path))
            covered = last
        if covered != units:
            raise HeadvisError(f"the saved prefix in {self.folder} holds {units} units but its segments {covered}; "
                               "run with --no-resume")
        for path in stale:
            path.unlink(missing_ok=True)
        for u in range(units):
            self.path(u).unlink(missing_ok=True)  # folded into the prefix before the crash
        return units, sums, segments

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"scan": self.digest, **meta})
        except SafetensorError as e:
            tmp.unlink(missing_ok=True)
            found = re.search(r"os error (\d+)", str(e))
            raise OSError(int(found[1]) if found else errno.EIO, str(e), str(tmp)) from e
        durable_replace(tmp, path)

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            with safe_open(path, framework="pt") as f:
                written_for = (f.metadata() or {}).get("scan")
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise HeadvisError(f"the saved {path} is unreadable ({type(e).__name__}: {e}); run with --no-resume") from e
        if written_for != self.digest:
            raise HeadvisError(f"the saved {path} belongs to another scan; run with --no-resume")
        return tensors

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def done_in(self, n_units: int) -> set[int]:
        """`done` (a unit file, or folded into the prefix), limited to this scan's unit numbers."""
        return {u for u in self.done() if u < n_units} | set(range(min(n_units, self.prefix_units())))


def snapshot_due(folded_bytes: int, prefix_bytes: int) -> bool:
    """Whether the unit files folded since the last snapshot are worth a prefix snapshot: they weigh at least
    as much as the snapshot itself (so its writes at most double the units'), and at least SNAPSHOT_MIN_BYTES."""
    return folded_bytes >= max(prefix_bytes, SNAPSHOT_MIN_BYTES)


# -- pass 2 across processes: rank 0 names the shown sequences, each rank hands back its rows and edges


def write_shown(path: Path, wanted: dict[tuple[int, int], dict[int, int]]) -> None:
    """(layer, head) -> {sequence id: interval}, in the heads' order, as JSON (temp file, then rename)."""
    rows = [[layer, head, [[sid, interval] for sid, interval in per_head.items()]]
            for (layer, head), per_head in wanted.items()]
    atomic_write_bytes(path, json.dumps(rows).encode("utf-8"))


def read_shown(path: Path) -> dict[tuple[int, int], dict[int, int]]:
    return {(layer, head): {int(sid): int(interval) for sid, interval in per_head}
            for layer, head, per_head in json.loads(path.read_text(encoding="utf-8"))}


def pass2_path(folder: Path, rank: int, layer: int) -> Path:
    return Path(folder) / f"pass2-{rank:05d}-L{layer:03d}.safetensors"


def save_pass2(folder: Path, rank: int, rows: dict[tuple[int, int], dict], points, layers: list[int]) -> None:
    """One rank's pass-2 rows ({(layer, head): {sid: (indices, values, max, [q, k])}}) and gathered edges, one
    file per layer (`pass2_path`): rank 0 reads them back a layer at a time, so that it never holds more than
    one layer's rows and edges of the other ranks."""
    for layer in layers:
        _save_pass2_file(pass2_path(folder, rank, layer), {key: per_head for key, per_head in rows.items()
                                                           if key[0] == layer}, points.parts_tensors(layer))


def _save_pass2_file(path: Path, rows: dict[tuple[int, int], dict], edges: dict[str, torch.Tensor]) -> None:
    meta, best, indices, values = [], [], [], []
    for (layer, head), per_head in rows.items():
        for sid, (idx, val, top, (q, k)) in per_head.items():
            meta.append([layer, head, sid, q, k, len(idx)])
            best.append(top)
            indices.append(np.asarray(idx, dtype=np.int64))
            values.append(np.asarray(val, dtype=np.float32))
    tensors = {"meta": torch.tensor(meta, dtype=torch.int64).reshape(-1, 6),
               "best": torch.tensor(best, dtype=torch.float64),
               "indices": torch.from_numpy(np.concatenate(indices) if indices else np.zeros(0, np.int64)),
               "values": torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.float32))}
    tensors.update({f"points.{name}": value for name, value in edges.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    except SafetensorError as e:  # Rust's IO error (a full disk): an OSError, which the scan reports in one line
        tmp.unlink(missing_ok=True)
        found = re.search(r"os error (\d+)", str(e))
        raise OSError(int(found[1]) if found else errno.EIO, str(e), str(tmp)) from e
    os.replace(tmp, path)


def load_pass2(path: Path, points, rows: bool = True) -> dict[tuple[int, int], dict]:
    """A rank's `save_pass2` file: its rows ({} with rows=False), its edges added to `points` (None: left)."""
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise HeadvisError(f"pass 2 of another process is unreadable ({path}: {e}); run the same command again") from e
    got: dict[tuple[int, int], dict] = {}
    offset = 0
    indices, values = tensors["indices"].numpy(), tensors["values"].numpy()
    for (layer, head, sid, q, k, n), top in zip(tensors["meta"].tolist() if rows else [], tensors["best"].tolist()):
        got.setdefault((layer, head), {})[sid] = (indices[offset:offset + n].copy(), values[offset:offset + n].copy(),
                                                   top, [q, k])
        offset += n
    if points is not None:
        points.add_tensors({name[len("points."):]: value for name, value in tensors.items()
                            if name.startswith("points.")})
    return got
