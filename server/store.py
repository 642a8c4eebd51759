"""The files the server changes: custom sequences, and the clusters and projected points of umap files.

Every write is atomic (`headvis.io.atomic_write_bytes`: temp file + rename), and a
read-modify-write of a shared file runs under that file's own asyncio lock,
with the file IO itself on a thread, so concurrent requests never lose a
write and never block the event loop. Changes that wait for a file's lock
are applied together by the next write (`JsonFiles`).

Order of writes, so that `custom_sequences/index.json` only lists complete
sequences: an add writes every `custom_sequences/L{l}H{h}.json` first and
the index entry last; a delete removes the index entry first and the head
records after. A crash between the two leaves records without an entry;
`CustomStore.reconcile` removes them (and stray temp files) at start-up.

`umap/L{l}H{h}.json` is the scan's file; the server only replaces its
`clusters` key and appends to its `projected_points` (`UmapStore`), keeping
every other key as the scan wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from headvis.io import read_json, write_json
from headvis.server.limits import MAX_CUSTOM_SEQUENCES, MAX_PROJECTED_POINTS
from headvis.server.tree import DataTree
from headvis.server.validation import number_text

__all__ = ["CustomStore", "JsonFiles", "UmapStore", "find_edge"]


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

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """fn(*args) on the IO thread: file reads that are not a JSON body alone."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def read(self, path: Path, default: Callable[[], Any]) -> Any:
        """The file as it is now, parsed on the IO thread (writes are atomic renames, so no lock is needed)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, _read_or, Path(path), default)

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


def _empty_sequences() -> dict:
    return {"sequences": []}


class CustomStore:
    """custom_sequences/index.json and custom_sequences/L{l}H{h}.json of one data tree."""

    def __init__(self, tree: DataTree, files: JsonFiles):
        self.tree = tree
        self.files = files
        self._reserved = 0  # adds admitted but not yet listed

    async def entries(self) -> list[dict]:
        """The index entries as they are now."""
        return (await self.files.read(self.tree.custom_index, _empty_sequences))["sequences"]

    async def entry(self, sequence_id: str) -> dict | None:
        return next((e for e in await self.entries() if e["sequence_id"] == sequence_id), None)

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
        sequence_id = entry["sequence_id"]

        def put(item: dict) -> Change:
            def change(body: dict) -> tuple[dict, None]:
                body["sequences"] = [r for r in body["sequences"] if r["sequence_id"] != sequence_id] + [item]
                return body, None
            return change

        await asyncio.gather(*(
            self.files.update(self.tree.custom_head(layer, head), put(record), _empty_sequences)
            for (layer, head), record in records.items()
        ))
        await self.files.update(self.tree.custom_index, put(entry), _empty_sequences)

    async def delete(self, sequence_id: str) -> None:
        """Unlist the entry (404 if it is not listed), then drop it from every head file and umap file."""

        def drop(body: dict) -> tuple[dict | None, bool]:
            kept = [r for r in body["sequences"] if r["sequence_id"] != sequence_id]
            if len(kept) == len(body["sequences"]):
                return None, False
            return {**body, "sequences": kept}, True

        if not await self.files.update(self.tree.custom_index, drop, _empty_sequences):
            raise web.HTTPNotFound(text=f"no custom sequence {sequence_id!r}")
        await asyncio.gather(*(
            self.files.update(self.tree.custom_head(layer, head), drop, _empty_sequences)
            for layer, head in self.tree.scanned_heads
            if self.tree.custom_head(layer, head).exists()
        ))

        def forget(body: dict) -> tuple[dict | None, None]:
            """Projected points of the sequence, and cluster points naming it, leave the umap file too."""
            points = [p for p in body.get("projected_points", []) if p["seq_idx"] != sequence_id]
            clusters = [{**c, "points": [t for t in c["points"] if t[0] != sequence_id]} for c in body.get("clusters", [])]
            if len(points) == len(body.get("projected_points", [])) and clusters == body.get("clusters", []):
                return None, None
            return {**body, "projected_points": points, "clusters": clusters}, None

        await asyncio.gather(*(
            self.files.update(self.tree.umap_head(layer, head), forget, dict)
            for layer, head in self.tree.scanned_heads
            if self.tree.umap_head(layer, head).exists()
        ))

    def reconcile(self) -> int:
        """At start-up: drop head records whose id is not listed, and stray temp files. Returns records dropped."""
        folder = self.tree.custom_dir
        for path in _stray_temp_files(folder) + _stray_temp_files(self.tree.umap_dir):
            path.unlink(missing_ok=True)
        if not folder.is_dir():
            return 0
        listed = {e["sequence_id"] for e in _read_or(self.tree.custom_index, _empty_sequences)["sequences"]}
        dropped = 0
        for path in sorted(folder.glob("L*H*.json")):
            body = read_json(path)
            kept = [r for r in body["sequences"] if r["sequence_id"] in listed]
            if len(kept) != len(body["sequences"]):
                dropped += len(body["sequences"]) - len(kept)
                write_json(path, {**body, "sequences": kept}, rounded=True)
        return dropped


def find_edge(umap: dict, seq_idx: int | str, query_pos: int, key_pos: int) -> dict | None:
    """The project_to_umap reply for an edge already in a umap file (cloud first, then projected), else None."""
    for i, edge in enumerate(zip(umap["seq_idx"], umap["top_q"], umap["top_k"])):
        if edge == (seq_idx, query_pos, key_pos):
            return {"found_in_cloud": True, "existing_index": i}
    for i, point in enumerate(umap.get("projected_points", [])):
        if (point["seq_idx"], point["top_q"], point["top_k"]) == (seq_idx, query_pos, key_pos):
            return {"found_in_cloud": False, "found_in_projected": True, "projected_index": i}
    return None


class UmapStore:
    """The server's two changes to umap/L{l}H{h}.json: `clusters` replaced, `projected_points` appended."""

    def __init__(self, tree: DataTree, files: JsonFiles):
        self.tree = tree
        self.files = files

    def _missing(self, layer: int, head: int) -> Callable[[], dict]:
        def missing() -> dict:
            raise web.HTTPConflict(text=f"L{layer}H{head} has no projection file (umap/L{layer}H{head}.json)")
        return missing

    async def read(self, layer: int, head: int) -> dict:
        """umap/L{l}H{h}.json as it is now; 409 when the scan wrote none."""
        return await self.files.read(self.tree.umap_head(layer, head), self._missing(layer, head))

    async def save_clusters(self, layer: int, head: int, clusters: list[dict]) -> int:
        """Replace the file's `clusters`; 400 when a point is neither a cloud point nor a projected point. Returns how many.

        Projected points count: the reference frontend draws them in the cloud, so a lasso selects them too.
        """

        def change(body: dict) -> tuple[dict, int]:
            cloud = set(zip(body["seq_idx"], body["top_q"], body["top_k"]))
            cloud |= {(p["seq_idx"], p["top_q"], p["top_k"]) for p in body.get("projected_points", [])}
            for i, cluster in enumerate(clusters):
                for j, point in enumerate(cluster["points"]):
                    if tuple(point) not in cloud:
                        shown = ", ".join(number_text(x) for x in point)
                        raise web.HTTPBadRequest(text=f"clusters.{i}.points.{j}: [{shown}] is not a point of "
                                                      f"L{layer}H{head}'s cloud nor a projected point "
                                                      f"(umap/L{layer}H{head}.json)")
            return {**body, "clusters": clusters}, len(clusters)

        return await self.files.update(self.tree.umap_head(layer, head), change, self._missing(layer, head))

    @staticmethod
    def check_room(umap: dict, layer: int, head: int) -> None:
        """409 (before any forward pass) when the head's projected points are at MAX_PROJECTED_POINTS."""
        if len(umap.get("projected_points", [])) >= MAX_PROJECTED_POINTS:
            raise _projected_full(layer, head)

    async def add_projected(self, layer: int, head: int, point: dict) -> dict:
        """Append a new point to `projected_points`; the project_to_umap reply. 409 past MAX_PROJECTED_POINTS.

        An edge that reached the file since the caller looked (a concurrent request for the same
        edge) is not appended twice: the reply then names the one already there.
        """

        def change(body: dict) -> tuple[dict | None, dict]:
            found = find_edge(body, point["seq_idx"], point["top_q"], point["top_k"])
            if found is not None:
                return None, found
            UmapStore.check_room(body, layer, head)
            body["projected_points"] = [*body.get("projected_points", []), point]
            return body, {"found_in_cloud": False, "found_in_projected": False, "point": point}

        return await self.files.update(self.tree.umap_head(layer, head), change, self._missing(layer, head))


def _projected_full(layer: int, head: int) -> web.HTTPConflict:
    return web.HTTPConflict(text=f"L{layer}H{head} already has {MAX_PROJECTED_POINTS} projected points, the most "
                                 f"the server keeps; remove some from umap/L{layer}H{head}.json to project more")

