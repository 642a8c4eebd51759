"""The command line: flags, selections, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from headvis.errors import HeadvisError
from headvis.scan import build_parser, main, parse_selection

# Frozen public flags (CONTRACT section 5 plus headvis' own).
FLAGS = {
    "--model", "--dataset", "--split", "--text-column", "--seq-len", "--num-seqs", "--batch-size", "--layers",
    "--heads", "--out", "--device", "--device-map", "--tp", "--backend", "--top-k", "--min-weight", "--per-interval", "--umap",
    "--no-umap", "--seed", "--max-points", "--resume", "--no-resume", "--keep-memory", "--unit-size",
}


def test_flags_are_frozen():
    parser = build_parser()
    found = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    assert found == FLAGS


@pytest.mark.parametrize("text, expected", [
    ("all", list(range(6))), ("3", [3]), ("0-3", [0, 1, 2, 3]), ("1,4-5", [1, 4, 5]), (" 2 , 2 ", [2]),
])
def test_parse_selection(text, expected):
    assert parse_selection(text, 6, "layers") == expected


@pytest.mark.parametrize("text", ["6", "-1", "3-1", "a", "1,,2", "0-9"])
def test_parse_selection_rejects(text):
    with pytest.raises(HeadvisError, match="--heads"):
        parse_selection(text, 6, "heads")


@pytest.fixture
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))  # n_positions = 128


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}."} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _fails_cleanly(capsys, out, expected: str, *args):
    code, err = run_main(capsys, *args, "--out", str(out))
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert lines[-1].startswith("headvis: error: ") and expected in lines[-1], err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written on bad input"
    assert not list(out.parent.glob(f".{out.name}.staging-*")), "staging folder left behind"


def test_unknown_hub_model(capsys, tmp_path, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "cannot load model 'no-such-org/no-such-model'",
                   "--model", "no-such-org/no-such-model", "--dataset", corpus)


def test_missing_model_folder(capsys, tmp_path, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "does not exist", "--model", str(tmp_path / "nowhere"), "--dataset", corpus)


def test_unknown_hub_dataset(capsys, tmp_path, gpt2_dir):
    _fails_cleanly(capsys, tmp_path / "o", "cannot load dataset 'no-such-org/no-such-dataset'",
                   "--model", gpt2_dir, "--dataset", "no-such-org/no-such-dataset")


def test_missing_dataset_file(capsys, tmp_path, gpt2_dir):
    _fails_cleanly(capsys, tmp_path / "o", "does not exist", "--model", gpt2_dir,
                   "--dataset", str(tmp_path / "missing.jsonl"))


def test_missing_text_column(capsys, tmp_path, gpt2_dir, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "no text column 'body'", "--model", gpt2_dir, "--dataset", corpus,
                   "--text-column", "body")


def test_missing_parquet_column(capsys, tmp_path, gpt2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["some text"] * 5}), path)
    _fails_cleanly(capsys, tmp_path / "o", "no text column 'text'", "--model", gpt2_dir, "--dataset", str(path))


def test_layer_out_of_range(capsys, tmp_path, gpt2_dir, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "--layers: 2 is out of range (the model has 2 layers: 0-1)",
                   "--model", gpt2_dir, "--dataset", corpus, "--layers", "0-2")


def test_head_out_of_range(capsys, tmp_path, gpt2_dir, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "--heads: 4 is out of range", "--model", gpt2_dir, "--dataset", corpus,
                   "--heads", "4")


def test_seq_len_beyond_context(capsys, tmp_path, gpt2_dir, corpus):
    _fails_cleanly(capsys, tmp_path / "o", "exceeds the model's context of 128", "--model", gpt2_dir,
                   "--dataset", corpus, "--seq-len", "129")


def test_empty_corpus(capsys, tmp_path, gpt2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    _fails_cleanly(capsys, tmp_path / "o", "no full sequence", "--model", gpt2_dir, "--dataset", str(empty))


def test_empty_folder_corpus(capsys, tmp_path, gpt2_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    _fails_cleanly(capsys, tmp_path / "o", "holds no", "--model", gpt2_dir, "--dataset", str(folder))


def test_unwritable_out(capsys, tmp_path, gpt2_dir, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _fails_cleanly(capsys, blocker / "data", "cannot write to --out", "--model", gpt2_dir, "--dataset", corpus)


def test_refuses_to_replace_a_foreign_folder(capsys, tmp_path, gpt2_dir, corpus):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, err = run_main(capsys, "--model", gpt2_dir, "--dataset", corpus, "--out", str(precious))
    assert code == 2 and "not a headvis data tree" in err
    assert (precious / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("flag, value, expected", [
    ("--seq-len", "1", "--seq-len must be at least 2"),
    ("--num-seqs", "0", "--num-seqs must be at least 1"),
    ("--min-weight", "1.5", "--min-weight must be in [0, 1]"),
    ("--device", "tpu", "--device must be cpu or cuda"),
])
def test_bad_numbers(capsys, tmp_path, flag, value, expected):
    _fails_cleanly(capsys, tmp_path / "o", expected, flag, value)


def test_triton_without_cuda_or_interpreter(capsys, tmp_path, gpt2_dir, corpus, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _fails_cleanly(capsys, tmp_path / "o", "--backend triton needs --device cuda", "--model", gpt2_dir,
                   "--dataset", corpus, "--backend", "triton", "--device", "cpu")


def test_small_scan_of_other_architecture_and_folder_corpus(capsys, tmp_path, tiny_model_dir):
    """A bidirectional model over a folder of .txt files: a full tree, negative distance bins."""
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / ("sub" if i % 2 else ".") / f"d{i}.txt").write_text(f"document {i} " * 40, encoding="utf-8")
    out = tmp_path / "tree"
    code, err = run_main(capsys, "--model", str(tiny_model_dir("bert")), "--dataset", str(folder),
                         "--seq-len", "16", "--num-seqs", "30", "--per-interval", "1", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["causal"] is False and config["dataset"]["n_sequences"] == 30
    head = json.loads((out / "heads" / "L1H3.json").read_text())
    assert head["qk_distance_histogram"]["bin_edges"][0] < 0
    assert sum(head["interval_counts"]) == 30
    from headvis.schemas import validate_tree

    assert validate_tree(out) > 0


def test_umap_view_and_rotation_reproduce_the_saved_coordinates(capsys, tmp_path, tiny_model_dir, corpus):
    """--umap adds a 3-D UMAP view; the saved PCA rotation maps the edges' vectors onto their coordinates."""
    import numpy as np
    import torch

    from headvis.capture import CaptureSession
    from headvis.models import load_model, output_projections
    from headvis.pipeline import HeadSelection, head_vectors
    from headvis.projection import project_pca

    model_dir = str(tiny_model_dir("gpt2"))
    out = tmp_path / "u"
    code, err = run_main(capsys, "--model", model_dir, "--dataset", corpus, "--seq-len", "24", "--num-seqs", "12",
                         "--layers", "1", "--heads", "2", "--umap", "--max-points", "40", "--out", str(out))
    assert code == 0, err
    body = json.loads((out / "umap" / "L1H2.json").read_text())
    n = len(body["seq_idx"])
    assert 0 < n <= 40 + 12 and len(body["top_q"]) == len(body["top_k"]) == len(body["norms"]) == n
    (view,) = body["views"]
    assert (view["n_neighbors"], view["min_dist"]) == (15, 0.1)
    assert set(view["embeddings"]) == {"Q", "K", "V", "O"}
    assert all(len(view["embeddings"]["O"][d]) == n for d in ("d0", "d1", "d2"))
    assert json.loads((out / "config.json").read_text())["projection"]["methods"] == ["pca", "umap"]

    rotation = json.loads((out / "umap" / "L1H2.rotation.json").read_text())
    head = json.loads((out / "heads" / "L1H2.json").read_text())
    token_ids = {s["sequence_id"]: s["token_ids"] for s in head["sequences"]}
    seq_order = sorted(set(body["seq_idx"]))
    ids = torch.tensor([token_ids[s] for s in seq_order])
    lm = load_model(model_dir)
    rows = torch.tensor([seq_order.index(s) for s in body["seq_idx"]])
    got = {}
    selection = HeadSelection([1], [2], lm.info.n_heads, lm.info.n_kv_heads)
    with CaptureSession(lm.model, {1}, lambda c: got.update(head_vectors(
            c, selection, output_projections(lm.model)[1], rows, torch.tensor(body["top_q"]), torch.tensor(body["top_k"])))) as s:
        s.run(ids)
    assert np.allclose(np.linalg.norm(got[2]["Q"], axis=1), body["norms"], rtol=1e-4)
    for vector in ("Q", "K", "V", "O"):
        coords = project_pca(got[2][vector], rotation[vector])
        saved = np.stack([body["pca"][vector][d] for d in ("d0", "d1", "d2")], axis=1)
        assert np.allclose(coords, saved, atol=2e-3 * (1 + np.abs(coords).max())), vector


def test_killed_scan_resumes_where_it_stopped(capsys, tmp_path, gpt2_dir, corpus, monkeypatch):
    """Ctrl-C during pass 1 keeps the finished units; the same command then scans only the rest, same tree."""
    import headvis.pipeline as pipeline

    args = ["--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "24", "--batch-size", "4",
            "--per-interval", "1", "--max-points", "20", "--unit-size", "4"]
    clean = tmp_path / "clean"
    assert run_main(capsys, *args, "--out", str(clean))[0] == 0

    real_pass = pipeline.metric_pass
    units = []

    def killed_pass(*a, after_unit, **kw):
        def after(u, state):
            after_unit(u, state)
            units.append(u)
            if len(units) == 3:
                raise KeyboardInterrupt
        real_pass(*a, after_unit=after, **kw)

    monkeypatch.setattr("headvis.scan.metric_pass", killed_pass)
    out = tmp_path / "resumed"
    code, err = run_main(capsys, *args, "--out", str(out))
    assert code == 130 and "resumes pass 1" in err
    saved = sorted(p.name for p in (tmp_path / ".resumed.resume").glob("unit-*.safetensors"))
    assert not out.exists() and saved == [f"unit-{u:06d}.safetensors" for u in range(3)]
    assert (tmp_path / ".resumed.tokens" / "tokens.bin").is_file(), "the corpus's token rows stay for the resume"

    monkeypatch.setattr("headvis.token_store.pack_blocks", lambda *a, **kw: pytest.fail("tokenized again"))
    monkeypatch.setattr("headvis.scan.metric_pass", real_pass)
    scanned = []
    monkeypatch.setattr("headvis.scan.metric_pass", lambda *a, units, **kw: (
        scanned.append([u for u, _ in units]), real_pass(*a, units=units, **kw)))
    code = main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "resuming pass 1: 12 of 24 sequences already scanned" in printed
    assert scanned == [[3, 4, 5]]
    assert not (tmp_path / ".resumed.resume").exists(), "a finished scan removes its saved units"
    assert not (tmp_path / ".resumed.tokens").exists(), "and its token rows"
    for name in ("scatter_data.json", "heads/L1H2.json"):
        a = json.loads((clean / name).read_text())
        b = json.loads((out / name).read_text())
        assert a == b, name


def test_device_map_spreads_the_model_and_scans_the_same_tree(capsys, tmp_path, gpt2_dir, corpus, monkeypatch):
    """--device-map loads through transformers' device_map (on the CPU: every layer on the CPU) and
    the tree is the one of a plain load."""
    import transformers

    args = ["--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "12", "--batch-size", "4",
            "--per-interval", "1", "--max-points", "20"]
    assert run_main(capsys, *args, "--out", str(tmp_path / "plain"))[0] == 0
    placed = []
    real = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda *a, **kw: (placed.append(kw.get("device_map")), real(*a, **kw))[1])
    assert run_main(capsys, *args, "--device-map", "auto", "--out", str(tmp_path / "mapped"))[0] == 0
    assert placed == [{"": "cpu"}]  # the scan runs on the CPU here: the map is the CPU, whatever accelerate sees
    for name in ["scatter_data.json", *(f"heads/{p.name}" for p in (tmp_path / "plain" / "heads").iterdir())]:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "mapped" / name).read_bytes(), name
    with pytest.raises(SystemExit) as stopped:  # argparse's one-line usage error, as for any flag
        main([*args, "--device-map", "everywhere", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "argument --device-map: invalid choice" in err and "Traceback" not in err


def test_a_damaged_saved_unit_is_refused_with_the_way_out(capsys, tmp_path, gpt2_dir, corpus, monkeypatch):
    import headvis.pipeline as pipeline

    args = ["--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "8", "--batch-size", "4",
            "--unit-size", "4", "--out", str(tmp_path / "o")]
    real_pass = pipeline.metric_pass

    def killed_pass(*a, after_unit, **kw):
        def after(u, state):
            after_unit(u, state)
            raise KeyboardInterrupt
        real_pass(*a, after_unit=after, **kw)

    monkeypatch.setattr("headvis.scan.metric_pass", killed_pass)
    assert run_main(capsys, *args)[0] == 130
    (tmp_path / ".o.resume" / "unit-000000.safetensors").write_bytes(b"torn")
    monkeypatch.setattr("headvis.scan.metric_pass", real_pass)
    code, err = run_main(capsys, *args)
    assert code == 2 and "the saved unit 0 is unreadable" in err and ".o.resume" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_checkpoint_of_another_scan_is_discarded(capsys, tmp_path, gpt2_dir, corpus):
    stale = tmp_path / ".o.resume"
    stale.mkdir()
    (stale / "key.json").write_text('{"model": "something else"}')
    (stale / "state.safetensors").write_bytes(b"not a tensor file")
    code, _ = run_main(capsys, "--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "8",
                       "--out", str(tmp_path / "o"))
    assert code == 0 and not stale.exists()


def test_a_retrained_model_under_the_same_name_does_not_resume_the_old_statistics(capsys, tmp_path, gpt2_dir, corpus,
                                                                                   monkeypatch):
    """The units' key holds the weights' digest: `--model ./ckpt` retrained in place scans again from 0."""
    import shutil

    import headvis.pipeline as pipeline
    from transformers import AutoModel

    model_dir = tmp_path / "ckpt"
    shutil.copytree(gpt2_dir, model_dir)
    args = ["--model", str(model_dir), "--dataset", corpus, "--seq-len", "16", "--num-seqs", "24", "--batch-size", "4",
            "--per-interval", "1", "--max-points", "20", "--unit-size", "4", "--out", str(tmp_path / "o")]
    real_pass = pipeline.metric_pass

    def killed_pass(*a, after_unit, **kw):
        def after(u, state):
            after_unit(u, state)
            if u >= 2:
                raise KeyboardInterrupt
        real_pass(*a, after_unit=after, **kw)

    monkeypatch.setattr("headvis.scan.metric_pass", killed_pass)
    assert run_main(capsys, *args)[0] == 130
    model = AutoModel.from_pretrained(model_dir)  # "retrained": one weight changed, same name, same shape
    with torch.no_grad():
        model.h[0].attn.c_attn.weight[0, 0] += 0.5
    model.save_pretrained(model_dir)

    scanned = []
    monkeypatch.setattr("headvis.scan.metric_pass", lambda *a, units, **kw: (
        scanned.append(sum(len(ids) for _, ids in units)), real_pass(*a, units=units, **kw)))
    code = main(args)
    printed = capsys.readouterr().out
    assert code == 0 and "checkpoint of another scan was found and is discarded" in printed
    assert scanned == [24], "the old statistics were resumed"
    digest = json.loads((tmp_path / "o" / "config.json").read_text())["model"]["weights_sha256"]
    assert len(digest) == 64


def test_heads_with_no_strong_edge_get_an_empty_projection(capsys, tmp_path, gpt2_dir, corpus):
    """--min-weight 1.0 leaves every cloud empty: the scan still writes every umap file (no points, no rotation)."""
    out = tmp_path / "o"
    code, err = run_main(capsys, "--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "8",
                         "--min-weight", "1.0", "--out", str(out))
    assert code == 0, err
    umap = json.loads((out / "umap" / "L0H0.json").read_text())
    assert umap["seq_idx"] == [] and umap["clusters"] == [] and umap["projected_points"] == []


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("keep", ["1024", "0.05", "0"])
def test_pass_1_keeps_the_rows_it_can_and_the_tree_is_the_same(capsys, tmp_path, gpt2_dir, corpus, keep, backend):
    """--keep-memory only moves work between the passes: every file equals the two-pass scan's (--keep-memory 0)."""
    args = ["--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs", "40", "--batch-size", "4",
            "--per-interval", "2", "--max-points", "30", "--backend", backend]
    code, _ = run_main(capsys, *args, "--keep-memory", "0", "--out", str(tmp_path / "two_pass"))
    assert code == 0
    code = main([*args, "--keep-memory", keep, "--out", str(tmp_path / "kept")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    ran, shown = (int(x) for x in re.search(r"pass 2 ran (\d+) of (\d+) shown sequences", printed).groups())
    if keep == "1024":  # everything fits: no second forward pass
        assert ran == 0, printed
    elif keep == "0.05":  # room for a few sequences beside each head's top interval: some run again, not all
        assert 0 < ran < shown, printed
    else:  # nothing kept: pass 2 runs every shown sequence
        assert ran == shown, printed
    files = sorted(p.relative_to(tmp_path / "two_pass") for p in (tmp_path / "two_pass").rglob("*.json"))
    assert files == sorted(p.relative_to(tmp_path / "kept") for p in (tmp_path / "kept").rglob("*.json"))
    for rel in files:
        a, b = (json.loads((tmp_path / tree / rel).read_text()) for tree in ("two_pass", "kept"))
        if rel.name == "config.json":
            a.pop("created"), b.pop("created")
        assert a == b, rel


def test_a_second_scan_of_the_same_out_stops_before_it_touches_anything(capsys, tmp_path, gpt2_dir, corpus):
    """The resume folder's lock comes first: a second scan neither tokenizes into nor clears the running one's
    files beside --out (with --no-resume too)."""
    from headvis.lock import TreeLock

    running = TreeLock(tmp_path / ".o.resume", "scan")
    (tmp_path / ".o.resume").mkdir()
    running.acquire()
    (tmp_path / ".o.resume" / "unit-000000.safetensors").write_bytes(b"the running scan's")
    try:
        for extra in ([], ["--no-resume"]):
            code, err = run_main(capsys, "--model", gpt2_dir, "--dataset", corpus, "--seq-len", "16", "--num-seqs",
                                 "8", "--out", str(tmp_path / "o"), *extra)
            assert code == 2 and "another scan of the same --out is running" in err, err
            assert not (tmp_path / ".o.tokens").exists()
            assert (tmp_path / ".o.resume" / "unit-000000.safetensors").read_bytes() == b"the running scan's"
    finally:
        running.release()
