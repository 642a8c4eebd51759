"""The files the server changes: custom sequences, and the clusters and projected points of umap files.

Every write is atomic (`headvis.io.atomic_write_bytes`: temp file + rename), and a
read-modify-write of a shared file runs under that file's own asyncio lock,
with the file IO itself on a thread, so concurrent requests never lose a
write and never block the event loop. Changes that wait for a file's lock
are applied together by the next write (`JsonFiles`).

Custom sequences live one folder per sequence (`headvis.custom`): an add
writes its own records and renames them into place, a delete renames them
away, so neither leaves a partial sequence and an add's cost does not grow
with the number of sequences. `CustomStore` keeps the listing in memory (the
tree lock makes this process the only writer) and answers the contract's
`custom_sequences/index.json` and `L{l}H{h}.json` from the store; the files
of those names are a snapshot for static hosts, rewritten at shutdown.

`umap/L{l}H{h}.json` is the scan's file; the server only replaces its
`clusters` key and appends to its `projected_points` (`UmapStore`), keeping
every other key as the scan wrote it.

A tree file that cannot be read as the JSON it should be (truncated,
replaced by a folder) is the tree's state, not a bug: a 409 that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from headvis.custom import CustomFolder
from headvis.io import read_json, write_json
from headvis.server.limits import MAX_CUSTOM_SEQUENCES, MAX_PROJECTED_POINTS
from headvis.server.tree import DataTree
from headvis.server.validation import number_text

__all__ = ["CustomStore", "JsonFiles", "UmapStore", "checked_json", "damaged", "find_edge"]


log = logging.getLogger("headvis.server")

Change = Callable[[Any], tuple[Any, Any]]  # old body -> (new body or None for "unchanged", result)


def damaged(path: Path, error: BaseException | str) -> web.HTTPConflict:
    """The 409 for a tree file that is not what the scan or the server wrote."""
    if isinstance(error, str):
        reason = error
    else:
        reason = getattr(error, "strerror", None) or (error.msg if isinstance(error, ValueError) and hasattr(error, "msg")
                                                      else type(error).__name__)
    return web.HTTPConflict(text=f"the data tree's {path.parent.name}/{path.name} is damaged ({reason}); "
                                 "restore it or re-scan")


def _shape_problem(path: Path, body: Any) -> str | None:
    """What the server relies on in a tree file and `body` lacks (the schemas hold the rest), or None."""
    if not isinstance(body, dict):
        return f"not a JSON object but {type(body).__name__}"
    if path.parent.name == "umap" and path.name.startswith("L") and not path.name.endswith(".rotation.json"):
        for key in ("seq_idx", "top_q", "top_k"):
            if not isinstance(body.get(key), list):
                return f"no `{key}` list"
        if len({len(body[key]) for key in ("seq_idx", "top_q", "top_k")}) > 1:
            return "`seq_idx`, `top_q` and `top_k` differ in length"
        for key in ("projected_points", "clusters"):
            if not isinstance(body.get(key, []), list) or not all(isinstance(x, dict) for x in body.get(key, [])):
                return f"`{key}` is not a list of objects"
    if path.parent.name == "heads":
        sequences = body.get("sequences")
        if not isinstance(sequences, list) or not all(
                isinstance(x, dict) and {"sequence_id", "token_ids", "tokens"} <= set(x) for x in sequences):
            return "`sequences` is not a list of sequence records"
    return None


def checked_json(path: Path) -> Any:
    """A tree file read and checked for what the server uses (`_shape_problem`); 409 when it falls short."""
    body = read_json(path)
    problem = _shape_problem(path, body)
    if problem is not None:
        raise damaged(path, problem)
    return body


def _read_or(path: Path, default: Callable[[], Any]) -> Any:
    try:
        return checked_json(path)
    except FileNotFoundError:
        return default()
    except (OSError, ValueError) as e:  # truncated, not UTF-8, a folder in its place
        raise damaged(path, e) from e


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
                        if waiting is not future and not waiting.done():  # this one's caller gets the raise
                            waiting.set_exception(e if isinstance(e, Exception) else RuntimeError("write interrupted"))
                    raise
                for (_, waiting), (ok, value) in zip(batch, outcomes):
                    waiting.set_result(value) if ok else waiting.set_exception(value)
        return future.result()


def _forget(sequence_ids: set[str]) -> Change:
    """The change that drops projected points of these custom sequences, and cluster points naming them."""

    def change(body: dict) -> tuple[dict | None, None]:
        points = [p for p in body.get("projected_points", []) if p["seq_idx"] not in sequence_ids]
        clusters = [{**c, "points": [t for t in c["points"] if t[0] not in sequence_ids]}
                    for c in body.get("clusters", [])]
        if len(points) == len(body.get("projected_points", [])) and clusters == body.get("clusters", []):
            return None, None
        return {**body, "projected_points": points, "clusters": clusters}, None

    return change


def _stray_temp_files(folder: Path) -> list[Path]:
    """Temp files of `headvis.io.atomic_write_bytes` (`.NAME.XXXX.tmp`) left by a killed process."""
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


class CustomStore:
    """custom_sequences/ of one data tree (`headvis.custom.CustomFolder`), with its listing kept in memory.

    The tree's lock (`headvis.lock`) makes this process its only writer, so the
    listing read at start-up stays true: reads answer from it and from the
    stored records, never from the snapshot files, which `close` rewrites.
    """

    def __init__(self, tree: DataTree, files: JsonFiles):
        self.tree = tree
        self.files = files
        self.folder = CustomFolder(tree.custom_dir)
        self._folders: dict[str, Path] = {}  # sequence_id -> its store folder, in add order
        self._entries: dict[str, dict] = {}
        self._ids: frozenset[str] = frozenset()  # replaced, never changed: other threads read it
        self._reserved = 0  # adds admitted but not yet listed
        self._dirty = False  # the snapshot files lag the store

    def open(self) -> tuple[int, int, bool]:
        """At start-up (on a thread): reconcile, read the listing, bring the snapshot up to date.

        Returns (killed adds or deletes removed, sequences imported from a 0.2.0 tree, snapshot rewritten).
        A tree no server has opened yet (no `store/`) gets its snapshot rewritten once.
        """
        for path in _stray_temp_files(self.tree.umap_dir):
            path.unlink(missing_ok=True)
        first = not self.folder.migrated()  # the snapshot may hold records of a killed 0.2.0 add
        removed, imported = self.folder.reconcile(self.tree.scanned_heads)
        folders = self.folder.folders()
        self._folders = {CustomFolder.sequence_id(f): f for f in folders}
        self._entries = {e["sequence_id"]: e for e in self.folder.entries(folders)}
        self._ids = frozenset(self._entries)
        stale = first or not self.folder.current()
        if stale:
            self.folder.snapshot(self.tree.scanned_heads)
            self.folder.store.mkdir(exist_ok=True)
        if self.forget_unlisted():
            log.info("removed projected and cluster points of deleted custom sequences from the umap files")
        return removed, imported, stale

    def close(self) -> None:
        """At shutdown (on a thread): rewrite the snapshot files if anything changed."""
        if self._dirty:
            self.folder.snapshot(self.tree.scanned_heads)
            self._dirty = False

    def entries(self) -> list[dict]:
        return list(self._entries.values())

    def ids(self) -> frozenset[str]:
        """The listed custom ids; safe to call from any thread."""
        return self._ids

    def entry(self, sequence_id: str) -> dict | None:
        return self._entries.get(sequence_id)

    async def index_bytes(self) -> bytes:
        return await self.files.call(CustomFolder.index_bytes, self.entries())

    async def head_bytes(self, layer: int, head: int) -> bytes:
        return await self.files.call(CustomFolder.head_bytes, layer, head, list(self._folders.values()))

    @contextlib.asynccontextmanager
    async def reserve(self):
        """Admit one add, or 409 when MAX_CUSTOM_SEQUENCES are listed or being added."""
        if len(self._entries) + self._reserved >= MAX_CUSTOM_SEQUENCES:
            raise web.HTTPConflict(text=f"there are already {MAX_CUSTOM_SEQUENCES} custom sequences; delete some first")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    async def add(self, entry: dict, records: dict[tuple[int, int], dict]) -> None:
        """Store the sequence (all heads' records and the entry become visible together), then list it."""
        folder = await self.files.call(self.folder.add, entry, records)
        self._folders[entry["sequence_id"]] = folder
        self._entries[entry["sequence_id"]] = entry
        self._ids = frozenset(self._entries)
        self._dirty = True

    async def delete(self, sequence_id: str) -> None:
        """Unlist the sequence (404 if it is not listed), then drop its points from every umap file."""
        folder = self._folders.pop(sequence_id, None)
        if folder is None:
            raise web.HTTPNotFound(text=f"no custom sequence {sequence_id!r}")
        entry = self._entries.pop(sequence_id)
        self._ids = frozenset(self._entries)
        try:
            await self.files.call(self.folder.delete, folder)
        except BaseException:
            self._folders[sequence_id], self._entries[sequence_id] = folder, entry  # still stored: still listed
            self._ids = frozenset(self._entries)
            raise
        self._dirty = True
        # The delete is done. Its points in the umap files go next; a file that cannot be changed now (a full
        # disk, a damaged file) keeps them until the next start-up removes points of unlisted sequences.
        results = await asyncio.gather(*(
            self.files.update(self.tree.umap_head(layer, head), _forget({sequence_id}), dict)
            for layer, head in self.tree.scanned_heads
            if self.tree.umap_head(layer, head).exists()
        ), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for error in failed:
            if not isinstance(error, (OSError, web.HTTPException)):
                raise error
        if failed:
            log.warning("deleted %s, but %d umap files keep its points for now (%s); the next start removes them",
                        sequence_id, len(failed), failed[0])

    def forget_unlisted(self) -> int:
        """At start-up (on a thread): drop projected and cluster points of custom sequences no longer listed."""
        changed = 0
        for layer, head in self.tree.scanned_heads:
            path = self.tree.umap_head(layer, head)
            try:
                body = read_json(path)
            except (OSError, ValueError):
                continue  # a damaged umap file is reported when it is used
            if not isinstance(body, dict):
                continue
            named = {p.get("seq_idx") for p in body.get("projected_points", []) if isinstance(p, dict)}
            named |= {t[0] for c in body.get("clusters", []) if isinstance(c, dict) for t in c.get("points", [])
                      if isinstance(t, list) and t}
            gone = {x for x in named if isinstance(x, str) and x not in self._ids}
            if gone:
                new, _ = _forget(gone)(body)
                write_json(path, new, rounded=True)
                changed += 1
        return changed


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

