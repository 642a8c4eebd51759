"""PCA (always) and UMAP (with --umap) of each head's q, k, v and o vectors.

Points are every position >= 1 of a seeded sample of scanned sequences
(position 0 is the BOS token, whose vectors are outliers that would dominate
the first components); the same points serve every head. The PCA rotation
(`mean`, `components`) is saved as JSON beside the head's file so that new
prompts can be projected later (`project_pca`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["VECTORS", "fit_head", "project_pca"]

VECTORS: tuple[str, ...] = ("q", "k", "v", "o")


def _pca(x: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """(coords (n, 2), rotation {mean, components, explained_variance_ratio})."""
    from sklearn.decomposition import PCA

    n_components = min(2, x.shape[0], x.shape[1])
    pca = PCA(n_components=n_components, random_state=seed).fit(x)
    coords = pca.transform(x)
    if n_components < 2:  # degenerate: pad to 2-D so every consumer sees (n, 2)
        coords = np.pad(coords, ((0, 0), (0, 2 - n_components)))
    rotation = {
        "mean": pca.mean_,
        "components": pca.components_,
        "explained_variance_ratio": pca.explained_variance_ratio_,
    }
    return coords, rotation


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    n_neighbors = max(2, min(15, x.shape[0] - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


def fit_head(vectors: dict[str, np.ndarray], *, with_umap: bool, seed: int) -> tuple[dict, dict]:
    """Fit one head. vectors: name -> (n_points, dim). Returns (file fields, rotation)."""
    pca_part: dict = {}
    rotation: dict = {}
    views: dict = {}
    for name in VECTORS:
        x = np.asarray(vectors[name], dtype=np.float64)
        coords, rot = _pca(x, seed)
        pca_part[name] = {"coords": coords, "explained_variance_ratio": rot["explained_variance_ratio"]}
        rotation[name] = {"mean": rot["mean"], "components": rot["components"]}
        if with_umap:
            views[name] = _umap(x, seed)
    fields = {"pca": pca_part}
    if with_umap:
        fields["views"] = {"umap": views}
    return fields, rotation


def project_pca(x: np.ndarray, rotation: dict) -> np.ndarray:
    """(n, dim) new vectors -> (n, 2) coordinates in a saved PCA rotation."""
    mean = np.asarray(rotation["mean"], dtype=np.float64)
    components = np.asarray(rotation["components"], dtype=np.float64)
    coords = (np.asarray(x, dtype=np.float64) - mean) @ components.T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords
