"""benchmarks/gpu_check.py without a GPU: arguments, target verdicts and result files on fake
numbers, and `--dry-run` end to end (a subprocess: the interpreter is chosen before triton loads)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def fake_results(gpu_check, tri_pairs_per_s: float, speedup: float, slowdown: float) -> dict:
    row = {"seq_len": 2048, "d_head": 64, "dtype": "float16", "batch": 4, "heads": 9, "kv_heads": 3, "top_k": 8,
           "pairs": gpu_check.pairs(4, 9, 2048), "tri_s": 1e-3, "tri_pairs_per_s": tri_pairs_per_s,
           "sdpa_s": 1e-3 / slowdown, "sdpa_pairs_per_s": 1.0, "materialized_s": 1e-3 * speedup,
           "materialized_pairs_per_s": 1.0, "speedup_vs_materialized": speedup, "slowdown_vs_sdpa": slowdown}
    skipped = dict(row, seq_len=8192, materialized_s=None, materialized_note="skipped: needs ~154 GiB",
                   speedup_vs_materialized=None)
    return {
        "card": "NVIDIA H200", "capability": "9.0", "date": "2026-01-02", "torch": "2.11", "triton": "3.6.0",
        "dry_run": False, "launch_defaults": gpu_check.launch_defaults(type("rs", (), {"tri_row_stats": _launcher})),
        "correctness": [{"case": "B1-H1-KV1-T1-D64-causal-float16-top8", "ok": True, "atol": 2e-5, "errors": {}},
                        {"case": "B2-H9-KV3-T500-D64-causal-bfloat16-top8", "ok": False, "atol": 2e-5,
                         "errors": {"pattern_entropy": float("inf"), "top_indices": 3.0}}],
        "throughput": [row, skipped],
        "sweep_shape": {"seq_len": 2048, "d_head": 64, "dtype": "float16", "batch": 4, "heads": 9, "kv_heads": 3},
        "sweep": [{"block_m": 64, "block_n": 64, "num_warps": 8, "num_stages": 2, "tri_s": 1e-3, "pairs_per_s": 7e11,
                   "matches_first": True},
                  {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2, "error": "OutOfResources: smem"}],
        "model": {"skipped": "transformers is not installed"},
        "targets": gpu_check.evaluate_targets([row, skipped]),
    }


def _launcher(query, key, tokens, spec, *, top_k, bin_edges, block_m=64, block_n=32, num_warps=4, num_stages=3):
    """Stands in for tri_row_stats: only its keyword defaults are read."""


def test_parse_args(gpu_check, tmp_path: Path) -> None:
    args = gpu_check.parse_args([])
    assert args.out == ROOT / "benchmarks" / "results" and not args.dry_run and args.reps == 7
    args = gpu_check.parse_args(["--out", str(tmp_path), "--dry-run", "--no-sweep", "--no-model", "--reps", "3"])
    assert args.out == tmp_path and args.dry_run and args.no_sweep and args.no_model and args.reps == 3


def test_targets_say_met_or_by_how_much_they_missed(gpu_check) -> None:
    targets = fake_results(gpu_check, tri_pairs_per_s=5e11, speedup=40.0, slowdown=3.0)["targets"]
    by_name = {t["name"].split(" ")[0]: t for t in targets}
    assert by_name["pairs/s"]["met"] is False and by_name["pairs/s"]["miss_factor"] == pytest.approx(2.0)
    assert "missed by 2.00x" in by_name["pairs/s"]["verdict"]
    assert by_name["speedup"]["met"] is True and by_name["speedup"]["miss_factor"] == 1.0
    assert by_name["time"]["met"] is False and by_name["time"]["miss_factor"] == pytest.approx(1.5)
    unmeasured = gpu_check.evaluate_targets([])
    assert all(t["met"] is None and "not measured" in t["verdict"] for t in unmeasured)


def test_write_results(gpu_check, tmp_path: Path) -> None:
    results = fake_results(gpu_check, tri_pairs_per_s=1.2e12, speedup=10.0, slowdown=1.5)
    json_path, md_path = gpu_check.write_results(results, tmp_path / "out")
    assert json_path.name == "gpu_check_NVIDIA_H200_2026-01-02.json"
    assert md_path.name == "gpu_check_NVIDIA_H200_2026-01-02.md"
    saved = json.loads(json_path.read_text())  # strict JSON: the infinity became a string
    assert saved["correctness"][1]["errors"]["pattern_entropy"] == "inf"
    assert saved["launch_defaults"] == {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}
    markdown = md_path.read_text()
    assert "| 2048 | 64 | float16 | 1 | 1.2e+12 |" in markdown
    assert "skipped: needs ~154 GiB" in markdown
    assert "**met (1.2e+12 pairs/s vs 1e+12 pairs/s)**" in markdown
    assert "**missed by 2.00x (10x vs 20x)**" in markdown
    assert "| B2-H9-KV3-T500-D64-causal-bfloat16-top8 | **NO** | pattern_entropy=inf, top_indices=3 |" in markdown
    assert "OutOfResources: smem" in markdown
    assert "Not run: transformers is not installed." in markdown


def test_dry_run_end_to_end(tmp_path: Path) -> None:
    """Tiny shapes on the CPU under the interpreter: correctness, throughput and sweep code paths run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (json_path,) = tmp_path.glob("gpu_check_CPU_dry_run_*.json")
    results = json.loads(json_path.read_text())
    assert results["dry_run"] and all(c["ok"] for c in results["correctness"])
    assert results["throughput"][0]["tri_s"] > 0 and results["throughput"][0]["materialized_s"] > 0
    assert all(r["matches_first"] for r in results["sweep"])
    assert json_path.with_suffix(".md").exists()
