"""Fused CPU row statistics (`cpu_row_stats`): the numba counterpart of `tri_row_stats`.

The torch reference (`headvis.metrics.ref_row_stats`) makes ~25 passes over
each (batch, head, rows, keys) block of scores. Here BLAS computes the scores
of `q_chunk` query rows (`headvis.metrics.chunk_scores`), torch's vectorized
exp their exponentials, and one compiled loop per (batch, head) reads each row
three times: for the count, sum and two largest of the allowed scores, for
everything else, and for the column sums, accumulating in float64. Same
inputs, outputs and conventions as the reference (ties: lowest key index).

Row formulas, with m = max(row max, sink), d_k = s_k - m, e_k = exp(d_k),
Z = sum e_k (+ exp(sink - m)), p_k = e_k / Z (a third pass adds the column sums):
  pattern_entropy  = ln(Z) * sum p_k - (sum e_k d_k) / Z   (both terms >= 0: no cancellation)
  logit_std        = sqrt(sum (s_k - mean)^2 / n)          (two passes: no E[s^2] - E[s]^2)
  top_logit_margin = s_(1) - s_(2), the two largest allowed scores, a tie counted twice (0 when n < 2)
Everything else is a sum of p_k over a set of keys (times |q-k| or (q-k)^2 for the distances), or a max.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from headvis.metrics import ROW_METRICS, AttentionSpec, RowStats, allowed_keys, chunk_scores

try:
    import numba
except ImportError as e:  # pragma: no cover - numba comes with umap-learn
    raise ImportError("cpu_row_stats needs numba (pip install numba)") from e

__all__ = ["cpu_row_stats"]

# Prefer numba's OpenMP threading layer: its threads sleep between regions like torch's do, while
# the default workqueue layer's contend with torch's and cost ~15% more on a scan (2 cores, measured).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

# Metric slots of the kernel's output array, in ROW_METRICS order.
_SLOT = {name: i for i, name in enumerate(ROW_METRICS)}
(_ENT, _PREV, _IND, _DUP, _BOS, _SELF, _DIST, _MEAN, _STD, _MAX, _MARGIN, _DIST_SQ) = (_SLOT[n] for n in (
    "pattern_entropy", "previous_token_score", "induction_score", "duplicate_token_score", "bos_score",
    "self_attention_score", "qk_distance", "logit_mean", "logit_std", "logit_max", "top_logit_margin",
    "qk_distance_sq"))


@numba.njit(parallel=True, cache=True, nogil=True)
def _rows_kernel(scores, exps, shifts, q_start, causal, window, key_valid, tokens, prev_tokens, sinks, edges, top_k,
                 metrics, ind_counted, dup_counted, margin_counted, max_nobos, argmax_nobos, hist, key_weight,
                 top_values, top_indices):  # pragma: no cover - compiled
    batch, heads, rows, keys = scores.shape
    n_bins = edges.shape[0] - 1
    has_valid = key_valid.shape[1] > 0
    for bh in numba.prange(batch * heads):
        b = bh // heads
        h = bh % heads
        weights = np.zeros(keys, dtype=np.float64)
        bins_e = np.zeros(n_bins, dtype=np.float64)
        best_e = np.empty(max(top_k, 1), dtype=np.float64)
        best_k = np.empty(max(top_k, 1), dtype=np.int64)
        for r in range(rows):
            q = q_start + r
            # the allowed keys form the range [k_lo, k_hi), thinned by key_valid
            k_hi = min(q + 1, keys) if causal else keys
            k_lo = 0
            if window > 0:
                k_lo = max(0, q - window + 1)
                if not causal:
                    k_hi = min(keys, q + window)
            # pass 1: count, sum and max of the allowed scores (plain reductions: the loop vectorizes)
            n = 0
            total_s = 0.0
            m = -np.inf
            for k in range(k_lo, k_hi):
                if has_valid and not key_valid[b, k]:
                    continue
                s = scores[b, h, r, k]
                n += 1
                total_s += s
                m = max(m, s)
            if n == 0:
                continue  # a fully padded row: every output stays 0 / -1
            mean = total_s / n
            shift = shifts[b, h, r]  # max(row max, sink); exps = exp(scores - shift), 0 where not allowed
            # pass 2: exponentials and everything that is a weighted sum of them
            z = 0.0
            ed = 0.0
            var = 0.0
            dist = 0.0
            dist_sq = 0.0
            ind = 0.0
            dup = 0.0
            has_ind = False
            has_dup = False
            e_max = 0.0
            k_max = -1
            m2 = -np.inf  # the largest score below the max; n_top: how often the max occurs
            n_top = 0
            filled = 0
            tok_q = tokens[b, q]
            bins_e[:] = 0.0
            bin_i = n_bins - 1  # keys ascend, so q-k descends through the bins
            while bin_i > 0 and edges[bin_i] > q - k_lo:
                bin_i -= 1
            for k in range(k_lo, k_hi):
                while bin_i > 0 and edges[bin_i] > q - k:
                    bin_i -= 1
                if has_valid and not key_valid[b, k]:
                    weights[k] = 0.0
                    continue
                s = scores[b, h, r, k]
                d = s - shift
                e = exps[b, h, r, k]
                weights[k] = e
                if edges[bin_i] <= q - k < edges[bin_i + 1]:
                    bins_e[bin_i] += e
                z += e
                ed += e * d
                var += (s - mean) * (s - mean)
                if s == m:
                    n_top += 1
                elif s > m2:
                    m2 = s
                dist += e * abs(q - k)
                dist_sq += e * ((q - k) * (q - k))
                if k < q and tokens[b, k] == tok_q:
                    dup += e
                    has_dup = True
                if 1 <= k < q and prev_tokens[b, k] == tok_q:
                    ind += e
                    has_ind = True
                if k >= 1 and e > e_max:  # strict: the lowest index wins ties
                    e_max = e
                    k_max = k
                if top_k > 0 and e > 0.0:
                    if filled < top_k:
                        j = filled
                        filled += 1
                    elif e > best_e[top_k - 1]:
                        j = top_k - 1
                    else:
                        j = -1
                    if j >= 0:  # insertion sort, strict compare: earlier keys stay ahead on ties
                        while j > 0 and best_e[j - 1] < e:
                            best_e[j] = best_e[j - 1]
                            best_k[j] = best_k[j - 1]
                            j -= 1
                        best_e[j] = e
                        best_k[j] = k
            sink_e = math.exp(sinks[h] - shift) if sinks.shape[0] > 0 else 0.0
            z_all = z + sink_e
            inv = 1.0 / z_all
            metrics[_ENT, b, h, q] = math.log(z_all) * z * inv - ed * inv
            metrics[_MEAN, b, h, q] = mean
            metrics[_STD, b, h, q] = math.sqrt(var / n)
            metrics[_MAX, b, h, q] = m
            metrics[_DIST, b, h, q] = dist * inv
            metrics[_DIST_SQ, b, h, q] = dist_sq * inv
            if n >= 2:  # a tie for the max gives margin 0
                metrics[_MARGIN, b, h, q] = 0.0 if n_top >= 2 else m - m2
                margin_counted[b, h, q] = True
            metrics[_IND, b, h, q] = ind * inv
            metrics[_DUP, b, h, q] = dup * inv
            ind_counted[b, h, q] = has_ind
            dup_counted[b, h, q] = has_dup
            if k_lo == 0:
                metrics[_BOS, b, h, q] = weights[0] * inv
            if k_lo <= q < k_hi:
                metrics[_SELF, b, h, q] = weights[q] * inv
            if k_lo <= q - 1 < k_hi:
                metrics[_PREV, b, h, q] = weights[q - 1] * inv
            if k_max >= 0:
                max_nobos[b, h, q] = e_max * inv
                argmax_nobos[b, h, q] = k_max
            for j in range(filled):
                top_values[b, h, q, j] = best_e[j] * inv
                top_indices[b, h, q, j] = best_k[j]
            for i in range(n_bins):
                hist[b, h, q, i] = bins_e[i] * inv
            if q >= 1:  # pass 3: column sums need the row's final normalizer
                for k in range(k_lo, k_hi):
                    key_weight[b, h, k] += weights[k] * inv


def cpu_row_stats(
    query: Tensor,
    key: Tensor,
    token_ids: Tensor,
    spec: AttentionSpec,
    *,
    top_k: int,
    bin_edges: list[int],
    q_chunk: int = 64,
) -> RowStats:
    """`ref_row_stats` fused on the CPU. query (batch, head, pos, d_head), key (batch, kv_head, pos, d_head)."""
    batch, n_heads, seq_len, _ = query.shape
    if key.shape[2] != seq_len or token_ids.shape != (batch, seq_len) or n_heads % key.shape[1]:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, tokens {tuple(token_ids.shape)}")
    f64 = np.float64
    metrics = np.zeros((len(ROW_METRICS), batch, n_heads, seq_len), f64)
    ind_counted = np.zeros((batch, n_heads, seq_len), np.bool_)
    dup_counted = np.zeros_like(ind_counted)
    margin_counted = np.zeros_like(ind_counted)
    max_nobos = np.zeros((batch, n_heads, seq_len), f64)
    argmax_nobos = np.full((batch, n_heads, seq_len), -1, np.int64)
    hist = np.zeros((batch, n_heads, seq_len, len(bin_edges) - 1), f64)
    key_weight = np.zeros((batch, n_heads, seq_len), f64)
    top_values = np.zeros((batch, n_heads, seq_len, top_k), f64)
    top_indices = np.full((batch, n_heads, seq_len, top_k), -1, np.int64)
    tokens = token_ids.cpu().numpy().astype(np.int64)
    prev_tokens = np.concatenate([np.full((batch, 1), -1, np.int64), tokens[:, :-1]], axis=1)
    key_valid = spec.key_valid.cpu().numpy().astype(np.bool_) if spec.key_valid is not None else np.zeros((batch, 0), np.bool_)
    sinks = spec.sinks.float().cpu().numpy().astype(f64) if spec.sinks is not None else np.zeros(0, f64)
    edges = np.asarray(bin_edges, dtype=np.int64)
    window = int(spec.window or 0)
    for q_start in range(0, seq_len, q_chunk):
        q_end = min(q_start + q_chunk, seq_len)
        k_end = q_end if spec.causal else seq_len  # causal: later keys are never allowed
        scores = chunk_scores(query, key[:, :, :k_end], spec, q_start, q_end)  # (batch, head, rows, k_end)
        # exp is the costly part of a row: torch's vectorized exp does it, the loop does the rest.
        masked = scores.masked_fill(~allowed_keys(spec, q_start, q_end, k_end, scores.device), -math.inf)
        shift = masked.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        if spec.sinks is not None:
            shift = torch.maximum(shift, spec.sinks.float().to(shift.device)[None, :, None, None])
        exps = torch.exp(masked - shift)
        _rows_kernel(scores.contiguous().numpy(), exps.numpy(), shift[..., 0].contiguous().numpy(), q_start, spec.causal, window, key_valid, tokens, prev_tokens,
                     sinks, edges, top_k, metrics, ind_counted, dup_counted, margin_counted, max_nobos, argmax_nobos, hist,
                     key_weight, top_values, top_indices)
    as_f32 = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731 - one conversion, used 6 times
    return RowStats(
        metrics={name: as_f32(metrics[i]) for i, name in enumerate(ROW_METRICS)},
        induction_counted=torch.from_numpy(ind_counted),
        duplicate_counted=torch.from_numpy(dup_counted),
        margin_counted=torch.from_numpy(margin_counted),
        max_nobos=as_f32(max_nobos),
        argmax_nobos=torch.from_numpy(argmax_nobos),
        dist_hist=as_f32(hist),
        key_weight=as_f32(key_weight),
        top_values=as_f32(top_values),
        top_indices=torch.from_numpy(top_indices),
    )
