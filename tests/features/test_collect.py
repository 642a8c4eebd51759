"""The streaming passes against a reference computed from every activation held in memory.

The reference (`ref_*`) encodes each sequence alone (capture_hooks + Dictionary.encode, batch 1) and
picks top windows and interval samples with plain Python loops over all activations; the library
(`compute_tables`, batches of 5) keeps only its bounded pools. Both must agree exactly on which
tokens are chosen, and to float32 rounding on the activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headvis.dictionaries import capture_hooks
from headvis.features import compute_tables
from headvis.features.collect import N_INTERVALS, PER_INTERVAL, POOL, TOP_WINDOWS, WINDOW, interval_of, sample_hash
from features_helpers import DEAD_FEATURE, D_SAE, MARK, NUM_SEQS, SEED, SEQ_LEN, TOKEN_FEATURE


@pytest.fixture(scope="module")
def acts(hand, corpus) -> np.ndarray:
    """(NUM_SEQS, SEQ_LEN, D_SAE): every activation, one sequence at a time."""
    lm, _, d = hand
    rows = [d.encode(capture_hooks(lm.model, [d.hook_name], corpus[s:s + 1])[d.hook_name])[0]
            for s in range(len(corpus))]
    return torch.stack(rows).numpy()


def ref_window(acts: np.ndarray, seq: int, pos: int, feature: int) -> np.ndarray:
    """The feature's activations at pos - before .. pos + after, 0 outside the sequence."""
    out = np.zeros(WINDOW.width, np.float32)
    for j, q in enumerate(range(pos - WINDOW.before, pos + WINDOW.after + 1)):
        if 0 <= q < acts.shape[1]:
            out[j] = acts[seq, q, feature]
    return out


def _inside(seq: int, pos: int, windows: list[tuple[int, int]]) -> bool:
    return any(s == seq and max(p - WINDOW.before, 0) <= pos <= min(p + WINDOW.after, SEQ_LEN - 1) for s, p in windows)


def ref_top(acts: np.ndarray, feature: int) -> list[tuple[int, int]]:
    """Greedy top windows over the POOL strongest activations (ties: lower seq, then pos)."""
    seq, pos = np.nonzero(acts[:, :, feature] > 0)
    values = acts[seq, pos, feature]
    chosen: list[tuple[int, int]] = []
    for i in np.lexsort((pos, seq, -values))[:POOL]:
        if len(chosen) < TOP_WINDOWS and not _inside(seq[i], pos[i], chosen):
            chosen.append((int(seq[i]), int(pos[i])))
    return chosen


def ref_samples(acts: np.ndarray, feature: int, top: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """interval -> its PER_INTERVAL lowest-hash activations (hash order), minus those inside a top window."""
    seq, pos = np.nonzero(acts[:, :, feature] > 0)
    values = acts[seq, pos, feature]
    intervals = interval_of(values, values.max()) if len(values) else values
    hashes = sample_hash(SEED, seq * SEQ_LEN + pos, np.full(len(seq), feature), D_SAE)
    out = {}
    for i in range(1, N_INTERVALS + 1):
        members = np.flatnonzero(intervals == i)
        picked = members[np.argsort(hashes[members])][:PER_INTERVAL]
        out[i] = [(int(seq[j]), int(pos[j])) for j in picked if not _inside(seq[j], pos[j], top)]
    return out


def stored_top(tables, feature: int) -> list[tuple[int, int]]:
    return [(int(s), int(p)) for s, p in zip(tables.top_seq[feature], tables.top_pos[feature]) if s >= 0]


def test_token_feature_windows_are_exactly_its_occurrences(hand, corpus, tables, acts):
    _, token, _ = hand
    occurrences = [(int(s), int(p)) for s, p in zip(*(corpus == token).nonzero(as_tuple=True))]
    assert 3 <= len(occurrences) <= TOP_WINDOWS
    assert stored_top(tables, TOKEN_FEATURE) == sorted(occurrences)  # equal activations: ordered by seq, pos
    assert int(tables.count[TOKEN_FEATURE]) == len(occurrences)
    nonzero = set(zip(*(np.nonzero(acts[:, :, TOKEN_FEATURE] > 0))))
    assert nonzero == set(occurrences)  # the construction holds: it fires there and nowhere else
    expected = acts[occurrences[0][0], occurrences[0][1], TOKEN_FEATURE]
    assert expected == pytest.approx(MARK / 2, abs=0.2)
    np.testing.assert_allclose(tables.top_value[TOKEN_FEATURE][: len(occurrences)], expected, rtol=1e-6)
    assert tables.max_activation[TOKEN_FEATURE] == pytest.approx(expected, rel=1e-6)
    # every activation lies in a top window already, so no interval sample is left
    assert (tables.sample_seq[TOKEN_FEATURE] == -1).all()
    ids = [int(t) for t in tables.token_ids[TOKEN_FEATURE] if t >= 0]
    assert ids == [token] and int(tables.token_counts[TOKEN_FEATURE, 0]) == len(occurrences)


def test_dead_feature_keeps_nothing(tables):
    assert tables.count[DEAD_FEATURE] == 0 and tables.max_activation[DEAD_FEATURE] == 0
    assert (tables.top_seq[DEAD_FEATURE] == -1).all() and (tables.sample_seq[DEAD_FEATURE] == -1).all()
    assert (tables.token_ids[DEAD_FEATURE] == -1).all()


@pytest.mark.parametrize("feature", range(D_SAE))
def test_windows_and_samples_match_the_reference(tables, acts, feature):
    top = ref_top(acts, feature)
    assert stored_top(tables, feature) == top, "top windows"
    samples = ref_samples(acts, feature, top)
    for i in range(1, N_INTERVALS + 1):
        stored = [(int(s), int(p)) for s, p in zip(tables.sample_seq[feature, i - 1], tables.sample_pos[feature, i - 1])
                  if s >= 0]
        assert stored == samples[i], f"interval {i}"
    column = acts[:, :, feature]
    assert int(tables.count[feature]) == int((column > 0).sum())
    assert tables.total[feature] == pytest.approx(float(column.sum(dtype=np.float64)), rel=1e-5)
    assert tables.max_activation[feature] == pytest.approx(float(column.max()), rel=1e-6)
    for j, (s, p) in enumerate(stored_top(tables, feature)):
        np.testing.assert_allclose(tables.top_acts[feature, j], ref_window(acts, s, p, feature), rtol=1e-5, atol=1e-6)
        assert tables.top_value[feature, j] == pytest.approx(acts[s, p, feature], rel=1e-6)
    for i in range(N_INTERVALS):
        for m in range(PER_INTERVAL):
            s, p = int(tables.sample_seq[feature, i, m]), int(tables.sample_pos[feature, i, m])
            if s >= 0:
                np.testing.assert_allclose(tables.sample_acts[feature, i, m], ref_window(acts, s, p, feature),
                                           rtol=1e-5, atol=1e-6)
                assert interval_of(acts[s, p, feature], tables.max_activation[feature]) == i + 1


def test_token_counts_match_the_reference(tables, acts, corpus):
    ids = corpus.numpy()
    for feature in range(D_SAE):
        active = ids[acts[:, :, feature] > 0]
        tokens, counts = np.unique(active, return_counts=True)
        order = np.lexsort((tokens, -counts))[: tables.token_ids.shape[1]]
        n = len(order)
        assert tables.token_ids[feature, :n].tolist() == tokens[order].tolist()
        assert tables.token_counts[feature, :n].tolist() == counts[order].tolist()
        assert (tables.token_ids[feature, n:] == -1).all()
    assert tables.token_counts_exact and tables.n_tokens == NUM_SEQS * SEQ_LEN


def test_batching_and_seed(hand, corpus, tables):
    """One batch gives the same choices as batches of 5 (the pools merge exactly); another seed samples anew."""
    lm, _, d = hand
    whole = compute_tables(lm, d, corpus, batch_size=NUM_SEQS, seed=SEED)
    for name in ("count", "top_seq", "top_pos", "sample_seq", "sample_pos", "token_ids", "token_counts"):
        assert np.array_equal(getattr(whole, name), getattr(tables, name)), name
    np.testing.assert_allclose(whole.sample_acts, tables.sample_acts, rtol=1e-5, atol=1e-6)
    other = compute_tables(lm, d, corpus, batch_size=7, seed=SEED + 1)
    assert np.array_equal(other.top_seq, tables.top_seq)  # top windows do not depend on the seed
    assert not np.array_equal(other.sample_seq, tables.sample_seq)
