"""FeatureLibrary over the hand-built dictionary's tables: descriptions, labels, snippet order and shape."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from headvis.errors import HeadvisError
from headvis.features import FeatureLibrary
from headvis.features.collect import N_INTERVALS, TOP_WINDOWS, WINDOW
from headvis.features.describe import quote_token
from headvis.features.library import FEATURES_DIR, FORMAT_VERSION, LABELS_FILE, SNIPPET_KEYS, write_library
from headvis.pipeline import Tokens
from features_helpers import DEAD_FEATURE, NUM_SEQS, SEQ_LEN, TOKEN_FEATURE

NAME = "hand"


@pytest.fixture
def data_root(tmp_path, hand, corpus, tables):
    lm, _, d = hand
    folder = tmp_path / FEATURES_DIR / NAME
    folder.mkdir(parents=True)
    ids = sorted(set(corpus.flatten().tolist()))
    info = {"format_version": FORMAT_VERSION, "dictionary": NAME, "hook": d.hook_name, "d_sae": d.d_sae,
            "n_tokens": tables.n_tokens, "window_before": WINDOW.before, "window_after": WINDOW.after}
    write_library(folder, tables, corpus.numpy(), dict(zip(ids, Tokens(lm.tokenizer)(ids))), info)
    return tmp_path


@pytest.fixture
def library(data_root) -> FeatureLibrary:
    return FeatureLibrary.open(data_root, NAME)


def test_open_none_when_not_computed(tmp_path):
    assert FeatureLibrary.open(tmp_path, "nothing-here") is None
    with pytest.raises(HeadvisError, match="not a dictionary name"):
        FeatureLibrary.open(tmp_path, "../escape")


def test_open_refuses_other_versions_and_broken_files(data_root):
    index = data_root / FEATURES_DIR / NAME / "index.json"
    info = json.loads(index.read_text())
    index.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(HeadvisError, match="format_version 99"):
        FeatureLibrary.open(data_root, NAME)
    index.write_text(json.dumps(info))
    (data_root / FEATURES_DIR / NAME / "features.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadvisError, match="unreadable"):
        FeatureLibrary.open(data_root, NAME)


def test_token_feature_description_and_snippets(library, hand, corpus):
    lm, token, _ = hand
    name = quote_token(Tokens(lm.tokenizer)([token])[0])
    n = int((corpus == token).sum())
    description, snippets = library.describe(TOKEN_FEATURE)
    assert description.startswith(f"fires on {name} (100%); strongest on {name} ({n} of {n} top examples)")
    assert f"active on {100 * n / (NUM_SEQS * SEQ_LEN):.2g}% of {NUM_SEQS * SEQ_LEN:,} tokens" in description
    assert len(snippets) == n
    tokens = Tokens(lm.tokenizer)
    for snippet in snippets:
        assert tuple(snippet) == SNIPPET_KEYS
        seq, pos, start = snippet["sequence_id"], snippet["position"], snippet["start"]
        assert start == max(pos - WINDOW.before, 0)
        assert snippet["tokens"] == tokens(corpus[seq, start:start + len(snippet["tokens"])].tolist())
        assert len(snippet["activations"]) == len(snippet["tokens"]) == min(pos + WINDOW.after, SEQ_LEN - 1) - start + 1
        centre = pos - start
        assert snippet["tokens"][centre] == tokens([token])[0]
        assert [a > 0 for a in snippet["activations"]] == [i == centre for i in range(len(snippet["tokens"]))]
        assert snippet["interval"] == N_INTERVALS


def test_dead_feature(library):
    assert library.describe(DEAD_FEATURE) == (f"never active in {NUM_SEQS * SEQ_LEN:,} tokens", [])
    assert library.statistics(DEAD_FEATURE) == {"count": 0, "frequency": 0.0, "max_activation": 0.0,
                                                "mean_activation": 0.0}


@pytest.mark.parametrize("feature", [2, 3, 4, 5])
def test_snippets_top_first_then_intervals_high_to_low(library, tables, feature):
    snippets = library.snippets(feature)
    n_top = int((tables.top_seq[feature] >= 0).sum())
    assert n_top == TOP_WINDOWS
    top, samples = snippets[:n_top], snippets[n_top:]
    max_activation = float(tables.max_activation[feature])
    assert top[0]["interval"] == N_INTERVALS
    assert [s["interval"] for s in top] == sorted((s["interval"] for s in top), reverse=True)
    centres = [s["activations"][s["position"] - s["start"]] for s in top]
    assert centres == sorted(centres, reverse=True) and centres[0] == pytest.approx(max_activation, rel=1e-5)
    intervals = [s["interval"] for s in samples]
    assert intervals == sorted(intervals, reverse=True) and len(set(intervals)) == len(intervals)  # 1 per interval
    assert all(1 <= i <= N_INTERVALS for i in intervals) and len(samples) >= 5
    for s in samples:  # each sample's own activation lies in its interval
        a = s["activations"][s["position"] - s["start"]]
        assert (s["interval"] - 1) / N_INTERVALS * max_activation < a <= s["interval"] / N_INTERVALS * max_activation * (1 + 1e-6)
    every = library.snippets(feature, per_interval=3)
    assert len(every) == n_top + int((tables.sample_seq[feature] >= 0).sum())


def test_labels_override_and_reload(library, data_root):
    derived = library.description(TOKEN_FEATURE)
    labels = data_root / FEATURES_DIR / NAME / LABELS_FILE
    labels.write_text(json.dumps({str(TOKEN_FEATURE): "the marked token"}))
    assert library.description(TOKEN_FEATURE) == "the marked token"  # re-read on change, no reopen
    assert library.describe(TOKEN_FEATURE)[0] == "the marked token"
    assert library.derived_description(TOKEN_FEATURE) == derived
    assert library.description(2) == library.derived_description(2)
    labels.write_text(json.dumps({str(TOKEN_FEATURE): "renamed", "2": "two"}))
    os.utime(labels, ns=(1, 1))  # a new stamp even within the clock's resolution
    assert library.description(TOKEN_FEATURE) == "renamed" and library.description(2) == "two"
    labels.unlink()
    assert library.description(TOKEN_FEATURE) == derived
    labels.write_text('{"99": "out of range"}')
    with pytest.raises(HeadvisError, match="feature 99 is out of range"):
        library.description(TOKEN_FEATURE)
    with pytest.raises(HeadvisError, match="feature 99 is out of range"):
        FeatureLibrary.open(data_root, NAME)


def test_feature_out_of_range(library):
    for feature in (-1, library.d_sae):
        with pytest.raises(HeadvisError, match="out of range"):
            library.describe(feature)


def test_statistics(library, tables, corpus):
    stats = library.statistics(3)
    assert stats["count"] == int(tables.count[3]) > 0
    assert stats["frequency"] == pytest.approx(tables.count[3] / corpus.numel())
    assert stats["mean_activation"] == pytest.approx(float(tables.total[3]) / int(tables.count[3]))
    assert np.float32(stats["max_activation"]) == tables.max_activation[3]
