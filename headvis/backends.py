"""Choosing the row-statistics backend: the torch reference, the Triton kernels or the CPU kernel.

- `torch`: `headvis.metrics.ref_row_stats`, plain torch, any device (the reference);
- `triton`: `headvis.kernels.row_stats.tri_row_stats`, fused GPU kernels (CUDA,
  or the CPU under TRITON_INTERPRET=1 for verification);
- `numba`: `headvis.kernels.row_stats_cpu.cpu_row_stats`, a fused CPU loop;
- `auto`: triton on CUDA, numba on the CPU.

All are functions with the signature of `ref_row_stats` returning the same
`RowStats`, so the pipeline above them is one and the same.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from headvis.errors import HeadvisError
from headvis.metrics import RowStats, ref_row_stats

__all__ = ["BACKENDS", "RowStatsFn", "resolve_backend"]

BACKENDS = ("auto", "triton", "numba", "torch")
RowStatsFn = Callable[..., RowStats]


def _triton_fn() -> tuple[RowStatsFn | None, str]:
    try:
        from headvis.kernels.row_stats import tri_row_stats
    except ImportError as e:
        return None, f"triton is not importable ({e}); install it with pip install triton==3.6.0"
    return tri_row_stats, ""


def _numba_fn() -> tuple[RowStatsFn | None, str]:
    try:
        from headvis.kernels.row_stats_cpu import cpu_row_stats
    except ImportError as e:
        return None, f"numba is not importable ({e})"
    return cpu_row_stats, ""


def resolve_backend(name: str, device: torch.device) -> tuple[str, RowStatsFn]:
    """(backend name for config.json, function). `auto` = triton on CUDA, numba on the CPU."""
    if name not in BACKENDS:
        raise HeadvisError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if name == "torch":
        return "torch", ref_row_stats
    if name == "numba" or (name == "auto" and device.type != "cuda"):
        if device.type != "cpu":
            raise HeadvisError("--backend numba runs on the CPU only: use --device cpu")
        fn, why = _numba_fn()
        if fn is None:
            if name == "auto":
                print(f"headvis: backend auto -> torch: {why}", flush=True)
                return "torch", ref_row_stats
            raise HeadvisError(f"--backend numba: {why}")
        return "numba", fn
    fn, why = _triton_fn()
    if fn is None:
        if name == "auto":
            print(f"headvis: backend auto -> torch: {why}", flush=True)
            return "torch", ref_row_stats
        raise HeadvisError(f"--backend triton: {why}")
    if device.type != "cuda" and not interpreted:
        raise HeadvisError(
            "--backend triton needs --device cuda, or TRITON_INTERPRET=1 to run the kernels "
            "interpreted on the CPU (slow; meant for verification)"
        )
    return "triton", fn
