"""The row-statistics op's types (`AttentionSpec`, `RowStats`, `ROW_METRICS`) and its plain torch reference
(`ref_row_stats`), beside its kernels: `row_stats.py` (Triton) and `row_stats_cpu.py` (numba).

Every metric of CONTRACT section 1 is a function of one attention row, so a
backend only has to turn a layer's queries and keys into per-row quantities
(`RowStats`); summing them into head metrics, deciles and top tokens happens in
`headvis.accumulate`, identically for every backend. The kernels produce the
same `RowStats` without materializing a T x T matrix; this reference holds at
most `q_chunk` query rows of scores at a time. Nothing here imports the rest of
headvis (`headvis.metrics` re-exports these names for it).

Vocabulary (TransformerLens): `scores` are pre-softmax, `pattern` post-softmax;
dimensions are `batch, head, query_pos, key_pos, d_head`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ROW_METRICS",
    "AttentionSpec",
    "RowStats",
    "allowed_keys",
    "chunk_scores",
    "distance_bin_edges",
    "ref_pattern",
    "ref_row_stats",
]

# Row quantities in the order backends return them: CONTRACT section 1's row metrics by their
# contract names, plus `qk_distance_sq` (sum_k p[q,k] (q-k)^2, for the head-level
# qk_distance_variance). Public names: frozen by tests.
ROW_METRICS: tuple[str, ...] = (
    "pattern_entropy",
    "previous_token_score",
    "induction_score",
    "duplicate_token_score",
    "bos_score",
    "self_attention_score",
    "qk_distance",
    "logit_mean",
    "logit_std",
    "logit_max",
    "top_logit_margin",
    "qk_distance_sq",
)

# Bits reserved for the key index in the composite sort key (see `_composite_key`).
_INDEX_BITS = 24


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer turns (query, key) into scores and which keys are allowed."""

    causal: bool  # keys k <= q only
    scaling: float  # the model's own factor on q.k (usually d_head ** -0.5)
    window: int | None = None  # sliding window: causal q-k < window; bidirectional |q-k| < window
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    key_valid: Tensor | None = field(default=None, compare=False)  # (batch, key_pos) bool; False = padding
    sinks: Tensor | None = field(default=None, compare=False)  # (head,) extra softmax logit (gpt-oss)


@dataclass
class RowStats:
    """Per-row quantities of one layer for a batch of sequences.

    Row 0 is present in every tensor (backends do not special-case it); the
    accumulator skips it, as the contract says.
    """

    metrics: dict[str, Tensor]  # name -> (batch, head, query_pos) float32, names = ROW_METRICS
    induction_counted: Tensor  # (batch, head, query_pos) bool: the row has an induction key
    duplicate_counted: Tensor  # (batch, head, query_pos) bool: the row has a duplicate key
    margin_counted: Tensor  # (batch, head, query_pos) bool: the row has >= 2 allowed keys
    max_nobos: Tensor  # (batch, head, query_pos) float32: max_{k>=1} pattern[q, k], 0 if none
    argmax_nobos: Tensor  # (batch, head, query_pos) int64: its key index, -1 if none
    dist_hist: Tensor  # (batch, head, query_pos, n_bins) float32: pattern summed by q-k bins
    key_weight: Tensor  # (batch, head, key_pos) float32: sum over rows q >= 1 of pattern[q, k]
    top_values: Tensor  # (batch, head, query_pos, top_k) float32, descending, 0 where unused
    top_indices: Tensor  # (batch, head, query_pos, top_k) int64, -1 where unused


def distance_bin_edges(seq_len: int, causal: bool) -> list[int]:
    """Edges of the q-k distance histogram: [0, 1, 2, 4, ..., 2^m] with 2^m >= seq_len.

    Bin b holds distances d with edges[b] <= d < edges[b+1]. Bidirectional
    models also attend to later keys (d < 0): their edges mirror the positive
    ones, [-2^m, ..., -2, -1, 0, 1, 2, ..., 2^m].
    """
    top = 1
    while top < max(seq_len, 2):
        top *= 2
    positive = [0, 1]
    while positive[-1] < top:
        positive.append(positive[-1] * 2)
    if causal:
        return positive
    return [-e for e in reversed(positive[1:])] + positive


def _composite_key(pattern: Tensor) -> Tensor:
    """An int64 key ordering entries by (value descending, key index ascending).

    Non-negative float32 values order like their bit patterns, so
    `bits << 24 - index` makes top-k and argmax deterministic under ties
    (the lowest key index wins), which `torch.topk` alone does not promise.
    """
    key_pos = pattern.shape[-1]
    bits = pattern.contiguous().view(torch.int32).to(torch.int64)
    index = torch.arange(key_pos, device=pattern.device, dtype=torch.int64)
    return (bits << _INDEX_BITS) - index


def drop_light_entries(top_values: Tensor, top_indices: Tensor, min_weight: float) -> None:
    """In place: top-K entries after each row's first whose weight is below `min_weight` -> 0 / -1.

    The rule of `headvis.sampling.sparse_rows` (float32 compare), applied by every backend to its output.
    """
    if min_weight <= 0 or top_values.shape[-1] < 2:
        return
    light = top_values[..., 1:] < min_weight
    top_values[..., 1:].masked_fill_(light, 0.0)
    top_indices[..., 1:].masked_fill_(light, -1)


def allowed_keys(
    spec: AttentionSpec, q_start: int, q_end: int, key_pos: int, device: torch.device
) -> Tensor:
    """(batch or 1, 1, q_end - q_start, key_pos) bool: which of keys [0, key_pos) each row may read."""
    q = torch.arange(q_start, q_end, device=device)[:, None]
    k = torch.arange(key_pos, device=device)[None, :]
    allowed = torch.ones(q_end - q_start, key_pos, dtype=torch.bool, device=device)
    if spec.causal:
        allowed &= k <= q
    if spec.window is not None:
        allowed &= (q - k < spec.window) if spec.causal else ((q - k).abs() < spec.window)
    allowed = allowed[None, None]
    if spec.key_valid is not None:
        allowed = allowed & spec.key_valid.to(device)[:, None, None, :key_pos]
    return allowed


def chunk_scores(query: Tensor, key: Tensor, spec: AttentionSpec, q_start: int, q_end: int,
                 out: Tensor | None = None) -> Tensor:
    """Scores of query rows [q_start, q_end) against every key of `key`: (batch, head, rows, key_pos) float32.

    GQA: the query heads reading one kv head are one matrix product with it (their rows stacked), never a
    repeated `key`: one (group x rows, d_head) @ (d_head, key_pos) product per (batch, kv head), 1.4x faster
    on the CPU than a product per query head (SmolLM2, 64-row chunks, measured). `out`: a float32 buffer of
    at least batch x head x rows x key_pos elements to write the scores into (its first ones); a view of it
    is returned.
    """
    batch, n_heads, _, d_head = query.shape
    n_kv, key_pos = key.shape[1], key.shape[2]
    rows = q_end - q_start
    q = query[:, :, q_start:q_end].float() * spec.scaling  # scale the (rows, d_head) side: cheaper than scores
    q = q.reshape(batch, n_kv, (n_heads // n_kv) * rows, d_head)  # heads are kv-major: (kv, group) stacked
    k = key.float().transpose(-1, -2)  # (batch, kv_head, d_head, key_pos)
    if out is not None:
        out = out.view(-1)[: batch * n_heads * rows * key_pos].view(batch, n_kv, q.shape[2], key_pos)
    scores = torch.matmul(q, k, out=out).view(batch, n_heads, rows, key_pos)
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap, out=scores).mul_(spec.softcap)
    return scores


def _chunk_pattern(scores: Tensor, allowed: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pattern, row max score, row_ok, masked scores) for one chunk; masked entries of the pattern are 0
    and of the scores -inf.

    pattern = exp(s - m) / sum exp(s - m) with m the row max (and the sink
    logit, if any, in both m and the sum). `s - m` is exact in float32 for
    scores within a factor 2 of the max (Sterbenz), so large logits (1e3) lose
    nothing to a rounded logsumexp. Rows without any allowed key (full
    padding) get an all-zero pattern and row_ok False.
    """
    masked = scores.masked_fill(~allowed, -math.inf)
    row_max = masked.amax(-1, keepdim=True)
    row_ok = torch.isfinite(row_max)
    shift = torch.where(row_ok, row_max, 0.0)
    if spec.sinks is not None:
        sink = spec.sinks.float().to(scores.device)[None, :, None, None]
        shift = torch.maximum(shift, sink)
    weights = torch.exp(masked - shift)  # exp(-inf) = 0 off the allowed keys
    total = weights.sum(-1, keepdim=True)
    if spec.sinks is not None:
        total = total + torch.exp(sink - shift)
    pattern = weights / torch.where(row_ok, total, 1.0)
    return pattern, row_max.squeeze(-1), row_ok.squeeze(-1), masked


def ref_pattern(query: Tensor, key: Tensor, spec: AttentionSpec) -> Tensor:
    """The full attention pattern (batch, head, query_pos, key_pos), float32. Tests only."""
    scores = chunk_scores(query, key, spec, 0, query.shape[2])
    allowed = allowed_keys(spec, 0, query.shape[2], key.shape[2], query.device)
    return _chunk_pattern(scores, allowed, spec)[0]


def ref_row_stats(
    query: Tensor,
    key: Tensor,
    token_ids: Tensor,
    spec: AttentionSpec,
    *,
    top_k: int,
    bin_edges: list[int],
    min_weight: float = 0.0,
    q_chunk: int = 128,
) -> RowStats:
    """Every row quantity of one layer, `q_chunk` query rows at a time.

    Top-K entries after a row's first that weigh less than `min_weight` are
    left out (0 / -1), as the head files leave them out: every backend
    applies `drop_light_entries`, so that a kernel need not rank them.

    query: (batch, head, query_pos, d_head), key: (batch, kv_head, key_pos,
    d_head) post-RoPE and not repeated, token_ids: (batch, key_pos). Peak extra
    memory is a few (batch, head, q_chunk, key_pos) float32 buffers.
    """
    batch, n_heads, seq_len, _ = query.shape
    if key.shape[2] != seq_len or token_ids.shape != (batch, seq_len):
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, tokens {tuple(token_ids.shape)}")
    if n_heads % key.shape[1]:
        raise ValueError(f"{n_heads} query heads do not divide into {key.shape[1]} kv heads")
    if spec.sinks is not None and tuple(spec.sinks.shape) != (n_heads,):
        raise ValueError(f"sinks must be (head,) = ({n_heads},), got {tuple(spec.sinks.shape)}")
    device = query.device
    f32 = dict(dtype=torch.float32, device=device)
    out = {name: torch.zeros(batch, n_heads, seq_len, **f32) for name in ROW_METRICS}
    ind_counted = torch.zeros(batch, n_heads, seq_len, dtype=torch.bool, device=device)
    dup_counted = torch.zeros_like(ind_counted)
    margin_counted = torch.zeros_like(ind_counted)
    max_nobos = torch.zeros(batch, n_heads, seq_len, **f32)
    argmax_nobos = torch.full((batch, n_heads, seq_len), -1, dtype=torch.int64, device=device)
    n_bins = len(bin_edges) - 1
    dist_hist = torch.zeros(batch, n_heads, seq_len, n_bins, **f32)
    key_weight = torch.zeros(batch, n_heads, seq_len, **f32)
    top_values = torch.zeros(batch, n_heads, seq_len, top_k, **f32)
    top_indices = torch.full((batch, n_heads, seq_len, top_k), -1, dtype=torch.int64, device=device)

    tokens = token_ids.to(device)
    prev_tokens = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)  # tok[k-1]
    k_pos = torch.arange(seq_len, device=device)
    edges = torch.tensor(bin_edges, device=device)

    for q_start in range(0, seq_len, q_chunk):
        q_end = min(q_start + q_chunk, seq_len)
        rows = slice(q_start, q_end)
        q_pos = k_pos[rows]
        k_end = q_end if spec.causal else seq_len  # causal: later keys are never allowed, skip them
        keys = slice(0, k_end)
        scores = chunk_scores(query, key[:, :, keys], spec, q_start, q_end)  # (batch, head, rows, k_end)
        allowed = allowed_keys(spec, q_start, q_end, k_end, device)
        pattern, row_max, row_ok, masked = _chunk_pattern(scores, allowed, spec)
        row_ok = row_ok & allowed.any(-1)

        n_allowed = allowed.sum(-1).clamp(min=1)
        mean = torch.where(allowed, scores, 0.0).sum(-1) / n_allowed
        centered = torch.where(allowed, scores - mean[..., None], 0.0)
        var = (centered * centered).sum(-1) / n_allowed  # two-pass: no E[s^2] - E[s]^2 cancellation
        out["logit_mean"][:, :, rows] = torch.where(row_ok, mean, 0.0)
        out["logit_std"][:, :, rows] = torch.where(row_ok, var.sqrt(), 0.0)
        out["logit_max"][:, :, rows] = torch.where(row_ok, row_max, 0.0)
        # top-1 minus top-2 over allowed keys; ties give 0 (topk keeps duplicates)
        two = allowed.sum(-1) >= 2  # (batch or 1, 1, rows)
        if k_end >= 2:
            top2 = masked.topk(2, dim=-1).values  # (batch, head, rows, 2)
            margin = torch.where(two, top2[..., 0] - top2[..., 1], 0.0)
            out["top_logit_margin"][:, :, rows] = torch.where(row_ok, margin, 0.0)
        margin_counted[:, :, rows] = (two & row_ok).expand(batch, n_heads, -1)
        # -sum p ln p straight from the probabilities: no lse - sum(p s) cancellation for large logits.
        out["pattern_entropy"][:, :, rows] = -torch.special.xlogy(pattern, pattern).sum(-1)
        out["bos_score"][:, :, rows] = pattern[..., 0]
        out["self_attention_score"][:, :, rows] = pattern.gather(-1, q_pos.expand(*pattern.shape[:2], -1)[..., None])[..., 0]
        prev = pattern.gather(-1, (q_pos - 1).clamp(min=0).expand(*pattern.shape[:2], -1)[..., None])[..., 0]
        out["previous_token_score"][:, :, rows] = torch.where(q_pos >= 1, prev, 0.0)
        distance = (q_pos[:, None] - k_pos[None, keys]).abs().float()  # (rows, k_end)
        out["qk_distance"][:, :, rows] = (pattern * distance).sum(-1)
        out["qk_distance_sq"][:, :, rows] = (pattern * (distance * distance)).sum(-1)

        earlier = k_pos[None, keys] < q_pos[:, None]  # (rows, k_end)
        induction_keys = (prev_tokens[:, None, keys] == tokens[:, rows, None]) & earlier & (k_pos[keys] >= 1)
        duplicate_keys = (tokens[:, None, keys] == tokens[:, rows, None]) & earlier
        induction_keys = induction_keys[:, None] & allowed  # (batch, 1, rows, k_end): the same for every head
        duplicate_keys = duplicate_keys[:, None] & allowed
        out["induction_score"][:, :, rows] = (pattern * induction_keys).sum(-1)
        out["duplicate_token_score"][:, :, rows] = (pattern * duplicate_keys).sum(-1)
        ind_counted[:, :, rows] = induction_keys.any(-1).expand(batch, n_heads, -1)
        dup_counted[:, :, rows] = duplicate_keys.any(-1).expand(batch, n_heads, -1)

        if k_end > 1:
            best_value, best = pattern[..., 1:].max(-1)  # torch returns the first maximal index
            max_nobos[:, :, rows] = best_value
            argmax_nobos[:, :, rows] = torch.where(best_value > 0, best + 1, -1)

        # Bin sums via a prefix sum: keys with lo <= q-k < hi are k in (q-hi, q-lo].
        prefix = torch.nn.functional.pad(pattern.cumsum(-1), (1, 0))  # prefix[j] = sum_{k<j}
        at = (q_pos[:, None] - edges[None, :] + 1).clamp(0, k_end)  # (rows, n_edges)
        cum = prefix.gather(-1, at.expand(*pattern.shape[:2], -1, -1))
        dist_hist[:, :, rows] = (cum[..., :-1] - cum[..., 1:]).clamp(min=0)

        counted_rows = pattern[:, :, 1:] if q_start == 0 else pattern  # rows q >= 1
        key_weight[:, :, keys] += counted_rows.sum(-2)

        if top_k:
            k_eff = min(top_k, k_end)
            chosen = _composite_key(pattern).topk(k_eff, dim=-1, sorted=True).indices
            values = pattern.gather(-1, chosen)
            top_values[:, :, rows, :k_eff] = values
            top_indices[:, :, rows, :k_eff] = torch.where(values > 0, chosen, -1)

    drop_light_entries(top_values, top_indices, min_weight)
    return RowStats(
        metrics=out,
        induction_counted=ind_counted,
        duplicate_counted=dup_counted,
        margin_counted=margin_counted,
        max_nobos=max_nobos,
        argmax_nobos=argmax_nobos,
        dist_hist=dist_hist,
        key_weight=key_weight,
        top_values=top_values,
        top_indices=top_indices,
    )
