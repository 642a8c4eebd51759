"""Fused CPU row statistics (`cpu_row_stats`): the numba counterpart of `tri_row_stats`.

The torch reference (`row_stats_ref.ref_row_stats`) makes ~25 passes over
each (batch, head, rows, keys) block of scores. Here BLAS computes the scores
of `q_chunk` query rows (`row_stats_ref.chunk_scores`; only padding is masked),
and one compiled loop per (batch, head) reads each row's causal or window range
in short loops that LLVM vectorizes: the integer maximum over the scores' bits
(an order-preserving int32 key) with their count and sum; then one pass that
writes e = exp(s - max) (an inline polynomial: numba has no vector exp here,
and a libm call stops the loop vectorizing) and, from the same registers, the
float64 sums weighted by it (`reassoc` only), the ties and runner-up for the
margin and the bits of the largest weight outside column 0 (non-negative floats
order like their bits); then the histogram's bins as contiguous key ranges and
the column sums; the induction and duplicate keys are read from per-sequence
token groups (~1% of the pairs on real text) instead of comparing tokens at
every pair. Top-K ranks only keys whose weight can be shown (at least
`min_weight`, or the row's largest). Same inputs, outputs and conventions as the reference (ties:
lowest key index).

Row formulas, with m = max(row max, sink), d_k = s_k - m, e_k = exp(d_k),
Z = sum e_k (+ exp(sink - m)), p_k = e_k / Z:
  pattern_entropy  = ln(Z) * sum p_k - (sum e_k d_k) / Z   (both terms >= 0: no cancellation)
  logit_std        = sqrt(sum (s_k - mean)^2 / n)          (two passes: no E[s^2] - E[s]^2)
  top_logit_margin = s_(1) - s_(2), the two largest allowed scores, a tie counted twice (0 when n < 2)
Everything else is a sum of p_k over a set of keys (times |q-k| or (q-k)^2 for the distances), or a max.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch
from torch import Tensor

from headvis.kernels.row_stats_ref import (ROW_METRICS, AttentionSpec, RowStats, allowed_keys, chunk_scores,
                                           drop_light_entries)

try:
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic
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


# Vectorizable reductions: `reassoc` lets LLVM split each sum / max into SIMD lanes (a different, equally
# exact-in-float64 summation order); no other fast-math flag, so infinities and NaN keep their meaning.
_VEC = {"reassoc", "nsz"}


_INT_MIN = np.int32(-(2**31))
_MAGNITUDE = np.int32(0x7FFFFFFF)


@numba.njit(cache=True, nogil=True)
def _order_key(bits):  # pragma: no cover - compiled
    """float32 bits -> an int32 that orders like the float (-inf lowest); its own inverse."""
    return bits ^ ((bits >> 31) & _MAGNITUDE)


@intrinsic
def _bits_as_float(typingctx, bits):
    """An integer's low 32 bits -> the float32 they encode (an LLVM bitcast: free, and it vectorizes)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@intrinsic
def _float_bits(typingctx, value):
    """A float32's bits as an int32 (an LLVM bitcast)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


# exp(d) for float32 d <= 0, ~1 ulp: numba has no vector exp here (no SVML), and a call to the libm one stops
# LLVM vectorizing the loop around it; inline arithmetic does not. The range reduction runs in float64, whose
# 29 spare bits make it exact enough under the loops' `reassoc` (which rewrites a float32 Cody-Waite split:
# 68 ulps at d = -72, found in review); the polynomial (Cephes' expf) runs in float32.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_EXP_FLOOR = np.float32(-104.0)  # exp(-104) < half the smallest float32: 0, as -inf gives
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_ONE = np.float32(1.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _exp_nonpositive(d):  # pragma: no cover - compiled
    """exp(d) in float32 for d <= 0 or -inf (-> 0); subnormal results rounded once."""
    x = np.float64(max(d, _EXP_FLOOR)) * _LOG2E
    n = np.floor(x + 0.5)
    r = np.float32((x - n) * _LN2)  # |r| <= ln(2) / 2
    p = ((((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r) + _ONE
    e = np.int32(n)  # in [-150, 0]: 2^e as two normal factors, so one rounding makes any subnormal
    half = e >> 1
    return (p * _bits_as_float((half + 127) << 23)) * _bits_as_float((e - half + 127) << 23)


@numba.njit(fastmath=_VEC, cache=True, nogil=True)
def _max_count_sum(s, s_bits, lo, hi):  # pragma: no cover - compiled
    """Over the allowed scores s[lo:hi] (not allowed: -inf): the order key of the largest, their count and sum."""
    best = _INT_MIN
    n = 0
    total = 0.0
    for k in range(lo, hi):
        x = s[k]
        ok = x > -np.inf
        best = max(best, _order_key(s_bits[k]))
        n += 1 if ok else 0
        total += np.float64(x) if ok else 0.0
    return best, n, total


@numba.njit(fastmath=_VEC, cache=True, nogil=True)
def _exp_row(s, s_bits, e, lo, hi, q, shift, mean, top):  # pragma: no cover - compiled
    """e[k] = exp(s[k] - shift) over [lo, hi) (0 where not allowed), and in the same pass: z = sum e,
    sum e (s - shift), sum (s - mean)^2, sum e |q-k|, sum e (q-k)^2; how many scores have the largest order key
    `top`, the largest key below it, and the bits of the largest e[k] at k >= 1."""
    z = 0.0
    ed = 0.0
    var = 0.0
    dist = 0.0
    dist_sq = 0.0
    n_top = 0
    second = _INT_MIN
    best_bits = np.int32(0)
    shift64 = np.float64(shift)
    for k in range(lo, hi):
        x = s[k]
        ok = x > -np.inf
        w32 = _exp_nonpositive(x - shift)
        e[k] = w32
        w = np.float64(w32)
        d = np.float64(x) - shift64 if ok else 0.0
        c = np.float64(x) - mean if ok else 0.0
        gap = np.float64(abs(q - k))
        z += w
        ed += w * d
        var += c * c
        dist += w * gap
        dist_sq += w * (gap * gap)
        key = _order_key(s_bits[k])
        n_top += 1 if key == top else 0
        second = max(second, key if key < top else _INT_MIN)
        best_bits = max(best_bits, _float_bits(w32) if k >= 1 else np.int32(0))
    return z, ed, var, dist, dist_sq, n_top, second, best_bits


@numba.njit(fastmath=_VEC, cache=True, nogil=True)
def _range_sum_into(e, lo, hi, inv, column_sums):  # pragma: no cover - compiled
    """sum e[lo:hi], and column_sums[k] += e[k] * inv there."""
    total = 0.0
    for k in range(lo, hi):
        w = np.float64(e[k])
        total += w
        column_sums[k] += w * inv
    return total


@numba.njit(fastmath=_VEC, cache=True, nogil=True)
def _range_sum(e, lo, hi):  # pragma: no cover - compiled
    total = 0.0
    for k in range(lo, hi):
        total += np.float64(e[k])
    return total


@numba.njit(parallel=True, cache=True, nogil=True)
def _rows_kernel(scores, scores_bits, q_start, causal, window, key_valid, order, group_start, n_dup, n_ind, sinks,
                 edges, top_k, min_weight, metrics, ind_counted, dup_counted, margin_counted, max_nobos, argmax_nobos,
                 hist, key_weight, top_values, top_indices):  # pragma: no cover - compiled
    batch, heads, rows, keys = scores.shape
    n_bins = edges.shape[0] - 1
    has_valid = key_valid.shape[1] > 0
    for bh in numba.prange(batch * heads):
        b = bh // heads
        h = bh % heads
        best_e = np.empty(max(top_k, 1), dtype=np.float32)
        best_k = np.empty(max(top_k, 1), dtype=np.int64)
        listed = np.empty(keys, dtype=np.int64)  # a row's top-K candidates
        e = np.empty(keys, dtype=np.float32)  # the row's exp(s - shift), valid in [k_lo, k_hi)
        e_bits = e.view(np.int32)
        for r in range(rows):
            q = q_start + r
            s = scores[b, h, r]  # read in [k_lo, k_hi) only; -inf there where padding
            s_bits = scores_bits[b, h, r]
            k_hi = min(q + 1, keys) if causal else keys  # the allowed keys lie in [k_lo, k_hi)
            k_lo = 0
            if window > 0:
                k_lo = max(0, q - window + 1)
                if not causal:
                    k_hi = min(keys, q + window)
            top, n, total_s = _max_count_sum(s, s_bits, k_lo, k_hi)
            if n == 0:
                continue  # a fully padded row: every output stays 0 / -1
            m32 = _bits_as_float(_order_key(top))
            shift32 = max(m32, np.float32(sinks[h])) if sinks.shape[0] > 0 else m32  # max(row max, sink)
            mean = total_s / n
            z, ed, var, dist, dist_sq, n_top, second, best_bits = _exp_row(s, s_bits, e, k_lo, k_hi, q, shift32,
                                                                           mean, top)
            m = np.float64(m32)
            m2 = np.float64(_bits_as_float(_order_key(second)))
            shift = np.float64(shift32)
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
            # duplicate / induction keys from the token groups: order[b, gs:gs+n_dup] are the earlier positions
            # holding this row's token (ascending); the first n_ind of them, plus one, are the induction keys
            gs = group_start[b, q]
            dup = 0.0
            has_dup = False
            for j in range(gs, gs + n_dup[b, q]):
                k = order[b, j]
                if k >= k_lo and (not has_valid or key_valid[b, k]):
                    dup += e[k]
                    has_dup = True
            ind = 0.0
            has_ind = False
            for j in range(gs, gs + n_ind[b, q]):
                k = order[b, j] + 1
                if k >= k_lo and (not has_valid or key_valid[b, k]):
                    ind += e[k]
                    has_ind = True
            metrics[_IND, b, h, q] = ind * inv
            metrics[_DUP, b, h, q] = dup * inv
            ind_counted[b, h, q] = has_ind
            dup_counted[b, h, q] = has_dup
            if k_lo == 0:
                metrics[_BOS, b, h, q] = e[0] * inv
            if k_lo <= q < k_hi:
                metrics[_SELF, b, h, q] = e[q] * inv
            if k_lo <= q - 1 < k_hi:
                metrics[_PREV, b, h, q] = e[q - 1] * inv
            # the largest weight outside column 0 (first index on ties)
            lo1 = max(k_lo, 1)
            e_top = e[0] if k_lo == 0 else np.float32(0.0)  # the row's largest weight, column 0 included
            if best_bits > 0:
                for k in range(lo1, k_hi):
                    if e_bits[k] == best_bits:
                        max_nobos[b, h, q] = e[k] * inv
                        argmax_nobos[b, h, q] = k
                        e_top = max(e_top, e[k])
                        break
            # distance histogram: bin i holds keys with edges[i] <= q - k < edges[i + 1], a contiguous range; the
            # bins partition [k_lo, k_hi), so the same loops add the column sums (rows q >= 1: they need the row's
            # final normalizer)
            row_kw = key_weight[b, h]
            for i in range(n_bins):
                lo = max(k_lo, q - edges[i + 1] + 1)
                hi = min(k_hi, q - edges[i] + 1)
                if lo < hi:
                    total = _range_sum_into(e, lo, hi, inv, row_kw) if q >= 1 else _range_sum(e, lo, hi)
                    hist[b, h, q, i] = total * inv
            if top_k > 0:  # insertion, strict compare: earlier keys stay ahead on ties
                # only keys that may be shown are ranked: weight >= min_weight, or the row's largest
                floor = min(np.float32(min_weight * z_all * (1.0 - 1e-6)), e_top)
                # the keys at or above the floor (~11 a row on real text), listed without a branch, then ranked
                n_listed = 0
                for k in range(k_lo, k_hi):
                    listed[n_listed] = k
                    n_listed += 1 if e[k] >= floor else 0
                filled = 0
                for c in range(n_listed):
                    k = listed[c]
                    x = e[k]
                    if x < floor or x <= 0.0:  # the floor rises as the list fills
                        continue
                    if filled < top_k:
                        j = filled
                        filled += 1
                    elif x > best_e[top_k - 1]:
                        j = top_k - 1
                    else:
                        continue
                    while j > 0 and best_e[j - 1] < x:
                        best_e[j] = best_e[j - 1]
                        best_k[j] = best_k[j - 1]
                        j -= 1
                    best_e[j] = x
                    best_k[j] = k
                    if filled == top_k:
                        floor = max(floor, best_e[top_k - 1])
                for j in range(filled):
                    top_values[b, h, q, j] = best_e[j] * inv
                    top_indices[b, h, q, j] = best_k[j]


_buffers = threading.local()
_BUFFER_CACHE_BYTES = 64 << 20


def _chunk_buffer(size: int) -> Tensor:
    """A float32 buffer of `size` elements for a chunk's scores, kept by the thread between calls up to 64 MiB:
    a fresh one each chunk costs its page faults again (~10% of the call at T = 256). One in inference mode
    and one outside (an inference tensor cannot be written outside it)."""
    mode = torch.is_inference_mode_enabled()
    held = getattr(_buffers, "by_mode", {}).get(mode)
    if held is not None and held.numel() >= size:
        return held
    buffer = torch.empty(size)
    if 4 * size <= _BUFFER_CACHE_BYTES:
        _buffers.by_mode = {**getattr(_buffers, "by_mode", {}), mode: buffer}
    return buffer


def _token_groups(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence, positions grouped by token: (order, group_start, n_dup, n_ind), each (batch, seq_len).

    order[b] lists the positions sorted by (token, position); row q's group starts at group_start[b, q];
    the n_dup[b, q] positions before q in its group are its duplicate keys (k < q, same token), and the
    first n_ind[b, q] of them (those <= q - 2) plus one its induction keys (1 <= k < q, token before k
    equal to q's). Sparse on real text (~1% of pairs), so the kernel never compares every pair.
    """
    batch, seq_len = tokens.shape
    order = np.argsort(tokens, axis=1, kind="stable")
    ranked = np.take_along_axis(tokens, order, axis=1)
    index = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
    new_group = np.ones((batch, seq_len), np.bool_)
    new_group[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    start_sorted = np.maximum.accumulate(np.where(new_group, index, 0), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, index, axis=1)  # rank[b, q]: q's place in order[b]
    group_start = np.take_along_axis(start_sorted, rank, axis=1)
    n_dup = rank - group_start
    repeat = np.zeros((batch, seq_len), np.int64)
    repeat[:, 1:] = tokens[:, 1:] == tokens[:, :-1]  # q - 1 is in q's group: not an induction source
    return order, group_start, n_dup, n_dup - repeat


def cpu_row_stats(
    query: Tensor,
    key: Tensor,
    token_ids: Tensor,
    spec: AttentionSpec,
    *,
    top_k: int,
    bin_edges: list[int],
    min_weight: float = 0.0,
    q_chunk: int = 64,
) -> RowStats:
    """`ref_row_stats` fused on the CPU. query (batch, head, pos, d_head), key (batch, kv_head, pos, d_head).

    `min_weight` also bounds the top-K ranking: keys below it (but the row's largest) are never ranked.
    """
    batch, n_heads, seq_len, _ = query.shape
    # as many kernel threads as torch has: several processes on one machine (torchrun gives each 1 thread)
    # would otherwise each start one per core, and 2 ranks on 2 cores ran pass 1 3.4x slower (measured)
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    if key.shape[2] != seq_len or token_ids.shape != (batch, seq_len) or n_heads % key.shape[1]:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, tokens {tuple(token_ids.shape)}")
    if spec.sinks is not None and tuple(spec.sinks.shape) != (n_heads,):  # one per query head, or another head's
        raise ValueError(f"sinks must be (head,) = ({n_heads},), got {tuple(spec.sinks.shape)}")
    f32, f64 = np.float32, np.float64  # computed in float64, stored as float32 by the kernel (no copy after)
    metrics = np.zeros((len(ROW_METRICS), batch, n_heads, seq_len), f32)
    ind_counted = np.zeros((batch, n_heads, seq_len), np.bool_)
    dup_counted = np.zeros_like(ind_counted)
    margin_counted = np.zeros_like(ind_counted)
    max_nobos = np.zeros((batch, n_heads, seq_len), f32)
    argmax_nobos = np.full((batch, n_heads, seq_len), -1, np.int64)
    hist = np.zeros((batch, n_heads, seq_len, len(bin_edges) - 1), f32)
    key_weight = np.zeros((batch, n_heads, seq_len), f64)  # summed over rows: float64 until the end
    top_values = np.zeros((batch, n_heads, seq_len, top_k), f32)
    top_indices = np.full((batch, n_heads, seq_len, top_k), -1, np.int64)
    tokens = token_ids.cpu().numpy().astype(np.int64)
    order, group_start, n_dup, n_ind = _token_groups(tokens)
    key_valid = spec.key_valid.cpu().numpy().astype(np.bool_) if spec.key_valid is not None else np.zeros((batch, 0), np.bool_)
    sinks = spec.sinks.detach().float().cpu().numpy().astype(f64) if spec.sinks is not None else np.zeros(0, f64)
    edges = np.asarray(bin_edges, dtype=np.int64)
    window = int(spec.window or 0)
    size = batch * n_heads * min(q_chunk, seq_len) * seq_len
    score_buffer = _chunk_buffer(size)
    for q_start in range(0, seq_len, q_chunk):
        q_end = min(q_start + q_chunk, seq_len)
        k_end = q_end if spec.causal else seq_len  # causal: later keys are never allowed
        scores = chunk_scores(query, key[:, :, :k_end], spec, q_start, q_end, out=score_buffer)  # (batch, head, rows, k_end)
        if spec.key_valid is not None:  # the kernel reads each row's causal / window range only: mask the padding
            scores.masked_fill_(~allowed_keys(spec, q_start, q_end, k_end, scores.device), -math.inf)
        scores_np = scores.contiguous().numpy()
        _rows_kernel(scores_np, scores_np.view(np.int32), q_start, spec.causal, window, key_valid, order,
                     group_start, n_dup, n_ind, sinks, edges, top_k, float(min_weight), metrics, ind_counted,
                     dup_counted, margin_counted, max_nobos, argmax_nobos, hist, key_weight, top_values, top_indices)
    values, indices = torch.from_numpy(top_values), torch.from_numpy(top_indices)
    drop_light_entries(values, indices, min_weight)
    return RowStats(
        metrics={name: torch.from_numpy(metrics[i]) for i, name in enumerate(ROW_METRICS)},
        induction_counted=torch.from_numpy(ind_counted),
        duplicate_counted=torch.from_numpy(dup_counted),
        margin_counted=torch.from_numpy(margin_counted),
        max_nobos=torch.from_numpy(max_nobos),
        argmax_nobos=torch.from_numpy(argmax_nobos),
        dist_hist=torch.from_numpy(hist),
        key_weight=torch.from_numpy(key_weight.astype(f32)),
        top_values=values,
        top_indices=indices,
    )
