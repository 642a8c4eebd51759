"""`python -m headvis.features` end to end on a tiny scan tree: what it writes, re-runs, and refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headvis.dictionaries import Dictionary, save_dictionary
from headvis.features import FeatureLibrary
from headvis.features.build import build_parser, main
from headvis.features.library import FEATURES_DIR, LABELS_FILE
from headvis.models import load_model
from headvis.scan import ScanOptions, run_scan

SCAN_SEQS, SCAN_LEN = 12, 32
INDEX_KEYS = ["format_version", "headvis_version", "created", "dictionary", "dictionary_path", "hook", "architecture",
              "is_transcoder", "d_in", "d_sae", "k", "model_name", "dataset", "n_tokens", "matches_scan",
              "window_before", "window_after", "top_windows", "n_intervals", "per_interval", "seed",
              "token_counts_exact", "n_dead", "seconds"]
FLAGS = ["--dictionary", "--data", "--num-seqs", "--seq-len", "--batch-size", "--labels", "--device", "--seed"]


def random_topk(d_in: int, d_sae: int = 64, k: int = 4, name: str = "tiny-topk") -> Dictionary:
    g = torch.Generator().manual_seed(1)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    return Dictionary(name=name, path=Path(name), architecture="topk", hook_name="blocks.1.hook_resid_pre",
                      hook_name_out=None, layer=1, hook="resid_pre", d_in=d_in, d_sae=d_sae, d_out=d_in,
                      W_enc=W_enc, b_enc=torch.zeros(d_sae), W_dec=W_enc.T.contiguous(), b_dec=torch.zeros(d_in),
                      threshold=None, k=k, apply_b_dec_to_input=True, model_name=None, is_transcoder=False)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("scan") / "data"
    run_scan(ScanOptions(model=str(tiny_dir), seq_len=SCAN_LEN, num_seqs=SCAN_SEQS, layers="0", heads="0",
                         per_interval=1, out=str(out), device="cpu", backend="torch", max_points=20),
             lm=load_model(str(tiny_dir)))
    return out


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dictionaries")
    save_dictionary(random_topk(32), root / "tiny-topk")
    save_dictionary(random_topk(48, name="wide"), root / "wide")
    return root


@pytest.fixture
def data(scanned, tmp_path) -> Path:
    shutil.copytree(scanned, tmp_path / "data")
    return tmp_path / "data"


def run(capsys, *args) -> tuple[int, list[str]]:
    """(exit code, the lines headvis printed to stderr); progress bars are the other lines."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("headvis")]


def test_flags_are_frozen():
    parser = build_parser()
    assert [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"] == FLAGS


def test_command_writes_the_library(data, dictionaries, capsys):
    code, err = run(capsys, "--dictionary", dictionaries / "tiny-topk", "--data", data, "--device", "cpu")
    assert code == 0, err
    folder = data / FEATURES_DIR / "tiny-topk"
    assert sorted(p.name for p in folder.iterdir()) == ["descriptions.json", "features.safetensors", "index.json",
                                                        "tokens.json"]
    assert [p.name for p in (data / FEATURES_DIR).iterdir()] == ["tiny-topk"]  # no staging left behind
    library = FeatureLibrary.open(data, "tiny-topk")
    assert list(library.info) == INDEX_KEYS
    assert library.info["d_sae"] == 64 and library.info["n_tokens"] == SCAN_SEQS * SCAN_LEN
    assert library.info["matches_scan"] and library.info["hook"] == "blocks.1.hook_resid_pre"
    assert library.info["dataset"]["n_sequences"] == SCAN_SEQS
    # sequence ids are the scan's: every snippet reads the tokens the head file shows for that id
    records = {r["sequence_id"]: r["tokens"] for r in json.loads((data / "heads" / "L0H0.json").read_text())["sequences"]}
    checked = 0
    for feature in range(library.d_sae):
        for s in library.snippets(feature):
            if s["sequence_id"] in records:
                assert s["tokens"] == records[s["sequence_id"]][s["start"]:s["start"] + len(s["tokens"])]
                checked += 1
    assert checked > 10


def test_rerun_replaces_and_keeps_labels(data, dictionaries, tmp_path, capsys, monkeypatch):
    args = ["--dictionary", dictionaries / "tiny-topk", "--data", data, "--device", "cpu"]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"3": "my feature"}))
    assert run(capsys, *args, "--labels", labels)[0] == 0
    folder = data / FEATURES_DIR / "tiny-topk"
    assert json.loads((folder / LABELS_FILE).read_text()) == {"3": "my feature"}
    library = FeatureLibrary.open(data, "tiny-topk")
    assert library.describe(3)[0] == "my feature" != library.derived_description(3)
    first = (folder / "index.json").stat().st_ino
    assert run(capsys, *args, "--seed", "5")[0] == 0  # no --labels: the folder's own labels stay
    assert (folder / "index.json").stat().st_ino != first
    assert json.loads((folder / LABELS_FILE).read_text()) == {"3": "my feature"}
    assert FeatureLibrary.open(data, "tiny-topk").info["seed"] == 5

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("headvis.features.build.write_library", broken)
    code, err = run(capsys, *args, "--seed", "6")
    assert code == 1 and len(err) == 1 and "disk full" in err[0]
    assert FeatureLibrary.open(data, "tiny-topk").info["seed"] == 5  # the previous library is untouched
    assert [p.name for p in (data / FEATURES_DIR).iterdir()] == ["tiny-topk"]


def _labels(tmp_path: Path, text: str) -> Path:
    (tmp_path / "labels.json").write_text(text)
    return tmp_path / "labels.json"


BAD = {
    "no config.json": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", tmp / "empty"], "no config.json"),
    "width": (lambda data, d, tmp: ["--dictionary", d / "wide", "--data", data], "is for d_model 48, the model has 32"),
    "no dictionary": (lambda data, d, tmp: ["--dictionary", tmp / "nope", "--data", data], "no such folder"),
    "labels not json": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", data,
                                              "--labels", _labels(tmp, "{oops")], "not valid JSON"),
    "labels range": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", data,
                                           "--labels", _labels(tmp, '{"64": "x"}')], "feature 64 is out of range"),
    "labels list": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", data,
                                          "--labels", _labels(tmp, '["x"]')], "must be a JSON object"),
    "labels missing": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", data,
                                             "--labels", tmp / "absent.json"], "cannot read"),
    "batch size": (lambda data, d, tmp: ["--dictionary", d / "tiny-topk", "--data", data, "--batch-size", "0"],
                   "--batch-size must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, data, dictionaries, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    make, message = BAD[case]
    code, err = run(capsys, *make(data, dictionaries, tmp_path))
    assert code == 2 and len(err) == 1 and err[0].startswith("headvis: error: ") and message in err[0], err
    assert not (data / FEATURES_DIR).exists()


def test_a_changed_corpus_is_refused(data, dictionaries, capsys):
    head = data / "heads" / "L0H0.json"
    body = json.loads(head.read_text())
    body["sequences"][0]["token_ids"][5] += 1
    head.write_text(json.dumps(body))
    code, err = run(capsys, "--dictionary", dictionaries / "tiny-topk", "--data", data)
    assert code == 2 and len(err) == 1 and "no longer gives the scan's sequence" in err[0]


def test_module_entry_point(tmp_path, dictionaries):
    result = subprocess.run([sys.executable, "-m", "headvis.features", "--dictionary", str(dictionaries / "tiny-topk"),
                             "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"headvis: error: --data {tmp_path}: no config.json "
                                                  f"(run python -m headvis.scan --out {tmp_path} first)"]
