"""Small pieces: decile sampling, sparse rows, rounding and atomic writes, accumulator merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headvis.accumulate import HEAD_METRICS, ScanAccumulator
from headvis.io import round_sig, write_json
from headvis.metrics import ROW_METRICS, AttentionSpec, distance_bin_edges, ref_row_stats
from headvis.sampling import assign_intervals, choose_samples, interval_edges, sparse_rows


def test_public_metric_names_are_frozen():
    assert ROW_METRICS == ("pattern_entropy", "previous_token_score", "induction_score", "duplicate_token_score",
                           "bos_score", "self_attention_score", "qk_distance", "logit_mean", "logit_std", "logit_max",
                           "top_logit_margin", "qk_distance_sq")
    assert HEAD_METRICS == ("pattern_entropy", "previous_token_score", "self_attention_score", "bos_score",
                            "induction_score", "duplicate_token_score", "qk_distance", "logit_mean", "logit_std",
                            "logit_max", "top_logit_margin", "logit_z_score", "qk_distance_variance",
                            "key_token_entropy", "query_token_entropy", "mean_max_activation")


def test_deciles_and_samples():
    rng = np.random.default_rng(0)
    values = rng.random(103)
    edges = interval_edges(values)
    assert edges[0] == values.min() and edges[-1] == values.max() and np.all(np.diff(edges) >= 0)
    member = assign_intervals(values)
    assert set(np.bincount(member)[1:]) <= {10, 11} and member[np.argmax(values)] == 10
    chosen = choose_samples(values, edges, 3, np.random.default_rng(1))
    ids = [i for i, _ in chosen]
    assert len(ids) == len(set(ids)) == 30
    assert [i for i, interval in chosen if interval == 10] == list(np.argsort(-values)[:3])
    for i, interval in chosen:
        assert interval == 10 or member[i] == interval
    assert chosen == choose_samples(values, edges, 3, np.random.default_rng(1)), "seeded"


def test_ties_still_fill_every_decile():
    values = np.array([0.5] * 20)
    chosen = choose_samples(values, interval_edges(values), 2, np.random.default_rng(0))
    assert sorted(i for i, _ in chosen) == list(range(20))


def test_samples_when_fewer_sequences_than_slots():
    values = np.array([0.3, 0.9, 0.1])
    chosen = choose_samples(values, interval_edges(values), 5, np.random.default_rng(0))
    assert [i for i, _ in chosen] == [1, 0, 2] and chosen[0][1] == 10


def test_sparse_rows_rule():
    values = np.array([[1.0, 0, 0], [0.6, 0.395, 0.005], [0.004, 0.003, 0.002]])
    indices = np.array([[0, -1, -1], [0, 1, 2], [2, 0, 1]])
    flat, vals = sparse_rows(values, indices, min_weight=0.01)
    assert flat.tolist() == [0, 3, 4, 8]  # row 2 keeps only its largest although below min_weight
    assert vals.tolist() == [1.0, 0.6, 0.395, 0.004]


@pytest.mark.parametrize("x, expected", [
    (0.123456789, 0.123457), (123456789.0, 123457000.0), (1e-12 / 3, 3.33333e-13), (-2.5, -2.5), (0.0, 0.0),
    (0.30000000000000004, 0.3),
])
def test_round_sig(x, expected):
    (value,) = round_sig(np.array([x]))
    assert value == expected and float(f"{value:.6g}") == value


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": np.float32(0.1), "v": np.arange(3), "f": [1.0, 2.0 / 3]})
    assert json.loads(path.read_text()) == {"x": 0.1, "v": [0, 1, 2], "f": [1.0, 0.666667]}
    with pytest.raises(ValueError, match="NaN"):
        write_json(path, {"x": float("nan")})
    assert json.loads(path.read_text())["x"] == 0.1, "a failed write keeps the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"], "no temp file left"


def test_accumulators_merge_to_the_single_pass_result():
    g = torch.Generator().manual_seed(0)
    n, seq_len, heads = 6, 9, 3
    query = torch.randn(n, heads, seq_len, 8, generator=g)
    key = torch.randn(n, 1, seq_len, 8, generator=g)
    tokens = torch.randint(0, 5, (n, seq_len), generator=g)
    edges = distance_bin_edges(seq_len, True)
    spec = AttentionSpec(causal=True, scaling=0.35)

    def accumulate(rows):
        acc = ScanAccumulator([0], heads, n, 5, len(edges) - 1)
        ids = torch.tensor(rows)
        acc.count_tokens(ids, tokens[rows])
        acc.update(0, ids, tokens[rows], ref_row_stats(query[rows], key[rows], tokens[rows], spec, top_k=0, bin_edges=edges))
        return acc

    whole = accumulate(list(range(n)))
    parts = accumulate([0, 2, 4])
    parts.merge(accumulate([1, 3, 5]))
    for slot in range(heads):
        a, b = whole.result(0, slot), parts.result(0, slot)
        for name in HEAD_METRICS:
            assert a.metrics[name] is not None and a.metrics[name] == pytest.approx(b.metrics[name], rel=1e-6)
        assert np.allclose(a.seq_max, b.seq_max) and np.array_equal(a.seq_argmax, b.seq_argmax)
        assert np.allclose(a.key_weight, b.key_weight) and np.allclose(a.dist_hist, b.dist_hist)
    assert set(whole.state_dict()) >= {"metric_sum", "metric_count", "seq_max", "key_weight"}


def test_gpu_projection_path_hands_tensors_over_by_dlpack(monkeypatch):
    """The cuML path, with stand-ins for cupy and cuML (no GPU here): same numbers as scikit-learn."""
    import types

    from sklearn.decomposition import PCA

    from headvis.projection import fit_head

    handed = []

    def from_dlpack(tensor):
        handed.append(type(tensor).__name__)
        return np.from_dlpack(tensor)

    class FakePCA:  # cuml.PCA's interface, computed by scikit-learn
        def __init__(self, n_components, output_type):
            assert output_type == "numpy"
            self._pca = PCA(n_components=n_components)

        def fit_transform(self, x):
            coords = self._pca.fit_transform(x)
            self.mean_, self.components_ = self._pca.mean_, self._pca.components_
            self.explained_variance_ratio_ = self._pca.explained_variance_ratio_
            return coords

    cupy = types.SimpleNamespace(from_dlpack=from_dlpack)
    cuml = types.SimpleNamespace(PCA=FakePCA)
    g = torch.Generator().manual_seed(0)
    vectors = {name: torch.randn(40, 6, generator=g) for name in ("Q", "K", "V", "O")}
    fields, rotation = fit_head(vectors, n_points=40, with_umap=False, seed=0, gpu=(cupy, cuml))
    ref_fields, ref_rotation = fit_head({k: v.numpy() for k, v in vectors.items()}, n_points=40, with_umap=False, seed=0)
    assert handed == ["Tensor"] * 4
    for name in ("Q", "K", "V", "O"):
        for d in ("d0", "d1", "d2"):
            assert np.allclose(np.abs(fields["pca"][name][d]), np.abs(ref_fields["pca"][name][d]), atol=1e-5)
        assert np.allclose(rotation[name]["mean"], ref_rotation[name]["mean"], atol=1e-6)
    assert "views" not in fields


def test_backend_resolution_and_fallback(monkeypatch, capsys):
    from headvis import backends
    from headvis.errors import HeadvisError

    cpu = torch.device("cpu")
    assert backends.resolve_backend("torch", cpu)[0] == "torch"
    assert backends.resolve_backend("auto", cpu)[0] == "numba"
    monkeypatch.setitem(backends._KERNELS, "numba", ("headvis.kernels.no_such_module", "f", "pip install numba"))
    assert backends.resolve_backend("auto", cpu) == ("torch", backends.ref_row_stats)
    assert "backend auto -> torch: numba is not importable" in capsys.readouterr().out
    with pytest.raises(HeadvisError, match="--backend numba: numba is not importable"):
        backends.resolve_backend("numba", cpu)
    with pytest.raises(HeadvisError, match="--backend must be one of"):
        backends.resolve_backend("jax", cpu)


@pytest.mark.parametrize("n, dim", [(2000, 64), (500, 576), (40, 100), (2, 8), (5, 2)])
def test_pca_equals_scikit_learn(n, dim):
    """headvis' PCA (torch, exact) against scikit-learn's: same components up to sign, coordinates, ratios."""
    from sklearn.decomposition import PCA

    from headvis.projection import _pca

    rng = np.random.default_rng(n + dim)
    x = rng.normal(size=(n, dim)) * np.linspace(3, 0.1, dim) + rng.normal(size=dim)
    coords, rotation = _pca(x, seed=0)
    c = min(3, n, dim)
    ref = PCA(n_components=c, svd_solver="full").fit(x)
    signs = np.sign((rotation["components"] * ref.components_).sum(1))
    assert np.all(signs != 0)
    assert np.allclose(rotation["components"] * signs[:, None], ref.components_, atol=1e-6)
    assert np.allclose(coords[:, :c] * signs, ref.transform(x), atol=1e-6 * (1 + np.abs(coords).max()))
    assert np.allclose(rotation["explained_variance_ratio"][:c], ref.explained_variance_ratio_, atol=1e-9)
    assert np.allclose(rotation["mean"], ref.mean_)
    assert coords.shape == (n, 3) and np.all(coords[:, c:] == 0)
    pivots = np.abs(rotation["components"]).argmax(1)
    assert np.all(rotation["components"][np.arange(c), pivots] > 0), "sign: the largest entry is positive"
