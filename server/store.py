"""The files the server changes: custom sequences and cluster labels.

Every write is atomic (`headvis.io.atomic_write_bytes`: temp file + rename), and a
read-modify-write of a shared file runs under that file's own asyncio lock,
with the file IO itself on a thread, so concurrent requests never lose a
write and never block the event loop. Changes that wait for a file's lock
are applied together by the next write (`JsonFiles`).

Order of writes, so that `custom/sequences.json` only lists complete
sequences: an add writes every `custom/L{l}H{h}.json` first and the
sequences.json entry last; a delete removes the entry first and the head
records after. A crash between the two leaves records without an entry;
`CustomStore.reconcile` removes them (and stray temp files) at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from headvis.io import read_json, write_json
from headvis.server.limits import MAX_CUSTOM_SEQUENCES
from headvis.server.tree import DataTree

__all__ = ["CustomStore", "JsonFiles"]


Change = Callable[[Any], tuple[Any, Any]]  # old body -> (new body or None for "unchanged", result)


def _read_or(path: Path, default: Callable[[], Any]) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        return default()


def _apply(path: Path, changes: list[Change], default: Callable[[], Any]) -> list[tuple[bool, Any]]:
    """Apply changes in order to one read of `path`, write once if any changed it; (ok, result or error) each."""
    body = _read_or(path, default)
    outcomes: list[tuple[bool, Any]] = []
    changed = False
    for change in changes:
        try:
            new, result = change(body)
        except Exception as e:  # this change fails alone; the others still apply
            outcomes.append((False, e))
            continue
        if new is not None:
            body, changed = new, True
        outcomes.append((True, result))
    if changed:
        write_json(path, body, rounded=True)
    return outcomes


class JsonFiles:
    """Read-modify-write of shared JSON files whose bodies are JSON-ready (rounded, plain Python).

    One asyncio lock per file; changes that queue up behind a file's write are
    applied together by the next one, so N concurrent adds cost about one
    rewrite per file, not N. The IO runs on one thread of its own: parsing
    and dumping JSON holds the GIL, and more threads would only take it from
    the model thread.
    """

    def __init__(self) -> None:
        self._locks: dict[Path, asyncio.Lock] = {}
        self._queued: dict[Path, list[tuple[Change, asyncio.Future]]] = {}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headvis-io")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def lock(self, path: Path) -> asyncio.Lock:
        return self._locks.setdefault(Path(path), asyncio.Lock())

    async def update(self, path: Path, change: Change, default: Callable[[], Any]) -> Any:
        """(new, result) = change(old) on `path` (default() when missing), new written unless None; returns result."""
        path = Path(path)
        future = asyncio.get_running_loop().create_future()
        self._queued.setdefault(path, []).append((change, future))
        async with self.lock(path):
            if not future.done():  # nobody took it along: write this change and every one queued since
                batch = self._queued.pop(path)
                try:
                    outcomes = await asyncio.get_running_loop().run_in_executor(
                        self._io, _apply, path, [c for c, _ in batch], default)
                except BaseException as e:
                    for _, waiting in batch:
                        if not waiting.done():
                            waiting.set_exception(e if isinstance(e, Exception) else RuntimeError("write interrupted"))
                    raise
                for (_, waiting), (ok, value) in zip(batch, outcomes):
                    waiting.set_result(value) if ok else waiting.set_exception(value)
        return future.result()


def _stray_temp_files(folder: Path) -> list[Path]:
    """Temp files of `headvis.io.atomic_write_bytes` (`.NAME.XXXX.tmp`) left by a killed process."""
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


class CustomStore:
    """custom/sequences.json and custom/L{l}H{h}.json of one data tree."""

    def __init__(self, tree: DataTree, files: JsonFiles):
        self.tree = tree
        self.files = files
        self._reserved = 0  # adds admitted but not yet listed

    def _empty_head(self, layer: int, head: int) -> Callable[[], dict]:
        return lambda: {"layer": layer, "head": head, "sequences": []}

    @staticmethod
    def _empty_list() -> dict:
        return {"sequences": []}

    async def entries(self) -> list[dict]:
        """The sequences.json entries as they are now (every write is atomic, so no lock is needed)."""
        return (await asyncio.to_thread(_read_or, self.tree.custom_sequences, self._empty_list))["sequences"]

    async def entry(self, sid: str) -> dict | None:
        return next((e for e in await self.entries() if e["id"] == sid), None)

    @contextlib.asynccontextmanager
    async def reserve(self):
        """Admit one add, or 409 when MAX_CUSTOM_SEQUENCES are listed or being added."""
        if len(await self.entries()) + self._reserved >= MAX_CUSTOM_SEQUENCES:
            raise web.HTTPConflict(text=f"there are already {MAX_CUSTOM_SEQUENCES} custom sequences; delete some first")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    async def add(self, entry: dict, records: dict[tuple[int, int], dict]) -> None:
        """Write each head's record, then list the entry."""
        sid = entry["id"]

        def add_record(record: dict) -> Change:
            def change(body: dict) -> tuple[dict, None]:
                body["sequences"] = [r for r in body["sequences"] if r["id"] != sid] + [record]
                return body, None
            return change

        await asyncio.gather(*(
            self.files.update(self.tree.custom_head(layer, head), add_record(record), self._empty_head(layer, head))
            for (layer, head), record in records.items()
        ))

        def list_entry(body: dict) -> tuple[dict, None]:
            body["sequences"] = [e for e in body["sequences"] if e["id"] != sid] + [entry]
            return body, None

        await self.files.update(self.tree.custom_sequences, list_entry, self._empty_list)

    async def delete(self, sid: str) -> None:
        """Unlist the entry (404 if it is not listed), then drop its record from every head file."""

        def unlist(body: dict) -> tuple[dict | None, bool]:
            kept = [e for e in body["sequences"] if e["id"] != sid]
            if len(kept) == len(body["sequences"]):
                return None, False
            body["sequences"] = kept
            return body, True

        if not await self.files.update(self.tree.custom_sequences, unlist, self._empty_list):
            raise web.HTTPNotFound(text=f"no custom sequence {sid!r}")

        def drop_record(body: dict) -> tuple[dict | None, None]:
            kept = [r for r in body["sequences"] if r["id"] != sid]
            return (None if len(kept) == len(body["sequences"]) else {**body, "sequences": kept}), None

        await asyncio.gather(*(
            self.files.update(self.tree.custom_head(layer, head), drop_record, self._empty_head(layer, head))
            for layer, head in self.tree.scanned_heads
            if self.tree.custom_head(layer, head).exists()
        ))

    def reconcile(self) -> int:
        """At start-up: drop head records whose id is not listed, and stray temp files. Returns records dropped."""
        folder = self.tree.custom_dir
        for path in _stray_temp_files(folder) + _stray_temp_files(self.tree.root / "umap" / "clusters"):
            path.unlink(missing_ok=True)
        if not folder.is_dir():
            return 0
        listed = {e["id"] for e in _read_or(self.tree.custom_sequences, self._empty_list)["sequences"]}
        dropped = 0
        for path in sorted(folder.glob("L*H*.json")):
            body = read_json(path)
            kept = [r for r in body["sequences"] if r["id"] in listed]
            if len(kept) != len(body["sequences"]):
                dropped += len(body["sequences"]) - len(kept)
                write_json(path, {**body, "sequences": kept}, rounded=True)
        return dropped
