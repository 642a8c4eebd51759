"""`ref_row_stats` (torch) vs `cpu_row_stats` (fused numba loop) on the same CPU shapes, side by side.

    .venv/bin/python -m pytest benchmarks/bench_row_stats_cpu.py --benchmark-enable --benchmark-group-by=param:shape

One layer of SmolLM2's shape (9 query heads, 3 KV heads, d_head 64), causal,
pass-1 settings (top_k 0) and pass-2 settings (top_k 8).
"""

from __future__ import annotations

import pytest
import torch

from headvis.kernels.row_stats_cpu import cpu_row_stats
from headvis.metrics import AttentionSpec, distance_bin_edges, ref_row_stats

SHAPES = [(4, 9, 3, 256, 64), (1, 9, 3, 1024, 64)]  # (batch, head, kv_head, seq_len, d_head)


def _inputs(shape):
    batch, heads, kv, seq_len, d_head = shape
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, seq_len, d_head, generator=g), torch.randn(batch, kv, seq_len, d_head, generator=g),
            torch.randint(0, 1000, (batch, seq_len), generator=g), AttentionSpec(causal=True, scaling=d_head**-0.5),
            distance_bin_edges(seq_len, True))


@pytest.mark.parametrize("top_k", [0, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-KV{}-T{}-D{}".format(*s))
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_row_stats_cpu(benchmark, impl, shape, top_k):
    query, key, tokens, spec, edges = _inputs(shape)
    fn = ref_row_stats if impl == "ref" else cpu_row_stats
    fn(query, key, tokens, spec, top_k=top_k, bin_edges=edges)  # numba compiles once
    stats = benchmark.pedantic(lambda: fn(query, key, tokens, spec, top_k=top_k, bin_edges=edges), rounds=3)
    assert stats.metrics["pattern_entropy"].shape == (shape[0], shape[1], shape[3])
