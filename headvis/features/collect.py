"""Streaming statistics of a dictionary's features over a corpus, in bounded memory.

Two passes over the same batches `(seq_ids (batch,), token_ids (batch, pos), acts (batch, pos, d_sae))`:

pass 1  `TopActivations`: per feature the POOL largest activations (a torch.topk merge per batch) and
        the feature's activations on the window around each; count, sum and max per feature.
        `TokenCounts`: how often each feature is active on each token id (sparse, merged per batch).
pass 2  `IntervalSamples`: with the max known, an activation a > 0 of feature f lies in interval
        i = ceil(N_INTERVALS * a / max_f), clamped to 1..N_INTERVALS (equal widths over (0, max_f]).
        Per (f, i) the PER_INTERVAL activations with the lowest seeded hash h(seed, seq, pos, f) are
        kept: a uniform sample without replacement of the interval, and the same sample whatever the
        batching (bottom-k sketches merge exactly).

Memory: d_sae * (POOL + N_INTERVALS * PER_INTERVAL) windows of WINDOW.width floats, plus the
token-count table (at most TOKEN_TABLE_CAP entries), whatever the corpus size.

`finish` picks the top windows greedily, highest first (ties: lower sequence, then position): a
candidate that lies inside an already chosen window of the same sequence is skipped (its token is
shown there already); interval samples inside a chosen top window are dropped for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["N_INTERVALS", "PER_INTERVAL", "POOL", "TOP_WINDOWS", "TOP_TOKENS", "WINDOW", "Batches",
           "FeatureTables", "IntervalSamples", "TokenCounts", "TopActivations", "Window", "collect_features",
           "interval_of", "sample_hash"]


@dataclass(frozen=True)
class Window:
    """The tokens shown around an activation at `pos`: `before` tokens before it, `after` after."""

    before: int = 10
    after: int = 4

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    def bounds(self, pos: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) positions, inclusive, of the windows around `pos`, clipped to the sequence."""
        return np.maximum(pos - self.before, 0), np.minimum(pos + self.after, seq_len - 1)


WINDOW = Window()
TOP_WINDOWS = 8  # top-activating windows kept per feature
POOL = 4 * TOP_WINDOWS  # candidates kept in pass 1, so overlapping windows can be skipped
N_INTERVALS = 10  # CONTRACT's n_intervals; interval 10 holds the strongest activations
PER_INTERVAL = 3  # sampled windows kept per interval
TOP_TOKENS = 5  # token ids kept per feature, by how often the feature is active on them
TOKEN_TABLE_CAP = 1 << 22  # (feature, token) entries; beyond it the rarest are pruned (counts become lower bounds)

# One batch: seq_ids (batch,) int64, token_ids (batch, pos) int64, acts (batch, pos, d_sae) float32.
Batches = Callable[[str], Iterable[tuple[Tensor, Tensor, Tensor]]]  # pass label -> that pass's batches


def interval_of(values: np.ndarray, max_activation: np.ndarray, n_intervals: int = N_INTERVALS) -> np.ndarray:
    """Interval 1..n_intervals of activations `values` > 0 of features whose max is `max_activation`."""
    ratio = np.asarray(values, np.float64) / np.maximum(np.asarray(max_activation, np.float64), 1e-30)
    return np.clip(np.ceil(n_intervals * ratio), 1, n_intervals).astype(np.int64)


def sample_hash(seed: int, token_index: np.ndarray, feature: np.ndarray, d_sae: int) -> np.ndarray:
    """SplitMix64 of (seed, token_index = seq * seq_len + pos, feature): uint64, wrapping arithmetic."""
    z = token_index.astype(np.uint64) * np.uint64(d_sae) + feature.astype(np.uint64)
    z = z + np.uint64((seed * 0xD1B54A32D192ED03 + 0x9E3779B97F4A7C15) % 2**64)  # Python ints: no overflow warning
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _gather_windows(acts: Tensor, b: Tensor, pos: Tensor, feature: Tensor, window: Window) -> Tensor:
    """(n, window.width) activations of `feature` around `pos` in batch row `b`; 0 outside the sequence."""
    seq_len = acts.shape[1]
    offsets = torch.arange(-window.before, window.after + 1, device=acts.device)
    q = pos[:, None] + offsets  # (n, width)
    inside = (q >= 0) & (q < seq_len)
    values = acts[b[:, None], q.clamp(0, seq_len - 1), feature[:, None]]  # (n, width)
    return torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device)).float()


def _bottom_per_group(group: np.ndarray, hash_: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m lowest hashes of each group, ordered by (group, hash)."""
    order = np.lexsort((hash_, group))
    g = group[order]
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
    run_start = np.repeat(first, np.diff(np.r_[first, len(g)]))
    rank = np.arange(len(g)) - run_start
    return order[rank < m]


class TopActivations:
    """Pass 1: per feature the `pool` largest activations with their windows; count, sum, max."""

    def __init__(self, d_sae: int, device: torch.device | str, pool: int = POOL, window: Window = WINDOW):
        self.pool, self.window = pool, window
        self.values = torch.zeros(d_sae, pool, device=device)  # (d_sae, pool); 0 = an empty slot
        self.seq = torch.full((d_sae, pool), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((d_sae, pool), -1, dtype=torch.int64, device=device)
        self.windows = torch.zeros(d_sae, pool, window.width, device=device)  # (d_sae, pool, width)
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)  # activations > 0
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)  # their sum

    def update(self, seq_ids: Tensor, acts: Tensor) -> None:
        batch, seq_len, d_sae = acts.shape
        flat = acts.reshape(batch * seq_len, d_sae)
        self.count += (flat > 0).sum(0)
        self.total += flat.sum(0, dtype=torch.float64)
        k = min(self.pool, batch * seq_len)
        vals, idx = flat.topk(k, dim=0)  # (k, d_sae)
        merged = torch.cat([self.values, vals.T], dim=1)  # (d_sae, pool + k)
        top, sel = merged.topk(self.pool, dim=1)  # (d_sae, pool)
        old = sel.clamp(max=self.pool - 1)
        seq, pos = self.seq.gather(1, old), self.pos.gather(1, old)
        windows = self.windows.gather(1, old[..., None].expand(-1, -1, self.window.width))
        f, slot = ((sel >= self.pool) & (top > 0)).nonzero(as_tuple=True)
        token = idx.T[f, sel[f, slot] - self.pool]  # flat index into the batch's tokens
        b, p = token // seq_len, token % seq_len
        seq[f, slot], pos[f, slot] = seq_ids[b], p
        windows[f, slot] = _gather_windows(acts, b, p, f, self.window)
        empty = top <= 0
        seq[empty], pos[empty] = -1, -1
        self.values, self.seq, self.pos, self.windows = top, seq, pos, windows

    def max_activation(self) -> np.ndarray:
        return self.values[:, 0].cpu().numpy()  # (d_sae,) topk keeps each row sorted


class TokenCounts:
    """Pass 1: how often each feature is active on each token id, as a sparse (feature, token) table."""

    def __init__(self, vocab: int, device: torch.device | str, cap: int = TOKEN_TABLE_CAP):
        self.vocab, self.cap = vocab, cap
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)  # feature * vocab + token id, ascending
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self.exact = True  # False once the table was pruned: counts are then lower bounds

    def update(self, token_ids: Tensor, acts: Tensor) -> None:
        b, p, f = (acts > 0).nonzero(as_tuple=True)
        keys = f * self.vocab + token_ids[b, p]
        keys, inverse = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        counts = torch.zeros(len(keys), dtype=torch.int64, device=keys.device)
        counts.scatter_add_(0, inverse[: len(self.counts)], self.counts)
        counts.scatter_add_(0, inverse[len(self.counts):], torch.ones_like(inverse[len(self.counts):]))
        if len(keys) > self.cap:
            kept = counts.topk(self.cap // 2).indices.sort().values
            keys, counts, self.exact = keys[kept], counts[kept], False
        self.keys, self.counts = keys, counts

    def top(self, d_sae: int, n: int = TOP_TOKENS) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, counts), each (d_sae, n): each feature's most frequent tokens (ties: lower id); -1 pads."""
        keys, counts = self.keys.cpu().numpy(), self.counts.cpu().numpy()
        feature, token = keys // self.vocab, keys % self.vocab
        order = np.lexsort((token, -counts, feature))
        feature, token, counts = feature[order], token[order], counts[order]
        first = np.searchsorted(feature, np.arange(d_sae))
        rank = np.arange(len(feature)) - first[feature]
        keep = rank < n
        ids = np.full((d_sae, n), -1, np.int64)
        out_counts = np.zeros((d_sae, n), np.int64)
        ids[feature[keep], rank[keep]] = token[keep]
        out_counts[feature[keep], rank[keep]] = counts[keep]
        return ids, out_counts


class IntervalSamples:
    """Pass 2: per (feature, interval) the `per_interval` activations of lowest seeded hash, with windows."""

    def __init__(self, max_activation: np.ndarray, seq_len: int, seed: int, n_intervals: int = N_INTERVALS,
                 per_interval: int = PER_INTERVAL, window: Window = WINDOW):
        self.max_activation = np.asarray(max_activation, np.float32)  # (d_sae,)
        self.seq_len, self.seed = seq_len, seed
        self.n_intervals, self.per_interval, self.window = n_intervals, per_interval, window
        self.group = np.zeros(0, np.int64)  # feature * n_intervals + interval - 1, ascending
        self.hash = np.zeros(0, np.uint64)
        self.seq = np.zeros(0, np.int64)
        self.pos = np.zeros(0, np.int64)
        self.value = np.zeros(0, np.float32)
        self.windows = np.zeros((0, window.width), np.float32)

    def update(self, seq_ids: Tensor, acts: Tensor) -> None:
        d_sae = acts.shape[2]
        b_t, p_t, f_t = (acts > 0).nonzero(as_tuple=True)
        value = acts[b_t, p_t, f_t].float().cpu().numpy()
        b, p, f = b_t.cpu().numpy(), p_t.cpu().numpy(), f_t.cpu().numpy()
        seq = seq_ids.cpu().numpy()[b]
        group = f * self.n_intervals + interval_of(value, self.max_activation[f], self.n_intervals) - 1
        hash_ = sample_hash(self.seed, seq * self.seq_len + p, f, d_sae)
        pre = _bottom_per_group(group, hash_, self.per_interval)  # this batch's own candidates
        n_old = len(self.group)
        keep = _bottom_per_group(np.r_[self.group, group[pre]], np.r_[self.hash, hash_[pre]], self.per_interval)
        new = keep >= n_old
        taken = pre[keep[new] - n_old]  # indices into this batch's nonzero entries
        windows = np.empty((len(keep), self.window.width), np.float32)
        windows[~new] = self.windows[keep[~new]]
        if len(taken):
            index = torch.as_tensor(taken, device=b_t.device)
            windows[new] = _gather_windows(acts, b_t[index], p_t[index], f_t[index], self.window).cpu().numpy()
        self.group = np.r_[self.group, group[pre]][keep]
        self.hash = np.r_[self.hash, hash_[pre]][keep]
        self.seq = np.r_[self.seq, seq[pre]][keep]
        self.pos = np.r_[self.pos, p[pre]][keep]
        self.value = np.r_[self.value, value[pre]][keep]
        self.windows = windows


@dataclass
class FeatureTables:
    """Everything `finish` keeps per feature (numpy; -1 marks an empty slot of seq / pos / token)."""

    seq_len: int
    n_tokens: int  # tokens scanned
    count: np.ndarray  # (d_sae,) int64 activations > 0
    total: np.ndarray  # (d_sae,) float64 sum of activations
    max_activation: np.ndarray  # (d_sae,) float32
    top_seq: np.ndarray  # (d_sae, TOP_WINDOWS) int64, highest first
    top_pos: np.ndarray  # (d_sae, TOP_WINDOWS) int64, the window's centre (its activation in top_value)
    top_value: np.ndarray  # (d_sae, TOP_WINDOWS) float32
    top_acts: np.ndarray  # (d_sae, TOP_WINDOWS, WINDOW.width) float32, positions pos - before .. pos + after
    sample_seq: np.ndarray  # (d_sae, N_INTERVALS, PER_INTERVAL) int64, interval i at index i - 1, hash order
    sample_pos: np.ndarray  # (d_sae, N_INTERVALS, PER_INTERVAL) int64
    sample_value: np.ndarray  # (d_sae, N_INTERVALS, PER_INTERVAL) float32
    sample_acts: np.ndarray  # (d_sae, N_INTERVALS, PER_INTERVAL, WINDOW.width) float32
    token_ids: np.ndarray  # (d_sae, TOP_TOKENS) int64, the feature's most frequent tokens
    token_counts: np.ndarray  # (d_sae, TOP_TOKENS) int64
    token_counts_exact: bool

    @property
    def d_sae(self) -> int:
        return len(self.count)


def _choose_top(top: TopActivations, seq_len: int, n_top: int) -> tuple[np.ndarray, ...]:
    """(seq, pos, value, acts) of the n_top windows chosen greedily from each feature's pool."""
    values = top.values.cpu().numpy()
    seq, pos, windows = top.seq.cpu().numpy(), top.pos.cpu().numpy(), top.windows.cpu().numpy()
    valid = values > 0
    order = np.lexsort((pos, seq, np.where(valid, -values, np.inf)), axis=1)  # highest first, ties: seq, pos
    values, seq, pos, valid = (np.take_along_axis(a, order, 1) for a in (values, seq, pos, valid))
    windows = np.take_along_axis(windows, order[..., None], 1)
    start, end = top.window.bounds(pos, seq_len)  # (d_sae, pool)
    # covers[f, j, i]: candidate i lies inside candidate j's window
    covers = (seq[:, :, None] == seq[:, None, :]) & (start[:, :, None] <= pos[:, None, :]) \
        & (pos[:, None, :] <= end[:, :, None])
    d_sae, pool = values.shape
    chosen = np.zeros((d_sae, pool), bool)
    n_chosen = np.zeros(d_sae, np.int64)
    for i in range(pool):
        ok = valid[:, i] & ~(chosen & covers[:, :, i]).any(1) & (n_chosen < n_top)
        chosen[:, i] = ok
        n_chosen += ok
    slot = np.argsort(~chosen, axis=1, kind="stable")[:, :n_top]  # chosen first, in order
    kept = np.take_along_axis(chosen, slot, 1)
    out_seq = np.where(kept, np.take_along_axis(seq, slot, 1), -1)
    out_pos = np.where(kept, np.take_along_axis(pos, slot, 1), -1)
    out_value = np.where(kept, np.take_along_axis(values, slot, 1), 0).astype(np.float32)
    out_acts = np.where(kept[..., None], np.take_along_axis(windows, slot[..., None], 1), 0).astype(np.float32)
    return out_seq, out_pos, out_value, out_acts


def _place_samples(samples: IntervalSamples, d_sae: int, seq_len: int, top_seq: np.ndarray,
                   top_pos: np.ndarray) -> tuple[np.ndarray, ...]:
    """(seq, pos, value, acts) per (feature, interval), hash order, without samples inside a top window."""
    n_int, m = samples.n_intervals, samples.per_interval
    feature = samples.group // n_int
    start, end = samples.window.bounds(top_pos[feature], seq_len)  # (n, TOP_WINDOWS)
    inside = ((top_seq[feature] == samples.seq[:, None]) & (start <= samples.pos[:, None])
              & (samples.pos[:, None] <= end)).any(1)
    keep = ~inside
    group = samples.group[keep]
    first = np.searchsorted(group, group)  # group is ascending: the first index of each run
    rank = np.arange(len(group)) - first
    f, i = group // n_int, group % n_int
    seq = np.full((d_sae, n_int, m), -1, np.int64)
    pos = np.full((d_sae, n_int, m), -1, np.int64)
    value = np.zeros((d_sae, n_int, m), np.float32)
    acts = np.zeros((d_sae, n_int, m, samples.window.width), np.float32)
    seq[f, i, rank], pos[f, i, rank] = samples.seq[keep], samples.pos[keep]
    value[f, i, rank], acts[f, i, rank] = samples.value[keep], samples.windows[keep]
    return seq, pos, value, acts


def collect_features(batches: Batches, *, d_sae: int, vocab: int, seq_len: int, seed: int,
                     device: torch.device | str = "cpu", n_top: int = TOP_WINDOWS) -> FeatureTables:
    """Run both passes over `batches` (called once per pass, yielding the same batches) and finish."""
    top = TopActivations(d_sae, device)
    tokens = TokenCounts(vocab, device)
    n_tokens = 0
    for seq_ids, token_ids, acts in batches("features pass 1/2"):
        top.update(seq_ids, acts)
        tokens.update(token_ids, acts)
        n_tokens += token_ids.numel()
    max_activation = top.max_activation()
    samples = IntervalSamples(max_activation, seq_len, seed)
    for seq_ids, _token_ids, acts in batches("features pass 2/2"):
        samples.update(seq_ids, acts)
    top_seq, top_pos, top_value, top_acts = _choose_top(top, seq_len, n_top)
    sample_seq, sample_pos, sample_value, sample_acts = _place_samples(samples, d_sae, seq_len, top_seq, top_pos)
    token_ids, token_counts = tokens.top(d_sae)
    return FeatureTables(
        seq_len=seq_len, n_tokens=n_tokens,
        count=top.count.cpu().numpy(), total=top.total.cpu().numpy(), max_activation=max_activation,
        top_seq=top_seq, top_pos=top_pos, top_value=top_value, top_acts=top_acts,
        sample_seq=sample_seq, sample_pos=sample_pos, sample_value=sample_value, sample_acts=sample_acts,
        token_ids=token_ids, token_counts=token_counts, token_counts_exact=tokens.exact,
    )
