"""Fused attention row statistics: `tri_row_stats`, the Triton twin of `row_stats_ref.ref_row_stats`.

Same inputs, same `RowStats`, same conventions (row 0 present, zeros for rows
without an allowed key, -1 for missing indices, the lowest key index wins every
tie), but no (query_pos, key_pos) matrix is ever written: each program owns a
block of query rows of one (batch, head) and streams over key blocks with an
online softmax, keeping every row quantity as a running sum relative to the
row's running max. Three kernels:

- `_row_bound_kernel`, grid (query blocks, batch * head): each row's entry
  bound for the top-K set (QK and one max per pair), so that the row pass
  inserts only the keys a row reports; not run when top-K of any weight is
  asked for (min_weight 0);
- `_row_stats_fwd_kernel`, grid (query blocks, batch * head): every per-row
  output, plus the row's normalizer (c, log L), lse = c + log L;
- `_key_weight_kernel`, grid (key blocks, batch * head): column sums of the
  pattern over rows q >= 1, which need each row's final normalizer, hence a
  second pass (it recomputes the scores; deterministic, no atomics).

Grouped-query attention reads kv head `head // (n_heads // n_kv_heads)` in the
kernel; `key` is never repeated. Scores accumulate in float32 whatever the
input dtype (float32 inputs use IEEE float32 dot products, not TF32).

Needs triton. On a machine without CUDA the kernels run under Triton's CPU
interpreter when `TRITON_INTERPRET=1` is set before triton is first imported
(slow; float32 and float16 only): that is how the tests run here.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the optional `triton` extra
    raise ImportError("headvis.kernels.row_stats needs triton: pip install 'headvis[triton]'") from error

from headvis.kernels.row_stats_ref import ROW_METRICS, AttentionSpec, RowStats, drop_light_entries

__all__ = ["is_available", "tri_row_stats"]

# Index of an empty top-k slot; above every key index, so empty slots lose ties.
_NO_KEY = tl.constexpr(1 << 30)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softcapped(scores, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(scores / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1).

    The form has the exact limits +-1 for large |x| (exp gives inf or 0, never
    NaN); its absolute error near 0 is ~1e-7 * softcap.
    """
    if HAS_SOFTCAP:
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (scores / softcap)) + 1.0))
    return scores


@triton.jit
def _allowed(dist, key_pos, seq_len, window, key_valid,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr):
    """Which (query, key) pairs a row may read; dist = q - k, all arguments broadcast together."""
    ok = tl.broadcast_to((key_pos >= 0) & (key_pos < seq_len), dist.shape)
    if CAUSAL:
        ok = ok & (dist >= 0)
    if HAS_WINDOW:
        if CAUSAL:
            ok = ok & (dist < window)
        else:
            ok = ok & (dist < window) & (dist > -window)
    if HAS_KEY_VALID:
        ok = ok & key_valid
    return ok


@triton.jit
def _score_at(q, k_base, key_pos, key_ok, offs_d, d_in, stride_kt, stride_kd, scaling, softcap,
              HAS_SOFTCAP: tl.constexpr):
    """(BLOCK_M,) scores of each query row against one key per row (bos, self, previous token)."""
    k = tl.load(k_base + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & d_in[None, :], other=0.0)
    scores = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scaling
    return _softcapped(scores, softcap, HAS_SOFTCAP)


@triton.jit
def _head_bases(pid_bh, Q, K, stride_qb, stride_qh, stride_kb, stride_kh, n_heads, group):
    """(batch, head, Q pointer, K pointer) of pid_bh = batch * n_heads + head; K is kv head head // group's."""
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
    return batch, head, q_base, k_base


@triton.jit
def _key_block(state, q, q0, q_pos, tok_q, k0, k_base, tok_base, valid_base, offs_d, d_in, stride_kt, stride_kd,
               seq_len, window, scaling, softcap, EDGES, BIN_OF, bin_reach, n_bins, edge_first, edge_last,
               bin_col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_KEY_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
               TOKEN_COUNTED: tl.constexpr, SPARSE_MATCHES: tl.constexpr, MASKED: tl.constexpr):
    """The running row state of `_row_stats_fwd_kernel` after the key block k0 .. k0 + BLOCK_N.

    With MASKED False the caller guarantees that every key of the block is allowed for every row (no window,
    no padding, inside T) and, when causal, earlier than every row: the block then skips every mask, counts
    BLOCK_N keys without summing a mask, and forms the distance sums from block-local terms (causal): with
    b = q - (k0 + BLOCK_N - 1) >= 1 and r = BLOCK_N - 1 - j >= 0, q - k = b + r, so
    sum e |q - k| = b E0 + E1 and sum e (q - k)^2 = b (b E0 + 2 E1) + E2, E_n = sum e r^n: every term is
    >= 0, nothing cancels, and the only per-pair work is E1 and E2. That is the cost of almost every block
    of a long causal row.
    """
    (m_i, l_i, t_i, dist_acc, dist_sq_acc, ind_acc, dup_acc, ind_any, dup_any, n_i, mean_i, m2_i, hist, top_s, top_i,
     theta) = state
    j = tl.arange(0, BLOCK_N)
    k_pos = k0 + j
    k_in = k_pos < seq_len
    if MASKED:
        kt = tl.load(k_base + k_pos[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=k_in[None, :] & d_in[:, None], other=0.0)  # (HEAD_DIM_PAD, BLOCK_N)
    else:
        kt = tl.load(k_base + k_pos[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=d_in[:, None],
                     other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scaling  # (BLOCK_M, BLOCK_N) scores
    s = _softcapped(s, softcap, HAS_SOFTCAP)
    dist = q_pos[:, None] - k_pos[None, :]  # q - k; only materialized where a mask or bin needs it
    if MASKED:
        if HAS_KEY_VALID:
            k_valid = tl.load(valid_base + k_pos, mask=k_in, other=0) != 0
        else:
            k_valid = k_in
        allowed = _allowed(dist, k_pos[None, :], seq_len, window, k_valid[None, :],
                           CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
        s_allowed = tl.where(allowed, s, float("-inf"))
    else:
        s_allowed = s

    # Online softmax, entropy and distance sums.
    m_tile = tl.max(s_allowed, 1)
    m_new = tl.maximum(m_i, m_tile)
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # every row has BLOCK_N allowed keys here
    alpha = tl.exp(m_i - m_safe)  # 0 while the row had no allowed key
    shift = s - m_safe[:, None]  # finite everywhere (masked loads are 0)
    # exp as exp2 of shift x log2 e: tl.exp compiled to ~3 more instructions a pair (kernel_resources.py)
    if MASKED:
        e = tl.math.exp2(tl.where(allowed, shift, float("-inf")) * 1.4426950408889634)  # 0 where masked
    else:
        e = tl.math.exp2(shift * 1.4426950408889634)
    e_sum = tl.sum(e, 1)
    t_i = alpha * (t_i + tl.where(l_i > 0, m_i - m_safe, 0.0) * l_i) + tl.sum(e * shift, 1)
    l_i = l_i * alpha + e_sum
    if MASKED or not CAUSAL:
        d = dist.to(tl.float32)
        dist_acc = dist_acc * alpha + tl.sum(e * tl.abs(d), 1)
        dist_sq_acc = dist_sq_acc * alpha + tl.sum(e * (d * d), 1)
    else:
        r = (BLOCK_N - 1 - j).to(tl.float32)  # distance from the block's last key
        b = (q_pos - (k0 + BLOCK_N - 1)).to(tl.float32)  # >= 1: the block ends before the row
        e1 = tl.sum(e * r[None, :], 1)
        dist_acc = dist_acc * alpha + (b * e_sum + e1)
        dist_sq_acc = dist_sq_acc * alpha + (b * (b * e_sum + 2.0 * e1) + tl.sum(e * (r * r)[None, :], 1))

    if not SPARSE_MATCHES:  # else the launcher sums these few pairs from the token list, after the loop
        # Induction (1 <= k < q, tok[k-1] == tok[q]) and duplicate (k < q, tok[k] == tok[q]) keys. Key 0 needs no
        # test of its own: its "previous token" loads as -1, which no token id of a real row equals.
        tok_k = tl.load(tok_base + k_pos, mask=k_in, other=-1)
        tok_prev_k = tl.load(tok_base + k_pos - 1, mask=k_in & (k_pos >= 1), other=-1)
        ind_keys = tok_prev_k[None, :] == tok_q[:, None]
        dup_keys = tok_k[None, :] == tok_q[:, None]
        if MASKED:
            earlier = allowed & (dist > 0)
            ind_keys = ind_keys & earlier
            dup_keys = dup_keys & earlier
        elif not CAUSAL:
            ind_keys = ind_keys & (dist > 0)
            dup_keys = dup_keys & (dist > 0)
        ind_acc = ind_acc * alpha + tl.sum(tl.where(ind_keys, e, 0.0), 1)
        dup_acc = dup_acc * alpha + tl.sum(tl.where(dup_keys, e, 0.0), 1)
        if not TOKEN_COUNTED:  # else the launcher finds the counted rows from the tokens alone
            ind_any = tl.maximum(ind_any, tl.max(ind_keys.to(tl.int32), 1))
            dup_any = tl.maximum(dup_any, tl.max(dup_keys.to(tl.int32), 1))

    # Logit mean / std: the block's (count, mean, M2), merged with Chan's formula.
    if MASKED:
        n_b = tl.sum(allowed.to(tl.float32), 1)
        mean_b = tl.sum(tl.where(allowed, s, 0.0), 1) / tl.maximum(n_b, 1.0)
        dev = tl.where(allowed, s - mean_b[:, None], 0.0)
    else:
        n_b = tl.full([BLOCK_M], BLOCK_N, tl.float32)
        mean_b = tl.sum(s, 1) / BLOCK_N
        dev = s - mean_b[:, None]
    n_new = n_i + n_b
    frac = n_b / tl.maximum(n_new, 1.0)
    delta = mean_b - mean_i
    mean_i = mean_i + delta * frac
    m2_i = m2_i + tl.sum(dev * dev, 1) + delta * delta * n_i * frac
    n_i = n_new

    # Distance histogram: masked sums only for the bins this block crosses.
    hist = hist * alpha[:, None]
    d_min = q0 - (k0 + BLOCK_N - 1)
    d_max = q0 + BLOCK_M - 1 - k0
    # BIN_OF[d + bin_reach] = number of edges <= d, for |d| <= bin_reach (beyond, the bins saturate).
    b_first = tl.maximum(tl.load(BIN_OF + tl.minimum(tl.maximum(d_min, -bin_reach), bin_reach) + bin_reach) - 1, 0)
    b_last = tl.minimum(tl.load(BIN_OF + tl.minimum(tl.maximum(d_max, -bin_reach), bin_reach) + bin_reach) - 1,
                        n_bins - 1)
    inside = (d_min >= edge_first) & (d_max < edge_last)
    b_stop = tl.where(inside, b_last, b_last + 1)
    rest = e_sum
    for b in range(b_first, b_stop):
        in_bin = (dist >= tl.load(EDGES + b)) & (dist < tl.load(EDGES + b + 1))
        part = tl.sum(tl.where(in_bin, e, 0.0), 1)
        hist += tl.where(bin_col[None, :] == b, part[:, None], 0.0)
        rest -= part
    if inside:
        hist += tl.where(bin_col[None, :] == b_last, rest[:, None], 0.0)

    # Top-KEEP raw scores: insert each row's best remaining key while it beats the set's minimum.
    if tl.max((m_tile > theta).to(tl.int32), 0) > 0:
        s_cand = s_allowed
        best = m_tile
        while tl.max((best > theta).to(tl.int32), 0) > 0:
            best_pos = tl.min(tl.where(s_cand == best[:, None], k_pos[None, :], _NO_KEY), 1)
            enter = best > theta
            # Evict the weakest slot: minimum score, highest key index among equals.
            weakest = tl.max(tl.where(top_s == theta[:, None], top_i, -1), 1)
            slot = (top_i == weakest[:, None]) & enter[:, None]
            top_s = tl.where(slot, best[:, None], top_s)
            top_i = tl.where(slot, best_pos[:, None], top_i)
            theta = tl.min(top_s, 1)
            s_cand = tl.where(k_pos[None, :] == best_pos[:, None], float("-inf"), s_cand)
            best = tl.max(s_cand, 1)
    m_i = m_new
    return (m_i, l_i, t_i, dist_acc, dist_sq_acc, ind_acc, dup_acc, ind_any, dup_any, n_i, mean_i, m2_i, hist, top_s,
            top_i, theta)


@triton.jit
def _key_range(q0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr):
    """(k_lo, k_split, k_hi): the key blocks [k_lo, k_hi) that can hold an allowed key for the query rows
    q0 .. q0 + BLOCK_M, of which those before k_split have every key allowed for every row (and, causal,
    earlier than every row) and need no mask: without a window or padding, causal blocks wholly before q0
    and bidirectional blocks wholly inside T."""
    k_lo = 0
    k_hi = seq_len
    if CAUSAL:
        k_hi = tl.minimum(seq_len, q0 + BLOCK_M)
    if HAS_WINDOW:
        k_lo = tl.maximum(0, q0 - window + 1) // BLOCK_N * BLOCK_N
        if not CAUSAL:
            k_hi = tl.minimum(seq_len, q0 + BLOCK_M - 1 + window)
    k_split = k_lo
    if not HAS_WINDOW and not HAS_KEY_VALID:
        if CAUSAL:
            k_split = q0 // BLOCK_N * BLOCK_N
        else:
            k_split = seq_len // BLOCK_N * BLOCK_N
    return k_lo, k_split, k_hi


@triton.jit
def _bound_block(b1, b2, l_i, q, q_pos, k0, k_base, valid_base, offs_d, d_in, stride_kt, stride_kd, seq_len, window,
                 scaling, softcap, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_KEY_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr, RANKED: tl.constexpr, FOLD: tl.constexpr):
    """(b1, b2, l) after key block k0: each row's two largest block maxima so far and, RANKED, the sum of
    exp(s - b1) over its keys so far (`_row_bound_kernel`). FOLD: in units of the raw dot product q.k
    (scaling > 0, no softcap: the maxima are the same keys'), l as a sum of exp2(q.k (scaling log2 e) - b1
    (scaling log2 e)), one FFMA and one exp2 a pair."""
    k_pos = k0 + tl.arange(0, BLOCK_N)
    k_in = k_pos < seq_len
    if MASKED:
        kt = tl.load(k_base + k_pos[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=k_in[None, :] & d_in[:, None], other=0.0)
    else:
        kt = tl.load(k_base + k_pos[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=d_in[:, None],
                     other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if not FOLD:
        s = _softcapped(s * scaling, softcap, HAS_SOFTCAP)
    if MASKED:
        if HAS_KEY_VALID:
            k_valid = tl.load(valid_base + k_pos, mask=k_in, other=0) != 0
        else:
            k_valid = k_in
        allowed = _allowed(q_pos[:, None] - k_pos[None, :], k_pos[None, :], seq_len, window, k_valid[None, :],
                           CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
        s = tl.where(allowed, s, float("-inf"))
    m_tile = tl.max(s, 1)
    b2 = tl.maximum(b2, tl.minimum(b1, m_tile))
    m_new = tl.maximum(b1, m_tile)
    if RANKED:  # online: l = sum exp(s - m) over the keys so far, rescaled when the max grows
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD:
            to_log2 = scaling * 1.4426950408889634
            shift = m_safe * to_log2
            l_i = l_i * tl.math.exp2(b1 * to_log2 - shift) + tl.sum(tl.math.exp2(s * to_log2 - shift[:, None]), 1)
        else:
            l_i = l_i * tl.exp(b1 - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)  # masked: exp(-inf) = 0
    return m_new, b2, l_i


@triton.jit
def _row_bound_kernel(
    Q, K, KEY_VALID, THETA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    seq_len, n_heads, group, window, scaling, softcap, log_min_weight,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, RANKED: tl.constexpr, FOLD: tl.constexpr,
):
    """Each row's entry bound for the top-KEEP set of `_row_stats_fwd_kernel`: a score below every key the
    row must report, so that the row pass inserts only keys above it (QK and one max per pair here).

    The row pass needs the row's two largest scores (max_nobos is one of them; top_logit_margin needs the
    second) and, with RANKED (top-K reported with min_weight > 0), every key with p >= min_weight, whose
    scores are >= lse + log(min_weight), lse = m + log l the log-sum-exp of the row's scores (an attention
    sink only adds to it: leaving it out lowers the bound). The second largest of the block maxima, b2, is
    the score of a key other than the max's, so it is <= the row's second largest score: theta =
    min(b2, lse + log(min_weight)) (RANKED) or b2, lowered by 2^-10 (1 + |m|): a key enters only when it
    beats the set's minimum strictly, so the key scoring b2 itself (the row's second largest when the two
    largest sit in different blocks) would never enter at theta = b2; and a score or normalizer rounded
    otherwise here than there still enters. -inf: no bound (the row has one block of
    keys, or none). Cost per pair: QK, one max and (RANKED) one exp and add (FOLD, scaling > 0 without
    softcap: the scale and the shift in one FFMA before the exp2, `_bound_block`).
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks read the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    batch, head, q_base, k_base = _head_bases(pid_bh, Q, K, stride_qb, stride_qh, stride_kb, stride_kh, n_heads,
                                              group)
    valid_base = KEY_VALID + batch.to(tl.int64) * seq_len
    q0 = pid_m * BLOCK_M
    q_pos = q0 + tl.arange(0, BLOCK_M)
    q_in = q_pos < seq_len
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_in = offs_d < HEAD_DIM
    q = tl.load(q_base + q_pos[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_in[:, None] & d_in[None, :], other=0.0)
    b1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    k_lo, k_split, k_hi = _key_range(q0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
    for k0 in range(k_lo, k_split, BLOCK_N):
        b1, b2, l_i = _bound_block(b1, b2, l_i, q, q_pos, k0, k_base, valid_base, offs_d, d_in, stride_kt,
                                   stride_kd, seq_len, window, scaling, softcap, BLOCK_N, CAUSAL, HAS_WINDOW,
                                   HAS_SOFTCAP, HAS_KEY_VALID, DOT_PRECISION, False, RANKED, FOLD)
    for k0 in range(k_split, k_hi, BLOCK_N):
        b1, b2, l_i = _bound_block(b1, b2, l_i, q, q_pos, k0, k_base, valid_base, offs_d, d_in, stride_kt,
                                   stride_kd, seq_len, window, scaling, softcap, BLOCK_N, CAUSAL, HAS_WINDOW,
                                   HAS_SOFTCAP, HAS_KEY_VALID, DOT_PRECISION, True, RANKED, FOLD)
    if FOLD:  # back to scores: the same product q.k x scaling as the row pass's
        lse = (b1 * (scaling * 1.4426950408889634) + tl.math.log2(tl.maximum(l_i, 1.0))) * 0.6931471805599453
        b1 = b1 * scaling
        b2 = b2 * scaling
    else:
        lse = b1 + tl.log(tl.maximum(l_i, 1.0))  # l >= 1 with a key
    bound = b2
    if RANKED:
        bound = tl.minimum(bound, lse + log_min_weight)
    finite = bound > float("-inf")
    bound = tl.where(finite, bound - 0.0009765625 * (1.0 + tl.abs(tl.where(finite, b1, 0.0))), float("-inf"))
    tl.store(THETA + pid_bh.to(tl.int64) * seq_len + q_pos, bound, mask=q_in)


@triton.jit
def _row_stats_fwd_kernel(
    Q, K, TOKENS, KEY_VALID, SINKS, EDGES, BIN_OF,
    METRICS, COUNTED, MAX_NOBOS, ARGMAX_NOBOS, DIST_HIST, TOP_VALUES, TOP_INDICES, ROW_NORM, THETA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    seq_len, n_heads, group, n_bins, window, scaling, softcap, plane,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, HAS_SINKS: tl.constexpr,
    TOP_K: tl.constexpr, KEEP: tl.constexpr, KEEP_PAD: tl.constexpr,
    BINS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, TOKEN_COUNTED: tl.constexpr,
    SPARSE_MATCHES: tl.constexpr, BOUNDED: tl.constexpr,
):
    """Every per-row quantity of BLOCK_M query rows of one (batch, head), streaming over key blocks.

    Online softmax: with the running max m, l = sum_k e_k where e_k = exp(s_k - m)
    over allowed keys; when m grows to m', every running sum of e-weighted
    terms is rescaled by alpha = exp(m - m'). At the end (sink optional)
    p_k = e_k * f / L = exp((s_k - c) - log L) with c = max(m, sink),
    f = exp(m - c), L = l f + exp(sink - c); lse = c + log L is never formed
    (at |s| ~ 1e3 its float32 rounding alone is ~6e-5).

    Entropy without cancellation: H = lse - sum p s cancels when logits are
    large, so track t = sum_k e_k (s_k - m) (<= 0; on a max update
    t' = alpha (t + (m - m') l)) and use H = (f / L) (l ((c - m) + log L) - t),
    a sum of two non-negative terms.
    Logit mean and population std: per key block, the block's own mean and
    squared deviations (two passes over registers), merged into the running
    (count, mean, M2) with Chan's formula: no sum-of-squares cancellation.
    Distance histogram: a key block spans q - k in [d_min, d_max]; only the
    bins it crosses get a masked sum, and when the span lies inside the edges
    the last bin takes the block's remaining mass (most far blocks sit in one
    power-of-two bin and cost nothing extra). The first and last bin come from
    a lookup table, BIN_OF[d + bin_reach] = #edges <= d, built by the launcher.
    Cost: key blocks wholly before the diagonal (causal, no window, no
    padding) take `_key_block`'s unmasked path; and without a window or
    padding the rows that count for induction / duplicate are found from the
    tokens by the launcher (TOKEN_COUNTED), so the key loop skips those two
    reductions; where the matching (q, k) pairs are few (SPARSE_MATCHES, real
    text: ~1% of them) the key loop skips the induction and duplicate sums too
    and the launcher evaluates those pairs after it (`_sparse_match_sums`).
    `benchmarks/kernel_resources.py` reads the compiled cost.
    Top-k: softmax is monotone in s within a row, so a running top-KEEP set
    of raw scores is kept (ties: lowest key index) and turned into
    probabilities at the end. A key enters only when it beats the
    set's minimum; blocks where no row's max beats its minimum are skipped.
    KEEP >= 2 so the best key other than 0 (max_nobos) and the second-largest
    score (top_logit_margin, the max minus it) are always in the set: the
    margin costs the key loop nothing. BOUNDED: the set's empty slots start
    at THETA, each row's entry bound from `_row_bound_kernel` (below the two
    largest scores and every key with p >= min_weight), not at -inf, so the
    first blocks no longer fill the set with keys that a later one evicts:
    only keys the row reports, and the few just above the bound, are inserted.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks read the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    batch, head, q_base, k_base = _head_bases(pid_bh, Q, K, stride_qb, stride_qh, stride_kb, stride_kh, n_heads,
                                              group)
    tok_base = TOKENS + batch.to(tl.int64) * seq_len
    valid_base = KEY_VALID + batch.to(tl.int64) * seq_len
    row_base = pid_bh.to(tl.int64) * seq_len  # (batch, head, 0) in (batch, head, query_pos) outputs

    q0 = pid_m * BLOCK_M
    q_pos = q0 + tl.arange(0, BLOCK_M)
    q_in = q_pos < seq_len
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_in = offs_d < HEAD_DIM
    q = tl.load(q_base + q_pos[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_in[:, None] & d_in[None, :], other=0.0)  # (BLOCK_M, HEAD_DIM_PAD)
    tok_q = tl.load(tok_base + q_pos, mask=q_in, other=-1)

    # Scores of the three single keys a row reports: bos (k = 0), self (k = q), previous (k = q - 1).
    zero_pos = q_pos * 0
    s_bos = _score_at(q, k_base, zero_pos, q_in, offs_d, d_in, stride_kt, stride_kd, scaling, softcap, HAS_SOFTCAP)
    s_self = _score_at(q, k_base, q_pos, q_in, offs_d, d_in, stride_kt, stride_kd, scaling, softcap, HAS_SOFTCAP)
    s_prev = _score_at(q, k_base, q_pos - 1, q_in & (q_pos >= 1), offs_d, d_in, stride_kt, stride_kd,
                       scaling, softcap, HAS_SOFTCAP)
    if HAS_KEY_VALID:
        v_bos = tl.load(valid_base + zero_pos, mask=q_in, other=0) != 0
        v_self = tl.load(valid_base + q_pos, mask=q_in, other=0) != 0
        v_prev = tl.load(valid_base + q_pos - 1, mask=q_in & (q_pos >= 1), other=0) != 0
    else:
        v_bos = q_in
        v_self = q_in
        v_prev = q_in
    ok_bos = _allowed(q_pos, zero_pos, seq_len, window, v_bos, CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
    ok_self = _allowed(zero_pos, q_pos, seq_len, window, v_self, CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
    ok_prev = _allowed(zero_pos + 1, q_pos - 1, seq_len, window, v_prev, CAUSAL, HAS_WINDOW, HAS_KEY_VALID)

    # Running state, one entry per query row.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # max allowed score
    l_i = tl.zeros([BLOCK_M], tl.float32)  # sum e
    t_i = tl.zeros([BLOCK_M], tl.float32)  # sum e * (s - m)
    dist_acc = tl.zeros([BLOCK_M], tl.float32)  # sum e * |q - k|
    dist_sq_acc = tl.zeros([BLOCK_M], tl.float32)  # sum e * (q - k)^2
    ind_acc = tl.zeros([BLOCK_M], tl.float32)  # sum e over induction keys
    dup_acc = tl.zeros([BLOCK_M], tl.float32)  # sum e over duplicate keys
    ind_any = tl.zeros([BLOCK_M], tl.int32)
    dup_any = tl.zeros([BLOCK_M], tl.int32)
    n_i = tl.zeros([BLOCK_M], tl.float32)  # allowed keys so far
    mean_i = tl.zeros([BLOCK_M], tl.float32)  # their mean score
    m2_i = tl.zeros([BLOCK_M], tl.float32)  # their summed squared deviation
    bin_col = tl.arange(0, BINS_PAD)
    hist = tl.zeros([BLOCK_M, BINS_PAD], tl.float32)  # sum e by q - k bin
    keep_col = tl.arange(0, KEEP_PAD)
    real_slot = keep_col < KEEP  # padding slots hold +inf: never the minimum, never reported
    if BOUNDED:  # empty slots start at the row's entry bound (`_row_bound_kernel`): only keys above it enter
        floor = tl.load(THETA + row_base + q_pos, mask=q_in, other=float("-inf"))
        top_s = tl.where(real_slot[None, :], floor[:, None], float("inf"))
    else:
        top_s = tl.zeros([BLOCK_M, KEEP_PAD], tl.float32) + tl.where(real_slot, float("-inf"), float("inf"))[None, :]
    top_i = tl.zeros([BLOCK_M, KEEP_PAD], tl.int32) + tl.where(real_slot, _NO_KEY + keep_col, -2)[None, :]
    theta = tl.min(top_s, 1)  # the set's minimum: a key must beat it to enter

    bin_reach = seq_len + 2 * (BLOCK_M + BLOCK_N)  # BIN_OF covers every q - k a block can span
    edge_first = tl.load(EDGES)
    edge_last = tl.load(EDGES + n_bins)

    # Key blocks that can hold an allowed key for these rows, the unmasked ones first.
    k_lo, k_split, k_hi = _key_range(q0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KEY_VALID)

    state = (m_i, l_i, t_i, dist_acc, dist_sq_acc, ind_acc, dup_acc, ind_any, dup_any, n_i, mean_i, m2_i, hist, top_s,
             top_i, theta)
    for k0 in range(k_lo, k_split, BLOCK_N):
        state = _key_block(state, q, q0, q_pos, tok_q, k0, k_base, tok_base, valid_base, offs_d, d_in,
                           stride_kt, stride_kd, seq_len, window, scaling, softcap, EDGES, BIN_OF, bin_reach,
                           n_bins, edge_first, edge_last, bin_col, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                           HAS_KEY_VALID, DOT_PRECISION, TOKEN_COUNTED, SPARSE_MATCHES, False)
    for k0 in range(k_split, k_hi, BLOCK_N):
        state = _key_block(state, q, q0, q_pos, tok_q, k0, k_base, tok_base, valid_base, offs_d, d_in,
                           stride_kt, stride_kd, seq_len, window, scaling, softcap, EDGES, BIN_OF, bin_reach,
                           n_bins, edge_first, edge_last, bin_col, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                           HAS_KEY_VALID, DOT_PRECISION, TOKEN_COUNTED, SPARSE_MATCHES, True)
    (m_i, l_i, t_i, dist_acc, dist_sq_acc, ind_acc, dup_acc, ind_any, dup_any, n_i, mean_i, m2_i, hist, top_s, top_i,
     theta) = state

    # Normalize: p = exp((s - c) - log L); each e-weighted sum times f / L is a sum of probabilities.
    has_key = m_i > float("-inf")
    m_fin = tl.where(has_key, m_i, 0.0)
    if HAS_SINKS:
        sink = tl.load(SINKS + head).to(tl.float32)
        c = tl.maximum(m_fin, sink)
        f = tl.exp(m_fin - c)
        norm = l_i * f + tl.exp(sink - c)
    else:
        c = m_fin
        f = 1.0
        norm = l_i
    norm = tl.where(has_key, norm, 1.0)
    log_norm = tl.log(norm)
    to_prob = tl.where(has_key, f / norm, 0.0)

    entropy = to_prob * (l_i * ((c - m_fin) + log_norm) - t_i)
    prev_token = tl.exp(tl.where(ok_prev & has_key, (s_prev - c) - log_norm, float("-inf")))
    bos = tl.exp(tl.where(ok_bos & has_key, (s_bos - c) - log_norm, float("-inf")))
    self_p = tl.exp(tl.where(ok_self & has_key, (s_self - c) - log_norm, float("-inf")))
    logit_mean = tl.where(has_key, mean_i, 0.0)
    logit_std = tl.where(has_key, tl.sqrt(tl.maximum(m2_i / tl.maximum(n_i, 1.0), 0.0)), 0.0)
    logit_max = m_fin
    # top_logit_margin: the top-KEEP set (KEEP >= 2) holds the row's largest allowed scores, equal ones in
    # separate slots, so the second largest is the best slot other than one slot holding the max m.
    max_slot = tl.min(tl.where(real_slot[None, :] & (top_s == m_fin[:, None]), keep_col[None, :], KEEP_PAD), 1)
    second = tl.max(tl.where(real_slot[None, :] & (keep_col[None, :] != max_slot[:, None]), top_s, float("-inf")), 1)
    two_keys = n_i >= 2.0  # has_key too
    margin = tl.where(two_keys, m_fin - second, 0.0)

    out = METRICS + row_base + q_pos  # METRICS: (metric, batch, head, query_pos); order = ROW_METRICS
    tl.store(out + 0 * plane, entropy, mask=q_in)  # pattern_entropy
    tl.store(out + 1 * plane, prev_token, mask=q_in)  # previous_token_score
    tl.store(out + 2 * plane, ind_acc * to_prob, mask=q_in)  # induction_score
    tl.store(out + 3 * plane, dup_acc * to_prob, mask=q_in)  # duplicate_token_score
    tl.store(out + 4 * plane, bos, mask=q_in)  # bos_score
    tl.store(out + 5 * plane, self_p, mask=q_in)  # self_attention_score
    tl.store(out + 6 * plane, dist_acc * to_prob, mask=q_in)  # qk_distance
    tl.store(out + 7 * plane, logit_mean, mask=q_in)
    tl.store(out + 8 * plane, logit_std, mask=q_in)
    tl.store(out + 9 * plane, logit_max, mask=q_in)
    tl.store(out + 10 * plane, margin, mask=q_in)  # top_logit_margin
    tl.store(out + 11 * plane, dist_sq_acc * to_prob, mask=q_in)  # qk_distance_sq
    if not TOKEN_COUNTED:
        tl.store(COUNTED + row_base + q_pos, ind_any.to(tl.int8), mask=q_in)
        tl.store(COUNTED + plane + row_base + q_pos, dup_any.to(tl.int8), mask=q_in)
    tl.store(COUNTED + 2 * plane + row_base + q_pos, two_keys.to(tl.int8), mask=q_in)
    tl.store(ROW_NORM + row_base + q_pos, tl.where(has_key, c, float("-inf")), mask=q_in)
    tl.store(ROW_NORM + plane + row_base + q_pos, log_norm, mask=q_in)

    hist = tl.maximum(hist * to_prob[:, None], 0.0)
    tl.store(DIST_HIST + (row_base + q_pos)[:, None] * n_bins + bin_col[None, :], hist,
             mask=q_in[:, None] & (bin_col[None, :] < n_bins))

    # max_nobos: the best slot with key index >= 1 (KEEP >= 2 guarantees it is in the set).
    nobos = real_slot[None, :] & (top_i >= 1) & (top_i < _NO_KEY)
    best_s = tl.max(tl.where(nobos, top_s, float("-inf")), 1)
    best_pos = tl.min(tl.where(nobos & (top_s == best_s[:, None]), top_i, _NO_KEY), 1)
    best_p = tl.where(has_key & (best_s > float("-inf")), tl.exp((best_s - c) - log_norm), 0.0)
    tl.store(MAX_NOBOS + row_base + q_pos, best_p, mask=q_in)
    tl.store(ARGMAX_NOBOS + row_base + q_pos, tl.where(best_p > 0, best_pos, -1).to(tl.int64), mask=q_in)

    if TOP_K > 0:
        # Output column of each slot = its rank by (score descending, key index ascending).
        s_a = top_s[:, :, None]
        s_b = top_s[:, None, :]
        i_a = top_i[:, :, None]
        i_b = top_i[:, None, :]
        beats = ((s_b > s_a) | ((s_b == s_a) & (i_b < i_a))) & real_slot[None, None, :]
        rank = tl.sum(beats.to(tl.int32), 2)  # (BLOCK_M, KEEP_PAD)
        # a key, not an empty slot (whose p = exp(theta - lse) < min_weight drop_light_entries would zero anyway)
        held = has_key[:, None] & real_slot[None, :] & (top_i < _NO_KEY)
        top_p = tl.where(held, tl.exp((top_s - c[:, None]) - log_norm[:, None]), 0.0)
        top_pos = tl.where(top_p > 0, top_i, -1).to(tl.int64)
        at = (row_base + q_pos)[:, None] * TOP_K + rank
        written = q_in[:, None] & real_slot[None, :] & (rank < TOP_K)
        tl.store(TOP_VALUES + at, top_p, mask=written)
        tl.store(TOP_INDICES + at, top_pos, mask=written)


@triton.jit
def _column_block(acc, q0, q_base, kt, k_pos, k_valid, row_base, ROW_NORM, plane, offs_d, d_in, stride_qt,
                  stride_qd, seq_len, window, scaling, softcap, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """acc + p[q, k] for the query rows q0 .. q0 + BLOCK_M of `_key_weight_kernel` (rows q >= 1 only).

    With MASKED False the caller guarantees every row is inside T, at least 1, has an allowed key, and may
    read every key of the block: no mask at all.
    """
    q_pos = q0 + tl.arange(0, BLOCK_M)
    q_in = q_pos < seq_len
    if MASKED:
        q = tl.load(q_base + q_pos[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=q_in[:, None] & d_in[None, :], other=0.0)
    else:
        q = tl.load(q_base + q_pos[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=d_in[None, :],
                    other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        s = _softcapped(s * scaling, softcap, HAS_SOFTCAP)
    if MASKED:
        c = tl.load(ROW_NORM + row_base + q_pos, mask=q_in, other=float("-inf"))
        log_norm = tl.load(ROW_NORM + plane + row_base + q_pos, mask=q_in, other=0.0)
        counted_row = (q_pos >= 1) & (c > float("-inf"))  # rows q >= 1 with an allowed key
        allowed = _allowed(q_pos[:, None] - k_pos[None, :], k_pos[None, :], seq_len, window, k_valid[None, :],
                           CAUSAL, HAS_WINDOW, HAS_KEY_VALID) & counted_row[:, None]
        acc += tl.math.exp2(tl.where(allowed, _column_log2_p(s, c, log_norm, scaling, HAS_SOFTCAP), float("-inf")))
    else:
        c = tl.load(ROW_NORM + row_base + q_pos)
        log_norm = tl.load(ROW_NORM + plane + row_base + q_pos)
        acc += tl.math.exp2(_column_log2_p(s, c, log_norm, scaling, HAS_SOFTCAP))
    return acc


@triton.jit
def _column_log2_p(s, c, log_norm, scaling, HAS_SOFTCAP: tl.constexpr):
    """log2 p = ((score - c) - log L) log2 e of a block of `_column_block`; s: the softcapped scores, or (no
    softcap) the raw q.k, whose score - c is then one FFMA (q.k x scaling - c, rounded once) and the rest one
    more: two FFMAs a pair before the exp2, each rounding relative to its own result as the unfused form's did
    (c and log L are never folded into one constant: at scores ~1e3 its rounding would be ~1e-4 of every p
    of the row)."""
    log2_norm = log_norm * 1.4426950408889634
    if HAS_SOFTCAP:
        return (s - c[:, None]) * 1.4426950408889634 - log2_norm[:, None]
    c_safe = tl.where(c > float("-inf"), c, 0.0)  # a row without keys: masked by the caller
    return (s * scaling - c_safe[:, None]) * 1.4426950408889634 - log2_norm[:, None]


@triton.jit
def _key_weight_kernel(
    Q, K, KEY_VALID, ROW_NORM, KEY_WEIGHT,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    seq_len, n_heads, group, window, scaling, softcap, plane,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """key_weight[k] = sum over rows 1 <= q < T of p[q, k] = exp((s[q, k] - c[q]) - log L[q]), for BLOCK_N keys.

    Streams over query blocks with each row's (c, log L) saved by the forward
    kernel; rows without an allowed key (c = -inf) contribute 0.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, q_base, k_base = _head_bases(pid_bh, Q, K, stride_qb, stride_qh, stride_kb, stride_kh, n_heads,
                                              group)
    row_base = pid_bh.to(tl.int64) * seq_len

    k0 = pid_n * BLOCK_N
    k_pos = k0 + tl.arange(0, BLOCK_N)
    k_in = k_pos < seq_len
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_in = offs_d < HEAD_DIM
    kt = tl.load(k_base + k_pos[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                 mask=k_in[None, :] & d_in[:, None], other=0.0)  # (HEAD_DIM_PAD, BLOCK_N)
    if HAS_KEY_VALID:
        k_valid = tl.load(KEY_VALID + batch.to(tl.int64) * seq_len + k_pos, mask=k_in, other=0) != 0
    else:
        k_valid = k_in

    # Query blocks that can read these keys.
    q_lo = 0
    q_hi = seq_len
    if CAUSAL:
        q_lo = k0 // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        q_hi = tl.minimum(seq_len, k0 + BLOCK_N - 1 + window)
        if not CAUSAL:
            q_lo = tl.maximum(0, k0 - window + 1) // BLOCK_M * BLOCK_M

    # Without a window or padding, query blocks wholly inside T, after row 0 and (causal) starting at or
    # after the block's last key read every key of it: no mask there. The rest (the diagonal, row 0's
    # block, the ragged last block) are masked.
    q_split = q_lo
    q_tail = q_lo
    if not HAS_WINDOW and not HAS_KEY_VALID:
        q_tail = seq_len // BLOCK_M * BLOCK_M
        if CAUSAL:
            q_split = tl.minimum(tl.cdiv(k0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, q_tail)
        else:
            q_split = tl.minimum(BLOCK_M, q_tail)  # the first block holds row 0, which is not counted
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # summed over rows once, after the loops
    for q0 in range(q_lo, q_split, BLOCK_M):
        acc = _column_block(acc, q0, q_base, kt, k_pos, k_valid, row_base, ROW_NORM, plane, offs_d, d_in,
                            stride_qt, stride_qd, seq_len, window, scaling, softcap, BLOCK_M, CAUSAL, HAS_WINDOW,
                            HAS_SOFTCAP, HAS_KEY_VALID, DOT_PRECISION, True)
    for q0 in range(q_split, q_tail, BLOCK_M):
        acc = _column_block(acc, q0, q_base, kt, k_pos, k_valid, row_base, ROW_NORM, plane, offs_d, d_in,
                            stride_qt, stride_qd, seq_len, window, scaling, softcap, BLOCK_M, CAUSAL, HAS_WINDOW,
                            HAS_SOFTCAP, HAS_KEY_VALID, DOT_PRECISION, False)
    for q0 in range(q_tail, q_hi, BLOCK_M):
        acc = _column_block(acc, q0, q_base, kt, k_pos, k_valid, row_base, ROW_NORM, plane, offs_d, d_in,
                            stride_qt, stride_qd, seq_len, window, scaling, softcap, BLOCK_M, CAUSAL, HAS_WINDOW,
                            HAS_SOFTCAP, HAS_KEY_VALID, DOT_PRECISION, True)
    acc = tl.sum(acc, 0)
    tl.store(KEY_WEIGHT + row_base + k_pos, acc, mask=k_in)


def _interpreted() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_row_stats_fwd_kernel, InterpretedFunction)


def is_available(device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether `tri_row_stats` can run on `device` (and `dtype`), and why (not)."""
    device = torch.device(device)
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        return False, f"unsupported dtype {dtype}: use float32, float16 or bfloat16"
    if device.type == "cuda":
        if _interpreted():
            return False, "triton was imported with TRITON_INTERPRET=1: kernels run on CPU tensors only"
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, f"triton on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        if not _interpreted():
            return False, "triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 set before triton is imported)"
        if dtype == torch.bfloat16:
            return False, "the triton interpreter has no bfloat16"
        return True, "triton interpreter on CPU (slow: tests only)"
    return False, f"triton kernels do not run on {device.type}"


def _token_counted(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(induction, duplicate) rows of (batch, query_pos) int32 tokens, as int8, when every earlier key is allowed.

    With first[q] the first position of tok[q] in its sequence: a duplicate key k < q exists iff first[q] < q;
    an induction key (1 <= k < q, tok[k-1] == tok[q]) exists iff tok[q] occurs at or before q - 2, i.e.
    first[q] <= q - 2.
    """
    batch, seq_len = tokens.shape
    pos = torch.arange(seq_len, device=tokens.device).expand(batch, seq_len)
    sorted_tokens, order = torch.sort(tokens, dim=1, stable=True)  # equal tokens in position order
    run_start = torch.ones_like(sorted_tokens, dtype=torch.bool)
    run_start[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
    start_index = torch.cummax(torch.where(run_start, pos, 0), dim=1).values  # where each one's run begins
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, start_index))
    return (first <= pos - 2).to(torch.int8), (first < pos).to(torch.int8)


SPARSE_MAX_SHARE = 1 / 8  # matching pairs beyond this share of the causal pairs: the key loop sums them (dense)


def _match_pairs(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every (batch, q, k) with k < q and tokens[b, k] == tokens[b, q] (the duplicate-token pairs), as three
    flat int64 tensors ordered by (batch, token, q, k); built from one sort of each row, O(T log T + pairs)."""
    batch, seq_len = tokens.shape
    device = tokens.device
    sorted_tokens, order = torch.sort(tokens, dim=1, stable=True)  # equal tokens in position order
    pos = torch.arange(seq_len, device=device).expand(batch, seq_len)
    run_start = torch.ones_like(sorted_tokens, dtype=torch.bool)
    run_start[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
    first = torch.cummax(torch.where(run_start, pos, 0), dim=1).values  # each slot's run begins here
    earlier = (pos - first).reshape(-1)  # the run's members before each slot: that row's matching keys
    slot = torch.repeat_interleave(torch.arange(batch * seq_len, device=device), earlier)
    offset = torch.arange(len(slot), device=device) - torch.repeat_interleave(torch.cumsum(earlier, 0) - earlier,
                                                                              earlier)
    b = slot // seq_len
    flat_order = order.reshape(-1)
    q = flat_order[slot]
    k = flat_order[b * seq_len + first.reshape(-1)[slot] + offset]
    return b, q, k


def _sparse_match_sums(query: Tensor, key: Tensor, spec: AttentionSpec, row_norm: Tensor, b: Tensor, q: Tensor,
                       k: Tensor) -> Tensor:
    """sum over the pairs (b, q, k) of p[b, h, q, k] for every head h: (batch, heads, T) float32, with p from the
    row normalizers the key loop left (`row_norm`: c and log L per row) and the score computed here as there."""
    batch, n_heads, seq_len, d_head = query.shape
    group = n_heads // key.shape[1]
    out = torch.zeros(batch * seq_len, n_heads, dtype=torch.float32, device=query.device)
    c = row_norm[0].permute(0, 2, 1).reshape(batch * seq_len, n_heads)  # (batch * T, heads)
    log_norm = row_norm[1].permute(0, 2, 1).reshape(batch * seq_len, n_heads)
    chunk = max(1, (1 << 24) // (n_heads * d_head))  # pairs per step: ~64 MB of gathered vectors
    for start in range(0, len(b), chunk):
        bs, qs, ks = b[start : start + chunk], q[start : start + chunk], k[start : start + chunk]
        qv = query[bs, :, qs].float()  # (n, heads, d)
        kv = key[bs, :, ks].float().repeat_interleave(group, dim=1)  # (n, heads, d)
        scores = (qv * kv).sum(-1) * spec.scaling
        if spec.softcap is not None:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        row = bs * seq_len + qs
        p = torch.exp((scores - c[row]) - log_norm[row])
        out.index_add_(0, row, torch.where(torch.isfinite(c[row]), p, 0.0))
    return out.reshape(batch, seq_len, n_heads).permute(0, 2, 1)


def _next_power_of_2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(n, 1)))


def tri_row_stats(
    query: Tensor,
    key: Tensor,
    token_ids: Tensor,
    spec: AttentionSpec,
    *,
    top_k: int,
    bin_edges: list[int],
    min_weight: float = 0.0,
    block_m: int = 64,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> RowStats:
    """Every row quantity of one layer, fused: the same contract as `ref_row_stats`.

    query: (batch, head, query_pos, d_head), key: (batch, kv_head, key_pos,
    d_head) post-RoPE and not repeated, token_ids: (batch, key_pos). Extra
    memory is O(batch * head * query_pos * (n_bins + top_k)): the outputs.
    `block_m`, `block_n` (query rows and keys per tile: powers of two >= 16),
    `num_warps` and `num_stages` tune the launch (the last two only on CUDA;
    benchmarks/gpu_check.py sweeps them).
    """
    batch, n_heads, seq_len, d_head = query.shape
    if key.shape[0] != batch or key.shape[2] != seq_len or key.shape[3] != d_head:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}")
    if token_ids.shape != (batch, seq_len):
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, tokens {tuple(token_ids.shape)}")
    n_kv = key.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not divide into {n_kv} kv heads")
    if query.dtype != key.dtype:
        raise ValueError(f"query is {query.dtype} but key is {key.dtype}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if len(bin_edges) < 2 or any(a >= b for a, b in zip(bin_edges, bin_edges[1:])):
        raise ValueError(f"bin_edges must be >= 2 strictly ascending integers, got {bin_edges}")
    device = query.device
    ok, reason = is_available(device, query.dtype)
    if not ok:
        raise RuntimeError(f"tri_row_stats cannot run here: {reason}")
    if key.device != device:
        raise ValueError(f"query is on {device} but key is on {key.device}")

    on_gpu = device.type == "cuda"
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    launch = dict(num_warps=num_warps, num_stages=num_stages) if on_gpu else {}

    f32 = dict(dtype=torch.float32, device=device)
    plane = batch * n_heads * seq_len
    metrics = torch.zeros(len(ROW_METRICS), batch, n_heads, seq_len, **f32)
    counted = torch.zeros(3, batch, n_heads, seq_len, dtype=torch.int8, device=device)  # induction, duplicate, margin
    max_nobos = torch.zeros(batch, n_heads, seq_len, **f32)
    argmax_nobos = torch.full((batch, n_heads, seq_len), -1, dtype=torch.int64, device=device)
    n_bins = len(bin_edges) - 1
    dist_hist = torch.zeros(batch, n_heads, seq_len, n_bins, **f32)
    key_weight = torch.zeros(batch, n_heads, seq_len, **f32)
    top_values = torch.zeros(batch, n_heads, seq_len, top_k, **f32)
    top_indices = torch.full((batch, n_heads, seq_len, top_k), -1, dtype=torch.int64, device=device)
    row_norm = torch.empty(2, batch, n_heads, seq_len, **f32)  # (c, log L) per row, for the second pass
    # the top-K set's entry bound per row (`_row_bound_kernel`): without it (top-K of any weight asked for) every
    # row fills its set from its first keys and replaces them as better ones come
    ranked = top_k > 0 and min_weight > 0
    bounded = top_k == 0 or ranked
    theta = torch.empty(batch, n_heads, seq_len, **f32) if bounded else row_norm

    tokens = token_ids.to(device=device, dtype=torch.int32).contiguous()
    edges = torch.tensor(bin_edges, dtype=torch.int32, device=device)
    # bin_of[d + reach] = number of edges <= d: the kernel's bin lookup for a span of q - k (kernel: bin_reach).
    reach = seq_len + 2 * (block_m + block_n)
    bin_of = torch.searchsorted(edges, torch.arange(-reach, reach + 1, dtype=torch.int32, device=device),
                                right=True).to(torch.int32)
    has_key_valid = spec.key_valid is not None
    key_valid = (spec.key_valid.to(device=device, dtype=torch.int8).contiguous() if has_key_valid else tokens)
    has_sinks = spec.sinks is not None
    sinks = spec.sinks.to(device=device, dtype=torch.float32).contiguous() if has_sinks else metrics
    if has_key_valid and key_valid.shape != (batch, seq_len):
        raise ValueError(f"key_valid must be (batch, key_pos) = {(batch, seq_len)}, got {tuple(key_valid.shape)}")
    if has_sinks and sinks.shape != (n_heads,):
        raise ValueError(f"sinks must be (head,) = ({n_heads},), got {tuple(sinks.shape)}")

    # Without a window or padding every earlier key is allowed, so whether a row has an induction or a
    # duplicate key depends on the tokens alone: found here in O(T log T), and the kernel skips two
    # reductions per key block.
    token_counted = spec.window is None and not has_key_valid
    sparse = None
    if token_counted:
        induction, duplicate = _token_counted(tokens)
        counted[0] = induction[:, None, :]
        counted[1] = duplicate[:, None, :]
        # duplicate pairs, and the induction pairs they give (k = j + 1 for a match j <= q - 2): few on real text
        pairs = _match_pairs(tokens)
        if len(pairs[0]) <= SPARSE_MAX_SHARE * batch * seq_len * (seq_len - 1) / 2:
            shift = pairs[2] <= pairs[1] - 2
            sparse = (pairs, (pairs[0][shift], pairs[1][shift], pairs[2][shift] + 1))

    keep = max(top_k, 2)
    common = dict(
        HEAD_DIM=d_head,
        HEAD_DIM_PAD=_next_power_of_2(d_head, 16),
        CAUSAL=spec.causal,
        HAS_WINDOW=spec.window is not None,
        HAS_SOFTCAP=spec.softcap is not None,
        HAS_KEY_VALID=has_key_valid,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    window = int(spec.window) if spec.window is not None else 0
    softcap = float(spec.softcap) if spec.softcap is not None else 1.0
    group = n_heads // n_kv
    # Triton launches on the current device: a layer that --device-map put on another GPU launches on its own
    guard = torch.cuda.device(device) if device.type == "cuda" and not _interpreted() else contextlib.nullcontext()
    with guard:
        if bounded:
            _row_bound_kernel[(triton.cdiv(seq_len, block_m), batch * n_heads)](
                query, key, key_valid, theta,
                *query.stride(), *key.stride(),
                seq_len, n_heads, group, window, float(spec.scaling), softcap,
                math.log(min_weight) if ranked else 0.0,
                BLOCK_M=block_m, BLOCK_N=block_n, RANKED=ranked, FOLD=spec.softcap is None and spec.scaling > 0,
                **common, **launch,
            )
        _row_stats_fwd_kernel[(triton.cdiv(seq_len, block_m), batch * n_heads)](
            query, key, tokens, key_valid, sinks, edges, bin_of,
            metrics, counted, max_nobos, argmax_nobos, dist_hist, top_values, top_indices, row_norm, theta,
            *query.stride(), *key.stride(),
            seq_len, n_heads, group, n_bins, window, float(spec.scaling), softcap, plane,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_SINKS=has_sinks,
            TOP_K=top_k, KEEP=keep, KEEP_PAD=_next_power_of_2(keep),
            BINS_PAD=_next_power_of_2(n_bins, 2), TOKEN_COUNTED=token_counted, SPARSE_MATCHES=sparse is not None,
            BOUNDED=bounded, **common, **launch,
        )
        _key_weight_kernel[(triton.cdiv(seq_len, block_n), batch * n_heads)](
            query, key, key_valid, row_norm, key_weight,
            *query.stride(), *key.stride(),
            seq_len, n_heads, group, window, float(spec.scaling), softcap, plane,
            BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
        )
    if sparse is not None:
        duplicates, inductions = sparse
        metrics[ROW_METRICS.index("duplicate_token_score")] = _sparse_match_sums(query, key, spec, row_norm,
                                                                                 *duplicates)
        metrics[ROW_METRICS.index("induction_score")] = _sparse_match_sums(query, key, spec, row_norm, *inductions)
    drop_light_entries(top_values, top_indices, min_weight)
    return RowStats(
        metrics={name: metrics[i] for i, name in enumerate(ROW_METRICS)},
        induction_counted=counted[0].bool(),
        duplicate_counted=counted[1].bool(),
        margin_counted=counted[2].bool(),
        max_nobos=max_nobos,
        argmax_nobos=argmax_nobos,
        dist_hist=dist_hist,
        key_weight=key_weight,
        top_values=top_values,
        top_indices=top_indices,
    )
