"""PCA (always) and UMAP (with --umap) of each head's q, k, v and o vectors.

Points are every position >= 1 of a seeded sample of scanned sequences
(position 0 is the BOS token, whose vectors are outliers that would dominate
the first components); the same points serve every head. The PCA rotation
(`mean`, `components`) is saved as JSON beside the head's file so that new
prompts can be projected later (`project_pca`).

On CUDA, when cupy and cuML are installed (`pip install headvis[gpu]`), the
fits run on the GPU: the vectors stay on the device and reach cuML through
DLPack. Otherwise scikit-learn and umap-learn fit them on the CPU. The scan
says once which it uses.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

__all__ = ["VECTORS", "GpuLibraries", "fit_head", "gpu_libraries", "project_pca"]

GpuLibraries = tuple[ModuleType, ModuleType]  # (cupy, cuml)

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


def gpu_libraries() -> GpuLibraries | None:
    """(cupy, cuml) when both import, else None."""
    try:
        import cuml
        import cupy
    except ImportError:
        return None
    return cupy, cuml


def _fit_gpu(x, libs: GpuLibraries, with_umap: bool, seed: int) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """PCA (and UMAP) with cuML on a device tensor handed over by DLPack; results back on the host."""
    cupy, cuml = libs
    data = cupy.from_dlpack(x.contiguous())
    n_components = min(2, data.shape[0], data.shape[1])
    pca = cuml.PCA(n_components=n_components, output_type="numpy")
    coords = np.asarray(pca.fit_transform(data), dtype=np.float64)
    if n_components < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - n_components)))
    rotation = {name: np.asarray(getattr(pca, name + "_"), dtype=np.float64)
                for name in ("mean", "components", "explained_variance_ratio")}
    umap_coords = None
    if with_umap:
        n_neighbors = max(2, min(15, data.shape[0] - 1))
        reducer = cuml.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, output_type="numpy")
        umap_coords = np.asarray(reducer.fit_transform(data), dtype=np.float64)
    return coords, rotation, umap_coords


def fit_head(vectors: dict, *, with_umap: bool, seed: int, gpu: GpuLibraries | None = None) -> tuple[dict, dict]:
    """Fit one head. vectors: name -> (n_points, dim) array, or device tensor with `gpu`.

    Returns (the file's `pca` and `views` fields, the rotation).
    """
    pca_part: dict = {}
    rotation: dict = {}
    views: dict = {}
    for name in VECTORS:
        if gpu is not None:
            coords, rot, umap_coords = _fit_gpu(vectors[name], gpu, with_umap, seed)
        else:
            x = np.asarray(vectors[name], dtype=np.float64)
            coords, rot = _pca(x, seed)
            umap_coords = _umap(x, seed) if with_umap else None
        pca_part[name] = {"coords": coords, "explained_variance_ratio": rot["explained_variance_ratio"]}
        rotation[name] = {"mean": rot["mean"], "components": rot["components"]}
        if with_umap:
            views[name] = umap_coords
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
