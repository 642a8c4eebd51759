"""Model work of the server: custom-sequence records, projections and attributions of one attention edge.

Everything that touches the model or the tokenizer runs on one worker
thread (`ModelJobs`), one job at a time, off the event loop: a forward pass
is CPU- or GPU-bound, and neither a fast tokenizer nor the capture session
may be used from two threads at once.

Custom records go through `headvis.pipeline.sequence_records`, the function
the scan uses for its head files, so metrics and sparsification have one
implementation. An edge's Q/K/V/O vectors come from
`headvis.pipeline.head_vectors` (what the scan gathers for its cloud) and
its PCA coordinates from the saved rotation (`headvis.projection.project_pca`).
A head whose umap file has `views` (UMAP) places a new point by
nearest-neighbour interpolation: the cloud points' vectors are recomputed
once by running the model on their sequences (token ids from the head's
file, cached per head), and each new point goes to the inverse-distance-
weighted mean of the view coordinates of its `NEIGHBOURS` nearest cloud
points, distances taken in that vector's own space. Nothing is unpickled.

Attributions are `headvis.attributions.qk_attribution` / `ov_attribution`
(their own forward pass over the sequence, then the decomposition of one
edge); an OV target dictionary's input at the query position comes from
`headvis.dictionaries.capture_hooks` (a forward pass stopped at its hook).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
from aiohttp import web

from headvis.attributions import ov_attribution, qk_attribution
from headvis.backends import resolve_backend
from headvis.capture import CaptureSession, LayerCapture
from headvis.datasets import prefix_token
from headvis.dictionaries import capture_hooks
from headvis.errors import HeadvisError
from headvis.io import round_sig
from headvis.metrics import distance_bin_edges
from headvis.models import LoadedModel, output_projections
from headvis.pipeline import HeadSelection, Tokens, head_vectors, sequence_records
from headvis.projection import COMPONENTS, VECTORS, project_pca
from headvis.server.attributions import Served, describer
from headvis.server.limits import MAX_PENDING_JOBS, MAX_TOKENS, NEIGHBOURS
from headvis.server.store import checked_json
from headvis.server.tree import DataTree

__all__ = ["Edge", "ModelJobs", "ModelWorker", "check_model_matches", "custom_id", "interpolate_view", "json_ready"]

T = TypeVar("T")

CUSTOM_INTERVAL = -1  # CONTRACT section 2: custom sequences have interval -1
_CLOUD_CACHE = 16  # heads whose recomputed cloud vectors are kept (~6 MB each at 2000 points)
_CLOUD_BATCH = 8  # cloud sequences per forward pass when recomputing a head's cloud
# Recomputed cloud points must land on their saved PCA coordinates within this fraction of the
# coordinates' range: more means another model (or other weights) than the scan used.
_REPRODUCE_TOLERANCE = 0.02
_MODEL_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")


def check_model_matches(lm: LoadedModel, tree: DataTree) -> None:
    """HeadvisError unless the loaded model has the scanned model's shape (a --model override may not)."""
    scanned = tree.config["model"]
    for field in _MODEL_FIELDS:
        if field in scanned and getattr(lm.info, field) != scanned[field]:
            raise HeadvisError(
                f"model {lm.info.name!r} has {field}={getattr(lm.info, field)}, but the scan in {tree.root} "
                f"used {scanned.get('name')!r} with {field}={scanned[field]}; serve it with the scanned model"
            )


def json_ready(record: dict) -> dict:
    """A `sequence_records` record as plain Python with floats rounded as `headvis.io.write_json` rounds them."""
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            value = round_sig(value) if value.dtype.kind == "f" else value.tolist()
        elif isinstance(value, (float, np.floating)):
            value = round_sig(np.asarray([value]))[0]
        out[key] = value
    return out


def custom_id(text: str, created: str) -> str:
    """'c' + 12 hex digits: the start of SHA-256 of the text, the creation time and 8 random bytes."""
    digest = hashlib.sha256(f"{text}\x00{created}\x00{secrets.token_hex(8)}".encode("utf-8", "surrogatepass"))
    return "c" + digest.hexdigest()[:12]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tree_json(path) -> dict:
    """A data-tree file the scan wrote; missing or unreadable is the tree's state (409), not a server bug."""
    try:
        return checked_json(path)
    except FileNotFoundError as e:
        raise web.HTTPConflict(text=f"the data tree has no {path.parent.name}/{path.name}") from e
    except (OSError, ValueError) as e:
        raise web.HTTPConflict(text=f"the data tree's {path.parent.name}/{path.name} is unreadable ({e})") from e


def _stack(part: dict) -> np.ndarray:
    """{"d0": (n,), "d1": (n,), "d2": (n,)} -> (n, COMPONENTS)."""
    return np.stack([np.asarray(part[f"d{i}"], dtype=np.float64) for i in range(COMPONENTS)], axis=1)


def _xyz(row: np.ndarray) -> dict[str, float]:
    """(COMPONENTS,) -> {"d0": x, "d1": y, "d2": z}, rounded as the tree's files are."""
    return {f"d{i}": v for i, v in enumerate(round_sig(row))}


def interpolate_view(anchors: np.ndarray, coords: np.ndarray, points: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(m, c) view coordinates of `points` (m, dim) from `anchors` (n, dim) placed at `coords` (n, c).

    Each point goes to the inverse-distance-weighted mean of its k nearest
    anchors' coordinates; a point that coincides with an anchor (distance
    below 1e-9 of the anchors' scale) takes that anchor's coordinates.
    """
    anchors = np.asarray(anchors, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.zeros((0, coords.shape[1]))
    k = min(k, len(anchors))
    # squared distances by expansion, (m, n); only used to pick the k nearest
    d2 = (points**2).sum(1)[:, None] + (anchors**2).sum(1)[None, :] - 2.0 * points @ anchors.T
    nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (m, k)
    dist = np.linalg.norm(points[:, None, :] - anchors[nearest], axis=-1)  # (m, k), exact
    scale = max(float(np.abs(anchors).max(initial=0.0)), 1e-30)
    exact = dist <= 1e-9 * scale
    weights = np.where(exact.any(1, keepdims=True), exact.astype(np.float64), 1.0 / np.maximum(dist, 1e-300))
    return (weights[..., None] * coords[nearest]).sum(1) / weights.sum(1, keepdims=True)


@dataclass(frozen=True)
class Edge:
    """One attention edge of a sequence the tree holds: what project_to_umap places."""

    seq_idx: int | str  # a scanned id or a custom id
    token_ids: list[int]  # (seq_len,)
    tokens: list[str]  # (seq_len,) display strings
    query_pos: int
    key_pos: int


@dataclass
class _Cloud:
    """One head's projection cloud: the recomputed vectors and the saved view coordinates."""

    vectors: dict[str, np.ndarray]  # Q/K/V/O -> (n_points, dim)
    views: list[dict[str, np.ndarray]]  # per view of the umap file: Q/K/V/O -> (n_points, COMPONENTS)


class ModelWorker:
    """The loaded model and the scan's settings; every method runs on the model thread."""

    def __init__(self, lm: LoadedModel, tree: DataTree):
        check_model_matches(lm, tree)
        info = lm.info
        self.lm = lm
        self.tree = tree
        # the heads of every scanned layer; `sequence_records` only keeps the scanned pairs
        self.selection = HeadSelection(tree.layers, tree.heads, info.n_heads, info.n_kv_heads)
        self.backend, self.row_stats = resolve_backend("auto", lm.device)
        self.tokens = Tokens(lm.tokenizer)
        self.max_tokens = min(MAX_TOKENS, info.max_positions or MAX_TOKENS)
        self.w_o = output_projections(lm.model)
        self._prefix = prefix_token(lm.tokenizer)
        self._clouds: OrderedDict[tuple[int, int], _Cloud] = OrderedDict()

    # -- custom sequences
    def encode(self, text: str) -> tuple[list[int], bool]:
        """(token ids, truncated): the scan's layout, [BOS] + text tokens, cut to `max_tokens`."""
        body = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([self._prefix] if self._prefix is not None else []) + [int(i) for i in body]
        if len(ids) < 2:
            raise web.HTTPBadRequest(text="text gives fewer than 2 tokens (every metric skips row 0); add some text")
        return ids[: self.max_tokens], len(ids) > self.max_tokens

    def custom_records(self, text: str, *, sequence_id: str | None = None,
                       created: str | None = None) -> tuple[dict, dict[tuple[int, int], dict]]:
        """(index.json entry, (layer, head) -> custom head-file record) of a custom sequence, one forward pass.

        A new sequence gets a fresh id and time; a rescan recomputing one passes its own.
        """
        ids, truncated = self.encode(text)
        created = created or _now()
        sequence_id = sequence_id or custom_id(text, created)
        wanted = {key: {sequence_id: CUSTOM_INTERVAL} for key in self.tree.scanned_heads}
        records = sequence_records(
            self.lm, torch.tensor([ids], dtype=torch.int64), [sequence_id], wanted, self.selection, self.row_stats,
            top_k=int(self.tree.config["top_k"]), min_weight=float(self.tree.config["min_weight"]),
            bin_edges=distance_bin_edges(len(ids), self.lm.info.causal), batch_size=1,
            tokens=self.tokens, progress=False,
        )
        entry = {"sequence_id": sequence_id, "text": text, "tokens": self.tokens(ids), "token_ids": ids,
                 "created": created, "truncated": truncated}
        return entry, {key: {**json_ready(per_seq[sequence_id]), "text": text, "created": created}
                       for key, per_seq in records.items()}

    # -- projections
    def _vectors(self, layer: int, head: int, input_ids: torch.Tensor, rows: np.ndarray, query_pos: np.ndarray,
                 key_pos: np.ndarray) -> dict[str, np.ndarray]:
        """Q/K/V/O of one head at the n edges (rows[i], query_pos[i], key_pos[i]) of input_ids (batch, pos)."""
        selection = HeadSelection([layer], [head], self.selection.n_heads, self.selection.n_kv_heads)
        device = self.lm.device
        as_index = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64, device=device)  # noqa: E731
        out: dict[str, np.ndarray] = {}

        def on_layer(capture: LayerCapture) -> None:
            vectors = head_vectors(capture, selection, self.w_o[layer], as_index(rows), as_index(query_pos),
                                   as_index(key_pos))[head]
            out.update(vectors)

        with CaptureSession(self.lm.model, {layer}, on_layer) as session:
            session.run(input_ids.to(device))
        return out

    def _cloud(self, layer: int, head: int, umap: dict, rotation: dict) -> _Cloud:
        """The head's cloud vectors recomputed, checked against their saved PCA coordinates; LRU-cached."""
        key = (layer, head)
        if key in self._clouds:
            self._clouds.move_to_end(key)
            return self._clouds[key]
        shown = {s["sequence_id"]: s["token_ids"] for s in _tree_json(self.tree.head_file(layer, head))["sequences"]}
        seq_idx = np.asarray(umap["seq_idx"], dtype=np.int64)  # (n_points,)
        order = list(dict.fromkeys(int(s) for s in seq_idx))
        missing = [s for s in order if s not in shown]
        if missing:
            raise web.HTTPConflict(text=f"umap/L{layer}H{head}.json names sequence {missing[0]}, which "
                                        f"heads/L{layer}H{head}.json does not hold")
        if len({len(shown[s]) for s in order}) > 1:
            raise web.HTTPConflict(text=f"the sequences of L{layer}H{head}'s cloud have different lengths")
        top_q = np.asarray(umap["top_q"], dtype=np.int64)
        top_k = np.asarray(umap["top_k"], dtype=np.int64)
        parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        for start in range(0, len(order), _CLOUD_BATCH):
            batch = order[start : start + _CLOUD_BATCH]
            row_of = {s: b for b, s in enumerate(batch)}
            points = np.flatnonzero(np.isin(seq_idx, batch))  # cloud indices whose sequence is in this batch
            rows = np.array([row_of[int(s)] for s in seq_idx[points]], dtype=np.int64)
            input_ids = torch.tensor([shown[s] for s in batch], dtype=torch.int64)
            parts.append((points, self._vectors(layer, head, input_ids, rows, top_q[points], top_k[points])))
        index = np.concatenate([p for p, _ in parts])
        vectors = {}
        for name in VECTORS:
            stacked = np.concatenate([v[name] for _, v in parts])
            vectors[name] = np.empty_like(stacked)
            vectors[name][index] = stacked  # back in the umap file's order
            saved = _stack(umap["pca"][name])
            mine = project_pca(vectors[name], rotation[name])
            scale = max(float(np.ptp(saved)), 1e-6)
            deviation = float(np.abs(mine - saved).max(initial=0.0)) / scale
            if deviation > _REPRODUCE_TOLERANCE:
                raise web.HTTPConflict(text=(
                    f"the loaded model does not reproduce the scan's {name} points of L{layer}H{head} "
                    f"(off by {deviation:.1%} of their range): is it the model the scan used?"))
        views = [{name: _stack(view["embeddings"][name]) for name in VECTORS} for view in umap.get("views", [])]
        cloud = _Cloud(vectors=vectors, views=views)
        self._clouds[key] = cloud
        while len(self._clouds) > _CLOUD_CACHE:
            self._clouds.popitem(last=False)
        return cloud

    def project(self, layer: int, head: int, edge: Edge) -> dict:
        """The `projected_points` entry of a new edge: its norm, PCA and UMAP-view coordinates, tokens."""
        umap = _tree_json(self.tree.umap_head(layer, head))
        rotation = _tree_json(self.tree.umap_rotation(layer, head))
        if not umap["seq_idx"] or any(name not in rotation for name in VECTORS):
            raise web.HTTPConflict(text=f"L{layer}H{head} has an empty projection cloud (the scan found no strong "
                                        "edges), so there is no rotation to project onto")
        vectors = self._vectors(layer, head, torch.tensor([edge.token_ids], dtype=torch.int64),
                                np.zeros(1, dtype=np.int64), np.array([edge.query_pos]), np.array([edge.key_pos]))
        umap_views = []
        if umap.get("views"):
            cloud = self._cloud(layer, head, umap, rotation)
            umap_views = [{name: _xyz(interpolate_view(cloud.vectors[name], view[name], vectors[name])[0])
                           for name in VECTORS} for view in cloud.views]
        return {
            "seq_idx": edge.seq_idx,
            "top_q": edge.query_pos,
            "top_k": edge.key_pos,
            "norm": round_sig(np.linalg.norm(vectors["Q"], axis=1))[0],
            "pca": {name: _xyz(project_pca(vectors[name], rotation[name])[0]) for name in VECTORS},
            "umap_views": umap_views,
            "tokens": edge.tokens,
        }

    # -- attributions
    def attribution(self, kind: str, layer: int, head: int, edge: Edge, source: Served,
                    target: Served | None = None) -> dict:
        """The attribution file body (kind "qk" or "ov") of one edge; HeadvisError (400) for an edge edge.py refuses."""
        args = (self.lm, source.dictionary, edge.token_ids, edge.seq_idx, layer, head, edge.query_pos, edge.key_pos)
        if kind == "qk":
            return qk_attribution(*args, describe=describer([source]))
        target_input = None
        if target is not None:
            hook = target.dictionary.hook_name
            ids = torch.tensor([edge.token_ids], dtype=torch.int64)
            target_input = capture_hooks(self.lm.model, [hook], ids)[hook][0, edge.query_pos]  # (d_model,)
        return ov_attribution(*args, target=None if target is None else target.dictionary, target_input=target_input,
                              describe=describer([source] + ([target] if target is not None else [])))


class ModelJobs:
    """A single worker thread for model jobs, with a bound on how many may wait."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headvis-model")
        self._pending = 0

    async def run(self, job: Callable[[ModelWorker], T]) -> T:
        """Run job(worker) on the model thread; 429 when MAX_PENDING_JOBS are already queued or running."""
        if self._pending >= MAX_PENDING_JOBS:
            raise web.HTTPTooManyRequests(text=f"the model is busy ({self._pending} jobs queued); retry shortly")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job, self.worker)
        finally:
            self._pending -= 1

    def close(self) -> None:
        """Finish the running job, drop queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
