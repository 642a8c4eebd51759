"""Deciles of per-sequence activation, the sequences shown per interval, and sparse rows.

CONTRACT section 2: interval_edges are the 0th..100th percentiles of the
head's per-sequence max_activation; interval 10 holds the top sequences,
highest first; intervals 1..9 hold a seeded uniform sample of their decile; a
sequence appears at most once per head.

Coordinated samples. Every sequence gets one priority, a uniform number in
[0, 1) drawn from (seed, sequence id) alone (`sequence_priorities`), and each
head takes, in each decile, the sequences of lowest priority. Priorities are
independent of activations, so each head's pick is still a uniform sample
of its decile; but all heads prefer the same low-priority sequences, so the
union of every head's samples, which pass 2 runs through the model again,
stays small (for 270 heads, a few times per_interval x 10 sequences instead of
up to 270 x 50). Priorities do not depend on how the corpus is split across
processes, nor on the order sequences are scanned in.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["assign_intervals", "choose_samples", "interval_edges", "sequence_priorities", "sparse_rows",
           "sparse_rows_batched"]


def sequence_priorities(seed: int, n_sequences: int) -> np.ndarray:
    """(n_sequences,) float64 in [0, 1): the priority of sequence i is BLAKE2b(seed, i) read as a fraction.

    A keyed hash per id rather than one generator's stream, so that a sequence's priority is the same in
    any subset of the corpus (a shard, a resumed scan) and on any machine. About 1 us per sequence.
    """
    key = str(int(seed)).encode("ascii")
    words = [int.from_bytes(hashlib.blake2b(str(i).encode("ascii"), digest_size=8, key=key).digest(), "little")
             for i in range(n_sequences)]
    return (np.asarray(words, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


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
    values: np.ndarray, edges: np.ndarray, per_interval: int, priority: np.ndarray
) -> list[tuple[int, int]]:
    """[(sequence index, interval)], interval `len(edges)-1` first, each interval by activation descending.

    values: (n,) the head's per-sequence max activation; priority: (n,) `sequence_priorities` (lowest taken
    first in each decile, ties by lower index).
    """
    intervals = len(edges) - 1
    values = np.asarray(values)
    priority = np.asarray(priority, dtype=np.float64)
    n = len(values)
    order = np.lexsort((np.arange(n), -values))  # highest first, lowest index on ties
    top = order[:per_interval]  # the true top sequences, whatever their decile
    chosen: list[tuple[int, int]] = [(int(i), intervals) for i in top]
    free = np.ones(n, dtype=bool)
    free[top] = False
    member = assign_intervals(values, intervals)
    for interval in range(intervals - 1, 0, -1):
        pool = np.flatnonzero((member == interval) & free)
        pool = pool[np.lexsort((pool, priority[pool]))][:per_interval]  # lowest priority first
        pool = pool[np.lexsort((pool, -values[pool]))]  # shown by activation, highest first
        chosen.extend((int(i), interval) for i in pool)
        free[pool] = False
    return chosen


def sparse_rows(top_values: np.ndarray, top_indices: np.ndarray, min_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat COO (idx = q * seq_len + k, strictly ascending) of one head on one sequence.

    top_values/top_indices: (query_pos, top_k), descending per row, -1 where
    unused. Keeps each row's top_k, drops weights below min_weight, always
    keeps the row's largest; values stay the true probabilities.
    """
    (indices, values), = sparse_rows_batched(top_values[None], top_indices[None], min_weight)
    return indices, values

def sparse_rows_batched(top_values: np.ndarray, top_indices: np.ndarray, min_weight: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """`sparse_rows` of many (head, sequence) pairs at once: top_values/top_indices (pairs, query_pos, top_k).

    One mask, one sort of each row's few entries by key and one split for all pairs (a scan keeps
    thousands per layer), the same rule and order as `sparse_rows`; each pair's arrays are views of two
    arrays shared by the call's pairs.
    """
    n_pairs, seq_len, top_k = top_indices.shape
    keep = (top_indices >= 0) & (top_values >= min_weight)
    keep[:, :, 0] |= top_indices[:, :, 0] >= 0
    # one int64 per entry, key in the high half (left out: seq_len, after every key), its slot in the low
    # half: a plain sort of each row orders its entries by key and says where each came from
    key = np.where(keep, top_indices, seq_len).astype(np.int64)
    packed = np.sort((key << 32) | np.arange(top_k, dtype=np.int64), axis=-1)
    key = packed >> 32
    kept = key < seq_len
    flat = (np.arange(seq_len, dtype=np.int64)[None, :, None] * seq_len + key)[kept]  # pair, row, key order
    values = np.take_along_axis(top_values, packed & 0xFFFFFFFF, axis=-1)[kept]
    bounds = np.cumsum(np.count_nonzero(kept.reshape(n_pairs, -1), axis=1))[:-1]
    # views of two arrays per call, not a copy per pair: thousands of small copies out of one big temporary
    # fragmented the heap (the default scan's peak RSS grew from 3.1 to 5.1 GB with the same payload)
    return list(zip(np.split(flat, bounds), np.split(values, bounds)))
