"""One pipeline: Triton and numba scans of a few heads of the default model equal the torch scan.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1
(set by tests/conftest.py); with CUDA they run natively.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARGS = ["--seq-len", "32", "--num-seqs", "10", "--layers", "3", "--heads", "0-2", "--per-interval", "1"]


def scan(out: Path, backend: str) -> Path:
    device = "cuda" if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "headvis.scan", *ARGS, "--backend", backend, "--device", device,
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"with backend {backend}" in result.stdout
    return out


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def torch_tree(tmp_path_factory) -> Path:
    return scan(tmp_path_factory.mktemp("ref") / "torch", "torch")


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_backend_tree_equals_torch_tree(tmp_path, torch_tree, backend):
    ref = torch_tree
    tri = scan(tmp_path / backend, backend)
    assert load(ref / "config.json")["backend"] == "torch"
    assert load(tri / "config.json")["backend"] == backend
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.json"))
    assert files == sorted(p.relative_to(tri) for p in tri.rglob("*.json"))
    for head in range(3):
        a = load(ref / "heads" / f"L3H{head}.json")
        b = load(tri / "heads" / f"L3H{head}.json")
        assert list(a["metrics"]) == list(b["metrics"])
        for name, value in a["metrics"].items():
            assert value is not None and b["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
        assert np.allclose(a["interval_edges"], b["interval_edges"], rtol=1e-4)
        assert a["interval_counts"] == b["interval_counts"]
        assert np.allclose(a["qk_distance_histogram"]["bin_values"], b["qk_distance_histogram"]["bin_values"], atol=1e-5)
        assert [t["id"] for t in a["top_key_tokens"][:5]] == [t["id"] for t in b["top_key_tokens"][:5]]
        assert [(s["sequence_id"], s["interval"], s["argmax"]) for s in a["sequences"]] == \
               [(s["sequence_id"], s["interval"], s["argmax"]) for s in b["sequences"]]
        for sa, sb in zip(a["sequences"], b["sequences"]):
            assert sa["attention_indices"] == sb["attention_indices"], f"head {head} seq {sa['sequence_id']}"
            assert np.allclose(sa["attention_values"], sb["attention_values"], rtol=1e-4, atol=1e-6)
            assert sa["max_activation"] == pytest.approx(sb["max_activation"], rel=1e-4)
        # the projection cloud: the same edges (chosen from the same row statistics) and the same PCA
        ua, ub = load(ref / "umap" / f"L3H{head}.json"), load(tri / "umap" / f"L3H{head}.json")
        assert (ua["seq_idx"], ua["top_q"], ua["top_k"]) == (ub["seq_idx"], ub["top_q"], ub["top_k"])
        assert np.allclose(ua["norms"], ub["norms"], rtol=1e-5)
