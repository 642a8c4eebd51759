"""PCA (always) and UMAP (with --umap) of each head's Q, K, V and O vectors, 3 components each.

The points are the head's strong attention edges gathered in pass 2
(`headvis.pipeline.ProjectionPoints`). Each vector space is fitted on its
own. PCA: `batched_pca` fits every cloud of a layer (all heads, Q/K/V/O) in
one batched eigendecomposition in torch (covariances formed in the vectors'
precision, float32 for the scan's, decomposed in float64), on the scan's device;
`_pca` is its per-cloud numpy reference; both equal scikit-learn's within
float tolerance (tested). The PCA rotation (`mean`, `components`) is saved as
JSON beside the head's file so that new edges can be projected later
(`project_pca`).

UMAP: on CUDA, when cupy and cuML are installed (`pip install headvis[gpu]`),
cuML fits it on the GPU, the vectors handed over through DLPack; otherwise
umap-learn on the CPU. The scan says once which.
"""

from __future__ import annotations

import contextlib
from types import ModuleType

import numpy as np
import torch

__all__ = ["COMPONENTS", "UMAP_MIN_POINTS", "UMAP_VIEW", "VECTORS", "GpuLibraries", "batched_pca", "columns",
           "fit_head", "gpu_libraries", "project_pca", "small_linalg"]

GpuLibraries = tuple[ModuleType, ModuleType]  # (cupy, cuml)

VECTORS: tuple[str, ...] = ("Q", "K", "V", "O")
COMPONENTS = 3  # d0, d1, d2
UMAP_VIEW = {"n_neighbors": 15, "min_dist": 0.1}  # the one UMAP view the scan fits
UMAP_MIN_POINTS = 5  # fewer points: no UMAP view for that head (PCA only)


def columns(coords: np.ndarray) -> dict[str, np.ndarray]:
    """(n, COMPONENTS) -> {"d0": (n,), "d1": (n,), "d2": (n,)}."""
    return {f"d{i}": coords[:, i] for i in range(COMPONENTS)}


def _pad(coords: np.ndarray) -> np.ndarray:
    """Degenerate fits (fewer points or dimensions than COMPONENTS) padded with zero columns."""
    return np.pad(coords, ((0, 0), (0, COMPONENTS - coords.shape[1]))) if coords.shape[1] < COMPONENTS else coords


def _pca(x: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """(coords (n, 3), {mean, components (c, dim), explained_variance_ratio (3,)}), float64 numpy.

    scikit-learn's PCA, computed directly: the top eigenvectors of the centred
    covariance (an SVD of the centred data when there are fewer points than
    dimensions), each component's sign fixed so its largest-magnitude entry is
    positive (scikit-learn's `svd_flip` on the components). For these shapes
    scikit-learn picks a randomized solver with LU power iterations (~0.5 s per
    2000 x 576 cloud on this CPU); this is ~1 ms at d_head columns. numpy, not
    torch: torch's eigh on a 64 x 64 matrix takes ~35 ms with 2 threads on a
    busy 2-core machine, 0.6 ms with one. `seed` is unused (the solution is
    exact) and kept for the GPU path's signature.
    """
    data = np.asarray(x, dtype=np.float64)
    n, dim = data.shape
    c = min(COMPONENTS, n, dim)
    mean = data.mean(0)
    centred = data - mean
    total = float((centred * centred).sum())
    if n >= dim:
        values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending
        values, components = np.clip(values[::-1][:c], 0, None), vectors[:, ::-1][:, :c].T
    else:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        values, components = singular[:c] ** 2, vt[:c]
    pivot = np.abs(components).argmax(1)
    components = components * np.sign(components[np.arange(c), pivot])[:, None]
    ratio = np.pad(values / total if total > 0 else np.zeros(c), (0, COMPONENTS - c))
    return _pad(centred @ components.T), {"mean": mean, "components": components, "explained_variance_ratio": ratio}


@contextlib.contextmanager
def small_linalg(device: torch.device):
    """One CPU thread for batches of small matrices: with 2 threads on a busy 2-core machine, torch's eigh of
    36 64 x 64 matrices took 740 ms, with one 38 ms (the threads wait on each other more than they work); a
    layer's PCA in the scan took 18-119 ms with two, 22-30 ms with one (measured)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batched_pca(clouds: list[torch.Tensor]) -> list[tuple[np.ndarray, dict]]:
    """`_pca` of many clouds at once: [(coords (n_i, 3), {mean, components, explained_variance_ratio})].

    clouds: (n_i, dim) each, dim shared, on one device, n_i >= 1. Each cloud is centred and its covariance
    X^T X formed in the cloud's precision (float32 and narrower clouds in float32, as scikit-learn fits
    float32 data; float64 ones in float64); the clouds differ in n_i but not in dim, so the (b, dim, dim) covariances stack and
    one `torch.linalg.eigh` call decomposes them all (float64). The top
    min(3, n_i, dim) eigenvectors are the components, signs as scikit-learn's `svd_flip` sets them (each
    component's largest-magnitude entry positive); ratios are eigenvalues over the total variance.
    """
    if not clouds:
        return []
    device = clouds[0].device
    with small_linalg(device):
        return _batched_pca(clouds, device)


def _batched_pca(clouds: list[torch.Tensor], device: torch.device) -> list[tuple[np.ndarray, dict]]:
    data = [c.to(torch.float64 if c.dtype == torch.float64 else torch.float32) for c in clouds]
    means = [x.mean(0) for x in data]  # (dim,) each
    centred = [x - m for x, m in zip(data, means)]
    cov = torch.stack([c.T @ c for c in centred]).to(torch.float64)  # (b, dim, dim)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values = values.flip(-1).clamp_min(0.0)  # (b, dim) descending
    vectors = vectors.flip(-1)[:, :, :COMPONENTS].transpose(1, 2)  # (b, <=3, dim): rows are components
    totals = cov.diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy()  # (b,) trace = total variance x (n - 1)
    k_of = [min(COMPONENTS, *x.shape) for x in data]
    pivot = vectors.abs().argmax(-1, keepdim=True)  # (b, 3, 1)
    vectors = vectors * torch.sign(vectors.gather(-1, pivot))  # svd_flip: each row's largest entry positive
    values, host_vectors = values.cpu().numpy(), vectors.cpu().numpy()
    out = []
    for i, (c, mean, k) in enumerate(zip(centred, means, k_of)):
        components = host_vectors[i, :k]  # (k, dim)
        ratio = values[i, :k] / totals[i] if totals[i] > 0 else np.zeros(k)
        coords = (c @ vectors[i, :k].T.to(c.dtype)).cpu().numpy().astype(np.float64)
        out.append((_pad(coords), {"mean": mean.cpu().numpy().astype(np.float64), "components": components,
                                   "explained_variance_ratio": np.pad(ratio, (0, COMPONENTS - k))}))
    return out


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    """UMAP coordinates of the rows of x, fitted on its distinct rows (a repeated row gets its row's point).

    K and V clouds repeat a key at every edge that reads it (a third of the rows are distinct in a SmolLM2
    K cloud); on repeated rows umap-learn's result changed from one process to the next with the same seed
    and input (measured), so a scan's UMAP views differed between runs and between numbers of processes.
    Fewer than UMAP_MIN_POINTS distinct rows (UMAP cannot fit them) are laid out by their PCA, which keeps every
    distance between at most 4 points.
    """
    import umap

    distinct, where = np.unique(x, axis=0, return_inverse=True)
    where = where.reshape(-1)
    if len(distinct) < UMAP_MIN_POINTS:  # too few for UMAP: at most 4 points, which 3 PCA axes hold exactly
        return _pca(distinct, seed)[0][where]
    n_neighbors = min(UMAP_VIEW["n_neighbors"], distinct.shape[0] - 1)
    reducer = umap.UMAP(n_components=COMPONENTS, n_neighbors=n_neighbors, min_dist=UMAP_VIEW["min_dist"],
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(distinct)[where]


def gpu_libraries() -> GpuLibraries | None:
    """(cupy, cuml) when both import, else None."""
    try:
        import cuml
        import cupy
    except ImportError:
        return None
    return cupy, cuml


def _umap_gpu(x, libs: GpuLibraries, seed: int) -> np.ndarray:
    """UMAP with cuML on a device tensor handed over by DLPack; coordinates back on the host."""
    cupy, cuml = libs
    data = cupy.from_dlpack(x.contiguous())
    n_neighbors = min(UMAP_VIEW["n_neighbors"], data.shape[0] - 1)
    reducer = cuml.UMAP(n_components=COMPONENTS, n_neighbors=n_neighbors, min_dist=UMAP_VIEW["min_dist"],
                        random_state=seed, output_type="numpy")
    return np.asarray(reducer.fit_transform(data), dtype=np.float64)


def fit_head(vectors: dict, *, n_points: int, with_umap: bool, seed: int,
             gpu: GpuLibraries | None = None, bases: dict[str, np.ndarray] | None = None,
             pca: dict[str, tuple[np.ndarray, dict]] | None = None) -> tuple[dict, dict]:
    """Fit one head. vectors: Q/K/V/O -> (n_points, dim) array or tensor; {} when n_points = 0.

    Returns (the umap file's `norms`, `pca`, `pca_explained_variance` and,
    when UMAP was fitted, `views` fields; the rotation Q/K/V/O -> {mean, components}).
    An empty cloud gives empty columns and an empty rotation. UMAP needs
    UMAP_MIN_POINTS points; a smaller cloud gets no `views`. bases: name ->
    (dim, r) orthonormal columns when that vector is given as its (n, r)
    coordinates in them (O, see `ProjectionPoints.cloud`): the fit runs on the
    coordinates and the rotation is mapped back to the full space. pca: name ->
    a `batched_pca` result already computed for the vector (the scan fits a
    layer at once); absent names are fitted here with `_pca`. gpu: (cupy,
    cuML) for UMAP on a device tensor.
    """
    bases = bases or {}
    pca = pca or {}
    if n_points == 0:
        empty = {f"d{i}": [] for i in range(COMPONENTS)}
        return ({"norms": [], "pca": {name: dict(empty) for name in VECTORS},
                 "pca_explained_variance": {name: [0.0] * COMPONENTS for name in VECTORS}}, {})
    with_umap = with_umap and n_points >= UMAP_MIN_POINTS
    pca_part, ratios, rotation, embeddings = {}, {}, {}, {}
    for name in VECTORS:
        v = vectors[name]
        host = lambda: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)  # noqa: E731
        coords, rot = pca[name] if name in pca else _pca(host(), seed)
        pca_part[name] = columns(coords)
        ratios[name] = rot["explained_variance_ratio"]
        basis = bases.get(name)
        if basis is None:
            rotation[name] = {"mean": rot["mean"], "components": rot["components"]}
        else:  # back to the full space: x = y @ basis.T
            rotation[name] = {"mean": np.asarray(rot["mean"]) @ basis.T,
                              "components": np.asarray(rot["components"]) @ basis.T}
        if with_umap:
            umap_coords = _umap_gpu(torch.as_tensor(v), gpu, seed) if gpu is not None else _umap(host(), seed)
            embeddings[name] = columns(umap_coords)
    q = vectors["Q"]
    norms = np.linalg.norm(np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q, dtype=np.float64), axis=1)
    fields = {"norms": norms, "pca": pca_part, "pca_explained_variance": ratios}
    if with_umap:
        fields["views"] = [{**UMAP_VIEW, "embeddings": embeddings}]
    return fields, rotation


def project_pca(x: np.ndarray, rotation: dict) -> np.ndarray:
    """(n, dim) new vectors -> (n, 3) coordinates in a saved PCA rotation."""
    mean = np.asarray(rotation["mean"], dtype=np.float64)
    components = np.asarray(rotation["components"], dtype=np.float64)
    return _pad((np.asarray(x, dtype=np.float64) - mean) @ components.T)
