"""Custom sequences on disk: one folder per sequence, so an add costs the same however many there are.

    folder = CustomFolder(Path("data/custom_sequences"))
    folder.add(entry, {(5, 0): record, ...})   # one atomic rename makes it visible
    folder.snapshot(heads)                    # index.json and L{l}H{h}.json for a static host

Layout (CONTRACT section 2 names the two snapshot files; `store/` is ours):

    custom_sequences/
      index.json                  snapshot: {"sequences": [entry, ...]}, in add order
      L{l}H{h}.json               snapshot: {"sequences": [record, ...]}
      store/
        {time_ns:020d}-{id}/      one sequence, named so that names sort in add order
          entry.json              its index.json entry
          L{l}H{h}.json           its record of each scanned head
        .add-{id}-XXXX/           an add being written (a killed add's is removed at start-up)
        .del-{id}-XXXX/           a delete being removed

`store/` is the truth. An add writes its folder under a dot name and renames
it into place: every head's record and the entry become visible together,
and a failure (a full disk) leaves nothing behind. The cost of an add is its
own records (heads x its length); the contract's per-head files list every
sequence, so rewriting them on every add cost the sum of all sequences. The
server answers `/data/custom_sequences/...` from `store/` while it runs and
brings the snapshot files up to date when it stops, and at start-up when a
killed server left them behind (`current` is False).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from headvis.io import DIR_MODE, atomic_write_bytes, dumps, read_json, write_json

__all__ = ["CustomFolder"]

_ENTRY = "entry.json"
_FOLDER = re.compile(r"[0-9]{20}-c[0-9a-f]{12}")  # {time_ns:020d}-{id}; anything else in store/ is not ours


def _head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}.json"


class CustomFolder:
    """`custom_sequences/` of one data tree (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    def head_snapshot(self, layer: int, head: int) -> Path:
        return self.root / _head_name(layer, head)

    # -- the store
    def folders(self) -> list[Path]:
        """The sequences' folders in add order."""
        if not self.store.is_dir():
            return []
        return sorted(p for p in self.store.iterdir() if _FOLDER.fullmatch(p.name) and p.is_dir())

    @staticmethod
    def sequence_id(folder: Path) -> str:
        return folder.name.split("-", 1)[1]

    def entries(self, folders: list[Path] | None = None) -> list[dict]:
        return [read_json(folder / _ENTRY) for folder in (self.folders() if folders is None else folders)]

    def listing(self) -> list[dict]:
        """The custom sequences' entries: the store's, or index.json's in a tree no server has opened since 0.2.0."""
        if self.migrated():
            return self.entries()
        try:
            return read_json(self.index)["sequences"]
        except FileNotFoundError:
            return []

    def add(self, entry: dict, records: dict[tuple[int, int], dict]) -> Path:
        """Write one sequence's entry and head records (JSON-ready bodies) and make them visible at once."""
        sequence_id = entry["sequence_id"]
        self.store.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".add-{sequence_id}-", dir=self.store))
        try:
            for (layer, head), record in records.items():
                write_json(temp / _head_name(layer, head), record, rounded=True)
            write_json(temp / _ENTRY, entry, rounded=True)
            temp.chmod(DIR_MODE)
            final = self.store / f"{time.time_ns():020d}-{sequence_id}"
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return final

    def delete(self, folder: Path) -> None:
        """Unlist the sequence in one rename, then remove its files."""
        gone = self.store / f".del-{self.sequence_id(folder)}-{os.getpid()}-{time.time_ns()}"
        os.rename(folder, gone)
        shutil.rmtree(gone, ignore_errors=True)

    # -- what a client reads
    @staticmethod
    def index_bytes(entries: list[dict]) -> bytes:
        return dumps({"sequences": entries})

    @staticmethod
    def head_bytes(layer: int, head: int, folders: list[Path]) -> bytes:
        """The contract's `L{l}H{h}.json` body from the stored records, joined as bytes (nothing parsed)."""
        parts = []
        for folder in folders:
            path = folder / _head_name(layer, head)
            try:
                part = path.read_bytes()
            except FileNotFoundError:  # deleted meanwhile, or added before this head was scanned
                continue
            if not (part.startswith(b"{") and part.endswith(b"}")):  # written whole by rename: changed since
                raise OSError(errno.EBADMSG, "a stored custom record is damaged", str(path))
            parts.append(part)
        return b'{"sequences":[' + b",".join(parts) + b"]}"

    # -- snapshot files, for a static host
    def current(self) -> bool:
        """Whether index.json lists exactly the stored sequences, in order."""
        try:
            listed = [e["sequence_id"] for e in read_json(self.index)["sequences"]]
        except FileNotFoundError:
            listed = []
        return listed == [self.sequence_id(f) for f in self.folders()]

    def snapshot(self, heads: list[tuple[int, int]]) -> None:
        """Rewrite every head's snapshot file, then index.json (last: it says the snapshot is complete)."""
        folders = self.folders()
        for layer, head in heads:
            atomic_write_bytes(self.head_snapshot(layer, head), self.head_bytes(layer, head, folders))
        write_json(self.index, {"sequences": self.entries(folders)}, rounded=True)

    def reconcile(self, heads: list[tuple[int, int]]) -> tuple[int, int]:
        """At start-up: remove killed adds and deletes; move a snapshot-only tree's sequences into the store.

        Returns (folders removed, sequences imported). A tree written before `store/` existed (headvis
        0.2.0) keeps its sequences in the snapshot files alone; they are imported once.
        """
        removed = 0
        if self.store.is_dir():
            for path in self.store.iterdir():
                if path.name.startswith("."):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed += 1
        for stray in self.root.glob(".*.tmp"):  # temp files of headvis.io.atomic_write_bytes
            stray.unlink(missing_ok=True)
        imported = 0
        if not self.store.is_dir() and self.index.is_file():
            listed = read_json(self.index)["sequences"]
            if listed:
                records: dict[str, dict[tuple[int, int], dict]] = {e["sequence_id"]: {} for e in listed}
                for layer, head in heads:
                    path = self.head_snapshot(layer, head)
                    if path.is_file():
                        for record in read_json(path)["sequences"]:
                            if record["sequence_id"] in records:
                                records[record["sequence_id"]][(layer, head)] = record
                for entry in listed:
                    self.add(entry, records[entry["sequence_id"]])
                    imported += 1
        return removed, imported

    def migrated(self) -> bool:
        """Whether `store/` exists (a tree a server has opened since headvis 0.3)."""
        return self.store.is_dir()
