"""`ref_row_stats` (torch) vs `tri_row_stats` (Triton) on the same shapes, side by side.

    pytest benchmarks/bench_row_stats.py --benchmark-enable

On CUDA both sides run natively (fp16, causal, GQA 9/3, top-8). Without CUDA
the triton side needs TRITON_INTERPRET=1 (set before triton is imported) and
runs one tiny shape under the interpreter, which measures the interpreter, not
the kernel; without it that side is skipped with the reason. The numbers that
matter come from `benchmarks/gpu_check.py` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from headvis.metrics import AttentionSpec, distance_bin_edges, ref_row_stats

row_stats = pytest.importorskip("headvis.kernels.row_stats", reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.float16 if ON_GPU else torch.float32
# (batch, head, kv_head, seq_len, d_head)
SHAPES = [(4, 9, 3, 512, 64), (4, 9, 3, 2048, 64)] if ON_GPU else [(1, 3, 1, 64, 32)]
TOP_K = 8


def _inputs(shape: tuple[int, int, int, int, int]):
    batch, heads, kv_heads, seq_len, d_head = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    query = torch.randn(batch, heads, seq_len, d_head, generator=gen, device=DEVICE).to(DTYPE)
    key = torch.randn(batch, kv_heads, seq_len, d_head, generator=gen, device=DEVICE).to(DTYPE)
    tokens = torch.randint(0, 1000, (batch, seq_len), generator=gen, device=DEVICE)
    spec = AttentionSpec(causal=True, scaling=d_head**-0.5)
    return query, key, tokens, spec, distance_bin_edges(seq_len, True)


def _timed(fn):
    """fn, synchronized on CUDA so the benchmark measures the work, not the launch."""
    if not ON_GPU:
        return fn
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _shape_id(shape) -> str:
    batch, heads, kv_heads, seq_len, d_head = shape
    return f"B{batch}-H{heads}-KV{kv_heads}-T{seq_len}-D{d_head}-causal-{str(DTYPE).removeprefix('torch.')}"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_ref_row_stats(benchmark, shape) -> None:
    query, key, tokens, spec, edges = _inputs(shape)
    benchmark.group = _shape_id(shape)
    benchmark(_timed(lambda: ref_row_stats(query, key, tokens, spec, top_k=TOP_K, bin_edges=edges)))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_tri_row_stats(benchmark, shape) -> None:
    ok, reason = row_stats.is_available(DEVICE, DTYPE)
    if not ok:
        pytest.skip(f"triton side: {reason}")
    query, key, tokens, spec, edges = _inputs(shape)
    benchmark.group = _shape_id(shape)
    benchmark(_timed(lambda: row_stats.tri_row_stats(query, key, tokens, spec, top_k=TOP_K, bin_edges=edges)))
