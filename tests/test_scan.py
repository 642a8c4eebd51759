"""End to end: the issue's command, checked against an independent recomputation from the model.

The scan runs as a user runs it (a subprocess of `python -m headvis.scan`);
the check recomputes every metric from the model's own eager attention
matrices in float64, with code that shares nothing with the scanner.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from headvis.schemas import validate_tree

pytestmark = pytest.mark.slow

LAYERS = [2, 5]
N_SEQS, SEQ_LEN, PER_INTERVAL = 20, 48, 2


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "headvis.scan", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def scan_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "X"
    result = run_cli("--seq-len", str(SEQ_LEN), "--num-seqs", str(N_SEQS), "--per-interval", str(PER_INTERVAL),
                     "--layers", "2,5", "--backend", "torch", "--device", "cpu", "--no-umap", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "headvis: scanned 20 sequences (960 tokens), 18 heads" in result.stdout
    return out


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def eager(scan_tree, smollm):
    """Token ids of every scanned sequence and the model's eager patterns of layers 2 and 5, float64."""
    seqs = {}
    for path in (scan_tree / "heads").glob("*.json"):
        for s in load(path)["sequences"]:
            seqs[s["id"]] = s["token_ids"]
    ids = torch.tensor([seqs[i] for i in range(N_SEQS)])
    model = smollm.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation("headvis")
    return ids.numpy(), {layer: out.attentions[layer].double().numpy() for layer in LAYERS}


def test_tree_matches_schemas_and_contract_layout(scan_tree):
    assert validate_tree(scan_tree) == 1 + 1 + 18 + 1 + 18 + 18
    config = load(scan_tree / "config.json")
    assert config["layers"] == LAYERS and config["heads"] == list(range(9))
    assert config["backend"] == "torch" and config["projection"]["methods"] == ["pca"]
    scatter = load(scan_tree / "scatter_data.json")
    assert {(h["layer"], h["head"]) for h in scatter["heads"]} == {(l, h) for l in LAYERS for h in range(9)}
    for row in scatter["heads"]:
        assert set(row["metrics"]) == set(scatter["metrics"])
    for layer in LAYERS:
        for head in range(9):
            umap = load(scan_tree / "umap" / f"L{layer}H{head}.json")
            assert "views" not in umap  # PCA only
            assert len(umap["points"]["seq"]) == len(umap["pca"]["q"]["coords"])
    assert not list(scan_tree.parent.glob(".X.staging-*")), "staging folder left behind"


def test_every_sequence_sampled_in_its_decile(scan_tree):
    for path in (scan_tree / "heads").glob("*.json"):
        head = load(path)
        seqs = head["sequences"]
        assert sorted(s["id"] for s in seqs) == list(range(N_SEQS)), path.name
        assert head["interval_counts"] == [2] * 10
        acts = {s["id"]: s["max_activation"] for s in seqs}
        values = np.array([acts[i] for i in range(N_SEQS)])
        assert np.allclose(head["interval_edges"], np.percentile(values, np.arange(0, 101, 10)), rtol=1e-5)
        top = [s for s in seqs if s["interval"] == 10]
        assert [s["max_activation"] for s in top] == sorted(values, reverse=True)[:2]
        ranking = sorted(range(N_SEQS), key=lambda i: (-acts[i], i))
        for s in seqs:  # rank deciles: interval 10 holds the top two, interval 9 the next two, ...
            assert s["interval"] == 10 - ranking.index(s["id"]) // 2


def independent_metrics(p: np.ndarray, tok: np.ndarray, scores_ok: bool = False) -> dict:
    """CONTRACT section 1 from full patterns p (n, T, T), straight loops over rows."""
    n, seq_len, _ = p.shape
    sums = {k: 0.0 for k in ("entropy", "prev_token", "induction", "duplicate", "bos", "self", "distance")}
    counts = {k: 0 for k in sums}
    for b in range(n):
        for q in range(1, seq_len):
            row = p[b, q, : q + 1]
            sums["entropy"] += -sum(x * math.log(x) for x in row if x > 0)
            sums["prev_token"] += row[q - 1]
            sums["bos"] += row[0]
            sums["self"] += row[q]
            sums["distance"] += sum(row[k] * (q - k) for k in range(q + 1))
            for k in ("entropy", "prev_token", "bos", "self", "distance"):
                counts[k] += 1
            ind = [k for k in range(1, q) if tok[b, k - 1] == tok[b, q]]
            dup = [k for k in range(q) if tok[b, k] == tok[b, q]]
            if ind:
                sums["induction"] += row[ind].sum()
                counts["induction"] += 1
            if dup:
                sums["duplicate"] += row[dup].sum()
                counts["duplicate"] += 1
    out = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
    out["max_activation"] = float(np.mean(p[:, 1:, 1:].max(axis=(1, 2))))
    return out


def test_metrics_and_every_stored_weight_match_the_model(scan_tree, eager):
    tok, patterns = eager
    top_k, min_weight = 8, 0.01
    for layer in LAYERS:
        for head in range(9):
            data = load(scan_tree / "heads" / f"L{layer}H{head}.json")
            p = patterns[layer][:, head]  # (n, T, T)
            expected = independent_metrics(p, tok)
            for name, value in expected.items():
                assert data["metrics"][name] == pytest.approx(value, rel=2e-4, abs=2e-5), f"L{layer}H{head} {name}"
            for s in data["sequences"]:
                pb = p[s["id"]]
                assert s["max_activation"] == pytest.approx(pb[1:, 1:].max(), rel=1e-5)
                q, k = s["argmax"]
                assert pb[q, k] == pytest.approx(pb[1:, 1:].max(), rel=1e-5)
                idx = np.array(s["attention_indices"])
                vals = np.array(s["attention_values"])
                assert np.all(np.diff(idx) > 0)
                assert np.allclose(vals, pb.reshape(-1)[idx], rtol=2e-5, atol=1e-7)
                kept = set(idx.tolist())
                for row in range(SEQ_LEN):  # the sparsification rule, row by row
                    order = np.argsort(-pb[row], kind="stable")[:top_k]
                    want = {row * SEQ_LEN + int(k) for k in order if pb[row, k] >= min_weight + 1e-6}
                    want.add(row * SEQ_LEN + int(order[0]))
                    maybe = {row * SEQ_LEN + int(k) for k in order if abs(pb[row, k] - min_weight) <= 1e-6}
                    got = {i for i in kept if i // SEQ_LEN == row}
                    assert want <= got <= want | maybe, f"L{layer}H{head} seq {s['id']} row {row}"


def test_distance_histogram_and_top_tokens_match_the_model(scan_tree, eager):
    tok, patterns = eager
    layer, head = 5, 4
    data = load(scan_tree / "heads" / f"L{layer}H{head}.json")
    p = patterns[layer][:, head]
    hist = data["qk_distance_histogram"]
    edges = hist["bin_edges"]
    expected = np.zeros(len(edges) - 1)
    key_weight = {}
    for b in range(N_SEQS):
        for q in range(1, SEQ_LEN):
            for k in range(q + 1):
                expected[np.searchsorted(edges, q - k, side="right") - 1] += p[b, q, k]
                if k >= 1:
                    key_weight[tok[b, k]] = key_weight.get(tok[b, k], 0.0) + p[b, q, k]
    assert np.allclose(hist["weights"], expected / expected.sum(), atol=2e-6)
    total = sum(key_weight.values())
    best = max(key_weight, key=key_weight.get)
    assert data["top_tokens"]["key"][0]["id"] == best
    assert data["top_tokens"]["key"][0]["weight"] == pytest.approx(key_weight[best] / total, rel=1e-4)


def test_rerun_replaces_tree_atomically(scan_tree, tmp_path):
    """A second scan into an existing tree replaces it; a failing one leaves it as it was."""
    before = {p.relative_to(scan_tree): p.read_bytes() for p in scan_tree.rglob("*") if p.is_file()}
    bad = run_cli("--seq-len", "48", "--num-seqs", "4", "--layers", "99", "--out", str(scan_tree))
    assert bad.returncode == 2 and "--layers: 99 is out of range" in bad.stderr
    assert "Traceback" not in bad.stderr
    after = {p.relative_to(scan_tree): p.read_bytes() for p in scan_tree.rglob("*") if p.is_file()}
    assert before == after
