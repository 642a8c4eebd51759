"""Resuming a killed scan: pass 1's accumulators saved beside --out while it runs.

The folder `.{out}.resume/` (next to the --out tree) holds `key.json`, which
names the scan (model, corpus, settings and a hash of the packed token ids),
and `state.safetensors`, the accumulator's sums and per-sequence values. They
are rewritten atomically at most every SAVE_EVERY_S seconds and once more when
pass 1 ends. The same command, run again, finds a matching key, restores the
accumulator and scans only the sequences it has not seen (`seq_seen`); a key
that does not match (another scan) is discarded. A completed scan removes the
folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from headvis.accumulate import ScanAccumulator
from headvis.io import atomic_write_bytes

__all__ = ["SAVE_EVERY_S", "Checkpoint", "scan_key"]

SAVE_EVERY_S = 60.0  # seconds between checkpoint writes during pass 1


def scan_key(settings: dict, sequences: torch.Tensor) -> dict:
    """What must match for a checkpoint to be reused: the settings and the exact token ids."""
    digest = hashlib.sha256(sequences.cpu().numpy().tobytes()).hexdigest()
    return {**settings, "sequences_sha256": digest, "shape": list(sequences.shape)}


class Checkpoint:
    """Pass-1 state of one scan in `folder`."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        self._last = time.monotonic()

    def load(self, accumulator: ScanAccumulator) -> int:
        """Restore a matching checkpoint into `accumulator`; returns the sequences already done."""
        try:
            stored = json.loads((self.folder / "key.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0
        if stored != self.key:
            print("headvis: a resume checkpoint of another scan was found and is discarded", flush=True)
            self.remove()
            return 0
        try:
            state = load_file(self.folder / "state.safetensors")
        except Exception:  # safetensors raises its own error type for a damaged file
            print("headvis: the resume checkpoint is unreadable and is discarded", flush=True)
            self.remove()
            return 0
        mine = accumulator.state_dict()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
            self.remove()
            return 0
        for name, value in state.items():
            mine[name].copy_(value)
        return int(accumulator.seq_seen.sum())

    def save(self, accumulator: ScanAccumulator) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".state.{os.getpid()}.tmp"
        try:
            save_file({k: v.contiguous() for k, v in accumulator.state_dict().items()}, tmp)
        except SafetensorError as e:  # Rust's IO error, e.g. "... (os error 28)": back to an OSError
            tmp.unlink(missing_ok=True)
            found = re.search(r"os error (\d+)", str(e))
            raise OSError(int(found[1]) if found else errno.EIO, str(e), str(tmp)) from e
        atomic_write_bytes(self.folder / "key.json", json.dumps(self.key, sort_keys=True).encode("utf-8"))
        os.replace(tmp, self.folder / "state.safetensors")
        self._last = time.monotonic()

    def maybe_save(self, accumulator: ScanAccumulator) -> None:
        """Save if SAVE_EVERY_S seconds passed since the last save."""
        if time.monotonic() - self._last >= SAVE_EVERY_S:
            self.save(accumulator)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
