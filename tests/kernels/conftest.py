"""Kernel tests run natively on CUDA; without it, under Triton's CPU interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton.
Should triton have been imported earlier anyway (this folder run with another
root conftest), its Python modules are imported afresh here so that every jit
function is an interpreted one; the compiled extension (`triton._C`) is kept.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [n for n in sys.modules if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C")]
    for name in stale + ["headvis.kernels.row_stats"]:
        sys.modules.pop(name, None)
