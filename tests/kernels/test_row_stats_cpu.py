"""`ref_row_stats` (torch reference) against `cpu_row_stats` (fused numba loop), field by field."""

from __future__ import annotations

import pytest
import torch

from headvis.kernels.row_stats_cpu import cpu_row_stats
from headvis.metrics import ROW_METRICS, AttentionSpec, distance_bin_edges, ref_row_stats
from known_row_stats import KNOWN_CASES, KnownCase, assert_known_answers

FLOAT_FIELDS = ("max_nobos", "dist_hist", "key_weight", "top_values")
EXACT_FIELDS = ("induction_counted", "duplicate_counted", "margin_counted", "argmax_nobos", "top_indices")


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    assert ref.shape == got.shape and ref.dtype == got.dtype, f"{name}: {got.shape} {got.dtype} vs {ref.shape} {ref.dtype}"
    err = (ref.double() - got.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def compare(query, key, tokens, spec, top_k, q_chunk=64, min_weight=0.0):
    edges = distance_bin_edges(query.shape[2], spec.causal)
    ref = ref_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges, min_weight=min_weight)
    got = cpu_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges, q_chunk=q_chunk, min_weight=min_weight)
    for name in ROW_METRICS:
        scale = 1 + ref.metrics[name].abs().max().item() if ref.metrics[name].numel() else 1
        assert_close(name, ref.metrics[name], got.metrics[name], 3e-6 * scale * max(1, query.shape[2] / 16))
    for name in FLOAT_FIELDS:
        assert_close(name, getattr(ref, name), getattr(got, name), 5e-6 * max(1, query.shape[2] / 32))
    for name in EXACT_FIELDS:
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    return got


CASES = [  # batch, heads, kv heads, T, d_head, causal, window, softcap, padded, sinks
    (2, 3, 3, 1, 16, True, None, None, False, False),
    (1, 3, 1, 2, 16, True, None, None, False, False),
    (2, 6, 2, 63, 16, True, None, None, False, False),
    (1, 3, 3, 130, 32, True, None, None, False, False),
    (2, 3, 1, 63, 16, False, None, None, True, False),
    (1, 2, 2, 40, 16, True, 7, None, False, False),
    (1, 2, 2, 33, 16, False, 5, None, False, False),
    (1, 2, 1, 30, 16, True, None, 3.0, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-KV{c[2]}-T{c[3]}-D{c[4]}-"
                         + ("causal" if c[5] else "bidir") + (f"-win{c[6]}" if c[6] else "")
                         + ("-softcap" if c[7] else "") + ("-pad" if c[8] else "") + ("-sinks" if c[9] else ""))
@pytest.mark.parametrize("top_k, min_weight", [(0, 0.0), (1, 0.0), (8, 0.0), (8, 0.05)])
def test_cpu_matches_reference(case, top_k, min_weight):
    batch, heads, kv, seq_len, d_head, causal, window, softcap, padded, sinks = case
    g = torch.Generator().manual_seed(seq_len + 7 * heads)
    query = torch.randn(batch, heads, seq_len, d_head, generator=g)
    key = torch.randn(batch, kv, seq_len, d_head, generator=g)
    tokens = torch.randint(0, 5, (batch, seq_len), generator=g)
    key_valid = None
    if padded:
        key_valid = torch.ones(batch, seq_len, dtype=torch.bool)
        key_valid[0, 50:] = False
        key_valid[1] = False  # a fully padded sequence: zeros, -1, no NaN
    spec = AttentionSpec(causal=causal, scaling=d_head**-0.5, window=window, softcap=softcap, key_valid=key_valid,
                         sinks=torch.randn(heads, generator=g) if sinks else None)
    got = compare(query, key, tokens, spec, top_k, min_weight=min_weight)
    if min_weight:  # light entries after a row's first are left out, and something is left out
        light = got.top_values[..., 1:] < min_weight
        assert (got.top_indices[..., 1:][light] == -1).all() and (got.top_indices[..., 1:] == -1).sum() > 0
    for name in ROW_METRICS:
        assert torch.isfinite(got.metrics[name]).all(), name


def test_large_logits_and_ties():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 2, 40, 16, generator=g) * 30
    key = torch.randn(1, 2, 40, 16, generator=g) * 30
    compare(query, key, torch.zeros(1, 40, dtype=torch.long), AttentionSpec(causal=True, scaling=1.0), 4)
    key = torch.ones(1, 1, 40, 16)  # every key alike: ties everywhere, lowest index first
    got = compare(torch.randn(1, 2, 40, 16, generator=g), key, torch.arange(40)[None],
                  AttentionSpec(causal=False, scaling=0.25), 3)
    assert got.top_indices[0, 0, 10].tolist() == [0, 1, 2] and got.argmax_nobos[0, 0, 10] == 1


@pytest.mark.parametrize("q_chunk", [1, 7, 64, 500])
def test_chunking_does_not_matter(q_chunk):
    g = torch.Generator().manual_seed(5)
    compare(torch.randn(1, 3, 50, 16, generator=g), torch.randn(1, 1, 50, 16, generator=g),
            torch.randint(0, 3, (1, 50), generator=g), AttentionSpec(causal=True, scaling=0.25), 2, q_chunk=q_chunk)


@pytest.mark.parametrize("case", KNOWN_CASES, ids=lambda c: c.id)
def test_known_answers(case: KnownCase):
    """Hand-made rows (known_row_stats.py): margins, margin_counted and uniform distances as the contract
    says (q_chunk 16: several chunks); then every field against the reference."""
    query, key, tokens, spec = case.inputs(torch.device("cpu"))
    edges = distance_bin_edges(case.seq_len, case.causal)
    assert_known_answers(case, cpu_row_stats(query, key, tokens, spec, top_k=2, bin_edges=edges, q_chunk=16))
    compare(query, key, tokens, spec, 2, q_chunk=16)


def test_the_kept_chunk_buffers_serve_calls_in_and_out_of_inference_mode():
    """The thread keeps its chunk buffers between calls; one made under inference mode cannot be written
    outside it, so each mode has its own (a call outside after one inside used to fail)."""
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g),
            torch.randint(0, 5, (1, 12), generator=g), AttentionSpec(causal=True, scaling=0.5))
    edges = distance_bin_edges(12, True)
    with torch.inference_mode():
        inside = cpu_row_stats(*args, top_k=2, bin_edges=edges)
    outside = cpu_row_stats(*args, top_k=2, bin_edges=edges)
    with torch.inference_mode():
        again = cpu_row_stats(*args, top_k=2, bin_edges=edges)
    for got in (outside, again):
        for name, value in inside.metrics.items():
            assert torch.equal(got.metrics[name], value), name
        assert torch.equal(got.top_indices, inside.top_indices)


def test_the_inline_exp_is_within_one_ulp_of_the_exact_one():
    """The kernel's own exp (a polynomial, so that its loop vectorizes), as the kernel runs it: inside the
    pass that writes the weights (`_exp_row`, compiled with its fast-math flags, which once made a float32
    range reduction 68 ulps off), against exp in float64 rounded once, over every float32 scale a row meets:
    0, the subnormal results, -104 and below (0), -inf (0)."""
    import numpy as np

    from headvis.kernels.row_stats_cpu import _exp_row

    g = np.random.default_rng(0)
    d = np.concatenate([-g.random(200_000) * 110, -g.random(20_000) * 1e-3,
                        [0.0, -0.0, -1e-30, -72.09093, -87.33, -88.0, -100.0, -103.2, -103.9, -104.0, -200.0,
                         -np.inf]]).astype(np.float32)
    out = np.empty_like(d)
    _exp_row(d, d.view(np.int32), out, 0, len(d), 0, np.float32(0.0), 0.0, np.int32(0))  # shift 0: exp(d)
    exact = np.exp(d.astype(np.float64)).astype(np.float32)
    ulps = np.abs(out.view(np.int32).astype(np.int64) - exact.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1, d[ulps.argmax()]
    assert out[d == 0].tolist() == [1.0, 1.0] and (out[d <= -104] == 0).all() and (out >= 0).all()
