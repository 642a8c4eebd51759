"""The torch reference `ref_row_stats` against brute force float64 and hand-made heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headvis.metrics import ROW_METRICS, AttentionSpec, distance_bin_edges, ref_pattern, ref_row_stats
from random_heads import CASES, brute_row, make_inputs


def brute_force(query, key, tokens, spec: AttentionSpec, top_k: int, edges: list[int]) -> dict:
    """Row by row in float64 numpy, straight from CONTRACT section 1."""
    q = query.double().numpy()
    k = key.double().numpy()
    tok = tokens.numpy()
    batch, n_heads, seq_len, _ = q.shape
    out = {name: np.zeros((batch, n_heads, seq_len)) for name in ROW_METRICS}
    out["induction_counted"] = np.zeros((batch, n_heads, seq_len), bool)
    out["duplicate_counted"] = np.zeros((batch, n_heads, seq_len), bool)
    out["margin_counted"] = np.zeros((batch, n_heads, seq_len), bool)
    out["max_nobos"] = np.zeros((batch, n_heads, seq_len))
    out["dist_hist"] = np.zeros((batch, n_heads, seq_len, len(edges) - 1))
    out["key_weight"] = np.zeros((batch, n_heads, seq_len))
    out["top_values"] = np.zeros((batch, n_heads, seq_len, top_k))
    for b in range(batch):
        for h in range(n_heads):
            for i in range(seq_len):
                allowed, s, p = brute_row(q, k, spec, b, h, i)
                if not allowed:
                    continue
                pj = dict(zip(allowed, p))
                out["pattern_entropy"][b, h, i] = -sum(x * math.log(x) for x in p if x > 0)
                out["previous_token_score"][b, h, i] = pj.get(i - 1, 0.0) if i >= 1 else 0.0
                ind = [j for j in allowed if 1 <= j < i and tok[b, j - 1] == tok[b, i]]
                dup = [j for j in allowed if j < i and tok[b, j] == tok[b, i]]
                out["induction_score"][b, h, i] = sum(pj[j] for j in ind)
                out["duplicate_token_score"][b, h, i] = sum(pj[j] for j in dup)
                out["induction_counted"][b, h, i] = bool(ind)
                out["duplicate_counted"][b, h, i] = bool(dup)
                out["bos_score"][b, h, i] = pj.get(0, 0.0)
                out["self_attention_score"][b, h, i] = pj.get(i, 0.0)
                out["qk_distance"][b, h, i] = sum(pj[j] * abs(i - j) for j in allowed)
                out["logit_mean"][b, h, i] = s.mean()
                out["logit_std"][b, h, i] = s.std()
                out["logit_max"][b, h, i] = s.max()
                if len(s) >= 2:
                    top2 = np.sort(s)[::-1][:2]
                    out["top_logit_margin"][b, h, i] = top2[0] - top2[1]
                    out["margin_counted"][b, h, i] = True
                out["qk_distance_sq"][b, h, i] = sum(pj[j] * (i - j) ** 2 for j in allowed)
                out["max_nobos"][b, h, i] = max([pj[j] for j in allowed if j >= 1], default=0.0)
                for j in allowed:
                    d = i - j
                    for n in range(len(edges) - 1):
                        if edges[n] <= d < edges[n + 1]:
                            out["dist_hist"][b, h, i, n] += pj[j]
                    if i >= 1:
                        out["key_weight"][b, h, j] += pj[j]
                ranked = sorted(p, reverse=True)[:top_k]
                out["top_values"][b, h, i, : len(ranked)] = ranked
    return out


def assert_close(name: str, expected, actual, atol: float) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual.double() if torch.is_tensor(actual) else actual, dtype=np.float64)
    assert expected.shape == actual.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(expected - actual).max() if expected.size else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("q_chunk", [3, 128])
def test_ref_row_stats_matches_float64_brute_force(case, q_chunk):
    query, key, tokens, spec = make_inputs(case, vocab=4)
    edges = distance_bin_edges(case.seq_len, case.causal)
    top_k = 4
    stats = ref_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges, q_chunk=q_chunk)
    expected = brute_force(query, key, tokens, spec, top_k, edges)
    for name in ROW_METRICS:
        assert_close(name, expected[name], stats.metrics[name], 2e-5 * (1 + np.abs(expected[name]).max()))
    assert np.array_equal(expected["induction_counted"], stats.induction_counted.numpy())
    assert np.array_equal(expected["duplicate_counted"], stats.duplicate_counted.numpy())
    assert np.array_equal(expected["margin_counted"], stats.margin_counted.numpy())
    assert_close("max_nobos", expected["max_nobos"], stats.max_nobos, 1e-5)
    assert_close("dist_hist", expected["dist_hist"], stats.dist_hist, 1e-5)
    assert_close("key_weight", expected["key_weight"], stats.key_weight, 1e-4)
    assert_close("top_values", expected["top_values"], stats.top_values, 1e-5)
    # top indices point at the values they claim, argmax_nobos at max_nobos
    pattern = ref_pattern(query, key, spec)
    idx = stats.top_indices.clamp(min=0)
    assert_close("top_indices", stats.top_values, torch.where(stats.top_indices >= 0, pattern.gather(-1, idx), 0.0), 1e-6)
    am = stats.argmax_nobos
    assert_close("argmax_nobos", stats.max_nobos, torch.where(am >= 0, pattern.gather(-1, am.clamp(min=0)[..., None])[..., 0], 0.0), 1e-6)


def _hot_keys(positions: torch.Tensor, width: int, scale: float) -> torch.Tensor:
    return torch.nn.functional.one_hot(positions, width).float() * scale


def test_pure_previous_token_head():
    seq_len = 12
    pos = torch.arange(seq_len)
    key = _hot_keys(pos, seq_len, 1.0)[None, None]  # key k = e_k
    query = _hot_keys((pos - 1).clamp(min=0), seq_len, 60.0)[None, None]  # query q = 60 e_{q-1}
    tokens = torch.randint(0, 1000, (1, seq_len))
    stats = ref_row_stats(query, key, tokens, AttentionSpec(causal=True, scaling=1.0), top_k=2,
                          bin_edges=distance_bin_edges(seq_len, True))
    rows = stats.metrics["previous_token_score"][0, 0, 1:]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    assert torch.allclose(stats.metrics["qk_distance"][0, 0, 1:], torch.ones(seq_len - 1), atol=1e-5)
    assert stats.argmax_nobos[0, 0, 2:].tolist() == list(range(1, seq_len - 1))
    assert stats.top_indices[0, 0, 5, 0] == 4


def test_induction_on_repeated_random_tokens():
    half = 20
    g = torch.Generator().manual_seed(0)
    body = torch.randperm(500, generator=g)[:half]
    tokens = torch.cat([torch.tensor([9999]), body, body])[None]  # BOS, A, A
    seq_len = tokens.shape[1]
    prev = torch.cat([torch.tensor([0]), tokens[0, :-1]])
    vocab = 10000
    key = _hot_keys(prev, vocab, 1.0)[None, None]  # key k encodes tok[k-1]
    query = _hot_keys(tokens[0], vocab, 50.0)[None, None]  # query q encodes tok[q]
    stats = ref_row_stats(query, key, tokens, AttentionSpec(causal=True, scaling=1.0), top_k=1,
                          bin_edges=distance_bin_edges(seq_len, True))
    counted = stats.induction_counted[0, 0]
    assert counted[: half + 1].sum() == 0 and counted[half + 1 :].all()  # only the repeat has induction keys
    assert torch.allclose(stats.metrics["induction_score"][0, 0, half + 1 :], torch.ones(half), atol=1e-6)
    assert torch.allclose(stats.metrics["duplicate_token_score"][0, 0, half + 1 :], torch.zeros(half), atol=1e-6)


def test_uniform_attention_entropy_is_log_of_row_length():
    seq_len = 33
    query = torch.zeros(1, 2, seq_len, 8)
    key = torch.randn(1, 1, seq_len, 8)
    tokens = torch.arange(seq_len)[None]
    stats = ref_row_stats(query, key, tokens, AttentionSpec(causal=True, scaling=0.125), top_k=3,
                          bin_edges=distance_bin_edges(seq_len, True))
    expected = torch.log(torch.arange(1, seq_len + 1).float())
    assert torch.allclose(stats.metrics["pattern_entropy"][0, 1], expected, atol=1e-5)
    assert torch.allclose(stats.metrics["bos_score"][0, 0], 1 / torch.arange(1, seq_len + 1).float(), atol=1e-6)
    assert torch.allclose(stats.metrics["logit_std"][0, 0], torch.zeros(seq_len))
    # ties: the lowest key indices win
    assert stats.top_indices[0, 0, 10].tolist() == [0, 1, 2]
    assert stats.argmax_nobos[0, 0, 10] == 1


def test_bidirectional_uniform_rows_see_every_key():
    seq_len = 7
    query = torch.zeros(1, 1, seq_len, 4)
    key = torch.randn(1, 1, seq_len, 4)
    stats = ref_row_stats(query, key, torch.arange(seq_len)[None], AttentionSpec(causal=False, scaling=0.5),
                          top_k=2, bin_edges=distance_bin_edges(seq_len, False))
    assert torch.allclose(stats.metrics["pattern_entropy"][0, 0], torch.full((seq_len,), math.log(seq_len)), atol=1e-6)
    assert torch.allclose(stats.dist_hist[0, 0].sum(-1), torch.ones(seq_len), atol=1e-6)
    # later keys land in the negative bins
    edges = distance_bin_edges(seq_len, False)
    negative = [b for b in range(len(edges) - 1) if edges[b + 1] <= 0]
    assert torch.allclose(stats.dist_hist[0, 0, 0, negative].sum(), torch.tensor((seq_len - 1) / seq_len), atol=1e-6)


def test_single_token_sequence_has_no_counted_rows():
    stats = ref_row_stats(torch.randn(1, 2, 1, 4), torch.randn(1, 1, 1, 4), torch.tensor([[3]]),
                          AttentionSpec(causal=True, scaling=0.5), top_k=4, bin_edges=distance_bin_edges(1, True))
    assert stats.metrics["self_attention_score"][0, 0, 0] == pytest.approx(1.0)
    assert stats.max_nobos.abs().sum() == 0 and (stats.argmax_nobos == -1).all()
    assert stats.top_indices[0, 0, 0].tolist() == [0, -1, -1, -1]
    assert stats.key_weight.abs().sum() == 0


def test_large_logits_stay_finite():
    query = torch.randn(1, 2, 20, 8) * 300
    key = torch.randn(1, 2, 20, 8) * 300
    stats = ref_row_stats(query, key, torch.zeros(1, 20, dtype=torch.long), AttentionSpec(causal=True, scaling=1.0),
                          top_k=2, bin_edges=distance_bin_edges(20, True))
    for name in ROW_METRICS:
        assert torch.isfinite(stats.metrics[name]).all(), name
    assert (stats.metrics["pattern_entropy"] >= -1e-6).all()


def test_fully_padded_rows_are_zero_not_nan():
    key_valid = torch.zeros(1, 5, dtype=torch.bool)
    stats = ref_row_stats(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), torch.zeros(1, 5, dtype=torch.long),
                          AttentionSpec(causal=False, scaling=0.5, key_valid=key_valid), top_k=2,
                          bin_edges=distance_bin_edges(5, False))
    for name in ROW_METRICS:
        assert torch.equal(stats.metrics[name], torch.zeros_like(stats.metrics[name])), name
    assert (stats.top_indices == -1).all()


def test_distance_bin_edges():
    assert distance_bin_edges(5, True) == [0, 1, 2, 4, 8]
    assert distance_bin_edges(8, True) == [0, 1, 2, 4, 8]
    assert distance_bin_edges(1, True) == [0, 1, 2]
    assert distance_bin_edges(3, False) == [-4, -2, -1, 0, 1, 2, 4]
