"""FeatureLibrary answers from memory: open and describe timed for d_sae = 4096 (printed, not asserted),
and the reply of an attribution with 100 features stays under 1 MB (asserted)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from headvis.features import FeatureLibrary, collect_features
from headvis.features.collect import WINDOW
from headvis.features.library import FEATURES_DIR, FORMAT_VERSION, write_library

D_SAE, K, N_SEQS, SEQ_LEN, BATCH = 4096, 32, 64, 64, 8


def synthetic_batches(desc: str):
    """TopK-like activations: K random features per token, the same batches in both passes."""
    for start in range(0, N_SEQS, BATCH):
        g = torch.Generator().manual_seed(start)
        token_ids = torch.randint(0, 500, (BATCH, SEQ_LEN), generator=g)
        acts = torch.zeros(BATCH, SEQ_LEN, D_SAE)
        index = torch.rand(BATCH, SEQ_LEN, D_SAE, generator=g).topk(K, dim=-1).indices
        acts.scatter_(-1, index, torch.rand(BATCH, SEQ_LEN, K, generator=g) * 10)
        yield torch.arange(start, start + BATCH), token_ids, acts


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    tables = collect_features(synthetic_batches, d_sae=D_SAE, vocab=500, seq_len=SEQ_LEN, seed=0)
    corpus = np.concatenate([t.numpy() for _, t, _ in synthetic_batches("corpus")])
    folder = root / FEATURES_DIR / "synthetic"
    folder.mkdir(parents=True)
    info = {"format_version": FORMAT_VERSION, "dictionary": "synthetic", "d_sae": D_SAE, "n_tokens": tables.n_tokens,
            "window_before": WINDOW.before, "window_after": WINDOW.after}
    write_library(folder, tables, corpus, {i: f" tok{i}" for i in range(500)}, info)
    return root


def test_describe_answers_in_milliseconds(data_root, capsys):
    start = time.perf_counter()
    library = FeatureLibrary.open(data_root, "synthetic")
    opened = time.perf_counter() - start
    features = np.random.default_rng(0).integers(0, D_SAE, 300)
    times = []
    for f in features:
        start = time.perf_counter()
        description, snippets = library.describe(int(f))
        times.append(time.perf_counter() - start)
        assert description and 1 <= len(snippets) <= 8 + 10  # top windows + one per interval
    reply = [library.describe(int(f)) for f in features[:100]]
    size = len(json.dumps([{"description": d, "snippets": s} for d, s in reply], separators=(",", ":")))
    with capsys.disabled():
        print(f"\nFeatureLibrary d_sae={D_SAE}: open {1000 * opened:.1f} ms, describe median "
              f"{1000 * float(np.median(times)):.3f} ms, max {1000 * max(times):.3f} ms; "
              f"100 features' snippets {size / 1e6:.2f} MB")
    assert size < 1_000_000
