"""The TopK trainer: it learns a known sparse dictionary, and the CLI writes a loadable SAELens 6 folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headvis import train_dictionary
from headvis.dictionaries import load_dictionary
from headvis.dictionaries.training import (TopKConfig, evaluate, geometric_median, shuffled_batches, to_dictionary,
                                           train_topk)
from headvis.train_dictionary import build_parser, main

FLAGS = {"--layer", "--hook", "--out", "--model", "--dataset", "--split", "--text-column", "--d-sae", "--k",
         "--tokens", "--seq-len", "--batch-tokens", "--lr", "--seed", "--device", "--held-out-seqs",
         "--dead-tokens", "--buffer-tokens"}
TRAINING_KEYS = {"headvis_version", "created", "model", "dataset", "split", "text_column", "hook_name", "layer",
                 "hook", "architecture", "d_in", "d_sae", "k", "seq_len", "batch_tokens", "lr", "seed", "steps",
                 "train_tokens", "train_unique_tokens", "epochs", "input_scale", "dead_tokens", "dead_fraction",
                 "held_out", "device", "wall_s"}


def test_flags_are_frozen():
    found = {s for action in build_parser()._actions for s in action.option_strings} - {"-h", "--help"}
    assert found == FLAGS


def test_geometric_median_ignores_an_outlier():
    points = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [0, 0], [100, 0]])
    median = geometric_median(points)
    assert points.mean(dim=0).norm() > 16
    assert median.norm() < 0.3


@pytest.mark.parametrize("capacity", [2000, 300], ids=["fits", "mixing"])
def test_shuffled_batches_hand_out_each_row_once_per_epoch(capacity):
    rows = torch.arange(1000, dtype=torch.float32)[:, None]  # (1000, 1): row i holds i
    reads = []

    def chunks(epoch):
        reads.append(epoch)
        return [rows[i:i + 64] for i in range(0, 1000, 64)]

    stream = shuffled_batches(chunks, 1000, capacity, 50, torch.Generator().manual_seed(0))
    seen = torch.cat([next(stream) for _ in range(19)]).flatten()  # 950 rows: within epoch 0 either way
    assert len(set(seen.tolist())) == 950
    assert seen[:50].tolist() != list(range(50)), "batches must be shuffled"
    if capacity >= 1000:
        assert reads == [0]
        more = torch.cat([next(stream) for _ in range(21)]).flatten()  # the rest of epoch 0 and all of epoch 1
        assert sorted(more[-1000:].tolist()) == list(range(1000)) and reads == [0], "a stream that fits is read once"


def _synthetic(n: int, g: torch.Generator, features: torch.Tensor, active: int) -> torch.Tensor:
    """x = codes @ features * 3 + 1: `active` features per row, magnitudes in [0.5, 2.5]."""
    idx = torch.rand(n, len(features), generator=g).argsort(dim=-1)[:, :active]
    codes = torch.zeros(n, len(features)).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ features * 3.0 + 1.0


def test_recovers_a_known_sparse_dictionary():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, 32, generator=g)
    features /= features.norm(dim=-1, keepdim=True)  # 64 unit directions in 32 dimensions, 3 active per row
    train, held = _synthetic(30_000, g, features, 3), _synthetic(4000, g, features, 3)
    cfg = TopKConfig(d_in=32, d_sae=128, k=3, steps=600, lr=3e-3, dead_tokens=2000)
    result = train_topk(shuffled_batches(lambda epoch: [train], len(train), len(train), 256, g), cfg, seed=0)
    d = to_dictionary(result, 3, path=Path("synthetic"), hook_name="blocks.0.hook_resid_pre", model_name=None)
    scores = evaluate(d, held)
    assert scores["fvu"] < 0.1, scores
    assert scores["l0"] <= 3
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(128))
    recovered = (features @ d.W_dec.T).max(dim=1).values  # best cosine of each true feature with a latent
    assert (recovered > 0.9).float().mean() >= 0.9, recovered
    assert result.scale == pytest.approx(1 / train[:result.steps * 256].norm(dim=-1).mean().item(), rel=0.1)


def test_untrained_directions_do_not_reconstruct():
    """The FVU test above can fail: a dictionary of random directions leaves most variance unexplained."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, 32, generator=g)
    features /= features.norm(dim=-1, keepdim=True)
    held = _synthetic(2000, g, features, 3)
    cfg = TopKConfig(d_in=32, d_sae=128, k=3, steps=1, lr=1e-12, dead_tokens=2000)
    result = train_topk(iter([held[:256]]), cfg, seed=0)
    d = to_dictionary(result, 3, path=Path("untrained"), hook_name="blocks.0.hook_resid_pre", model_name=None)
    assert evaluate(d, held)["fvu"] > 0.5


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))} for i in range(120)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


def _short_run(model: str, corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--dataset", corpus, "--layer", "1", "--hook", "resid_pre", "--out", str(out),
            "--d-sae", "64", "--k", "4", "--tokens", "4096", "--seq-len", "32", "--batch-tokens", "256",
            "--held-out-seqs", "8", "--dead-tokens", "1024", *extra]


def test_short_run_writes_a_saelens_6_dictionary(tiny_model_dir, corpus, tmp_path, capsys):
    model = str(tiny_model_dir("mistral"))
    out = tmp_path / "dicts" / "L1"
    assert main(_short_run(model, corpus, out)) == 0
    printed = capsys.readouterr().out
    assert "held-out (248 tokens): FVU" in printed  # 8 held-out sequences x 31 tokens (BOS excluded)
    d = load_dictionary(out)
    assert (d.architecture, d.k, d.d_in, d.d_sae, d.hook_name, d.layer, d.model_name) == \
        ("topk", 4, 32, 64, "blocks.1.hook_resid_pre", 1, model)
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(64))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["model_name"] == model
    report = json.loads((out / "training.json").read_text())
    assert set(report) == TRAINING_KEYS
    assert report["held_out"]["sequences"] == 8 and report["held_out"]["tokens"] == 248
    assert 0 <= report["held_out"]["fvu"] < 1.0 and 0 < report["held_out"]["l0"] <= 4
    assert report["steps"] == 16 and report["train_tokens"] == 4096
    assert report["train_unique_tokens"] % 31 == 0 and 0 <= report["dead_fraction"] <= 1

    # run again into the same folder: replaced whole, nothing left beside it
    assert main(_short_run(model, corpus, out, "--seed", "1")) == 0
    assert json.loads((out / "training.json").read_text())["seed"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["L1"]


def test_held_out_sequences_are_never_trained_on():
    train, held = train_dictionary._split(100, 8, seed=3)
    assert len(held) == 8 and len(train) == 92
    assert set(train.tolist()).isdisjoint(held.tolist()) and set(train.tolist()) | set(held.tolist()) == set(range(100))
    assert torch.equal(train_dictionary._split(100, 8, seed=3)[1], held)


def test_interrupted_run_leaves_nothing(tiny_model_dir, corpus, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_dictionary, "train_topk", interrupted)
    out = tmp_path / "dicts" / "L1"
    assert main(_short_run(str(tiny_model_dir("mistral")), corpus, out)) == 130
    assert "no dictionary was written" in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--hook", "resid_foo"], "--hook must be one of resid_pre, resid_mid, resid_post"),
    (["--k", "0"], "--k must be at least 1"),
    (["--k", "65"], "--k 65 exceeds --d-sae 64"),
    (["--tokens", "100"], "less than one batch"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--layer", "-1"], "--layer must be at least 0"),
    (["--layer", "2"], "--layer 2 is out of range (the model has 2 layers: 0-1)"),
    (["--hook", "resid_mid", "--layer", "0"], "parallel residual"),
    (["--held-out-seqs", "500"], "none left for training"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flags_exit_2_with_one_line(tiny_model_dir, corpus, tmp_path, capsys, flags, message):
    model = str(tiny_model_dir("gpt_neox"))  # parallel residual: no resid_mid
    out = tmp_path / "o"
    assert main([*_short_run(model, corpus, out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # progress bars: blank once closed
    assert err[-1].startswith("headvis: error: ") and message in err[-1], err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_refuses_an_out_it_must_not_replace(tiny_model_dir, corpus, tmp_path, capsys, kind):
    out = tmp_path / "taken"
    if kind == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert main(_short_run(str(tiny_model_dir("mistral")), corpus, out)) == 2
    assert "headvis: error: " in capsys.readouterr().err
    assert (out.read_text() if kind == "file" else (out / "keep.txt").read_text()) == "x"


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--out", "x"])
    assert info.value.code == 2 and "--layer" in capsys.readouterr().err
