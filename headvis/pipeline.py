"""The scan pipeline: metrics over every sequence, then samples, then projections.

Pass 1 (`metric_pass`) walks every sequence through the model; each wanted
layer's queries and keys go through the row-statistics backend into a
`ScanAccumulator`. Pass 2 (`sequence_records`) runs only the sampled
sequences again and turns their top-K rows into the per-sequence records of
the head files; the server uses the same function for custom prompts. Pass 3
(`projection_pass`) fits PCA (and UMAP) of q/k/v/o per head on a small
sample of positions, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from headvis.accumulate import ScanAccumulator, sequence_argmax
from headvis.backends import RowStatsFn
from headvis.capture import CaptureSession, LayerCapture
from headvis.metrics import RowStats
from headvis.models import LoadedModel, output_projections
from headvis.projection import VECTORS, fit_head, gpu_libraries
from headvis.sampling import sparse_rows

__all__ = ["HeadSelection", "Tokens", "metric_pass", "projection_pass", "sequence_records"]


@dataclass(frozen=True)
class HeadSelection:
    """Which heads are scanned: every head of `heads` in every layer of `layers`."""

    layers: list[int]
    heads: list[int]  # query-head indices
    n_heads: int  # the model's query heads
    n_kv_heads: int

    @property
    def all_heads(self) -> bool:
        return self.heads == list(range(self.n_heads))

    def slice(self, capture: LayerCapture) -> tuple[Tensor, Tensor, Tensor]:
        """(query, key, value) of the scanned heads; under GQA with all heads, keys stay un-repeated."""
        if self.all_heads:
            return capture.query, capture.key, capture.value
        group = self.n_heads // self.n_kv_heads
        kv = [h // group for h in self.heads]
        return capture.query[:, self.heads], capture.key[:, kv], capture.value[:, kv]


class Tokens:
    """Token id -> display string (each id decoded alone, so " the" keeps its space), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        missing = [i for i in set(ids) if i not in self._cache]
        if missing:
            decoded = self.tokenizer.batch_decode([[i] for i in missing], clean_up_tokenization_spaces=False)
            self._cache.update(zip(missing, decoded))
        return [self._cache[i] for i in ids]


def _batches(ids: list[int], batch_size: int) -> list[list[int]]:
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def _row_stats(fn: RowStatsFn, selection: HeadSelection, capture: LayerCapture, tokens: Tensor, *, top_k: int, bin_edges: list[int]) -> RowStats:
    query, key, _ = selection.slice(capture)
    return fn(query, key, tokens, capture.spec, top_k=top_k, bin_edges=bin_edges)


def metric_pass(
    lm: LoadedModel,
    sequences: Tensor,
    selection: HeadSelection,
    fn: RowStatsFn,
    accumulator: ScanAccumulator,
    *,
    batch_size: int,
    bin_edges: list[int],
    after_batch: Callable[[ScanAccumulator], None] | None = None,
) -> None:
    """Pass 1: every sequence (n, seq_len) not yet seen by `accumulator` through the model into it.

    `after_batch(accumulator)` runs after each batch (the scan saves its resume checkpoint there).
    """
    state: dict = {}

    def on_layer(capture: LayerCapture) -> None:
        stats = _row_stats(fn, selection, capture, state["tokens"], top_k=0, bin_edges=bin_edges)
        accumulator.update(capture.layer, state["ids"], state["tokens"], stats)

    ids = [i for i in range(len(sequences)) if not accumulator.seq_seen[i]]
    with CaptureSession(lm.model, set(selection.layers), on_layer) as session:
        for batch in tqdm(_batches(ids, batch_size), desc="pass 1: metrics", unit="batch"):
            state["ids"] = torch.tensor(batch)
            state["tokens"] = sequences[batch].to(lm.device)
            session.run(state["tokens"])
            accumulator.count_tokens(state["ids"], state["tokens"])  # marks the batch seen: last
            if after_batch is not None:
                after_batch(accumulator)


def sequence_records(
    lm: LoadedModel,
    sequences: Tensor,
    seq_ids: list,
    wanted: dict[tuple[int, int], dict],
    selection: HeadSelection,
    fn: RowStatsFn,
    *,
    top_k: int,
    min_weight: float,
    bin_edges: list[int],
    batch_size: int,
    tokens: Tokens,
    progress: bool = True,
) -> dict[tuple[int, int], dict]:
    """Pass 2: the head-file record of each wanted (layer, head, sequence).

    sequences: (n, seq_len) token ids whose rows are named by `seq_ids`;
    wanted: (layer, head) -> {seq_id: interval}. Returns (layer, head) ->
    {seq_id: record} with the fields of CONTRACT section 2's `sequences`.
    """
    records: dict[tuple[int, int], dict] = {key: {} for key in wanted}
    needed = sorted({sid for per_head in wanted.values() for sid in per_head}, key=seq_ids.index)
    state: dict = {}

    def on_layer(capture: LayerCapture) -> None:
        stats = _row_stats(fn, selection, capture, state["tokens"], top_k=top_k, bin_edges=bin_edges)
        best, q, k = sequence_argmax(stats.max_nobos, stats.argmax_nobos)
        top_values = stats.top_values.float().cpu().numpy()
        top_indices = stats.top_indices.cpu().numpy()
        for slot, head in enumerate(selection.heads):
            per_head = wanted.get((capture.layer, head))
            if not per_head:
                continue
            for b, sid in enumerate(state["ids"]):
                if sid not in per_head:
                    continue
                indices, values = sparse_rows(top_values[b, slot], top_indices[b, slot], min_weight)
                token_ids = state["token_lists"][b]
                records[(capture.layer, head)][sid] = {
                    "id": sid,
                    "interval": per_head[sid],
                    "max_activation": float(best[b, slot]),
                    "argmax": [int(q[b, slot]), int(k[b, slot])],
                    "tokens": tokens(token_ids),
                    "token_ids": token_ids,
                    "seq_len": len(token_ids),
                    "attention_indices": indices,
                    "attention_values": values,
                }

    rows = {sid: i for i, sid in enumerate(seq_ids)}
    with CaptureSession(lm.model, set(selection.layers), on_layer) as session:
        batches = _batches(needed, batch_size)
        for batch in tqdm(batches, desc="pass 2: samples", unit="batch", disable=not progress):
            state["ids"] = batch
            state["tokens"] = sequences[[rows[s] for s in batch]].to(lm.device)
            state["token_lists"] = state["tokens"].cpu().tolist()
            session.run(state["tokens"])
    return records


def head_vectors(
    capture: LayerCapture, selection: HeadSelection, w_o: Tensor, rows: Tensor, positions: Tensor,
    *, as_numpy: bool = True,
) -> dict[int, dict]:
    """head -> {q, k, v: (n, d_head), o: (n, d_model)} at the (rows[i], positions[i]) points.

    o is the head's write to the residual stream: its attention output times
    its d_head-column slice of the output projection. as_numpy=False keeps
    float32 tensors on the capture's device.
    """
    host = (lambda t: t.float().cpu().numpy()) if as_numpy else (lambda t: t.float())
    query, key, value = selection.slice(capture)
    d_head = query.shape[-1]
    group = query.shape[1] // key.shape[1]
    out: dict[int, dict[str, np.ndarray]] = {}
    for slot, head in enumerate(selection.heads):
        per_head = capture.output[rows, positions, head]  # (n, d_head)
        o = per_head.float() @ w_o[:, head * d_head : (head + 1) * d_head].float().T  # (n, d_model)
        out[head] = {
            "q": host(query[rows, slot, positions]),
            "k": host(key[rows, slot // group, positions]),
            "v": host(value[rows, slot // group, positions]),
            "o": host(o),
        }
    return out


def projection_pass(
    lm: LoadedModel,
    sequences: Tensor,
    selection: HeadSelection,
    points: tuple[np.ndarray, np.ndarray],
    *,
    with_umap: bool,
    seed: int,
    on_head: Callable[[int, int, dict, dict], None],
) -> None:
    """Pass 3: fit every head's projections; `on_head(layer, head, fields, rotation)` per head.

    sequences: (n, seq_len) the sampled sequences, one forward batch;
    points: (row in `sequences`, position) arrays, shared by all heads.
    """
    w_o = output_projections(lm.model)
    gpu = gpu_libraries() if lm.device.type == "cuda" else None
    if lm.device.type == "cuda":
        print("headvis: projections on the GPU with cuML" if gpu else
              "headvis: projections on the CPU with scikit-learn (install headvis[gpu] for cuML)", flush=True)
    rows = torch.as_tensor(points[0], device=lm.device)
    positions = torch.as_tensor(points[1], device=lm.device)
    bar = tqdm(total=len(selection.layers) * len(selection.heads), desc="pass 3: projections", unit="head")

    def on_layer(capture: LayerCapture) -> None:
        if capture.layer not in w_o:
            raise RuntimeError(f"no output projection found for layer {capture.layer}")
        vectors_of = head_vectors(capture, selection, w_o[capture.layer], rows, positions, as_numpy=gpu is None)
        for head, vectors in vectors_of.items():
            fields, rotation = fit_head(vectors, with_umap=with_umap, seed=seed, gpu=gpu)
            on_head(capture.layer, head, fields, rotation)
            bar.update(1)

    with CaptureSession(lm.model, set(selection.layers), on_layer) as session:
        session.run(sequences.to(lm.device))
    bar.close()


assert set(VECTORS) == {"q", "k", "v", "o"}
