"""The scan pipeline: metrics over every sequence, then samples, then projections.

Pass 1 (`metric_pass`) walks every sequence through the model; each wanted
layer's queries and keys go through the row-statistics backend into a
`ScanAccumulator`. Pass 2 (`sequence_records`) runs only the sampled
sequences again and turns their top-K rows into the per-sequence records of
the head files, gathering in the same forward passes each head's projection
cloud (`ProjectionPoints`: strong edges and their Q/K/V/O vectors); the server
uses the same function for custom prompts. Pass 3 (`fit_projections`) fits
PCA (and UMAP) per head on the gathered vectors, with no forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Container

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from headvis.accumulate import ScanAccumulator, sequence_argmax
from headvis.backends import RowStatsFn
from headvis.capture import CaptureSession, LayerCapture
from headvis.distributed import tp_rank
from headvis.io import JsonList, return_freed_memory
from headvis.metrics import ROW_METRICS, AttentionSpec, RowStats
from headvis.models import LoadedModel, output_projections
from headvis.projection import VECTORS, batched_pca, fit_head, gpu_libraries, small_linalg
from headvis.sampling import sparse_rows_batched

__all__ = ["HeadSelection", "KeptRows", "ProjectionPoints", "SequenceText", "Tokens", "fit_projections", "head_vectors",
           "metric_pass", "record_of", "sequence_records"]


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

    def slots_held(self, offset: int, count: int) -> list[int]:
        """The slots (places in `heads`) of the scanned heads among heads [offset, offset + count)."""
        return [slot for slot, head in enumerate(self.heads) if offset <= head < offset + count]

    def held(self, capture: LayerCapture) -> "HeldHeads":
        """The scanned heads that `capture` holds (all of them, or a --tp process's own: `head_offset` on),
        in slot order."""
        count, offset = capture.query.shape[1], capture.head_offset
        slots = self.slots_held(offset, count)
        local = [self.heads[slot] - offset for slot in slots]
        sinks = capture.spec.sinks
        if sinks is not None:  # one per held query head; a tp plan may also leave them whole (every head's)
            if sinks.shape[0] == count:
                sinks = sinks[local] if local != list(range(count)) else sinks
            elif sinks.shape[0] == self.n_heads:
                sinks = sinks[[offset + h for h in local]]
            else:
                raise ValueError(f"{sinks.shape[0]} attention sinks for a capture of {count} of {self.n_heads} heads")
        spec = dataclasses.replace(capture.spec, sinks=sinks) if sinks is not capture.spec.sinks else capture.spec
        if local == list(range(count)):
            return HeldHeads(slots, [self.heads[s] for s in slots], capture.query, capture.key, capture.value,
                             capture.output, spec)
        group = count // capture.key.shape[1]
        kv_of = [h // group for h in local]
        if len(local) % group == 0 and all(kv == kv_of[i - i % group] for i, kv in enumerate(kv_of)):
            kv_of = kv_of[::group]  # whole GQA groups, in order: their keys stay un-repeated
        return HeldHeads(slots, [self.heads[s] for s in slots], capture.query[:, local], capture.key[:, kv_of],
                         capture.value[:, kv_of], capture.output[:, :, local], spec)


@dataclass
class HeldHeads:
    """The scanned heads one capture holds, in slot order (`HeadSelection.held`)."""

    slots: list[int]  # their places among the scanned heads
    heads: list[int]  # their head numbers
    query: Tensor  # (batch, head, pos, d_head)
    key: Tensor  # (batch, kv_head, pos, d_head): one per query head, or the un-repeated kv heads of whole groups
    value: Tensor  # like key
    output: Tensor  # (batch, pos, head, d_head)
    spec: AttentionSpec  # with their attention sinks


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


class SequenceText:
    """Sequence id -> (its token ids, their strings), each made once: 270 heads may show the same sequence."""

    def __init__(self, sequences: Tensor, tokens: Tokens):
        self.sequences = sequences
        self.tokens = tokens
        self._done: dict[int, tuple[list[int], list[str]]] = {}

    def __call__(self, sid: int) -> tuple[list[int], list[str]]:
        if sid not in self._done:
            ids = self.sequences[sid].tolist()
            self._done[sid] = (JsonList(ids), JsonList(self.tokens(ids)))
        return self._done[sid]


def _batches(ids: list[int], batch_size: int) -> list[list[int]]:
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def _row_stats(fn: RowStatsFn, selection: HeadSelection, capture: LayerCapture, tokens: Tensor, *, top_k: int,
               bin_edges: list[int], min_weight: float = 0.0) -> tuple["HeldHeads", RowStats | None]:
    """(the scanned heads the capture holds, their RowStats; None when it holds none)."""
    held = selection.held(capture)
    if not held.slots:
        return held, None
    return held, fn(held.query, held.key, tokens, held.spec, top_k=top_k, bin_edges=bin_edges,
                    min_weight=min_weight)


_GATHERED = ("induction_counted", "duplicate_counted", "margin_counted", "max_nobos", "argmax_nobos", "dist_hist",
             "key_weight", "top_values", "top_indices")


def gather_row_stats(stats: RowStats | None, selection: HeadSelection, tp: int, shape: tuple[int, int],
                     n_bins: int, top_k: int, device: torch.device) -> RowStats | None:
    """--tp, passes 1 and 2: every process's RowStats of its own scanned heads, put together on its group's
    leader (`headvis.distributed.tp_group`; rank 0 with one group) in slot order (None on the others). shape: (batch, seq_len); top_k: the stats' top-K width. One gather of one float32
    tensor per layer, padded to the most heads a process holds (every field is exact in it: float32 values,
    flags, and key indices below 2^24; float64 for longer rows). 30 + 2 top_k values a row and head, where
    gathering the heads' queries, keys, values and outputs moved ~2 x d_head + 2 x d_head / group
    (70B-shaped: 288, ~6x the bytes at one width with pass 1's top-K of 8)."""
    import torch.distributed as dist

    from headvis.distributed import peer_failed, tp_group

    batch, seq_len = shape
    per_process = selection.n_heads // tp
    held = [selection.slots_held(rank * per_process, per_process) for rank in range(tp)]
    tails = [()] * (len(ROW_METRICS) + 5) + [(n_bins,), (), (top_k,), (top_k,)]  # a head's field: (batch, T, *tail)
    widths = [batch * seq_len * int(np.prod(tail, dtype=np.int64)) for tail in tails]
    exact = torch.float32 if seq_len < 2**24 else torch.float64
    packed = torch.zeros(max(len(h) for h in held), sum(widths), dtype=exact, device=device)
    if stats is not None:
        fields = [stats.metrics[name] for name in ROW_METRICS] + [getattr(stats, name) for name in _GATHERED]
        packed[: fields[0].shape[1]] = torch.cat([f.transpose(0, 1).reshape(f.shape[1], -1).to(packed)
                                                  for f in fields], dim=1)
    parts = [torch.empty_like(packed) for _ in range(tp)] if tp_rank() == 0 else None
    try:
        dist.gather(packed, parts, group=tp_group(), group_dst=0)  # to the first process of this one's --tp group
    except Exception as e:  # gloo / NCCL: a peer that died closes the connection
        raise peer_failed() from e
    if parts is None:
        return None
    rows = torch.cat([part[: len(h)] for part, h in zip(parts, held)])  # process by process
    order = torch.tensor([slot for h in held for slot in h], device=rows.device).argsort()  # -> slot order
    columns = rows[order].split(widths, dim=1)
    names = list(ROW_METRICS) + list(_GATHERED)
    dtypes = [torch.float32] * len(ROW_METRICS) + [torch.bool] * 3 + [torch.float32, torch.int64, torch.float32,
                                                                      torch.float32, torch.float32, torch.int64]
    whole = {name: c.reshape(len(selection.heads), batch, seq_len, *tail).transpose(0, 1).contiguous().to(dtype)
             for name, c, tail, dtype in zip(names, columns, tails, dtypes)}
    return RowStats(metrics={name: whole.pop(name) for name in ROW_METRICS}, **whole)


def metric_pass(
    lm: LoadedModel,
    sequences: Tensor,
    selection: HeadSelection,
    fn: RowStatsFn,
    accumulator: ScanAccumulator,
    *,
    batch_size: int,
    bin_edges: list[int],
    units: list[tuple[int, range]] | None = None,
    after_unit: Callable[[int, dict], None] | None = None,
    keep: "KeptRows | None" = None,
    progress: tuple[int, Callable[[], int]] | None = None,
) -> None:
    """Pass 1: the sequences of `units` ([(unit index, its sequence ids)], in order) through the model.

    Each unit is summed on its own (`ScanAccumulator.begin_unit`), in batches that never straddle two units,
    and handed to `after_unit(index, state)` when it is complete (the scan saves and folds it there).
    Defaults: every sequence as one unit, folded into `accumulator` at once.
    `keep`: what pass 2 would compute for the sequences it may show is kept here instead (the row
    statistics then include the top-K rows; the accumulated statistics are the same). Under --tp (lm.tp > 1)
    each process computes its own heads' statistics; rank 0 sums and keeps the rows of every head from them
    (`gather_row_stats`), and each process gathers its own heads' projection edges (it holds their vectors;
    the scan brings them to rank 0 after the pass). `progress`:
    (total sequences, a function giving the sequences done by every process) for the bar; None: no bar.
    """
    if units is None:
        units = [(0, range(len(sequences)))]
    if after_unit is None:
        after_unit = lambda _, unit: accumulator.fold(unit)  # noqa: E731
    state: dict = {}
    top_k = keep.top_k if keep is not None else 0

    def on_layer(capture: LayerCapture) -> None:
        held, stats = _row_stats(fn, selection, capture, state["tokens"], top_k=top_k, bin_edges=bin_edges,
                                 min_weight=keep.min_weight if keep is not None else 0.0)
        ids = state["ids"].tolist()
        if lm.tp > 1:  # each process computed its own heads: rank 0 sums them all, keeps their rows
            mine = stats
            stats = gather_row_stats(mine, selection, lm.tp, tuple(state["tokens"].shape), len(bin_edges) - 1,
                                     top_k, lm.device)
            if stats is None:  # a helper: only its own heads' projection edges (it holds their vectors)
                if keep is not None and mine is not None:
                    keep.add(capture.layer, held.heads, ids, mine, held, rows=False)
                return
        accumulator.update(capture.layer, state["ids"], state["tokens"], stats)
        if keep is not None:
            keep.add(capture.layer, selection.heads, ids, stats, held)

    total, done_everywhere = progress if progress is not None else (0, lambda: 0)
    with CaptureSession(lm.model, set(selection.layers), on_layer, tp=lm.tp) as session, \
            tqdm(total=total, initial=done_everywhere(), desc="pass 1: metrics", unit="seq",
                 disable=progress is None) as bar:
        for index, ids in units:
            accumulator.begin_unit(list(ids), sequences[list(ids)])
            for batch in _batches(list(ids), batch_size):
                state["ids"] = torch.tensor(batch)
                state["tokens"] = sequences[batch].to(lm.device)
                session.run(state["tokens"])
                accumulator.count_tokens(state["ids"], state["tokens"])
                return_freed_memory()  # a batch's freed chunks would pile up between the kept rows (glibc)
                bar.update(len(batch))
            after_unit(index, accumulator.end_unit())
            bar.n = max(bar.n, done_everywhere())  # the other processes' units too
            bar.refresh()
    accumulator.close_units()


class ProjectionPoints:
    """The projection cloud of each head, gathered in pass 2 (CONTRACT section 2, `umap/`).

    A point is a strong attention edge (seq_idx, top_q, top_k) of the head:
    from each of the head's sampled sequences, the rows q >= 1 whose largest
    weight outside column 0, p[q, top_k] with top_k >= 1, is at least
    `min_weight`, the `per_sequence` heaviest of them (ties: lower q first),
    one edge per row. Q is the query at top_q, K and V the key and value at
    top_k, O the head's write to the residual stream at top_q; O is kept as
    the head's attention output (d_head) and multiplied by its slice of the
    output projection only when the head is fitted, to hold 4 x d_head floats
    per point.
    """

    def __init__(self, per_sequence: dict[tuple[int, int], int], min_weight: float):
        self.per_sequence = per_sequence  # (layer, head) -> edges taken from each sampled sequence
        self.min_weight = min_weight
        self._parts: dict[tuple[int, int], list[dict]] = {key: [] for key in per_sequence}

    def add(self, layer: int, heads: list[int], seq_ids: list, sampled: Tensor, stats: RowStats,
            qkv: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        """The edges of one layer's batch, every scanned head at once.

        heads: the scanned heads (slot order); seq_ids: the batch's sequence ids; sampled: (batch, slot) bool,
        whether the sequence is a sample of that head; qkv and output: those heads' (`HeadSelection.held`),
        output (batch, query_pos, slot, d_head).
        """
        weight = stats.max_nobos[:, :, 1:].float()  # (batch, slot, query_pos - 1): rows q >= 1
        top_k = stats.argmax_nobos[:, :, 1:]
        ok = (top_k >= 1) & (weight >= self.min_weight) & sampled.to(weight.device)[..., None]
        # rank of each row within its (sequence, head) by weight, heaviest first, lower q first on ties
        order = torch.sort(torch.where(ok, weight, -1.0), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        cap = torch.tensor([self.per_sequence.get((layer, h), 0) for h in heads], device=rank.device)
        b, slot, row = torch.nonzero(ok & (rank < cap[None, :, None]), as_tuple=True)  # row-major: q ascending
        if b.numel() == 0:
            return
        top_q, top_k = row + 1, top_k[b, slot, row]
        query, key, value = qkv
        kv = slot // (query.shape[1] // key.shape[1])
        ids = np.asarray(seq_ids, dtype=np.int64)
        columns = {
            "seq_idx": ids[b.cpu().numpy()], "top_q": top_q.cpu().numpy(), "top_k": top_k.cpu().numpy(),
            "Q": query[b, slot, top_q].float().cpu().numpy(),
            "K": key[b, kv, top_k].float().cpu().numpy(),
            "V": value[b, kv, top_k].float().cpu().numpy(),
            "Z": output[b, top_q, slot].float().cpu().numpy(),  # (n, d_head): O before W_O
        }
        slots = slot.cpu().numpy()
        for s in np.unique(slots):
            if (layer, heads[s]) in self._parts:
                pick = slots == s
                self._parts[(layer, heads[s])].append({name: col[pick] for name, col in columns.items()})

    def parts_tensors(self, layer: int | None = None) -> dict[str, Tensor]:
        """Every head's (of `layer`, when given) gathered edges as flat tensors (`add_tensors` reads them back):
        for a file."""
        out: dict[str, Tensor] = {}
        for (at, head), parts in self._parts.items():
            if parts and layer in (None, at):
                for name in parts[0]:
                    out[f"L{at}H{head}.{name}"] = torch.from_numpy(np.ascontiguousarray(
                        np.concatenate([p[name] for p in parts])))
        return out

    def add_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Edges another process gathered (`parts_tensors`), one part per head."""
        by_head: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for name, value in tensors.items():
            head, column = name.split(".", 1)
            layer, h = (int(x) for x in head[1:].split("H"))
            by_head.setdefault((layer, h), {})[column] = value.numpy()
        for key, columns in by_head.items():
            if key in self._parts:
                self._parts[key].append(columns)

    def restrict(self, shown: dict[tuple[int, int], set]) -> None:
        """Keep, per head, only the edges of the sequences it shows (`KeptRows` gathered every kept one)."""
        for key, parts in self._parts.items():
            ids = np.fromiter(shown.get(key, ()), dtype=np.int64)
            kept = []
            for part in parts:
                pick = np.isin(part["seq_idx"], ids)
                if pick.any():
                    kept.append({name: col[pick] for name, col in part.items()})
            self._parts[key] = kept

    def cloud(self, layer: int, head: int, w_o: Tensor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                  dict[str, np.ndarray]]:
        """(edges {seq_idx, top_q, top_k}: (n,) each, vectors {Q, K, V, O: (n, d_head)}, bases {O: (d_model, d_head)}).

        O = Z W^T lives in the d_head-dimensional column space of the head's slice W of the output
        projection: with W = B R (B orthonormal), O = (Z R^T) B^T, so O is handed over as its
        coordinates Z R^T in the basis B. Distances, PCA and UMAP are unchanged by an orthonormal
        basis, and the fits cost d_head instead of d_model columns. Rows: by seq_idx, then top_q.
        """
        parts = self._parts.pop((layer, head), [])
        if not parts:
            return ({name: np.zeros(0, dtype=np.int64) for name in ("seq_idx", "top_q", "top_k")}, {}, {})
        cat = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.lexsort((cat["top_q"], cat["seq_idx"]))
        cat = {name: col[order] for name, col in cat.items()}
        d_head = cat["Q"].shape[1]
        # (d_model, d_head) float64; the strided slice converted by numpy (torch took 5 ms a head on 2 busy threads)
        columns = w_o.detach().float().cpu().numpy()[:, head * d_head : (head + 1) * d_head]
        w = torch.from_numpy(columns.astype(np.float64))
        with small_linalg(w.device):  # one thread: 0.3 ms, against 5 ms with two busy ones
            basis, r = (t.numpy() for t in torch.linalg.qr(w))  # (d_model, d_head), (d_head, d_head)
        # O in float32 like Q, K and V (the model's Z is float32 at most): its PCA runs in float32 too
        vectors = {"Q": cat["Q"], "K": cat["K"], "V": cat["V"], "O": cat["Z"] @ r.T.astype(np.float32)}
        return {name: cat[name] for name in ("seq_idx", "top_q", "top_k")}, vectors, {"O": basis}


_Kept = tuple[np.ndarray, np.ndarray, float, list[int]]  # (attention_indices, attention_values, max, argmax)


def _keep_rows(layer: int, heads: list[int], stats: RowStats, ids: list, wanted: Callable[[int, int], Container],
               min_weight: float, out: dict[tuple[int, int], dict],
               argmax: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """The record pieces of each (head, sequence) of one layer's batch that `wanted(layer, head)` holds;
    heads: the stats' heads (slot order).

    argmax: `sequence_argmax` of the stats, when the caller has it already."""
    best, q, k = argmax if argmax is not None else sequence_argmax(stats.max_nobos, stats.argmax_nobos)
    pairs = []  # (slot, head, b, sid) of every wanted pair
    for slot, head in enumerate(heads):
        per_head = wanted(layer, head)
        if per_head:
            pairs.extend((slot, head, b, sid) for b, sid in enumerate(ids) if sid in per_head)
    if not pairs:
        return
    slots = torch.tensor([p[0] for p in pairs])
    rows_b = torch.tensor([p[2] for p in pairs])
    top_values = stats.top_values[rows_b, slots].float().cpu().numpy()  # (pairs, query_pos, top_k)
    top_indices = stats.top_indices[rows_b, slots].cpu().numpy()
    best, q, k = (t[rows_b, slots].cpu().numpy() for t in (best, q, k))
    for i, (indices, values) in enumerate(sparse_rows_batched(top_values, top_indices, min_weight)):
        _, head, _, sid = pairs[i]
        out.setdefault((layer, head), {})[sid] = (indices, values, float(best[i]), [int(q[i]), int(k[i])])


def record_of(sid, interval: int, kept: _Kept, token_ids: list[int], strings: list[str]) -> dict:
    """A head file's per-sequence record (CONTRACT section 2 `sequences`); strings: `Tokens` of token_ids."""
    indices, values, best, argmax = kept
    return {
        "sequence_id": sid,
        "interval": interval,
        "max_activation": best,
        "tokens": strings,
        "seq_len": len(token_ids),
        "attention_indices": indices,
        "attention_values": values,
        "argmax": argmax,
        "token_ids": token_ids,
    }


class KeptRows:
    """What pass 2 would compute, kept from pass 1 instead: sparse rows and the projection edges of `points`.

    Two kinds of (head, sequence) are kept: every head's rows of the sequences in `ids` (the lowest
    priorities, which the deciles take first), and each head's running top `per_interval` sequences by
    max activation (its top interval), replaced as better ones come. Pass 2 then runs only the shown
    (head, sequence) pairs that are not held (`holds`): those of a resumed checkpoint's sequences, and
    any that these rules missed. Edges are gathered for every kept pair; `ProjectionPoints.restrict`
    drops the ones of sequences a head does not show.
    """

    def __init__(self, ids: set[int], top_k: int, min_weight: float, points: ProjectionPoints, per_interval: int):
        self.ids = ids
        self.top_k = top_k
        self.min_weight = min_weight
        self.points = points
        self.per_interval = per_interval
        self._rows: dict[tuple[int, int], dict[int, _Kept]] = {}
        self._top: dict[tuple[int, int], list[tuple[float, int]]] = {}  # (max activation, id), best first

    def holds(self, key: tuple[int, int], sid: int) -> bool:
        return sid in self._rows.get(key, {})

    @property
    def held(self) -> set[int]:
        """Every sequence some head holds."""
        return {sid for rows in self._rows.values() for sid in rows}

    def add(self, layer: int, heads: list[int], ids: list[int], stats: RowStats, vectors: "HeldHeads",
            rows: bool = True) -> None:
        """One layer's batch: `stats` of `heads` (slot order); the edges of the heads `vectors` holds (all of
        them, or under --tp this process's own), and with `rows` the sparse rows of every one."""
        best, q, k = sequence_argmax(stats.max_nobos, stats.argmax_nobos)
        values = best.float().cpu().numpy()  # (batch, slot)
        wanted: dict[int, set[int]] = {}
        for slot, head in enumerate(heads):
            key = (layer, head)
            old = self._top.get(key, [])
            ranked = sorted(old + [(float(values[b, slot]), sid) for b, sid in enumerate(ids)],
                            key=lambda item: (-item[0], item[1]))[: self.per_interval]  # the scan's order
            self._top[key] = ranked
            top = {sid for _, sid in ranked}
            kept = self._rows.setdefault(key, {})
            for _, sid in old:  # displaced from the top, and not kept for the deciles: drop its rows
                if sid not in top and sid not in self.ids:
                    kept.pop(sid, None)
            wanted[head] = {sid for sid in ids if sid in self.ids or sid in top}
        if rows:
            _keep_rows(layer, heads, stats, ids, lambda _, head: wanted[head], self.min_weight, self._rows,
                       argmax=(best, q, k))
        if not vectors.slots:
            return
        at = torch.tensor([heads.index(head) for head in vectors.heads])  # their places in `heads`
        sampled = torch.tensor([[sid in wanted[head] for head in vectors.heads] for sid in ids])  # (batch, slot)
        own = dataclasses.replace(stats, max_nobos=stats.max_nobos[:, at], argmax_nobos=stats.argmax_nobos[:, at])
        self.points.add(layer, vectors.heads, ids, sampled, own, (vectors.query, vectors.key, vectors.value),
                        vectors.output)

    def rows_of(self, wanted: dict[tuple[int, int], dict]) -> dict[tuple[int, int], dict]:
        """(layer, head) -> {seq_id: (indices, values, max, argmax)} of the wanted pairs that are held."""
        return {key: {sid: self._rows[key][sid] for sid in per_head if self.holds(key, sid)}
                for key, per_head in wanted.items()}

    def records(self, wanted: dict[tuple[int, int], dict], sequences: Tensor, tokens: Tokens) -> dict:
        """(layer, head) -> {seq_id: record} of the wanted sequences that are held."""
        out: dict[tuple[int, int], dict] = {}
        text = SequenceText(sequences, tokens)
        for key, per_head in wanted.items():
            rows = self._rows.get(key, {})
            out[key] = {sid: record_of(sid, interval, rows[sid], *text(sid)) for sid, interval in per_head.items()
                        if sid in rows}
        return out

    @staticmethod
    def bytes_per_sequence(n_heads: int, seq_len: int, top_k: int, edges: int, d_head: int) -> int:
        """What one kept sequence costs, about: every head's sparse rows and projection edges."""
        rows = seq_len * top_k * (8 + 4)  # int64 index + float32 value per kept entry, at most
        points = edges * (4 * d_head * 4 + 3 * 8)  # Q, K, V, Z float32 + seq_idx, top_q, top_k
        return n_heads * (rows + points)


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
    points: ProjectionPoints | None = None,
    raw: bool = False,
) -> dict[tuple[int, int], dict]:
    """Pass 2: the head-file record of each wanted (layer, head, sequence), and the projection points.

    sequences: (n, seq_len) token ids whose rows are named by `seq_ids`;
    wanted: (layer, head) -> {seq_id: interval}. Returns (layer, head) ->
    {seq_id: record} with the fields of CONTRACT section 2's `sequences`.
    With `points`, the same forward passes also gather every head's
    projection cloud (no pass of its own). `raw`: {seq_id: (indices, values, max, argmax)} instead of
    records (`record_of` makes one), for a process that hands its rows to another. Under --tp (lm.tp > 1)
    each process computes its own heads' statistics and gathers their edges into `points` (the scan sends
    them to rank 0 after the pass); rank 0 keeps every head's rows from the gathered statistics
    (`gather_row_stats`), as in pass 1, and the helpers return {}.
    """
    kept: dict[tuple[int, int], dict] = {}
    needed = sorted({sid for per_head in wanted.values() for sid in per_head}, key=seq_ids.index)
    state: dict = {}

    def on_layer(capture: LayerCapture) -> None:
        held, stats = _row_stats(fn, selection, capture, state["tokens"], top_k=top_k, bin_edges=bin_edges,
                                 min_weight=min_weight)
        if points is not None and stats is not None:  # the edges of the heads this process holds the vectors of
            sampled = torch.tensor([[sid in wanted.get((capture.layer, head), ()) for head in held.heads]
                                    for sid in state["ids"]])  # (batch, held slot)
            points.add(capture.layer, held.heads, state["ids"], sampled, stats,
                       (held.query, held.key, held.value), held.output)
        if lm.tp > 1:  # each process computed its own heads: rank 0 keeps the rows of them all
            stats = gather_row_stats(stats, selection, lm.tp, tuple(state["tokens"].shape), len(bin_edges) - 1,
                                     top_k, lm.device)
            if stats is None:  # a helper
                return
        _keep_rows(capture.layer, selection.heads, stats, state["ids"], lambda layer, head: wanted.get((layer, head)),
                   min_weight, kept)

    rows = {sid: i for i, sid in enumerate(seq_ids)}
    token_lists: dict = {}
    with CaptureSession(lm.model, set(selection.layers), on_layer, tp=lm.tp) as session:
        batches = _batches(needed, batch_size)
        for batch in tqdm(batches, desc="pass 2: samples", unit="batch", disable=not progress or not batches):
            state["ids"] = batch
            state["tokens"] = sequences[[rows[s] for s in batch]].to(lm.device)
            token_lists.update(zip(batch, state["tokens"].cpu().tolist()))
            session.run(state["tokens"])
    if lm.tp > 1 and not kept and tp_rank() != 0:
        return {}  # a TP helper: its heads' statistics went to rank 0
    if raw:
        return {key: {sid: kept[key][sid] for sid in per_head} for key, per_head in wanted.items() if per_head}
    strings = {sid: tokens(ids) for sid, ids in token_lists.items()}
    return {key: {sid: record_of(sid, interval, kept[key][sid], token_lists[sid], strings[sid])
                  for sid, interval in per_head.items()}
            for key, per_head in wanted.items()}


def head_vectors(
    capture: LayerCapture, selection: HeadSelection, w_o: Tensor, rows: Tensor, query_pos: Tensor, key_pos: Tensor,
) -> dict[int, dict[str, np.ndarray]]:
    """head -> {Q, K, V: (n, d_head), O: (n, d_model)} float64 at the n edges (rows[i], query_pos[i], key_pos[i]).

    Q and O at query_pos, K and V at key_pos (CONTRACT section 2): what
    `ProjectionPoints` gathers in the scan, for one edge at a time (the server).
    """
    query, key, value = selection.slice(capture)
    d_head = query.shape[-1]
    group = query.shape[1] // key.shape[1]
    out: dict[int, dict[str, np.ndarray]] = {}
    for slot, head in enumerate(selection.heads):
        z = capture.output[rows, query_pos, head].float()  # (n, d_head)
        o = z @ w_o[:, head * d_head : (head + 1) * d_head].float().T  # (n, d_model)
        host = lambda t: t.double().cpu().numpy()  # noqa: E731
        out[head] = {
            "Q": host(query[rows, slot, query_pos]),
            "K": host(key[rows, slot // group, key_pos]),
            "V": host(value[rows, slot // group, key_pos]),
            "O": host(o),
        }
    return out


def fit_projections(
    points: ProjectionPoints,
    lm: LoadedModel,
    selection: HeadSelection,
    *,
    with_umap: bool,
    seed: int,
    on_head: Callable[[int, int, dict, dict, dict], None],
    layers: list[int] | None = None,
    progress: bool = True,
) -> None:
    """Pass 3 (no forward pass): fit every head's gathered cloud; `on_head(layer, head, edges, fields, rotation)`.

    PCA: one `batched_pca` call per layer over all its heads' Q/K/V/O clouds, on the model's device.
    layers: these of the selection's only (the scan fits a layer once its edges are in); progress: a bar.
    """
    w_o = lm.output_weights if lm.output_weights is not None else output_projections(lm.model)
    gpu = gpu_libraries() if lm.device.type == "cuda" and with_umap else None
    if lm.device.type == "cuda" and with_umap and (layers is None or layers[:1] == selection.layers[:1]):  # once
        print("headvis: UMAP on the GPU with cuML" if gpu else
              "headvis: UMAP on the CPU with umap-learn (install headvis[gpu] for cuML)", flush=True)
    for layer in tqdm(selection.layers if layers is None else layers, desc="pass 3: projections", unit="layer",
                      disable=not progress):
        if layer not in w_o:
            raise RuntimeError(f"no output projection found for layer {layer}")
        clouds = {head: points.cloud(layer, head, w_o[layer]) for head in selection.heads}
        tensors = {(head, name): torch.as_tensor(v, device=lm.device)
                   for head, (_, vectors, _) in clouds.items() for name, v in vectors.items()}
        keys = [key for key, t in tensors.items() if len(t)]
        fitted = dict(zip(keys, batched_pca([tensors[key] for key in keys])))
        for head, (edges, vectors, bases) in clouds.items():
            pca = {name: fitted[(head, name)] for name in vectors if (head, name) in fitted}
            inputs = {name: tensors[(head, name)] for name in vectors} if gpu is not None else vectors
            fields, rotation = fit_head(inputs, n_points=len(edges["seq_idx"]), with_umap=with_umap, seed=seed,
                                        gpu=gpu, bases=bases, pca=pca)
            on_head(layer, head, edges, fields, rotation)


assert set(VECTORS) == {"Q", "K", "V", "O"}
