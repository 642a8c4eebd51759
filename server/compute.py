"""Model work of the server: custom-sequence records and prompt projections.

Everything that touches the model or the tokenizer runs on one worker
thread (`ModelJobs`), one job at a time, off the event loop: a forward pass
is CPU- or GPU-bound, and neither a fast tokenizer nor the capture session
may be used from two threads at once.

Custom records go through `headvis.pipeline.sequence_records`, the function
the scan uses for its head files, so metrics and sparsification have one
implementation. Projections use the saved PCA rotations
(`headvis.projection.project_pca`). A head whose file has `views` (UMAP) gets
new points by nearest-neighbour interpolation: the scan points' vectors are
recomputed once by running the model on `umap/sequences.json` (cached per
head), and each new point is placed at the inverse-distance-weighted mean of
the view coordinates of its `NEIGHBOURS` nearest scan points, distances taken
in the head's own vector space (q, k, v or o). Nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
from aiohttp import web

from headvis.backends import resolve_backend
from headvis.capture import CaptureSession, LayerCapture
from headvis.datasets import prefix_token
from headvis.errors import HeadvisError
from headvis.io import read_json, round_sig
from headvis.metrics import distance_bin_edges
from headvis.models import LoadedModel, output_projections
from headvis.pipeline import HeadSelection, Tokens, head_vectors, sequence_records
from headvis.projection import VECTORS, project_pca
from headvis.server.limits import MAX_PENDING_JOBS, MAX_TOKENS, NEIGHBOURS
from headvis.server.tree import DataTree

__all__ = ["ModelJobs", "ModelWorker", "check_model_matches", "interpolate_view", "json_ready"]

T = TypeVar("T")

CUSTOM_INTERVAL = -1  # CONTRACT section 2: custom sequences have interval -1
_SCAN_POINT_CACHE = 16  # heads whose recomputed scan vectors are kept (~6 MB each at 2000 points)
# Recomputed scan points must land on their saved PCA coordinates within this fraction of the
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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tree_json(path) -> dict:
    """A data-tree file the scan wrote; missing or unreadable is the tree's state (409), not a server bug."""
    try:
        return read_json(path)
    except FileNotFoundError as e:
        raise web.HTTPConflict(text=f"the data tree has no {path.parent.name}/{path.name}") from e
    except (OSError, ValueError) as e:
        raise web.HTTPConflict(text=f"the data tree's {path.parent.name}/{path.name} is unreadable ({e})") from e


def interpolate_view(anchors: np.ndarray, coords: np.ndarray, points: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(m, 2) view coordinates of `points` (m, dim) from `anchors` (n, dim) placed at `coords` (n, 2).

    Each point goes to the inverse-distance-weighted mean of its k nearest
    anchors' coordinates; a point that coincides with an anchor (distance
    below 1e-9 of the anchors' scale) takes that anchor's coordinates.
    """
    anchors = np.asarray(anchors, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.zeros((0, 2))
    k = min(k, len(anchors))
    # squared distances by expansion, (m, n); only used to pick the k nearest
    d2 = (points**2).sum(1)[:, None] + (anchors**2).sum(1)[None, :] - 2.0 * points @ anchors.T
    nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (m, k)
    dist = np.linalg.norm(points[:, None, :] - anchors[nearest], axis=-1)  # (m, k), exact
    scale = max(float(np.abs(anchors).max(initial=0.0)), 1e-30)
    exact = dist <= 1e-9 * scale
    weights = np.where(exact.any(1, keepdims=True), exact.astype(np.float64), 1.0 / np.maximum(dist, 1e-300))
    return (weights[..., None] * coords[nearest]).sum(1) / weights.sum(1, keepdims=True)


@dataclass
class _ScanPoints:
    """One head's projection cloud: the recomputed vectors and the saved view coordinates."""

    vectors: dict[str, np.ndarray]  # q/k/v/o -> (n_points, dim)
    views: dict[str, dict[str, np.ndarray]]  # view name -> q/k/v/o -> (n_points, 2)


class ModelWorker:
    """The loaded model and the scan's settings; every method runs on the model thread."""

    def __init__(self, lm: LoadedModel, tree: DataTree):
        check_model_matches(lm, tree)
        info = lm.info
        self.lm = lm
        self.tree = tree
        self.selection = HeadSelection(tree.layers, tree.heads, info.n_heads, info.n_kv_heads)
        self.backend, self.row_stats = resolve_backend("auto", lm.device)
        self.tokens = Tokens(lm.tokenizer)
        self.max_tokens = min(MAX_TOKENS, info.max_positions or MAX_TOKENS)
        self.w_o = output_projections(lm.model)
        self._prefix = prefix_token(lm.tokenizer)
        self._scan_points: OrderedDict[tuple[int, int], _ScanPoints] = OrderedDict()

    # -- prompts
    def encode(self, text: str) -> tuple[list[int], bool]:
        """(token ids, truncated): the scan's layout, [BOS] + text tokens, cut to `max_tokens`."""
        body = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([self._prefix] if self._prefix is not None else []) + [int(i) for i in body]
        if len(ids) < 2:
            raise web.HTTPBadRequest(text="text gives fewer than 2 tokens (every metric skips row 0); add some text")
        return ids[: self.max_tokens], len(ids) > self.max_tokens

    def custom_records(self, text: str) -> tuple[dict, dict[tuple[int, int], dict]]:
        """(sequences.json entry, (layer, head) -> head-file record) of a new custom sequence."""
        ids, truncated = self.encode(text)
        sid = f"c-{secrets.token_hex(6)}"
        wanted = {key: {sid: CUSTOM_INTERVAL} for key in self.tree.scanned_heads}
        records = sequence_records(
            self.lm, torch.tensor([ids], dtype=torch.int64), [sid], wanted, self.selection, self.row_stats,
            top_k=int(self.tree.config["top_k"]), min_weight=float(self.tree.config["min_weight"]),
            bin_edges=distance_bin_edges(len(ids), self.lm.info.causal), batch_size=1,
            tokens=self.tokens, progress=False,
        )
        entry = {"id": sid, "text": text, "tokens": self.tokens(ids), "token_ids": ids,
                 "created": _now(), "truncated": truncated}
        return entry, {key: json_ready(per_seq[sid]) for key, per_seq in records.items()}

    # -- projections
    def _vectors(self, layer: int, head: int, input_ids: torch.Tensor, rows: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """q/k/v/o of one head at (rows[i], positions[i]) of input_ids (batch, pos)."""
        selection = HeadSelection([layer], [head], self.selection.n_heads, self.selection.n_kv_heads)
        device = self.lm.device
        rows_t = torch.as_tensor(rows, dtype=torch.int64, device=device)
        positions_t = torch.as_tensor(positions, dtype=torch.int64, device=device)
        out: dict[str, np.ndarray] = {}

        def on_layer(capture: LayerCapture) -> None:
            vectors = head_vectors(capture, selection, self.w_o[layer], rows_t, positions_t)[head]
            out.update({name: np.asarray(v, dtype=np.float64) for name, v in vectors.items()})

        with CaptureSession(self.lm.model, {layer}, on_layer) as session:
            session.run(input_ids.to(device))
        return out

    def _points_of(self, layer: int, head: int, head_file: dict, rotation: dict) -> _ScanPoints:
        """The head's scan points recomputed, checked against their saved PCA coordinates; LRU-cached."""
        key = (layer, head)
        if key in self._scan_points:
            self._scan_points.move_to_end(key)
            return self._scan_points[key]
        sequences = _tree_json(self.tree.umap_sequences)["sequences"]
        lengths = {len(s["token_ids"]) for s in sequences}
        if len(lengths) != 1:
            raise web.HTTPConflict(text="umap/sequences.json holds sequences of different lengths")
        row_of = {s["id"]: i for i, s in enumerate(sequences)}
        try:
            rows = np.array([row_of[s] for s in head_file["points"]["seq"]], dtype=np.int64)
        except KeyError as e:
            raise web.HTTPConflict(text=f"umap/L{layer}H{head}.json names sequence {e} absent from umap/sequences.json") from e
        positions = np.asarray(head_file["points"]["pos"], dtype=np.int64)
        input_ids = torch.tensor([s["token_ids"] for s in sequences], dtype=torch.int64)
        vectors = self._vectors(layer, head, input_ids, rows, positions)
        for name in VECTORS:
            saved = np.asarray(head_file["pca"][name]["coords"], dtype=np.float64)
            mine = project_pca(vectors[name], rotation[name])
            scale = max(float(np.ptp(saved)), 1e-6)
            deviation = float(np.abs(mine - saved).max(initial=0.0)) / scale
            if deviation > _REPRODUCE_TOLERANCE:
                raise web.HTTPConflict(text=(
                    f"the loaded model does not reproduce the scan's {name} points of L{layer}H{head} "
                    f"(off by {deviation:.1%} of their range): is it the model the scan used?"))
        views = {view: {name: np.asarray(coords[name], dtype=np.float64) for name in VECTORS}
                 for view, coords in head_file.get("views", {}).items()}
        points = _ScanPoints(vectors=vectors, views=views)
        self._scan_points[key] = points
        while len(self._scan_points) > _SCAN_POINT_CACHE:
            self._scan_points.popitem(last=False)
        return points

    def project(self, layer: int, head: int, ids: list[int]) -> dict:
        """The project_to_umap reply for token ids: positions >= 1, as the scan's points."""
        head_file = _tree_json(self.tree.umap_head(layer, head))
        rotation = _tree_json(self.tree.umap_rotation(layer, head))
        positions = np.arange(1, len(ids))
        vectors = self._vectors(layer, head, torch.tensor([ids], dtype=torch.int64),
                                np.zeros_like(positions), positions)
        reply = {
            "layer": layer, "head": head, "tokens": self.tokens(ids), "token_ids": ids,
            "points": {"pos": positions.tolist()},
            "pca": {name: round_sig(project_pca(vectors[name], rotation[name])) for name in VECTORS},
        }
        if head_file.get("views"):
            scan = self._points_of(layer, head, head_file, rotation)
            reply["views"] = {
                view: {name: round_sig(interpolate_view(scan.vectors[name], coords[name], vectors[name]))
                       for name in VECTORS}
                for view, coords in scan.views.items()
            }
        return reply

    def project_text(self, layer: int, head: int, text: str) -> dict:
        ids, truncated = self.encode(text)
        return {**self.project(layer, head, ids), "truncated": truncated}


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
