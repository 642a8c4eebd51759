"""Choosing the row-statistics backend: the torch reference, the Triton kernels or the CPU kernel.

- `torch`: `headvis.kernels.row_stats_ref.ref_row_stats`, plain torch, any device (the reference);
- `triton`: `headvis.kernels.row_stats.tri_row_stats`, fused GPU kernels (CUDA,
  or the CPU under TRITON_INTERPRET=1 for verification);
- `numba`: `headvis.kernels.row_stats_cpu.cpu_row_stats`, a fused CPU loop;
- `auto`: triton on CUDA, numba on the CPU.

All are functions with the signature of `ref_row_stats` returning the same
`RowStats`, so the pipeline above them is one and the same.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from headvis.errors import HeadvisError
from headvis.metrics import RowStats, ref_row_stats

__all__ = ["BACKENDS", "RowStatsFn", "resolve_backend"]

BACKENDS = ("auto", "triton", "numba", "torch")
RowStatsFn = Callable[..., RowStats]


# backend -> (module, function, what to install when the import fails)
_KERNELS = {
    "triton": ("headvis.kernels.row_stats", "tri_row_stats", "pip install triton==3.6.0"),
    "numba": ("headvis.kernels.row_stats_cpu", "cpu_row_stats", "pip install numba"),
}


def _kernel(name: str, fallback: bool) -> tuple[str, RowStatsFn]:
    """The kernel backend `name`; when it cannot be imported, torch if `fallback` (said once), else an error."""
    module, function, install = _KERNELS[name]
    try:
        return name, getattr(importlib.import_module(module), function)
    except ImportError as e:
        why = f"{name} is not importable ({e}); {install}"
    if not fallback:
        raise HeadvisError(f"--backend {name}: {why}")
    print(f"headvis: backend auto -> torch: {why}", flush=True)
    return "torch", ref_row_stats


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
        return _kernel("numba", fallback=name == "auto")
    chosen, fn = _kernel("triton", fallback=name == "auto")
    if chosen == "torch":
        return chosen, fn
    if device.type != "cuda" and not interpreted:
        raise HeadvisError(
            "--backend triton needs --device cuda, or TRITON_INTERPRET=1 to run the kernels "
            "interpreted on the CPU (slow; meant for verification)"
        )
    return chosen, fn
