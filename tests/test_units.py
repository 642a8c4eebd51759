"""Small pieces: decile sampling, sparse rows, rounding and atomic writes, accumulator merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headvis.accumulate import HEAD_METRICS, ScanAccumulator
from headvis.io import round_sig, write_json
from headvis.metrics import ROW_METRICS, AttentionSpec, distance_bin_edges, ref_row_stats
from headvis.sampling import assign_intervals, choose_samples, interval_edges, sequence_priorities, sparse_rows
from headvis.sampling import sparse_rows_batched


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
    chosen = choose_samples(values, edges, 3, sequence_priorities(1, len(values)))
    ids = [i for i, _ in chosen]
    assert len(ids) == len(set(ids)) == 30
    assert [i for i, interval in chosen if interval == 10] == list(np.argsort(-values)[:3])
    for i, interval in chosen:
        assert interval == 10 or member[i] == interval
    assert chosen == choose_samples(values, edges, 3, sequence_priorities(1, len(values))), "seeded"


def test_ties_still_fill_every_decile():
    values = np.array([0.5] * 20)
    chosen = choose_samples(values, interval_edges(values), 2, sequence_priorities(0, len(values)))
    assert sorted(i for i, _ in chosen) == list(range(20))


def test_samples_when_fewer_sequences_than_slots():
    values = np.array([0.3, 0.9, 0.1])
    chosen = choose_samples(values, interval_edges(values), 5, sequence_priorities(0, len(values)))
    assert [i for i, _ in chosen] == [1, 0, 2] and chosen[0][1] == 10


def test_priorities_are_uniform_per_id_and_independent_of_the_corpus_size():
    small, large = sequence_priorities(7, 100), sequence_priorities(7, 20_000)
    assert np.array_equal(small, large[:100]), "a sequence's priority depends on (seed, id) only"
    assert not np.array_equal(small, sequence_priorities(8, 100))
    assert 0.0 <= large.min() and large.max() < 1.0 and len(np.unique(large)) == len(large)
    counts, _ = np.histogram(large, bins=10, range=(0, 1))
    assert counts.min() > 1800 and counts.max() < 2200  # uniform: 2000 +- 4.5 sigma per tenth


def test_each_decile_takes_its_lowest_priority_sequences():
    rng = np.random.default_rng(3)
    values = rng.random(200)
    priority = sequence_priorities(0, 200)
    chosen = choose_samples(values, interval_edges(values), 4, priority)
    member = assign_intervals(values)
    top = set(np.argsort(-values)[:4].tolist())
    for interval in range(1, 10):
        picked = {i for i, got in chosen if got == interval}
        pool = [i for i in np.flatnonzero(member == interval) if i not in top]
        assert picked == set(sorted(pool, key=lambda i: priority[i])[:4]), interval
        shown = [i for i, got in chosen if got == interval]
        assert shown == sorted(shown, key=lambda i: -values[i]), "shown by activation"


def test_coordinated_samples_share_sequences_across_heads():
    """Heads with unrelated activations still pick mostly the same sequences: the union stays small."""
    rng = np.random.default_rng(0)
    n, heads, per_interval = 4096, 64, 5
    priority = sequence_priorities(0, n)
    union_coordinated, union_independent = set(), set()
    for h in range(heads):
        values = rng.random(n)
        edges = interval_edges(values)
        union_coordinated |= {i for i, interval in choose_samples(values, edges, per_interval, priority)
                              if interval < 10}
        union_independent |= {i for i, interval in choose_samples(values, edges, per_interval, rng.random(n))
                              if interval < 10}
    # independent picks of 45 in 4096 per head: the union is 4096 (1 - (1 - 45/4096)^64), about 2070
    assert len(union_independent) > 1900
    assert len(union_coordinated) < 0.1 * len(union_independent)  # 110 here


def test_sparse_rows_rule():
    values = np.array([[1.0, 0, 0], [0.6, 0.395, 0.005], [0.004, 0.003, 0.002]])
    indices = np.array([[0, -1, -1], [0, 1, 2], [2, 0, 1]])
    flat, vals = sparse_rows(values, indices, min_weight=0.01)
    assert flat.tolist() == [0, 3, 4, 8]  # row 2 keeps only its largest although below min_weight
    assert vals.tolist() == [1.0, 0.6, 0.395, 0.004]


def test_sparse_rows_batched_is_the_rule_pair_by_pair():
    rng = np.random.default_rng(0)
    pairs, seq_len, top_k = 7, 12, 4
    values = -np.sort(-rng.dirichlet(np.ones(seq_len) * 0.3, size=(pairs, seq_len))[..., :top_k], axis=-1)
    indices = np.array([[rng.permutation(seq_len)[:top_k] for _ in range(seq_len)] for _ in range(pairs)])
    values[values < 1e-4] = 0.0
    indices[values == 0.0] = -1
    values[2] = 0.0  # a pair with nothing kept (all unused)
    indices[2] = -1
    got = sparse_rows_batched(values.astype(np.float32), indices, 0.05)
    assert len(got) == pairs
    for p, (flat, vals) in enumerate(got):
        expected = sorted((q * seq_len + indices[p, q, j], np.float32(values[p, q, j]))
                          for q in range(seq_len) for j in range(top_k)
                          if indices[p, q, j] >= 0 and (j == 0 or np.float32(values[p, q, j]) >= np.float32(0.05)))
        assert flat.tolist() == [e[0] for e in expected] and vals.tolist() == [e[1] for e in expected]
    assert got[2][0].size == 0


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


def test_gpu_umap_path_hands_tensors_over_by_dlpack(monkeypatch):
    """The cuML UMAP path, with stand-ins for cupy and cuML (no GPU here): each vector handed over as a tensor."""
    import types

    from headvis.projection import fit_head

    handed = []

    def from_dlpack(tensor):
        handed.append(type(tensor).__name__)
        return np.from_dlpack(tensor)

    class FakeUMAP:  # cuml.UMAP's interface: the first three columns stand for the embedding
        def __init__(self, n_components, n_neighbors, min_dist, random_state, output_type):
            assert (n_components, n_neighbors, output_type) == (3, 15, "numpy")

        def fit_transform(self, x):
            return x[:, :3]

    cupy = types.SimpleNamespace(from_dlpack=from_dlpack)
    cuml = types.SimpleNamespace(UMAP=FakeUMAP)
    g = torch.Generator().manual_seed(0)
    vectors = {name: torch.randn(40, 6, generator=g, dtype=torch.float64) for name in ("Q", "K", "V", "O")}
    fields, rotation = fit_head(vectors, n_points=40, with_umap=True, seed=0, gpu=(cupy, cuml))
    ref_fields, ref_rotation = fit_head({k: v.numpy() for k, v in vectors.items()}, n_points=40, with_umap=False, seed=0)
    assert handed == ["Tensor"] * 4
    (view,) = fields["views"]
    for name in ("Q", "K", "V", "O"):
        assert np.allclose(view["embeddings"][name]["d2"], vectors[name][:, 2].numpy())
        for d in ("d0", "d1", "d2"):
            assert np.allclose(fields["pca"][name][d], ref_fields["pca"][name][d])
        assert np.allclose(rotation[name]["mean"], ref_rotation[name]["mean"])


def test_batched_pca_equals_the_reference_and_scikit_learn():
    """One eigh call for clouds of many sizes: each equals `_pca` and scikit-learn (components with variance)."""
    from sklearn.decomposition import PCA

    from headvis.projection import _pca, batched_pca

    rng = np.random.default_rng(0)
    dim = 16
    clouds = [rng.normal(size=(n, dim)) * np.linspace(3, 0.1, dim) + rng.normal(size=dim)
              for n in (2000, 300, 17, 4, 2, 1)]
    results = batched_pca([torch.as_tensor(x) for x in clouds])
    for x, (coords, rotation) in zip(clouds, results):
        ref_coords, ref_rotation = _pca(x, seed=0)
        ratio = ref_rotation["explained_variance_ratio"]
        live = (ratio > 1e-12)[: len(ref_rotation["components"])]  # a null-space direction is arbitrary in both
        assert np.allclose(rotation["explained_variance_ratio"], ratio, atol=1e-12)
        assert np.allclose(rotation["mean"], ref_rotation["mean"])
        assert np.allclose(rotation["components"][live], ref_rotation["components"][live], atol=1e-8)
        assert np.allclose(coords[:, : len(live)][:, live], ref_coords[:, : len(live)][:, live],
                           atol=1e-8 * (1 + np.abs(ref_coords).max()))
        assert coords.shape == (len(x), 3)
        if len(x) >= 3:
            ref = PCA(n_components=3, svd_solver="full").fit(x)
            signs = np.sign((rotation["components"] * ref.components_).sum(1))
            assert np.allclose(rotation["components"] * signs[:, None], ref.components_, atol=1e-6)
            assert np.allclose(coords * signs, ref.transform(x), atol=1e-6 * (1 + np.abs(coords).max()))


def test_batched_pca_of_float32_clouds_equals_scikit_learn_on_the_same_data():
    """The scan's clouds are float32: fitted in float32 (as scikit-learn fits float32 data), and closer to the
    exact (float64) fit than scikit-learn's own float32 fit is (measured: 4e-6 against its 4e-5)."""
    from sklearn.decomposition import PCA

    from headvis.projection import batched_pca

    rng = np.random.default_rng(1)
    dim = 64
    clouds = [(rng.normal(size=(n, dim)) * np.linspace(3, 0.1, dim) + 5 * rng.normal(size=dim)).astype(np.float32)
              for n in (2000, 300, 17, 4)]
    for x, (coords, rotation) in zip(clouds, batched_pca([torch.as_tensor(x) for x in clouds])):
        exact = PCA(n_components=3, svd_solver="full").fit(x.astype(np.float64))
        single = PCA(n_components=3, svd_solver="full").fit(x)
        assert np.allclose(rotation["components"], exact.components_, atol=2e-5)  # svd_flip's signs too
        assert np.allclose(rotation["components"], single.components_, atol=1e-4)
        assert np.allclose(rotation["explained_variance_ratio"], exact.explained_variance_ratio_, atol=1e-6)
        assert np.allclose(rotation["mean"], exact.mean_, atol=1e-5)
        assert np.allclose(coords, exact.transform(x.astype(np.float64)), atol=2e-5 * np.abs(coords).max())


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


def test_a_crash_between_the_prefix_snapshot_steps_leaves_files_the_next_open_drops(tmp_path):
    """save_prefix writes the segment, then the prefix, then deletes the folded units: whichever step a crash
    stops at, load_prefix gives a consistent state (a segment past the prefix and units below it go)."""
    from headvis.errors import HeadvisError
    from headvis.units import UnitFiles

    files = UnitFiles(tmp_path / "r", {"scan": 1})
    files.folder.mkdir()
    sums = {"metric_sum": torch.arange(4.0, dtype=torch.float64)}
    values = {"seq_ids": torch.arange(8), "seq_max": torch.ones(1, 8), "seq_argmax": torch.zeros(1, 8, 1, 2)}
    for u in range(3):
        files.save(u, {"seq_ids": torch.arange(4 * u, 4 * u + 4)})
    files.save_prefix(2, sums, 0, values)
    assert files.prefix_units() == 2 and files.done_in(3) == {0, 1, 2} and not files.path(0).exists()
    files.save(1, {"seq_ids": torch.arange(4, 8)})  # a folded unit whose deletion the crash stopped
    files._write(files.folder / "seqs-000002-000003.safetensors", values, {})  # a segment whose prefix never came
    units, got, segments = files.load_prefix()
    assert units == 2 and torch.equal(got["metric_sum"], sums["metric_sum"]) and len(segments) == 1
    assert torch.equal(segments[0]["seq_ids"], values["seq_ids"])
    assert not files.path(1).exists() and files.path(2).exists()
    assert not (files.folder / "seqs-000002-000003.safetensors").exists()
    other = UnitFiles(tmp_path / "r", {"scan": 2})
    with pytest.raises(HeadvisError, match="belongs to another scan"):
        other.prefix_units()


_UMAP_CLOUD = r"""
import sys
import numpy as np
from headvis.projection import _umap
rng = np.random.default_rng(7)
keys = rng.standard_normal((150, 16)) * rng.uniform(0.5, 2.0, (150, 1))
rows = np.repeat(keys, rng.integers(1, 8, 150), axis=0)  # a K cloud: a key at every edge that reads it
rows = rows[rng.permutation(len(rows))]
np.save(sys.argv[1], _umap(rows, 0))
np.save(sys.argv[2], rows)
"""


def test_umap_of_a_cloud_with_repeated_rows_is_the_same_in_every_process(tmp_path):
    """K and V clouds repeat rows; UMAP is fitted on the distinct ones, so a repeated row gets one point and
    two processes (two runs, or two ranks of a scan) give the same coordinates bit for bit."""
    import subprocess
    import sys

    runs = []
    for run in range(2):
        coords, rows = tmp_path / f"coords{run}.npy", tmp_path / f"rows{run}.npy"
        done = subprocess.run([sys.executable, "-c", _UMAP_CLOUD, str(coords), str(rows)], capture_output=True,
                              text=True, timeout=300, env={**__import__("os").environ, "NUMBA_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append((np.load(coords), np.load(rows)))
    (a, rows), (b, _) = runs
    assert a.shape == (len(rows), 3) and np.isfinite(a).all()
    assert np.array_equal(a, b), "the same coordinates in both processes"
    _, first, where = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    assert np.array_equal(a, a[first[where.reshape(-1)]]), "a repeated row has its row's point"


def test_a_cloud_of_fewer_distinct_rows_than_umap_needs_is_laid_out_exactly():
    """UMAP cannot fit fewer than UMAP_MIN_POINTS points: 3 distinct rows, repeated, get their PCA layout,
    which keeps every distance between them, one point per distinct row."""
    from headvis.projection import _umap

    rng = np.random.default_rng(2)
    distinct = rng.standard_normal((3, 16))
    rows = distinct[[0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2]]
    coords = _umap(rows, 0)
    assert coords.shape == (12, 3)
    for i in range(12):
        for j in range(12):
            assert np.linalg.norm(coords[i] - coords[j]) == pytest.approx(np.linalg.norm(rows[i] - rows[j]), abs=1e-9)
