"""Every head metric of CONTRACT section 1, through every backend and the accumulator, against float64 brute force.

`head_brute_force` recomputes the sixteen metrics straight from the
contract's definitions (numpy, float64, one row at a time, sharing no code
with headvis); the tests feed the same inputs through each row-statistics
backend and `ScanAccumulator`, on random heads (GQA, windows, padding,
soft-capping, bidirectional) and on hand-made heads whose answer is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headvis.accumulate import HEAD_METRICS, ScanAccumulator
from headvis.backends import resolve_backend
from headvis.metrics import AttentionSpec, distance_bin_edges
from random_heads import CASES, brute_row, make_inputs

BACKENDS = ["torch", "numba", "triton"]


def _entropy(weight: dict) -> float | None:
    total = sum(weight.values())
    if total <= 0:
        return None
    return -sum(w / total * math.log(w / total) for w in weight.values() if w > 0)


def head_brute_force(query, key, tokens, spec: AttentionSpec) -> list[dict]:
    """The metrics of every head (one dict per query head), float64, from CONTRACT section 1."""
    q, k, tok = query.double().numpy(), key.double().numpy(), tokens.numpy()
    batch, n_heads, seq_len, _ = q.shape
    heads = []
    for h in range(n_heads):
        rows = {name: [] for name in ("pattern_entropy", "previous_token_score", "self_attention_score", "bos_score",
                                      "induction_score", "duplicate_token_score", "qk_distance", "logit_mean",
                                      "logit_std", "logit_max", "top_logit_margin", "logit_z_score", "d", "d2")}
        key_w, query_w, seq_max = {}, {}, []
        for b in range(batch):
            best = 0.0
            for i in range(1, seq_len):
                allowed, s, row = brute_row(q, k, spec, b, h, i)
                if not allowed:
                    continue
                p = dict(zip(allowed, row))
                rows["pattern_entropy"].append(-sum(x * math.log(x) for x in p.values() if x > 0))
                rows["previous_token_score"].append(p.get(i - 1, 0.0))
                rows["self_attention_score"].append(p.get(i, 0.0))
                rows["bos_score"].append(p.get(0, 0.0))
                ind = [j for j in allowed if 1 <= j < i and tok[b, j - 1] == tok[b, i]]
                dup = [j for j in allowed if j < i and tok[b, j] == tok[b, i]]
                if ind:
                    rows["induction_score"].append(sum(p[j] for j in ind))
                if dup:
                    rows["duplicate_token_score"].append(sum(p[j] for j in dup))
                rows["qk_distance"].append(sum(p[j] * abs(i - j) for j in allowed))
                rows["d"].append(rows["qk_distance"][-1])
                rows["d2"].append(sum(p[j] * (i - j) ** 2 for j in allowed))
                rows["logit_mean"].append(s.mean())
                rows["logit_std"].append(s.std())
                rows["logit_max"].append(s.max())
                if len(s) >= 2:
                    top = np.sort(s)[::-1]
                    rows["top_logit_margin"].append(top[0] - top[1])
                if s.std() > 1e-9 * (abs(s.max()) + abs(s.mean()) + 1e-300):
                    rows["logit_z_score"].append((s.max() - s.mean()) / s.std())
                later = [p[j] for j in allowed if j >= 1]
                row_max = max(later, default=0.0)
                best = max(best, row_max)
                query_w[tok[b, i]] = query_w.get(tok[b, i], 0.0) + row_max
                for j in allowed:
                    if j >= 1:
                        key_w[tok[b, j]] = key_w.get(tok[b, j], 0.0) + p[j]
            seq_max.append(best)
        metrics = {name: (float(np.mean(v)) if v else None) for name, v in rows.items() if name not in ("d", "d2")}
        metrics["qk_distance_variance"] = float(np.mean(rows["d2"]) - np.mean(rows["d"]) ** 2) if rows["d"] else None
        metrics["key_token_entropy"] = _entropy(key_w)
        metrics["query_token_entropy"] = _entropy(query_w)
        metrics["mean_max_activation"] = float(np.mean(seq_max))
        heads.append(metrics)
    return heads


def scanned_metrics(backend: str, query, key, tokens, spec: AttentionSpec) -> list[dict]:
    """The same inputs through a backend and ScanAccumulator, two batches (so the sums are merged across updates)."""
    _, fn = resolve_backend(backend, torch.device("cpu"))
    batch, n_heads, seq_len, _ = query.shape
    edges = distance_bin_edges(seq_len, spec.causal)
    acc = ScanAccumulator([0], n_heads, batch, int(tokens.max()) + 1, len(edges) - 1)
    for part in (list(range(0, batch, 2)), list(range(1, batch, 2))):
        if not part:
            continue
        ids = torch.tensor(part)
        sub = AttentionSpec(causal=spec.causal, scaling=spec.scaling, window=spec.window, softcap=spec.softcap,
                            key_valid=None if spec.key_valid is None else spec.key_valid[part])
        stats = fn(query[part], key[part], tokens[part], sub, top_k=0, bin_edges=edges)
        acc.update(0, ids, tokens[part], stats)
        acc.count_tokens(ids, tokens[part])
    return [acc.result(0, h).metrics for h in range(n_heads)]


def assert_metrics(expected: list[dict], actual: list[dict], rel: float = 2e-4, atol: float = 2e-5) -> None:
    for h, (want, got) in enumerate(zip(expected, actual)):
        assert list(got) == list(HEAD_METRICS)
        for name in HEAD_METRICS:
            if want[name] is None:
                assert got[name] is None, f"head {h} {name}: {got[name]} where no row counts"
                continue
            assert got[name] is not None, f"head {h} {name}: None, expected {want[name]}"
            assert got[name] == pytest.approx(want[name], rel=rel, abs=atol), f"head {h} {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_head_metric_matches_float64_brute_force(backend, case):
    query, key, tokens, spec = make_inputs(case)
    assert_metrics(head_brute_force(query, key, tokens, spec), scanned_metrics(backend, query, key, tokens, spec))


def test_window_of_one_counts_no_margin_and_no_z_score():
    (case,) = [c for c in CASES if c.window == 1]
    query, key, tokens, spec = make_inputs(case)
    metrics = scanned_metrics("torch", query, key, tokens, spec)
    for m in metrics:
        assert m["top_logit_margin"] is None and m["logit_z_score"] is None
        assert m["self_attention_score"] == pytest.approx(1.0) and m["pattern_entropy"] == pytest.approx(0.0, abs=1e-6)
        assert m["qk_distance_variance"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_that_only_reads_one_token_type_has_key_token_entropy_0(backend):
    seq_len, x = 24, 7
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(10, 20, (2, seq_len), generator=g)
    tokens[:, 1::3] = x  # token x at positions 1, 4, 7, ...: every row q >= 1 can see one
    key = (tokens == x).float()[:, None, :, None] * torch.ones(1, 1, 1, 4)  # key k = [tok[k] == x] * 1
    query = torch.full((2, 1, seq_len, 4), 20.0)  # score 80 on x keys, 0 elsewhere
    metrics = scanned_metrics(backend, query, key, tokens, AttentionSpec(causal=True, scaling=1.0))[0]
    assert metrics["key_token_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["bos_score"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["query_token_entropy"] > 1.0, "queries are of many token types"
    assert_metrics(head_brute_force(query, key, tokens, AttentionSpec(causal=True, scaling=1.0)), [metrics])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_tied_top_logits_give_margin_0_and_a_clear_top_gives_its_gap(backend):
    seq_len = 9
    # keys: e0 * score; the query picks column 0 of every key, so s[q, k] = key score
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 0.0, 2.0, -1.0, 0.25, 1.5])
    key = torch.zeros(1, 1, seq_len, 4)
    key[0, 0, :, 0] = scores
    query = torch.zeros(1, 1, seq_len, 4)
    query[0, 0, :, 0] = 1.0
    tokens = torch.arange(seq_len)[None]
    spec = AttentionSpec(causal=True, scaling=1.0)
    _, fn = resolve_backend(backend, torch.device("cpu"))
    stats = fn(query, key, tokens, spec, top_k=0, bin_edges=distance_bin_edges(seq_len, True))
    margin = stats.metrics["top_logit_margin"][0, 0]
    assert margin[1].item() == pytest.approx(2.0)  # keys [1, 3]
    assert margin[2:].tolist() == pytest.approx([0.0] * (seq_len - 2))  # 3 and 3 tie from q = 2 on
    assert stats.margin_counted[0, 0].tolist() == [False] + [True] * (seq_len - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_rows(backend):
    seq_len = 13
    query = torch.zeros(2, 2, seq_len, 4)
    key = torch.randn(2, 1, seq_len, 4)
    tokens = torch.arange(2 * seq_len).reshape(2, seq_len)
    metrics = scanned_metrics(backend, query, key, tokens, AttentionSpec(causal=True, scaling=0.5))
    n = torch.arange(2, seq_len + 1, dtype=torch.float64)  # row q has q + 1 keys
    d = [sum(range(q + 1)) / (q + 1) for q in range(1, seq_len)]
    d2 = [sum(i * i for i in range(q + 1)) / (q + 1) for q in range(1, seq_len)]
    for m in metrics:
        assert m["pattern_entropy"] == pytest.approx(float(torch.log(n).mean()), rel=1e-5)
        assert m["top_logit_margin"] == pytest.approx(0.0, abs=1e-6)
        assert m["logit_std"] == pytest.approx(0.0, abs=1e-6)
        assert m["logit_z_score"] is None, "no row has logit_std > 0"
        assert m["qk_distance"] == pytest.approx(np.mean(d), rel=1e-5)
        assert m["qk_distance_variance"] == pytest.approx(np.mean(d2) - np.mean(d) ** 2, rel=1e-4)
        assert m["key_token_entropy"] is not None and m["key_token_entropy"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_sequences_count_no_row(backend):
    metrics = scanned_metrics(backend, torch.randn(2, 2, 1, 4), torch.randn(2, 1, 1, 4), torch.tensor([[3], [4]]),
                              AttentionSpec(causal=True, scaling=0.5))
    for m in metrics:
        assert all(m[name] is None for name in HEAD_METRICS if name != "mean_max_activation"), m
        assert m["mean_max_activation"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_distance_histogram_without_the_sink_is_the_rest_of_the_mass(backend, causal):
    """dist_hist_no_sink: the pattern's mass by q - k over keys k >= 1 (rows q >= 1), normalized; float64 brute force."""
    batch, n_heads, seq_len, d = 2, 3, 19, 8
    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(batch, n_heads, seq_len, d, generator=g), torch.randn(batch, n_heads, seq_len, d, generator=g)
    key[:, :, 0] *= 4  # a strong sink column
    tokens = torch.randint(0, 9, (batch, seq_len), generator=g)
    spec = AttentionSpec(causal=causal, scaling=d**-0.5)
    edges = distance_bin_edges(seq_len, causal)
    _, fn = resolve_backend(backend, torch.device("cpu"))
    acc = ScanAccumulator([0], n_heads, batch, 9, len(edges) - 1, bin_edges=edges)
    acc.update(0, torch.arange(batch), tokens, fn(query, key, tokens, spec, top_k=0, bin_edges=edges))
    scores = (query.double() @ key.double().transpose(-1, -2)) * d**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), -torch.inf)
    p = scores.softmax(-1)
    distance = torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]
    bins = (torch.searchsorted(torch.tensor(edges), distance, right=True) - 1).clamp(min=0)  # later keys: p = 0
    for h in range(n_heads):
        want = torch.zeros(len(edges) - 1, dtype=torch.float64)
        mass = p[:, h, 1:, 1:].sum(0)  # rows q >= 1, keys k >= 1
        want.index_add_(0, bins[1:, 1:].reshape(-1), mass.reshape(-1))
        got = acc.result(0, h)
        assert got.dist_hist_no_sink == pytest.approx((want / want.sum()).numpy(), abs=2e-6)
        assert got.dist_hist.sum() == pytest.approx(1.0) and got.dist_hist_no_sink.sum() == pytest.approx(1.0)
