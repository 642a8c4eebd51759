"""Mergeable accumulators that turn per-row statistics into head-level results.

Everything here is a sum, a count or a per-sequence value indexed by the
sequence's global id, so two accumulators over disjoint sequence sets merge by
addition (`merge`): the basis for splitting a scan across processes or
resuming one from a saved `state_dict`.

Work units (`begin_unit` / `end_unit` / `fold`): the scan sums each fixed
group of sequences on its own and folds the groups' sums into the totals in
group order, whatever process computed them, so that the float64 totals are
bit-identical for any number of processes and any resume. A unit's state is
small: its sums, the per-token sums at the tokens it holds only, and its
sequences' per-sequence values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from headvis.metrics import ROW_METRICS, RowStats

__all__ = ["HEAD_METRICS", "ROW_SUMS", "HeadResult", "ScanAccumulator", "sequence_argmax", "token_entropy"]

# Every metric of CONTRACT section 1, in the order config.json lists them: the row means, then the
# head-level ones. Public names: frozen by tests.
HEAD_METRICS: tuple[str, ...] = (
    "pattern_entropy", "previous_token_score", "self_attention_score", "bos_score", "induction_score",
    "duplicate_token_score", "qk_distance", "logit_mean", "logit_std", "logit_max", "top_logit_margin",
    "logit_z_score", "qk_distance_variance", "key_token_entropy", "query_token_entropy", "mean_max_activation",
)

# Row quantities summed (with their counts) over rows q >= 1: the backends' plus the z-score,
# which is a function of one row's logit_max, logit_mean and logit_std.
ROW_SUMS: tuple[str, ...] = ROW_METRICS + ("logit_z_score",)

_COUNTED_BY = {"induction_score": "induction_counted", "duplicate_token_score": "duplicate_counted",
               "top_logit_margin": "margin_counted"}

# A row's logit_std counts as > 0 above this fraction of its scale (|max| + |mean|): equal float32
# scores can leave a rounding residue of ~1e-7 of the scale, which must not turn into a z-score.
Z_STD_EPS = 1e-6


def token_entropy(weight: np.ndarray) -> float | None:
    """Entropy (nats) of a non-negative weight per token id, normalized; None when all weights are 0."""
    w = np.asarray(weight, dtype=np.float64)
    total = w.sum()
    if not total > 0:
        return None
    p = w[w > 0] / total
    return float(max(0.0, -(p * np.log(p)).sum()))


def _z_rows(stats: RowStats) -> tuple[Tensor, Tensor]:
    """(z, counted): (logit_max - logit_mean) / logit_std per row, counted where logit_std > 0."""
    mean, std, top = (stats.metrics[n].double() for n in ("logit_mean", "logit_std", "logit_max"))
    counted = std > Z_STD_EPS * (top.abs() + mean.abs())
    counted &= std > 0
    z = torch.where(counted, (top - mean) / torch.where(counted, std, 1.0), 0.0)
    return z, counted


def sequence_argmax(max_nobos: Tensor, argmax_nobos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence max_activation and its [q, k]: (batch, head) each.

    max over rows q >= 1 of max_{k>=1} pattern[q, k]; the first q wins ties.
    [q, k] is [-1, -1] where no such entry is positive (T = 1).
    """
    batch, heads, seq_len = max_nobos.shape
    if seq_len < 2:
        none = torch.full((batch, heads), -1, dtype=torch.int64, device=max_nobos.device)
        return torch.zeros(batch, heads, device=max_nobos.device), none, none
    best, q = max_nobos[:, :, 1:].max(dim=2)  # first maximal index (documented for max/argmax)
    k = argmax_nobos[:, :, 1:].gather(2, q[..., None])[..., 0]
    found = best > 0
    return best, torch.where(found, q + 1, -1), torch.where(found, k, -1)


@dataclass
class HeadResult:
    """The finished numbers of one head."""

    metrics: dict[str, float | None]  # HEAD_METRICS; None where no row was counted
    seq_max: np.ndarray  # (n_sequences,) max_activation per sequence
    seq_argmax: np.ndarray  # (n_sequences, 2) [q, k]; [-1, -1] where no k >= 1 exists
    dist_hist: np.ndarray  # (n_bins,) normalized to sum 1 (all zero if nothing counted)
    dist_hist_no_sink: np.ndarray  # (n_bins,) the same without column 0 (the sink), normalized to sum 1
    key_weight: np.ndarray  # (vocab,) attention received as key (column 0 excluded)
    query_max_sum: np.ndarray  # (vocab,) sum of the row's largest weight outside column 0
    query_count: np.ndarray  # (vocab,) occurrences as query (rows q >= 1)


class ScanAccumulator:
    """Sums over rows q >= 1 for every scanned (layer, head).

    layers: scanned layer indices; n_heads: scanned heads per layer (the
    accumulator indexes them 0..n_heads-1 in scan order).
    """

    def __init__(self, layers: list[int], n_heads: int, n_sequences: int, vocab_size: int, n_bins: int,
                 bin_edges: list[int] | None = None, token_ids: Tensor | None = None):
        """bin_edges: the distance histogram's edges (`distance_bin_edges`); without them the histogram
        without the sink column (`dist_hist_no_sink`) is the whole one. token_ids: every token id the
        updates will hold (the scan's corpus): the per-token totals then keep a column per such token
        instead of per vocabulary entry (SmolLM2's 49,152 x 270 heads x 2 float64 sums are 212 MB; a
        small corpus holds a few thousand tokens); `result` gives vocabulary-sized arrays either way."""
        if bin_edges is not None and len(bin_edges) != n_bins + 1:
            raise ValueError(f"{len(bin_edges)} bin edges for {n_bins} bins")
        self.bin_edges = torch.tensor(bin_edges, dtype=torch.int64) if bin_edges is not None else None
        self.layers = list(layers)
        self.n_heads = n_heads
        n_layers, m = len(self.layers), len(ROW_SUMS)
        f64 = dict(dtype=torch.float64)
        self.metric_sum = torch.zeros(n_layers, n_heads, m, **f64)
        self.metric_count = torch.zeros(n_layers, n_heads, m, dtype=torch.int64)
        self.seq_max = torch.zeros(n_layers, n_sequences, n_heads, dtype=torch.float32)
        self.seq_argmax = torch.full((n_layers, n_sequences, n_heads, 2), -1, dtype=torch.int32)
        self.seq_seen = torch.zeros(n_sequences, dtype=torch.bool)
        self.dist_hist = torch.zeros(n_layers, n_heads, n_bins, **f64)
        self.sink_hist = torch.zeros(n_layers, n_heads, n_bins, **f64)  # p[q, 0] summed in the bin of q - 0
        self.vocab_size = vocab_size
        self.token_ids: Tensor | None = None  # the totals' columns' token ids (None: every id, in order)
        self._total_columns: Tensor | None = None  # (vocab,) token id -> its column in the totals, -1: none
        if token_ids is not None:
            self.token_ids = torch.unique(token_ids.reshape(-1).cpu().to(torch.int64))
            if len(self.token_ids) and not 0 <= int(self.token_ids[0]) <= int(self.token_ids[-1]) < vocab_size:
                raise ValueError(f"token ids outside the vocabulary of {vocab_size}")
            self._total_columns = torch.full((vocab_size,), -1, dtype=torch.int64)
            self._total_columns[self.token_ids] = torch.arange(len(self.token_ids))
        n_columns = vocab_size if self.token_ids is None else len(self.token_ids)
        self.key_weight = torch.zeros(n_layers, n_heads, n_columns, **f64)
        self.query_max_sum = torch.zeros(n_layers, n_heads, n_columns, **f64)
        self.query_count = torch.zeros(n_columns, dtype=torch.int64)
        self._unit: dict[str, Tensor] | None = None  # the open unit's sums (None: updates go to the totals)
        self._unit_ids: Tensor | None = None
        self._unit_tokens: Tensor | None = None  # the tokens the open unit holds, ascending: its columns
        self._columns: Tensor | None = None  # (vocab,) token id -> its column in the open unit, -1 elsewhere

    # -- work units

    _SUMS = ("metric_sum", "metric_count", "dist_hist", "sink_hist")
    _VOCAB_SUMS = ("key_weight", "query_max_sum", "query_count")

    def _sums(self, name: str) -> Tensor:
        """Where an update adds `name`: the open unit's sums, else the totals (when no unit was ever begun)."""
        if self._unit is None and self._columns is not None:
            raise RuntimeError("an update between two units: it would be lost from the totals (begin_unit first)")
        return self._unit[name] if self._unit is not None else getattr(self, name)

    def _vocab_index(self, tokens: Tensor) -> Tensor:
        """Token ids -> where an update adds them: the open unit's own columns, else the totals'."""
        return self._columns[tokens] if self._unit is not None else self._total_index(tokens)

    def _total_index(self, tokens: Tensor) -> Tensor:
        """Token ids -> their columns in the totals; a token outside `token_ids` is an error, never dropped."""
        if self._total_columns is None:
            return tokens
        columns = self._total_columns[tokens]
        if bool((columns < 0).any()):
            raise ValueError("an update holds a token outside the accumulator's token_ids")
        return columns

    def begin_unit(self, seq_ids: list[int], token_ids: Tensor) -> None:
        """Updates until `end_unit` sum into a unit of their own: seq_ids, and token_ids (n, pos) their tokens.

        The unit's per-token sums have a column per token it holds (not per vocabulary entry), so a unit
        costs memory by its own tokens, not by the vocabulary.
        """
        tokens = torch.unique(token_ids[:, 1:].reshape(-1).cpu())  # rows q >= 1: the only tokens updates add
        n_layers, n_heads = self.key_weight.shape[:2]
        f64 = dict(dtype=torch.float64)
        self._unit = {name: torch.zeros_like(getattr(self, name)) for name in self._SUMS}
        self._unit["key_weight"] = torch.zeros(n_layers, n_heads, len(tokens), **f64)
        self._unit["query_max_sum"] = torch.zeros(n_layers, n_heads, len(tokens), **f64)
        self._unit["query_count"] = torch.zeros(len(tokens), dtype=torch.int64)
        if self._columns is None:
            self._columns = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        self._columns[tokens] = torch.arange(len(tokens))
        self._unit_tokens = tokens
        self._unit_ids = torch.tensor(seq_ids, dtype=torch.int64)

    def end_unit(self) -> dict[str, Tensor]:
        """The open unit's state (not folded into the totals: `fold` does that, in unit order)."""
        unit, ids, tokens = self._unit, self._unit_ids, self._unit_tokens
        if unit is None or ids is None or tokens is None:
            raise RuntimeError("end_unit without begin_unit")
        state = dict(unit)
        state["tokens"] = tokens
        state["seq_ids"] = ids
        state["seq_max"] = self.seq_max[:, ids].clone()
        state["seq_argmax"] = self.seq_argmax[:, ids].clone()
        self._columns[tokens] = -1
        self._unit = self._unit_ids = self._unit_tokens = None
        return state

    def close_units(self) -> None:
        """Free the token-column table of the units (updates outside a unit go to the totals)."""
        self._unit = self._unit_ids = self._unit_tokens = self._columns = None

    def fold(self, state: dict[str, Tensor]) -> None:
        """Add a unit's state (`end_unit`, or read back from its file) into the totals."""
        for name in self._SUMS:
            getattr(self, name).add_(state[name])
        tokens = self._total_index(state["tokens"])
        self.key_weight.index_add_(2, tokens, state["key_weight"])
        self.query_max_sum.index_add_(2, tokens, state["query_max_sum"])
        self.query_count.index_add_(0, tokens, state["query_count"])
        ids = state["seq_ids"]
        self.seq_max[:, ids] = state["seq_max"]
        self.seq_argmax[:, ids] = state["seq_argmax"]
        self.seq_seen[ids] = True

    _TOTALS = ("metric_sum", "metric_count", "dist_hist", "sink_hist", "key_weight", "query_max_sum", "query_count")

    def totals(self) -> dict[str, Tensor]:
        """The folded sums (not the per-sequence values): what a prefix snapshot saves."""
        return {name: getattr(self, name) for name in self._TOTALS}

    def load_totals(self, state: dict[str, Tensor]) -> None:
        """Replace the folded sums by a snapshot's (`totals`), checked to have their shapes."""
        for name in self._TOTALS:
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"{name}: the snapshot's shape {tuple(state[name].shape)} is not this scan's")
        for name in self._TOTALS:
            getattr(self, name).copy_(state[name])

    def sequence_values(self, seq_ids: list[int]) -> dict[str, Tensor]:
        """The per-sequence values of `seq_ids` (folded): what a prefix snapshot's segment saves."""
        ids = torch.tensor(seq_ids, dtype=torch.int64)
        return {"seq_ids": ids, "seq_max": self.seq_max[:, ids].clone(), "seq_argmax": self.seq_argmax[:, ids].clone()}

    def load_sequence_values(self, state: dict[str, Tensor]) -> None:
        ids = state["seq_ids"]
        self.seq_max[:, ids] = state["seq_max"]
        self.seq_argmax[:, ids] = state["seq_argmax"]
        self.seq_seen[ids] = True

    def count_tokens(self, seq_ids: Tensor, token_ids: Tensor) -> None:
        """Once per batch: query occurrences (rows q >= 1) and which sequences were seen."""
        tokens = token_ids[:, 1:].reshape(-1).cpu()
        self._sums("query_count").index_add_(0, self._vocab_index(tokens), torch.ones(tokens.numel(), dtype=torch.int64))
        self.seq_seen[seq_ids.cpu()] = True

    def update(self, layer: int, seq_ids: Tensor, token_ids: Tensor, stats: RowStats) -> None:
        """Add one layer's RowStats for a batch: seq_ids (batch,), token_ids (batch, pos)."""
        li = self.layers.index(layer)
        rows = slice(1, None)  # row 0 is skipped everywhere
        seq_ids = seq_ids.cpu()
        tokens = token_ids[:, rows].reshape(-1).cpu()
        z, z_counted = _z_rows(stats)
        for m, name in enumerate(ROW_SUMS):
            if name == "logit_z_score":
                values, counted = z[:, :, rows], z_counted[:, :, rows]
            else:
                values = stats.metrics[name][:, :, rows].double()  # (batch, head, pos-1)
                counted = getattr(stats, _COUNTED_BY[name])[:, :, rows] if name in _COUNTED_BY else None
            metric_sum, metric_count = self._sums("metric_sum"), self._sums("metric_count")
            if counted is not None:
                metric_sum[li, :, m] += (values * counted).sum((0, 2)).cpu()
                metric_count[li, :, m] += counted.sum((0, 2)).cpu()
            else:
                metric_sum[li, :, m] += values.sum((0, 2)).cpu()
                metric_count[li, :, m] += values.shape[0] * values.shape[2]
        if stats.max_nobos.shape[2] > 1:
            row_max = stats.max_nobos[:, :, rows]  # (batch, head, pos-1)
            best, q, k = sequence_argmax(stats.max_nobos, stats.argmax_nobos)
            self.seq_max[li, seq_ids] = best.float().cpu()
            self.seq_argmax[li, seq_ids] = torch.stack([q, k], dim=-1).int().cpu()
            flat_rows = row_max.permute(1, 0, 2).reshape(self.n_heads, -1).double().cpu()
            columns = self._vocab_index(tokens)
            self._sums("query_max_sum")[li].index_add_(1, columns, flat_rows)
            received = stats.key_weight[:, :, rows].permute(1, 0, 2).reshape(self.n_heads, -1).double().cpu()
            self._sums("key_weight")[li].index_add_(1, columns, received)
        self._sums("dist_hist")[li] += stats.dist_hist[:, :, rows].double().sum((0, 2)).cpu()
        if self.bin_edges is not None and token_ids.shape[1] > 1:
            distance = torch.arange(1, token_ids.shape[1])  # row q's column 0 lies q - 0 = q away
            bins = torch.searchsorted(self.bin_edges, distance, right=True) - 1
            sink = stats.metrics["bos_score"][:, :, rows].double().sum(0).cpu()  # (head, pos-1)
            self._sums("sink_hist")[li].index_add_(1, bins, sink)

    def merge(self, other: "ScanAccumulator") -> None:
        """Add another accumulator over a disjoint set of sequences."""
        same_columns = (self.token_ids is None) == (other.token_ids is None) and (
            self.token_ids is None or torch.equal(self.token_ids, other.token_ids))
        if self.layers != other.layers or self.seq_max.shape != other.seq_max.shape or not same_columns:
            raise ValueError("accumulators of different scans cannot be merged")
        for name in ("metric_sum", "metric_count", "dist_hist", "sink_hist", "key_weight", "query_max_sum",
                     "query_count"):
            getattr(self, name).add_(getattr(other, name))
        mine = other.seq_seen
        self.seq_max[:, mine] = other.seq_max[:, mine]
        self.seq_argmax[:, mine] = other.seq_argmax[:, mine]
        self.seq_seen |= mine

    def state_dict(self) -> dict[str, Tensor]:
        names = ("metric_sum", "metric_count", "seq_max", "seq_argmax", "seq_seen",
                 "dist_hist", "sink_hist", "key_weight", "query_max_sum", "query_count")
        return {name: getattr(self, name) for name in names}

    def result(self, layer: int, head_slot: int) -> HeadResult:
        """Finished numbers of scanned head `head_slot` (0-based in scan order) of `layer`."""
        li = self.layers.index(layer)
        count = self.metric_count[li, head_slot]
        mean = self.metric_sum[li, head_slot] / count.clamp(min=1)
        row = {name: float(mean[m]) if count[m] > 0 else None for m, name in enumerate(ROW_SUMS)}
        seen = self.seq_seen
        seq_max = self.seq_max[li, :, head_slot]
        metrics = {name: row[name] for name in HEAD_METRICS if name in row}
        d, d_sq = row["qk_distance"], row["qk_distance_sq"]
        # E[d^2] - E[d]^2 over the pooled mass; clamped: float rounding may leave a tiny negative
        metrics["qk_distance_variance"] = None if d is None else max(0.0, d_sq - d * d)
        metrics["key_token_entropy"] = token_entropy(self.key_weight[li, head_slot].numpy())
        metrics["query_token_entropy"] = token_entropy(self.query_max_sum[li, head_slot].numpy())
        metrics["mean_max_activation"] = float(seq_max[seen].double().mean()) if seen.any() else None
        metrics = {name: metrics[name] for name in HEAD_METRICS}
        hist = self.dist_hist[li, head_slot]
        total = float(hist.sum())
        rest = (hist - self.sink_hist[li, head_slot]).clamp(min=0.0)  # float rounding may leave a tiny negative
        rest_total = float(rest.sum())
        key_weight, query_max_sum, query_count = (self._per_vocab(t) for t in (
            self.key_weight[li, head_slot], self.query_max_sum[li, head_slot], self.query_count))
        return HeadResult(
            metrics=metrics,
            seq_max=seq_max.numpy(),
            seq_argmax=self.seq_argmax[li, :, head_slot].numpy(),
            dist_hist=(hist / total).numpy() if total > 0 else hist.numpy(),
            dist_hist_no_sink=(rest / rest_total).numpy() if rest_total > 0 else rest.numpy(),
            key_weight=key_weight,
            query_max_sum=query_max_sum,
            query_count=query_count,
        )

    def _per_vocab(self, columns: Tensor) -> np.ndarray:
        """One per-token total as a vocabulary-sized array (0 at the tokens it has no column for)."""
        if self.token_ids is None:
            return columns.numpy()
        out = np.zeros(self.vocab_size, dtype=columns.numpy().dtype)
        out[self.token_ids.numpy()] = columns.numpy()
        return out
