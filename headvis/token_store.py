"""The corpus as fixed-length token sequences in one memory-mapped file beside --out (`TokenStore`).

The scan's first stage. The documents of --dataset, in their canonical order (`iter_texts`: sorted file
list, the hub dataset's own order), are tokenized and packed (`pack_blocks`) straight into `tokens.bin`
(int32, n x seq_len, row-major) in the folder `.{out}.tokens` beside --out, a few thousand sequences at a
time, so that memory stays bounded by one block and one text: a `.txt` is read in 1 MiB pieces, except for
tokenizers that mark each call (SentencePiece: Llama 2, Mistral), which get a whole document at a time.
`manifest.json` says what made them: the dataset and its source's fingerprint (the files `iter_texts`
reads: path, size and modification time; the hub: name, split and the commit its name points to, which is
the one streamed; pydoc: the Python version), the
tokenizer (a digest of its whole definition, and the special tokens packing adds), seq_len, the number of
sequences and whether the corpus ended before --num-seqs. Sequence id N is row N: the same text on every
rank, in every resume, at any world size.

A later scan with the same manifest reads the file again instead of tokenizing (the rows it needs: the
first --num-seqs, when the file holds them or the corpus ended); anything else rebuilds it. Ranks other
than 0 open what rank 0 wrote, checking the settings and the tokenizer, not their own view of the source.
The scan removes the folder with its resume folder once the tree is published. Rows come back as int64
tensors (`TokenStore.__getitem__`); nothing holds the whole corpus in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from headvis.datasets import DEFAULT_DATASET, corpus_files, hub_revision, iter_texts, pack_blocks, prefix_token
from headvis.errors import HeadvisError
from headvis.io import atomic_write_bytes, durable_replace

__all__ = ["TokenStore", "source_fingerprint", "tokenizer_fingerprint"]

MANIFEST_VERSION = 1
_READ_ROWS = 1 << 14  # rows per step of the pass over the file that opening makes


def source_fingerprint(dataset: str, split: str, text_column: str) -> dict:
    """What identifies the texts `iter_texts(dataset, ...)` reads, without reading them."""
    if dataset == DEFAULT_DATASET:
        return {"kind": "pydoc", "python": sys.version}
    path = Path(dataset).expanduser()
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else corpus_files(path)  # what iter_texts reads, nothing else
        return {"kind": "files", "text_column": text_column, "files": [
            [str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]}
    # a hub dataset: its name, split and the commit the name points to now (None offline: then the name alone)
    return {"kind": "hub", "name": dataset, "split": split, "text_column": text_column,
            "revision": hub_revision(dataset)}


def _same_source(found: dict | None, want: dict) -> bool:
    """Whether a store's recorded source is `want`'s; a hub dataset whose commit cannot be told now (offline)
    matches its name and split at any recorded commit."""
    if found is None or found.get("kind") != want.get("kind"):
        return False
    if want.get("kind") == "hub" and want.get("revision") is None:
        return {k: v for k, v in found.items() if k != "revision"} == {k: v for k, v in want.items() if k != "revision"}
    return found == want


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the token ids of a text and the packing: the whole tokenizer (a fast tokenizer's own JSON:
    vocabulary, merges, normalizer, pre-tokenizer; else its vocabulary) and the special tokens packing adds."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()),
                                                                   ensure_ascii=False)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "sep_token_id",
                                                                  "cls_token_id")}
    return {"class": type(tokenizer).__name__, "size": len(tokenizer), "special": special,
            "prefix": prefix_token(tokenizer), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


class _Summary:
    """sha256 (of the rows' int64 bytes, row-major, as `scan_key` hashed the in-memory tensor), largest id and
    the ids at positions >= 1, of rows seen block by block."""

    def __init__(self):
        self.digest, self.counts, self.top = hashlib.sha256(), np.zeros(1, np.int64), -1

    def add(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.int64)
        self.digest.update(block.tobytes())
        self.top = max(self.top, int(block.max()))
        found = np.bincount(block[:, 1:].ravel(), minlength=len(self.counts))
        found[: len(self.counts)] += self.counts
        self.counts = found

    def result(self) -> tuple[str, int, np.ndarray]:
        return self.digest.hexdigest(), self.top, np.flatnonzero(self.counts)


class TokenStore:
    """(n, seq_len) token ids in `folder/tokens.bin`, memory-mapped; rows as int64 tensors.

    `sha256`, `max_id` and `present` (the ids that occur at positions >= 1, ascending) describe the rows in
    use: made while the rows are written and kept beside them (`present.npy`, the manifest), so that opening
    the store (every rank, every resume) reads no row; computed by one pass over the rows when fewer than
    the file holds are used.
    """

    def __init__(self, folder: Path, n: int, seq_len: int, summary: tuple[str, int, np.ndarray] | None = None):
        self.folder = Path(folder)
        self.seq_len = seq_len
        self._rows = np.memmap(self.folder / "tokens.bin", dtype=np.int32, mode="r", shape=(n, seq_len)) \
            if n else np.zeros((0, seq_len), np.int32)
        if summary is None:
            running = _Summary()
            for start in range(0, n, _READ_ROWS):
                running.add(self._rows[start : start + _READ_ROWS])
            summary = running.result()
        self.sha256, self.max_id, self.present = summary

    # -- opening

    @classmethod
    def open_or_build(cls, folder: Path, *, dataset: str, split: str, text_column: str, tokenizer, seq_len: int,
                      num_seqs: int, build: bool = True, progress: bool = True) -> "TokenStore":
        """The store of these settings in `folder`: reused when its manifest matches, else (build) written anew.

        build=False (a torchrun rank other than 0): the store rank 0 wrote must be there and match.
        """
        folder = Path(folder)
        want = {"version": MANIFEST_VERSION, "dataset": dataset, "tokenizer": tokenizer_fingerprint(tokenizer),
                "seq_len": seq_len}
        found = cls._manifest(folder)
        if not build:
            # another rank: rank 0 has just written or checked the store; its view of the source (paths, times)
            # may differ from this machine's, so only what this rank's tokenizer and settings decide is checked
            if found is None or {k: found.get(k) for k in want} != want:
                raise HeadvisError(f"no token store of these settings at {folder}: rank 0 writes it; is --out on a "
                                   "file system every process sees, with the same tokenizer?")
            return cls._opened(folder, found, num_seqs, seq_len)
        source = source_fingerprint(dataset, split, text_column)
        if found is not None and {k: found.get(k) for k in want} == want and _same_source(found.get("source"), source) \
                and (found["n"] >= num_seqs or found["ended"]):
            return cls._opened(folder, found, num_seqs, seq_len)
        want["source"] = source
        texts = iter_texts(dataset, split, text_column, revision=source.get("revision"))  # a hub commit: pinned
        n, ended, (digest, top, present) = cls._write(folder, texts, tokenizer, seq_len, num_seqs, progress)
        buffer = io.BytesIO()
        np.save(buffer, present.astype(np.int64))
        atomic_write_bytes(folder / "present.npy", buffer.getvalue(), durable=True)
        atomic_write_bytes(folder / "manifest.json", json.dumps(
            {**want, "n": n, "ended": ended, "sha256": digest, "max_id": top}).encode("utf-8"), durable=True)
        return cls(folder, n, seq_len, (digest, top, present))

    @classmethod
    def _opened(cls, folder: Path, found: dict, num_seqs: int, seq_len: int) -> "TokenStore":
        """The store a manifest describes, its first min(n, num_seqs) rows: the saved summary when all are used."""
        n = min(found["n"], num_seqs)
        summary = None
        if n == found["n"] and "sha256" in found:
            try:
                summary = (found["sha256"], int(found["max_id"]), np.load(folder / "present.npy"))
            except (OSError, ValueError):
                summary = None  # read the rows instead
        return cls(folder, n, seq_len, summary)

    @staticmethod
    def _manifest(folder: Path) -> dict | None:
        try:
            found = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            size = (folder / "tokens.bin").stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(found, dict) or size != 4 * int(found.get("n", -1)) * int(found.get("seq_len", 0)):
            return None  # a file cut short or replaced: rebuilt
        return found

    @staticmethod
    def _write(folder: Path, texts: Iterator[str], tokenizer, seq_len: int, num_seqs: int,
               progress: bool) -> tuple[int, bool, tuple[str, int, np.ndarray]]:
        """Pack `texts` into folder/tokens.bin (temp file, then rename): (sequences written, corpus ended, their
        summary)."""
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)  # the old rows go: no manifest may name them
        (folder / "present.npy").unlink(missing_ok=True)
        for stale in folder.glob(".tokens.bin.*.tmp"):  # a killed scan's (the caller holds the scan's lock)
            stale.unlink(missing_ok=True)
        temp = folder / f".tokens.bin.{os.getpid()}.tmp"
        n = 0
        summary = _Summary()
        try:
            with open(temp, "wb") as f:
                for block in pack_blocks(texts, tokenizer, seq_len, num_seqs, progress=progress):
                    if int(block.max()) > np.iinfo(np.int32).max:
                        raise HeadvisError(f"token id {int(block.max())} does not fit the token store's int32")
                    f.write(np.ascontiguousarray(block, dtype=np.int32).tobytes())
                    summary.add(block)
                    n += len(block)
            durable_replace(temp, folder / "tokens.bin")
        except BaseException:
            temp.unlink(missing_ok=True)
            if made:  # nothing of this scan stays beside --out when its corpus gives no sequence
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return n, n < num_seqs, summary.result()

    # -- rows

    def __len__(self) -> int:
        return self._rows.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.array(self._rows[index], dtype=np.int64))
