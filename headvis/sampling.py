"""Deciles of per-sequence activation, the sequences shown per interval, and sparse rows.

CONTRACT section 2: interval_edges are the 0th..100th percentiles of the
head's per-sequence max_activation; interval 10 holds the top sequences,
highest first; intervals 1..9 hold a seeded uniform sample of their decile; a
sequence appears at most once per head.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assign_intervals", "choose_samples", "interval_edges", "sparse_rows"]


def interval_edges(values: np.ndarray, intervals: int = 10) -> np.ndarray:
    """(intervals + 1,) ascending population percentiles (linear interpolation)."""
    return np.percentile(np.asarray(values, dtype=np.float64), np.linspace(0, 100, intervals + 1))


def assign_intervals(values: np.ndarray, intervals: int = 10) -> np.ndarray:
    """(n,) interval 1..intervals of each sequence: its population decile by rank.

    Sequences are ranked from the highest value down (ties: lower sequence
    index first, as for the top sequences) and the ranks cut into `intervals`
    equal parts, so every decile holds n/10 sequences (+-1) even when values
    tie at a percentile edge.
    """
    values = np.asarray(values)
    n = len(values)
    order = np.lexsort((np.arange(n), -values))  # highest first, lowest index first on ties
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return intervals - rank * intervals // max(n, 1)


def choose_samples(
    values: np.ndarray, edges: np.ndarray, per_interval: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """[(sequence index, interval)], interval `len(edges)-1` first, each interval by activation descending."""
    intervals = len(edges) - 1
    values = np.asarray(values)
    order = np.lexsort((np.arange(len(values)), -values))  # highest first, lowest index on ties
    top = order[:per_interval]  # the true top sequences, whatever their decile
    chosen: list[tuple[int, int]] = [(int(i), intervals) for i in top]
    taken = set(int(i) for i in top)
    member = assign_intervals(values, intervals)
    for interval in range(intervals - 1, 0, -1):
        pool = np.array([i for i in np.flatnonzero(member == interval) if int(i) not in taken], dtype=np.int64)
        if len(pool) > per_interval:
            pool = rng.choice(pool, size=per_interval, replace=False)
        pool = pool[np.lexsort((pool, -values[pool]))] if len(pool) else pool
        chosen.extend((int(i), interval) for i in pool)
        taken.update(int(i) for i in pool)
    return chosen


def sparse_rows(top_values: np.ndarray, top_indices: np.ndarray, min_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat COO (idx = q * seq_len + k, strictly ascending) of one head on one sequence.

    top_values/top_indices: (query_pos, top_k), descending per row, -1 where
    unused. Keeps each row's top_k, drops weights below min_weight, always
    keeps the row's largest; values stay the true probabilities.
    """
    seq_len = top_values.shape[0]
    keep = (top_indices >= 0) & (top_values >= min_weight)
    keep[:, 0] |= top_indices[:, 0] >= 0
    rows = np.broadcast_to(np.arange(seq_len)[:, None], top_indices.shape)
    flat = rows[keep].astype(np.int64) * seq_len + top_indices[keep].astype(np.int64)
    values = top_values[keep]
    order = np.argsort(flat, kind="stable")
    return flat[order], values[order]
