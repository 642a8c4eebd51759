"""One prepared check of the fused row-statistics kernels on a CUDA GPU (H100/H200).

    python benchmarks/gpu_check.py                 # on the GPU machine, ~3-5 minutes
    python benchmarks/gpu_check.py --out "$OUT"    # results into a given folder
    python benchmarks/gpu_check.py --dry-run --out /tmp/x   # CPU, Triton interpreter, tiny shapes

1. Correctness: `tri_row_stats` against `ref_row_stats`, natively, on shapes
   covering fp32/fp16/bf16, causal and bidirectional, GQA, sliding windows,
   padding, soft-capping, sinks, large logits and exact ties.
2. Throughput in (q, k) pairs per second (pairs = batch * heads * T(T+1)/2,
   the causal pairs every method computes) of `tri_row_stats` against
   scaled_dot_product_attention's flash forward and against the materialized
   torch path (`ref_row_stats` with q_chunk = T), for T in {512, 2048, 8192},
   d_head 64 and 128, fp16 and bf16, batch 4, 9 heads, 3 kv heads, top-8.
   CUDA events, warmup, median of several repetitions.
3. A small sweep of launch configurations at T = 2048, d_head 64, fp16 (each
   checked against the default's output), to tune the launcher's defaults.
4. When transformers is installed: a random-weight SmolLM2-135M-shaped Llama
   forward against the row statistics of all its 30 layers.

Writes gpu_check_<card>_<date>.json and .md (a markdown table, and for each
target whether it was met and by how much it missed) into --out (default
benchmarks/results). Imports only torch, triton and headvis.metrics /
headvis.kernels (plus transformers for part 4, when present); works from a
checkout that is not pip-installed. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernel_resources import CONFIGS  # noqa: E402  (a sibling script, not an installed module)

TARGET_PAIRS_PER_S = 1.0e12  # at T=2048, d_head 64, causal, fp16, top-8
TARGET_VS_MATERIALIZED = 20.0  # tri at least this many times faster than the materialized path
TARGET_VS_SDPA = 2.0  # tri at most this many times slower than SDPA flash forward
TARGET_SHAPE = dict(seq_len=2048, d_head=64, dtype="float16")

ATOL = 2e-5  # probabilities: both sides form float32 scores from the same inputs
RTOL = 1e-4  # scores, distances
SCORE_EPS = 5e-7  # float32 score rounding per unit of |s|: the tolerance grows with max |s|


@dataclass(frozen=True)
class Case:
    """One correctness shape; `id` reads like the test ids (B2-H3-KV1-T63-D16-causal-...)."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    d_head: int
    dtype: str
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    padding: bool = False
    sinks: bool = False
    top_k: int = 8
    logit_scale: float = 1.0
    ties: bool = False  # every key identical: top-k must list keys 0, 1, 2, ...

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}-H{self.heads}-KV{self.kv_heads}-T{self.seq_len}-D{self.d_head}",
                 "causal" if self.causal else "bidir", self.dtype]
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
        if self.ties:
            parts.append("ties")
        return "-".join(parts)


GPU_CASES = [
    Case(2, 3, 1, 63, 16, "float32"),
    Case(1, 1, 1, 1, 64, "float16"),
    Case(2, 9, 3, 500, 64, "bfloat16"),
    Case(2, 4, 4, 257, 128, "float16", causal=False, window=33, top_k=4),
    Case(3, 4, 2, 300, 64, "float16", padding=True, sinks=True),
    Case(1, 4, 1, 200, 80, "bfloat16", softcap=30.0, logit_scale=4.0),
    Case(1, 3, 1, 300, 64, "float32", logit_scale=300.0, top_k=1),
    Case(2, 2, 1, 1000, 64, "float16", causal=False, padding=True),
    Case(1, 2, 1, 130, 64, "float16", ties=True),
]
DRY_CASES = [
    Case(1, 3, 1, 37, 16, "float16"),
    Case(2, 2, 2, 20, 16, "float32", causal=False, padding=True, sinks=True, top_k=4, ties=False),
]
# (seq_len, d_head, dtype) for the throughput table; batch 4, 9 heads, 3 kv heads.
GPU_SHAPES = [(t, d, dtype) for dtype in ("float16", "bfloat16") for d in (64, 128) for t in (512, 2048, 8192)]
DRY_SHAPES = [(32, 16, "float16")]
GPU_BATCH = (4, 9, 3)
DRY_BATCH = (1, 3, 1)
# (block_m, block_n, num_warps, num_stages)
GPU_SWEEP = CONFIGS  # the launch configurations whose compiled cost kernel_resources.py reports
DRY_SWEEP = [(16, 16, 4, 2), (32, 16, 4, 2)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Correctness and throughput of the fused row-statistics kernels.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for gpu_check_<card>_<date>.json and .md (default: benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: tiny shapes on the CPU under the Triton interpreter (checks the script only)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model comparison")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement (median reported)")
    return parser.parse_args(argv)


def import_headvis():
    """(headvis.metrics, headvis.kernels.row_stats) from this checkout, installed or not.

    pyproject maps the folder kernels/ to `headvis.kernels`; in a bare checkout
    the same mapping is made here by hand.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import headvis.kernels  # noqa: F401
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "headvis.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["headvis.kernels"] = module
        spec.loader.exec_module(module)
    from headvis import metrics
    from headvis.kernels import row_stats

    return metrics, row_stats


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn(): CUDA events on the GPU, perf_counter on the CPU (one warmup there)."""
    for _ in range(warmup if device.type == "cuda" else 1):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_case_inputs(metrics, case: Case, device: torch.device):
    """query, key, tokens, spec, edges for one correctness case (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, kv, t, d = case.batch, case.heads, case.kv_heads, case.seq_len, case.d_head
    query = torch.randn(b, h, t, d, generator=gen) * case.logit_scale
    key = torch.randn(b, kv, t, d, generator=gen)
    if case.ties:
        key = key[:, :, :1].expand(b, kv, t, d).contiguous()
    tokens = torch.randint(0, 4, (b, t), generator=gen)
    key_valid = None
    if case.padding:
        key_valid = torch.ones(b, t, dtype=torch.bool)
        key_valid[0, : t // 3] = False
        if b > 1:
            key_valid[1, t - t // 4:] = False
        if b > 2:
            key_valid[2] = False
        key_valid = key_valid.to(device)
    sinks = (torch.randn(h, generator=gen) + 1.0).to(device) if case.sinks else None
    spec = metrics.AttentionSpec(causal=case.causal, scaling=d**-0.5, window=case.window, softcap=case.softcap,
                                 key_valid=key_valid, sinks=sinks)
    dtype = _dtype(case.dtype)
    return (query.to(device, dtype), key.to(device, dtype), tokens.to(device), spec,
            metrics.distance_bin_edges(t, case.causal))


def compare_stats(metrics, ref, tri, pattern, atol: float) -> dict[str, float]:
    """Field -> error (0 = within tolerance): float fields give their worst excess over
    atol + RTOL |ref|, or inf for a non-finite value; exact fields their count of mismatches;
    key indices their count pointing at keys of a different weight (near-ties may swap)."""
    errors = {}

    def excess(ref_t, tri_t):
        if not torch.isfinite(tri_t).all():
            return math.inf
        if ref_t.numel() == 0:
            return 0.0
        return max(0.0, ((tri_t - ref_t).abs() - atol - RTOL * ref_t.abs()).max().item())

    def key_weight(idx):
        return torch.where(idx >= 0, pattern.gather(-1, idx.clamp(min=0)), 0.0)

    for name in metrics.ROW_METRICS:
        errors[name] = excess(ref.metrics[name], tri.metrics[name])
    for name in ("max_nobos", "dist_hist", "key_weight", "top_values"):
        errors[name] = excess(getattr(ref, name), getattr(tri, name))
    for name in ("induction_counted", "duplicate_counted", "margin_counted"):
        errors[name] = float((getattr(ref, name) != getattr(tri, name)).sum().item())
    for name, ref_i, tri_i in (("argmax_nobos", ref.argmax_nobos[..., None], tri.argmax_nobos[..., None]),
                               ("top_indices", ref.top_indices, tri.top_indices)):
        wrong = (ref_i != tri_i) & ((key_weight(ref_i) - key_weight(tri_i)).abs() > atol)
        errors[name] = float(wrong.sum().item())
    return errors


def check_case(metrics, row_stats, case: Case, device: torch.device) -> dict:
    query, key, tokens, spec, edges = make_case_inputs(metrics, case, device)
    ref = metrics.ref_row_stats(query, key, tokens, spec, top_k=case.top_k, bin_edges=edges)
    tri = row_stats.tri_row_stats(query, key, tokens, spec, top_k=case.top_k, bin_edges=edges)
    atol = ATOL + SCORE_EPS * ref.metrics["logit_max"].abs().max().item()
    errors = compare_stats(metrics, ref, tri, metrics.ref_pattern(query, key, spec), atol)
    if case.ties:  # the lowest key index wins: row q lists keys 0, 1, ..., min(q, top_k - 1)
        rows = torch.arange(case.seq_len, device=device)[:, None]
        slots = torch.arange(case.top_k, device=device)[None, :]
        expected = torch.where(slots <= rows, slots, -1).expand_as(tri.top_indices)
        errors["ties"] = float((tri.top_indices != expected).sum().item())
    return {"case": case.id, "ok": all(v == 0 for v in errors.values()), "atol": atol, "errors": errors}


def pairs(batch: int, heads: int, seq_len: int) -> int:
    """Causal (q, k) pairs: every method computes exactly these."""
    return batch * heads * seq_len * (seq_len + 1) // 2


def materialized_bytes(batch: int, heads: int, seq_len: int) -> int:
    """Rough peak of ref_row_stats with q_chunk = T: ~16 float32 (batch, head, T, T) buffers at once."""
    return 16 * 4 * batch * heads * seq_len * seq_len


def _random_inputs(shape, dims, device, seed: int, vocab: int):
    """(query, key, value, tokens) for a (seq_len, d_head, dtype) shape and (batch, heads, kv_heads) dims."""
    seq_len, d_head, dtype_name = shape
    batch, heads, kv_heads = dims
    dtype = _dtype(dtype_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(batch, heads, seq_len, d_head, generator=gen, device=device).to(dtype)
    key = torch.randn(batch, kv_heads, seq_len, d_head, generator=gen, device=device).to(dtype)
    value = torch.randn(batch, kv_heads, seq_len, d_head, generator=gen, device=device).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen, device=device)
    return query, key, value, tokens


def throughput_row(metrics, row_stats, shape, dims, device, reps: int) -> dict:
    seq_len, d_head, dtype_name = shape
    batch, heads, kv_heads = dims
    query, key, value, tokens = _random_inputs(shape, dims, device, seed=0, vocab=1000)
    spec = metrics.AttentionSpec(causal=True, scaling=d_head**-0.5)
    edges = metrics.distance_bin_edges(seq_len, True)
    n_pairs = pairs(batch, heads, seq_len)
    row = {"seq_len": seq_len, "d_head": d_head, "dtype": dtype_name, "batch": batch, "heads": heads,
           "kv_heads": kv_heads, "top_k": 8, "pairs": n_pairs}

    row["tri_s"] = median_seconds(
        lambda: row_stats.tri_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges), device, reps)

    # SDPA forward on the same shapes; keys and values repeated to 9 heads outside the timing.
    group = heads // kv_heads
    key_rep, value_rep = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run_sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(query, key_rep, value_rep, is_causal=True)
        row["sdpa_backend"] = "flash"
    else:
        def run_sdpa():
            return sdpa(query, key_rep, value_rep, is_causal=True)
        row["sdpa_backend"] = "default (CPU)"
    try:
        row["sdpa_s"] = median_seconds(run_sdpa, device, reps)
    except RuntimeError as error:
        row["sdpa_s"], row["sdpa_note"] = None, f"failed: {error}"[:200]

    # The materialized torch path: all T query rows at once.
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 << 30
    need = materialized_bytes(batch, heads, seq_len)
    row["materialized_s"] = None
    if need > 0.8 * free:
        row["materialized_note"] = f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    else:
        try:
            row["materialized_s"] = median_seconds(
                lambda: metrics.ref_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges, q_chunk=seq_len),
                device, max(3, reps // 2), warmup=1)
        except torch.cuda.OutOfMemoryError:
            row["materialized_note"] = "skipped: out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name in ("tri", "sdpa", "materialized"):
        seconds = row.get(f"{name}_s")
        row[f"{name}_pairs_per_s"] = n_pairs / seconds if seconds else None
    row["speedup_vs_materialized"] = row["materialized_s"] / row["tri_s"] if row["materialized_s"] else None
    row["slowdown_vs_sdpa"] = row["tri_s"] / row["sdpa_s"] if row.get("sdpa_s") else None
    return row


def sweep(metrics, row_stats, configs, shape, dims, device, reps: int) -> list[dict]:
    """Time each launch configuration; each must reproduce the first configuration's output."""
    seq_len, d_head, dtype_name = shape
    batch, heads, kv_heads = dims
    query, key, _, tokens = _random_inputs(shape, dims, device, seed=1, vocab=8)
    spec = metrics.AttentionSpec(causal=True, scaling=d_head**-0.5)
    edges = metrics.distance_bin_edges(seq_len, True)
    rows, first = [], None
    for block_m, block_n, num_warps, num_stages in configs:
        launch = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        if device.type != "cuda":
            launch = dict(block_m=block_m, block_n=block_n)
        row = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        try:
            def run():
                return row_stats.tri_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges, **launch)
            out = run()
            if first is None:
                first, row["matches_first"] = out, True
            else:
                worst = max(((getattr(out, f) - getattr(first, f)).abs().max().item()
                             for f in ("dist_hist", "key_weight", "top_values", "max_nobos")), default=0.0)
                worst = max([worst] + [(out.metrics[n] - first.metrics[n]).abs().max().item()
                                       for n in metrics.ROW_METRICS])
                row["matches_first"] = worst <= 1e-4
            row["tri_s"] = median_seconds(run, device, reps)
            row["pairs_per_s"] = pairs(batch, heads, seq_len) / row["tri_s"]
        except Exception as error:  # a configuration that does not compile or fit is a result too
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        rows.append(row)
    return rows


def model_check(row_stats, metrics, device, reps: int) -> dict:
    """A random-weight SmolLM2-135M-shaped Llama: model forward vs row statistics of all its layers."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    try:
        config = transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
        config._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
        batch, seq_len = 4, 2048
        tokens = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
        with torch.no_grad():
            forward_s = median_seconds(lambda: model(input_ids=tokens).logits, device, reps)
        query = torch.randn(batch, 9, seq_len, 64, device=device, dtype=torch.bfloat16)
        key = torch.randn(batch, 3, seq_len, 64, device=device, dtype=torch.bfloat16)
        spec = metrics.AttentionSpec(causal=True, scaling=64**-0.5)
        edges = metrics.distance_bin_edges(seq_len, True)
        layer_s = median_seconds(
            lambda: row_stats.tri_row_stats(query, key, tokens, spec, top_k=8, bin_edges=edges), device, reps)
        return {"model": "random-weight Llama, SmolLM2-135M shapes (30 layers, 9 heads, 3 kv heads, d_head 64)",
                "transformers": transformers.__version__, "batch": batch, "seq_len": seq_len, "dtype": "bfloat16",
                "forward_s": forward_s, "row_stats_per_layer_s": layer_s, "row_stats_all_layers_s": 30 * layer_s,
                "all_layers_over_forward": 30 * layer_s / forward_s}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def evaluate_targets(throughput: list[dict]) -> list[dict]:
    """Each target at TARGET_SHAPE: met or not, and by what factor it missed (1.0 = met)."""
    row = next((r for r in throughput if all(r.get(k) == v for k, v in TARGET_SHAPE.items())), None)
    shape = "T=2048 d_head=64 causal fp16 top-8"

    def target(name, wanted, value, higher_is_better, unit):
        if value is None:
            return {"name": name, "target": wanted, "value": None, "met": None, "miss_factor": None,
                    "verdict": f"not measured at {shape}"}
        met = value >= wanted if higher_is_better else value <= wanted
        factor = (wanted / value if higher_is_better else value / wanted) if value else math.inf
        verdict = "met" if met else f"missed by {factor:.2f}x"
        return {"name": name, "target": wanted, "value": value, "met": met,
                "miss_factor": 1.0 if met else factor, "verdict": f"{verdict} ({value:.3g}{unit} vs {wanted:g}{unit})"}

    get = (lambda k: row.get(k)) if row else (lambda k: None)
    return [
        target(f"pairs/s at {shape}", TARGET_PAIRS_PER_S, get("tri_pairs_per_s"), True, " pairs/s"),
        target("speedup over the materialized torch path", TARGET_VS_MATERIALIZED, get("speedup_vs_materialized"),
               True, "x"),
        target("time relative to SDPA flash forward", TARGET_VS_SDPA, get("slowdown_vs_sdpa"), False, "x"),
    ]


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def to_markdown(results: dict) -> str:
    lines = [f"# gpu_check: {results['card']}, {results['date']}", "",
             f"torch {results['torch']}, triton {results['triton']}, capability {results['capability']}"
             f"{', DRY RUN (CPU interpreter: numbers mean nothing)' if results['dry_run'] else ''}.",
             f"Launch defaults: {results['launch_defaults']}.", ""]
    if results.get("stage", "complete") != "complete":
        lines += [f"**Incomplete: the run stopped after the {results['stage']} stage.**", ""]
    lines += ["## Targets", ""]
    lines += [f"- {t['name']}: **{t['verdict']}**" for t in results["targets"]]
    lines += ["", "## Correctness (tri_row_stats vs ref_row_stats)", "", "| case | ok | fields over tolerance |",
              "|---|---|---|"]
    for c in results["correctness"]:
        bad = ", ".join(f"{k}={v:.3g}" for k, v in c.get("errors", {}).items() if v) or c.get("error", "")
        lines.append(f"| {c['case']} | {'yes' if c['ok'] else '**NO**'} | {bad} |")
    lines += ["", "## Throughput ((q,k) pairs/s; pairs = batch*heads*T(T+1)/2)", "",
              "| T | d_head | dtype | tri ms | tri pairs/s | SDPA ms | SDPA pairs/s | materialized ms "
              "| tri vs materialized | tri / SDPA time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        ms = lambda s: _fmt(s * 1e3 if s else None)  # noqa: E731
        lines.append(
            f"| {r['seq_len']} | {r['d_head']} | {r['dtype']} | {ms(r['tri_s'])} | {_fmt(r['tri_pairs_per_s'])} "
            f"| {ms(r.get('sdpa_s'))} | {_fmt(r.get('sdpa_pairs_per_s'))} "
            f"| {ms(r['materialized_s']) if r['materialized_s'] else r.get('materialized_note', '-')} "
            f"| {_fmt(r['speedup_vs_materialized'])}x | {_fmt(r['slowdown_vs_sdpa'])}x |")
    if results.get("sweep"):
        shape = results["sweep_shape"]
        lines += ["", f"## Launch configurations (T={shape['seq_len']}, d_head {shape['d_head']}, {shape['dtype']}, "
                  f"batch {shape['batch']}, heads {shape['heads']}/{shape['kv_heads']})", "",
                  "| block_m | block_n | num_warps | num_stages | ms | pairs/s | same output |", "|---|---|---|---|---|---|---|"]
        for r in results["sweep"]:
            if "error" in r:
                lines.append(f"| {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} "
                             f"| {r['error']} | | |")
            else:
                lines.append(f"| {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} "
                             f"| {_fmt(r['tri_s'] * 1e3)} | {_fmt(r['pairs_per_s'])} | {r['matches_first']} |")
    model = results.get("model", {})
    lines += ["", "## Whole model", ""]
    if "forward_s" in model:
        lines.append(f"{model['model']}, batch {model['batch']} x T {model['seq_len']} {model['dtype']}: forward "
                     f"{model['forward_s'] * 1e3:.3g} ms, row statistics of all 30 layers "
                     f"{model['row_stats_all_layers_s'] * 1e3:.3g} ms ({model['all_layers_over_forward']:.3g}x the forward).")
    else:
        lines.append(f"Not run: {model.get('skipped') or model.get('error', 'disabled')}.")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """The results with every NaN or infinity replaced by its name (JSON has neither)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    """gpu_check_<card>_<date>.json and .md in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "_", results["card"]).strip("_") or "unknown"
    stem = out / f"gpu_check_{card}_{results['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path, text in ((json_path, json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n"),
                       (md_path, to_markdown(results))):
        temp = path.with_name(f".{path.name}.tmp")  # a lease can end mid-write: never a half file
        temp.write_text(text)
        temp.replace(path)
    return json_path, md_path


def launch_defaults(row_stats) -> dict:
    params = inspect.signature(row_stats.tri_row_stats).parameters
    return {name: params[name].default for name in ("block_m", "block_n", "num_warps", "num_stages")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    import triton

    metrics, row_stats = import_headvis()
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true float32
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    results = {
        "card": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device),
        "capability": "-" if args.dry_run else ".".join(map(str, torch.cuda.get_device_capability(device))),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S"),
        "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
        "launch_defaults": launch_defaults(row_stats), "targets_definition": {
            "pairs_per_s": TARGET_PAIRS_PER_S, "vs_materialized": TARGET_VS_MATERIALIZED, "vs_sdpa": TARGET_VS_SDPA,
            "shape": TARGET_SHAPE},
    }

    def save(stage: str) -> tuple[Path, Path]:
        """Write what is measured so far, so that a run cut short by its time limit still leaves results."""
        results["stage"] = stage
        results["targets"] = evaluate_targets(results["throughput"])
        results["wall_s"] = time.time() - started
        return write_results(results, args.out)

    results["correctness"] = []
    results["throughput"] = []
    for case in DRY_CASES if args.dry_run else GPU_CASES:
        try:
            result = check_case(metrics, row_stats, case, device)
        except Exception as error:
            result = {"case": case.id, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
        results["correctness"].append(result)
        log(f"correctness {case.id}: {'ok' if result['ok'] else 'FAILED ' + str(result.get('error') or result['errors'])}")

    save("correctness")

    dims = DRY_BATCH if args.dry_run else GPU_BATCH
    reps = 1 if args.dry_run else args.reps
    for shape in DRY_SHAPES if args.dry_run else GPU_SHAPES:
        row = throughput_row(metrics, row_stats, shape, dims, device, reps)
        results["throughput"].append(row)
        log(f"throughput T={shape[0]} d={shape[1]} {shape[2]}: tri {_fmt(row['tri_pairs_per_s'])} pairs/s, "
            f"x{_fmt(row['speedup_vs_materialized'])} vs materialized, {_fmt(row['slowdown_vs_sdpa'])}x SDPA time")
        save("throughput")

    if not args.no_sweep:
        shape = DRY_SHAPES[0] if args.dry_run else (2048, 64, "float16")
        results["sweep_shape"] = dict(zip(("seq_len", "d_head", "dtype", "batch", "heads", "kv_heads"), shape + dims))
        results["sweep"] = sweep(metrics, row_stats, DRY_SWEEP if args.dry_run else GPU_SWEEP, shape, dims, device,
                                 reps)
        log("sweep: " + "; ".join(f"{r['block_m']}x{r['block_n']}/w{r['num_warps']}/s{r['num_stages']}: "
                                  f"{_fmt(r.get('pairs_per_s'))}" for r in results["sweep"]))
        save("sweep")

    if args.no_model or args.dry_run:
        results["model"] = {"skipped": "dry run" if args.dry_run else "--no-model"}
    else:
        results["model"] = model_check(row_stats, metrics, device, args.reps)
        log(f"model: {results['model']}")

    json_path, md_path = save("complete")
    for t in results["targets"]:
        log(f"target {t['name']}: {t['verdict']}")
    log(f"wrote {json_path} and {md_path}")
    return 0 if all(c["ok"] for c in results["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
