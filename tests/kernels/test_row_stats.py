"""`tri_row_stats` (Triton) against `ref_row_stats` (torch): every RowStats field, by name.

On CUDA the kernels run natively (bfloat16 included); elsewhere under Triton's
CPU interpreter (see conftest.py), with small heads and blocks to stay fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from headvis.kernels.row_stats import is_available, tri_row_stats
from headvis.kernels.row_stats_ref import drop_light_entries
from headvis.metrics import ROW_METRICS, AttentionSpec, RowStats, distance_bin_edges, ref_pattern, ref_row_stats
from known_row_stats import KNOWN_CASES, KnownCase, assert_known_answers

ROOT = Path(__file__).resolve().parents[2]

# Triton 3.6's interpreter turns loop bounds into ints through a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# Both sides compute float32 scores from the same (rounded) inputs, so the
# tolerance only covers summation order; outputs are probabilities or scores.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
RTOL = 1e-4  # logit_mean / std / max and distance are not bounded by 1
# A float32 score s carries ~|s| * 2^-24 * a few rounding from its summation
# order, so probabilities agree only to ~SCORE_EPS * max|s| (5e-4 at s ~ 1e3).
SCORE_EPS = 5e-7


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    d_head: int
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    padding: bool = False  # batch 0 left-padded, batch 1 right-padded, batch 2 (if any) all padding
    sinks: bool = False
    top_k: int = 8
    logit_scale: float = 1.0  # multiplies queries: 300 gives scores ~ 1e3
    block: int = 16  # block_m = block_n
    edges: tuple[int, ...] | None = None  # default: distance_bin_edges(seq_len, causal)
    transposed: bool = False  # query and key as (batch, pos, head, d_head) memory, viewed as (batch, head, pos, d_head)

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}-H{self.heads}-KV{self.kv_heads}-T{self.seq_len}-D{self.d_head}",
                 "causal" if self.causal else "bidir"]
        if self.window is not None:
            parts.append(f"window{self.window}")
        if self.softcap is not None:
            parts.append(f"softcap{self.softcap:g}")
        if self.padding:
            parts.append("padding")
        if self.sinks:
            parts.append("sinks")
        parts.append(f"top{self.top_k}")
        if self.logit_scale != 1.0:
            parts.append(f"logits-x{self.logit_scale:g}")
        parts.append(f"block{self.block}")
        if self.edges is not None:
            parts.append("edges" + "_".join(map(str, self.edges)))
        if self.transposed:
            parts.append("strided")
        return "-".join(parts)


CASES = [
    Case(1, 1, 1, 1, 16),
    Case(1, 2, 2, 2, 16, causal=False, top_k=4),
    Case(2, 3, 1, 63, 16, top_k=8, block=32),
    Case(1, 3, 3, 63, 24, causal=False, top_k=4, block=32),
    Case(1, 3, 1, 130, 16, top_k=1, block=32),
    Case(1, 2, 2, 130, 32, causal=False, block=64, transposed=True),
    Case(1, 2, 1, 63, 16, window=8),
    Case(1, 2, 2, 63, 16, causal=False, window=5, top_k=4),
    Case(3, 2, 1, 63, 16, padding=True, block=32),
    Case(3, 2, 2, 63, 16, causal=False, padding=True, top_k=4, block=32),
    Case(1, 2, 1, 63, 16, softcap=3.0, logit_scale=4.0, block=32),
    Case(2, 2, 1, 63, 16, sinks=True, padding=True, block=32),
    Case(1, 3, 1, 63, 16, logit_scale=300.0, block=32),
    Case(1, 2, 2, 63, 16, causal=False, logit_scale=300.0, top_k=4, block=32),
    Case(1, 2, 1, 63, 16, edges=(2, 5, 9), block=32),
    Case(1, 2, 1, 63, 16, causal=False, edges=(-40, -3, 0, 7, 100), block=32),
]
# The dtype sweep repeats a few cases: the interpreter is slow.
DTYPE_CASES = [CASES[2], CASES[9], CASES[12]]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """query (batch, head, query_pos, d_head), key (batch, kv_head, key_pos, d_head), tokens, spec, edges."""
    gen = torch.Generator().manual_seed(seed)
    b, h, kv, t, d = case.batch, case.heads, case.kv_heads, case.seq_len, case.d_head
    query = torch.randn(b, t, h, d, generator=gen) * case.logit_scale
    key = torch.randn(b, t, kv, d, generator=gen)
    query = query.to(DEVICE, dtype)
    key = key.to(DEVICE, dtype)
    if case.transposed:
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # strided views
    else:
        query, key = query.transpose(1, 2).contiguous(), key.transpose(1, 2).contiguous()
    tokens = torch.randint(0, 4, (b, t), generator=gen).to(DEVICE)  # small vocabulary: many repeats
    key_valid = None
    if case.padding:
        key_valid = torch.ones(b, t, dtype=torch.bool)
        key_valid[0, : t // 3] = False  # left padding: early causal rows read nothing
        if b > 1:
            key_valid[1, t - t // 4 :] = False
        if b > 2:
            key_valid[2] = False  # every row empty
        key_valid = key_valid.to(DEVICE)
    sinks = (torch.randn(h, generator=gen) + 1.0).to(DEVICE) if case.sinks else None
    spec = AttentionSpec(causal=case.causal, scaling=d**-0.5, window=case.window, softcap=case.softcap,
                         key_valid=key_valid, sinks=sinks)
    edges = list(case.edges) if case.edges is not None else distance_bin_edges(t, case.causal)
    return query, key, tokens, spec, edges


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, atol: float, rtol: float = RTOL) -> None:
    assert tri.shape == ref.shape, f"{name}: shape {tuple(tri.shape)} != {tuple(ref.shape)}"
    assert tri.dtype == ref.dtype, f"{name}: dtype {tri.dtype} != {ref.dtype}"
    torch.testing.assert_close(tri.cpu(), ref.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_equal(name: str, ref: torch.Tensor, tri: torch.Tensor) -> None:
    assert tri.shape == ref.shape and tri.dtype == ref.dtype, f"{name}: {tri.shape}/{tri.dtype} != {ref.shape}/{ref.dtype}"
    bad = (tri != ref).nonzero()
    assert bad.numel() == 0, f"{name}: {len(bad)} entries differ, first at {bad[0].tolist()}"


def assert_same_keys(name: str, ref: torch.Tensor, tri: torch.Tensor, pattern: torch.Tensor, atol: float) -> None:
    """Key indices (batch, head, query_pos, n) agree, or point at keys of equal weight (near-ties
    may order differently when the two sides round scores differently)."""
    assert tri.shape == ref.shape and tri.dtype == ref.dtype, f"{name}: {tri.shape}/{tri.dtype} != {ref.shape}/{ref.dtype}"
    weight_of = lambda idx: torch.where(idx >= 0, pattern.gather(-1, idx.clamp(min=0)), 0.0)  # noqa: E731
    differ = tri != ref
    gap = (weight_of(tri) - weight_of(ref)).abs()
    bad = (differ & (gap > atol)).nonzero()
    assert bad.numel() == 0, f"{name}: {len(bad)} indices point at different weights, first at {bad[0].tolist()}"


def compare(ref: RowStats, tri: RowStats, pattern: torch.Tensor, atol: float) -> None:
    for name in ROW_METRICS:
        assert_close(name, ref.metrics[name], tri.metrics[name], atol)
    assert sorted(tri.metrics) == sorted(ROW_METRICS)
    assert_equal("induction_counted", ref.induction_counted, tri.induction_counted)
    assert_equal("duplicate_counted", ref.duplicate_counted, tri.duplicate_counted)
    assert_equal("margin_counted", ref.margin_counted, tri.margin_counted)
    assert_close("max_nobos", ref.max_nobos, tri.max_nobos, atol)
    assert_same_keys("argmax_nobos", ref.argmax_nobos[..., None], tri.argmax_nobos[..., None], pattern, atol)
    assert_close("dist_hist", ref.dist_hist, tri.dist_hist, atol)
    assert_close("key_weight", ref.key_weight, tri.key_weight, atol)
    assert_close("top_values", ref.top_values, tri.top_values, atol)
    assert_same_keys("top_indices", ref.top_indices, tri.top_indices, pattern, atol)


def run_both(case: Case, dtype: torch.dtype):
    query, key, tokens, spec, edges = make_inputs(case, dtype)
    ref = ref_row_stats(query, key, tokens, spec, top_k=case.top_k, bin_edges=edges)
    tri = tri_row_stats(query, key, tokens, spec, top_k=case.top_k, bin_edges=edges,
                        block_m=case.block, block_n=case.block)
    return ref, tri, ref_pattern(query, key, spec)


def tolerance(ref: RowStats, dtype: torch.dtype) -> float:
    """ATOL of the dtype, widened for large scores (see SCORE_EPS)."""
    return ATOL[dtype] + SCORE_EPS * ref.metrics["logit_max"].abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_row_stats_float32(case: Case) -> None:
    ref, tri, pattern = run_both(case, torch.float32)
    compare(ref, tri, pattern, tolerance(ref, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c.id)
def test_row_stats_half(case: Case, dtype: torch.dtype) -> None:
    ref, tri, pattern = run_both(case, dtype)
    compare(ref, tri, pattern, tolerance(ref, dtype))


def test_large_logits_entropy_and_std_are_stable() -> None:
    """Scores 1000 + O(1) that float32 holds exactly whatever the summation order: entropy and
    logit_std match float64. (lse - sum p s, or E[s^2] - E[s]^2, in float32 would miss by ~1e-4
    and ~1e-1.)"""
    b, h, t, d = 1, 2, 63, 16
    gen = torch.Generator().manual_seed(1)
    query = torch.zeros(b, h, t, d)
    key = torch.zeros(b, 1, t, d)
    query[..., 0], key[..., 0] = 1000.0, 1.0  # the common offset
    query[..., 1:4] = torch.randint(-4, 5, (b, h, t, 3), generator=gen).float()
    key[..., 1:4] = torch.randint(-8, 9, (b, 1, t, 3), generator=gen).float() / 4  # scores: multiples of 1/4
    tokens = torch.zeros(b, t, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scaling=1.0)
    edges = distance_bin_edges(t, True)

    scores = query.double() @ key.double().transpose(-1, -2)  # (batch, head, query_pos, key_pos), exact
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    log_pattern = scores.masked_fill(~allowed, -torch.inf).log_softmax(-1)
    entropy = -(log_pattern.exp() * log_pattern.masked_fill(~allowed, 0.0)).sum(-1)
    n = allowed.sum(-1)
    mean = scores.masked_fill(~allowed, 0.0).sum(-1) / n
    std = (((scores - mean[..., None]) ** 2).masked_fill(~allowed, 0.0).sum(-1) / n).sqrt()

    args = (query.to(DEVICE), key.to(DEVICE), tokens.to(DEVICE), spec)
    tri = tri_row_stats(*args, top_k=2, bin_edges=edges, block_m=32, block_n=32)
    ref = ref_row_stats(*args, top_k=2, bin_edges=edges)
    assert_close("pattern_entropy", entropy.float(), tri.metrics["pattern_entropy"], atol=2e-6, rtol=1e-5)
    assert_close("logit_mean", mean.float(), tri.metrics["logit_mean"], atol=0.0, rtol=1e-6)
    assert_close("logit_std", std.float(), tri.metrics["logit_std"], atol=1e-4, rtol=1e-4)
    # The reference forms log p = s - lse with lse rounded to float32 (~3e-5 at 1e3): looser.
    compare(ref, tri, ref_pattern(*args[:2], spec), tolerance(ref, torch.float32))


def test_ties_pick_the_lowest_key_index() -> None:
    """Identical keys tie exactly: top-k lists keys in index order and argmax_nobos is key 1."""
    b, h, t, d = 1, 2, 40, 16
    query = torch.randn(b, h, t, d, device=DEVICE)
    key = torch.randn(1, 1, 1, d, device=DEVICE).expand(b, 1, t, d).contiguous()  # every key the same
    tokens = torch.zeros(b, t, dtype=torch.int64, device=DEVICE)
    spec = AttentionSpec(causal=True, scaling=d**-0.5)
    edges = distance_bin_edges(t, True)
    tri = tri_row_stats(query, key, tokens, spec, top_k=4, bin_edges=edges, block_m=16, block_n=16)
    ref = ref_row_stats(query, key, tokens, spec, top_k=4, bin_edges=edges)
    rows = torch.arange(t, device=DEVICE)
    expected = torch.arange(4, device=DEVICE).expand(b, h, t, 4)
    expected = torch.where(expected <= rows[:, None], expected, -1)  # row q has q + 1 keys
    assert_equal("top_indices", expected, tri.top_indices)
    assert_equal("top_indices (ref)", expected, ref.top_indices)
    expected_argmax = torch.where(rows >= 1, 1, -1).expand(b, h, t)
    assert_equal("argmax_nobos", expected_argmax, tri.argmax_nobos)
    assert_close("top_values", ref.top_values, tri.top_values, ATOL[torch.float32])
    assert_close("pattern_entropy", torch.log(rows + 1.0).expand(b, h, t), tri.metrics["pattern_entropy"],
                 ATOL[torch.float32])


def test_ties_in_groups() -> None:
    """Keys repeat with period 5 (bidirectional): among equal scores the lowest index comes first."""
    b, h, t, d = 1, 1, 37, 16
    query = torch.randn(b, h, t, d, device=DEVICE)
    base = torch.randn(1, 1, 5, d, device=DEVICE)
    key = base[:, :, torch.arange(t) % 5].contiguous()
    tokens = torch.arange(t, device=DEVICE)[None]
    spec = AttentionSpec(causal=False, scaling=d**-0.5)
    edges = distance_bin_edges(t, False)
    tri = tri_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges, block_m=16, block_n=16)
    ref = ref_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges)
    assert_equal("top_indices", ref.top_indices, tri.top_indices)
    assert_equal("argmax_nobos", ref.argmax_nobos, tri.argmax_nobos)
    best_group = (query[0, 0] @ base[0, 0].T).argmax(-1)  # (query_pos,) the winning residue
    assert_equal("top_indices[..., 0]", best_group, tri.top_indices[0, 0, :, 0])


def test_light_entries_left_out_alike() -> None:
    """min_weight: every backend leaves out the same top-K entries (those after a row's first below it)."""
    case = Case(1, 2, 1, 40, 16)
    query, key, tokens, spec, edges = make_inputs(case, torch.float32)
    tri = tri_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges, min_weight=0.05, block_m=16, block_n=16)
    ref = ref_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges, min_weight=0.05)
    assert_equal("top_indices", ref.top_indices, tri.top_indices)
    assert_close("top_values", ref.top_values, tri.top_values, ATOL[torch.float32])
    full = ref_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges)
    assert (ref.top_indices[..., 1:] == -1).sum() > (full.top_indices[..., 1:] == -1).sum(), "something left out"


BOUND_CASES = [CASES[1], CASES[2], CASES[4], CASES[6], CASES[8], CASES[10], CASES[11], CASES[12]]


@pytest.mark.parametrize("case", BOUND_CASES, ids=lambda c: c.id)
def test_the_entry_bound_changes_no_output(case: Case) -> None:
    """`_row_bound_kernel`'s bound lets only some keys into the top-K set; every output is bit for bit the one of
    the unbounded set: the case's top-K with min_weight 0.05 against top-K of any weight with the light entries
    left out after, and top-0 (the set of 2: max_nobos, top_logit_margin) against top-2 unbounded. Random scores put the
    two largest of a row in one block as often as not, which the bound (the second largest block maximum) must
    survive."""
    query, key, tokens, spec, edges = make_inputs(case, torch.float32)
    run = lambda top_k, w: tri_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges,  # noqa: E731
                                         min_weight=w, block_m=case.block, block_n=case.block)
    bounded, unbounded = run(case.top_k, 0.05), run(case.top_k, 0.0)
    drop_light_entries(unbounded.top_values, unbounded.top_indices, 0.05)
    pairs = [(bounded, unbounded, True), (run(0, 0.0), run(2, 0.0), False)]
    for got, want, with_top in pairs:
        for name in ROW_METRICS:
            assert_equal(name, want.metrics[name], got.metrics[name])
        for name in ("max_nobos", "argmax_nobos", "margin_counted", "dist_hist", "key_weight") + (
                ("top_values", "top_indices") if with_top else ()):
            assert_equal(name, getattr(want, name), getattr(got, name))


@pytest.mark.parametrize("top_k", [1, 8])
def test_the_entry_bound_lets_in_the_second_largest_block_maximum(top_k: int) -> None:
    """Key 0 tops every row (a BOS sink, as in real models): the row's second largest score is then its second
    largest block maximum b2 itself, which must enter although the bound is b2 less a little (entry is
    strict). Query blocks of 16 against key blocks of 32; bit for bit the unbounded outputs."""
    gen = torch.Generator().manual_seed(5)
    t, d = 80, 16
    query = torch.randn(1, 2, t, d, generator=gen)
    key = torch.randn(1, 1, t, d, generator=gen)
    key[..., 0] = 0.0
    key[0, 0, 0, 0] = 1.0
    query[..., 0] = 40.0
    query, key = query.to(DEVICE), key.to(DEVICE)
    tokens = torch.randint(0, 4, (1, t), generator=gen).to(DEVICE)
    spec = AttentionSpec(causal=True, scaling=d**-0.5)
    edges = distance_bin_edges(t, True)
    run = lambda w: tri_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges,  # noqa: E731
                                  min_weight=w, block_m=16, block_n=32)
    bounded, unbounded = run(0.001), run(0.0)
    drop_light_entries(unbounded.top_values, unbounded.top_indices, 0.001)
    assert (unbounded.argmax_nobos[..., 40:] >= 1).all() and (unbounded.top_indices[..., 40:, 0] == 0).all()
    for name in ("max_nobos", "argmax_nobos", "top_values", "top_indices"):
        assert_equal(name, getattr(unbounded, name), getattr(bounded, name))
    assert_equal("top_logit_margin", unbounded.metrics["top_logit_margin"], bounded.metrics["top_logit_margin"])


def test_rows_without_keys_are_zero() -> None:
    """All keys padded: every output 0, indices -1, no NaN (with and without sinks)."""
    case = Case(1, 2, 1, 20, 16, padding=True)
    query, key, tokens, _, edges = make_inputs(case, torch.float32)
    for sinks in (None, torch.zeros(2, device=DEVICE)):
        spec = AttentionSpec(causal=True, scaling=0.25, key_valid=torch.zeros(1, 20, dtype=torch.bool, device=DEVICE),
                             sinks=sinks)
        tri = tri_row_stats(query, key, tokens, spec, top_k=3, bin_edges=edges, block_m=16, block_n=16)
        for name in ROW_METRICS:
            assert_equal(name, torch.zeros_like(tri.metrics[name]), tri.metrics[name])
        for name in ("max_nobos", "dist_hist", "key_weight", "top_values"):
            assert_equal(name, torch.zeros_like(getattr(tri, name)), getattr(tri, name))
        assert_equal("argmax_nobos", torch.full_like(tri.argmax_nobos, -1), tri.argmax_nobos)
        assert_equal("top_indices", torch.full_like(tri.top_indices, -1), tri.top_indices)
        assert not tri.induction_counted.any() and not tri.duplicate_counted.any() and not tri.margin_counted.any()


@pytest.mark.parametrize("top_k", [0, 3], ids=lambda k: f"top{k}")
@pytest.mark.parametrize("case", KNOWN_CASES, ids=lambda c: c.id)
def test_known_answers(case: KnownCase, top_k: int) -> None:
    """Hand-made rows (known_row_stats.py): margins, margin_counted and uniform distances as the contract
    says, with 16-key blocks (the largest and second-largest score often in different blocks); then every
    field against the reference."""
    query, key, tokens, spec = case.inputs(DEVICE)
    edges = distance_bin_edges(case.seq_len, case.causal)
    tri = tri_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges, block_m=16, block_n=16)
    assert_known_answers(case, tri)
    ref = ref_row_stats(query, key, tokens, spec, top_k=top_k, bin_edges=edges)
    compare(ref, tri, ref_pattern(query, key, spec), ATOL[torch.float32])


def test_top_k_zero() -> None:
    case = Case(1, 1, 1, 20, 16, top_k=0)
    ref, tri, pattern = run_both(case, torch.float32)
    assert tri.top_values.shape == (1, 1, 20, 0) and tri.top_indices.shape == (1, 1, 20, 0)
    compare(ref, tri, pattern, ATOL[torch.float32])


def test_is_available() -> None:
    assert is_available(DEVICE, torch.float32)[0]
    assert not is_available(DEVICE, torch.int32)[0]
    if DEVICE.type == "cpu":
        ok, reason = is_available("cpu", torch.bfloat16)
        assert not ok and "bfloat16" in reason
        assert not is_available("cuda")[0]


def test_rejects_bad_inputs() -> None:
    query, key, tokens, spec, edges = make_inputs(Case(1, 3, 1, 10, 16), torch.float32)
    with pytest.raises(ValueError, match="kv heads"):
        tri_row_stats(query, key.expand(1, 2, 10, 16), tokens, spec, top_k=2, bin_edges=edges)
    with pytest.raises(ValueError, match="tokens"):
        tri_row_stats(query, key, tokens[:, :5], spec, top_k=2, bin_edges=edges)
    with pytest.raises(ValueError, match="bin_edges"):
        tri_row_stats(query, key, tokens, spec, top_k=2, bin_edges=[0, 0, 1])
    with pytest.raises(ValueError, match="block_m"):
        tri_row_stats(query, key, tokens, spec, top_k=2, bin_edges=edges, block_m=24)


# Compiles both kernels for sm_90 through triton's own pipeline (PTX, then the
# bundled ptxas), with benchmarks/kernel_resources.py: no GPU needed, and it
# catches what the interpreter accepts but the compiler does not (loop-carried
# types, dot shapes, constexpr use). At the launcher's defaults and the target
# shape the forward kernel must not spill registers (a spill in the key loop
# costs local-memory traffic on every key block).
_COMPILE_SCRIPT = """
import sys
sys.path.insert(0, "benchmarks")
import kernel_resources as kr
from headvis.kernels import row_stats

for dtype, flags, fwd in [
    ("fp16", dict(CAUSAL=False, HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_KEY_VALID=True, HEAD_DIM=80, HEAD_DIM_PAD=128),
     dict(HAS_SINKS=True, TOP_K=5, KEEP=5, KEEP_PAD=8, TOKEN_COUNTED=False)),
    ("bf16", dict(CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_KEY_VALID=False, HEAD_DIM=64, HEAD_DIM_PAD=64),
     dict(HAS_SINKS=False, TOP_K=1, KEEP=2, KEEP_PAD=2, TOKEN_COUNTED=True)),
]:
    common = dict(flags, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32")
    kr.compile_for_hopper(row_stats._row_stats_fwd_kernel, dtype, dict(common, **fwd, BINS_PAD=32), 8, 2)
    kr.compile_for_hopper(row_stats._key_weight_kernel, dtype, common, 8, 2)
    print("compiled", dtype, flush=True)
row = kr.measure(row_stats, *kr.launch_defaults(row_stats))
print("defaults", row["registers"], row["spill_stores"], row["spill_loads"], row["instructions_per_pair"])
"""


def test_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("compiled") == 2
    registers, spill_stores, spill_loads, per_pair = done.stdout.split("defaults")[1].split()
    assert (int(spill_stores), int(spill_loads)) == (0, 0), f"the default launch spills: {done.stdout}"
    assert 0 < float(per_pair) < 1000 and 0 < int(registers) <= 255


@pytest.mark.parametrize("vocab", [1, 3, 50])
def test_token_counted_matches_brute_force(vocab: int) -> None:
    """The launcher's O(T log T) counted rows (no window, no padding) against the definition, pair by pair."""
    from headvis.kernels.row_stats import _token_counted

    gen = torch.Generator().manual_seed(vocab)
    tokens = torch.randint(0, vocab, (3, 40), generator=gen, dtype=torch.int32)
    induction, duplicate = _token_counted(tokens)
    for b in range(tokens.shape[0]):
        for q in range(tokens.shape[1]):
            tok = tokens[b].tolist()
            want_ind = any(tok[k - 1] == tok[q] for k in range(1, q))
            want_dup = any(tok[k] == tok[q] for k in range(q))
            assert (bool(induction[b, q]), bool(duplicate[b, q])) == (want_ind, want_dup), (b, q)
    assert induction.dtype == duplicate.dtype == torch.int8


SPARSE_CASES = [CASES[1], CASES[2], CASES[4], CASES[10], CASES[12], Case(1, 2, 1, 63, 16, sinks=True, block=32)]


@pytest.mark.parametrize("share", [0.0, 1.0], ids=["dense", "from-the-token-list"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c.id)
def test_induction_and_duplicate_sums_in_the_key_loop_or_from_the_token_list(case: Case, share: float,
                                                                            monkeypatch) -> None:
    """Either path (chosen by how many pairs match: SPARSE_MAX_SHARE) gives the reference's row statistics."""
    from headvis.kernels import row_stats

    monkeypatch.setattr(row_stats, "SPARSE_MAX_SHARE", share)
    ref, tri, pattern = run_both(case, torch.float32)
    compare(ref, tri, pattern, tolerance(ref, torch.float32))


@pytest.mark.parametrize("vocab", [1, 3, 50])
def test_match_pairs_are_every_earlier_equal_token(vocab: int) -> None:
    from headvis.kernels.row_stats import _match_pairs

    gen = torch.Generator().manual_seed(vocab)
    tokens = torch.randint(0, vocab, (2, 30), generator=gen, dtype=torch.int32)
    b, q, k = _match_pairs(tokens)
    got = sorted(zip(b.tolist(), q.tolist(), k.tolist()))
    want = sorted((i, qq, kk) for i in range(2) for qq in range(30) for kk in range(qq)
                  if tokens[i, kk] == tokens[i, qq])
    assert got == want
