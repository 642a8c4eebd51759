"""One scan across processes: the same tree, byte for byte, from 1, 2 or 3 ranks, from torchrun, and after a resume.

Ranks run as threads of one process here (each `run_scan` with its own `Ranks`, a threading barrier between
the passes; the capture serializes their forward passes), and as a real `torchrun --standalone
--nproc-per-node 2` (gloo on the loopback) against the same command without torchrun.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from headvis.distributed import Ranks
from headvis.scan import ScanOptions, run_scan

SEQ_LEN, NUM_SEQS, BATCH, UNIT = 16, 22, 2, 4  # 6 units, the last one half full: uneven across 2 and 4 ranks


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    return tiny_model_dir("gpt2")


@pytest.fixture(scope="module")
def tiny_lm(gpt2):
    from headvis.models import load_model

    return load_model(str(gpt2), device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist-corpus") / "corpus.jsonl"
    rows = [{"text": f"row {i}: a quick brown fox jumps over {i % 5} lazy dogs, then {i * 7 % 11} cats."}
            for i in range(80)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def options(gpt2: Path, corpus: Path, out: Path, **changes) -> ScanOptions:
    return ScanOptions(model=str(gpt2), dataset=str(corpus), seq_len=SEQ_LEN, num_seqs=NUM_SEQS, batch_size=BATCH,
                       unit_size=UNIT, per_interval=1, max_points=30, out=str(out), device="cpu", **changes)


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file of a tree by relative path; config.json without its `created` time."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".headvis.lock":
            data = path.read_bytes()
            if path.name == "config.json" and path.parent == root:
                config = json.loads(data)
                config.pop("created")
                data = json.dumps(config, sort_keys=True).encode()
            files[str(path.relative_to(root))] = data
    return files


def assert_same_tree(a: Path, b: Path) -> None:
    fa, fb = tree_files(a), tree_files(b)
    assert sorted(fa) == sorted(fb)
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files differ: {differ[:5]}"


def ranked_scan(opts: ScanOptions, lm, world: int) -> Path:
    """`world` ranks as threads with a shared barrier; rank 0 writes the tree, the others return None."""
    import threading

    barrier = threading.Barrier(world, timeout=300)
    returned: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            returned[r] = run_scan(opts, lm, Ranks(rank=r, world=world, wait=barrier.wait))
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            returned[r] = e
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(world):
        if isinstance(returned[r], BaseException):
            raise returned[r]
    assert all(returned[r] is None for r in range(1, world)), "only rank 0 writes the tree"
    return returned[0]


@pytest.fixture(scope="module")
def one_process(gpt2, corpus, tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-one") / "tree"
    run_scan(options(gpt2, corpus, out), tiny_lm, Ranks())
    return out


@pytest.mark.parametrize("world, keep_memory", [(2, 1024.0), (3, 1024.0), (4, 1024.0), (2, 0.0)],
                         ids=["2", "3", "4", "2-no-kept-rows"])
def test_ranks_give_the_one_process_tree_byte_for_byte(world, keep_memory, gpt2, corpus, tiny_lm, one_process,
                                                       tmp_path):
    """Pass 1 split by units, pass 2 by the units of the shown sequences (from rows kept in pass 1 or run again)."""
    out = tmp_path / "tree"
    ranked_scan(options(gpt2, corpus, out, keep_memory=keep_memory), tiny_lm, world)
    assert_same_tree(one_process, out)
    assert not (tmp_path / ".tree.resume").exists(), "the finished scan removed its units"


def test_a_killed_scan_resumes_with_another_number_of_processes(gpt2, corpus, tiny_lm, one_process, tmp_path,
                                                                 monkeypatch):
    import headvis.pipeline as pipeline

    out = tmp_path / "tree"
    real_pass = pipeline.metric_pass

    def killed_pass(*a, after_unit, **kw):
        def after(u, state):
            after_unit(u, state)
            if u == 2:
                raise KeyboardInterrupt
        real_pass(*a, after_unit=after, **kw)

    monkeypatch.setattr("headvis.scan.metric_pass", killed_pass)
    with pytest.raises(KeyboardInterrupt):
        run_scan(options(gpt2, corpus, out), tiny_lm, Ranks())
    assert sorted(p.name for p in (tmp_path / ".tree.resume").glob("unit-*")) == [
        f"unit-{u:06d}.safetensors" for u in range(3)]
    monkeypatch.setattr("headvis.scan.metric_pass", real_pass)
    ranked_scan(options(gpt2, corpus, out), tiny_lm, world=2)  # units 3, 4, 5 left: rank 1 takes 3 and 5
    assert_same_tree(one_process, out)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # torchrun's default for its ranks
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_with_two_processes_writes_the_tree_of_one(gpt2, corpus, tmp_path):
    flags = ["--model", str(gpt2), "--dataset", str(corpus), "--seq-len", str(SEQ_LEN), "--num-seqs", str(NUM_SEQS),
             "--batch-size", str(BATCH), "--unit-size", str(UNIT), "--per-interval", "1", "--max-points", "30",
             "--device", "cpu"]
    alone = _run([sys.executable, "-m", "headvis.scan", *flags, "--out", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ran = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "headvis.scan", *flags, "--out", str(tmp_path / "two")], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("headvis: scanned 22 sequences") == 1, "one summary: rank 0's"
    assert_same_tree(tmp_path / "alone", tmp_path / "two")

    bad = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "headvis.scan", *flags, "--layers", "99", "--out", str(tmp_path / "bad")], tmp_path)
    assert bad.returncode != 0
    assert "headvis: rank 0: error: " in bad.stderr and "headvis: rank 1: error: " in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_each_process_of_a_machine_spreads_its_model_over_its_own_share_of_the_gpus():
    from headvis.distributed import replica_gpus
    from headvis.errors import HeadvisError

    assert [replica_gpus(r, 4, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [replica_gpus(r, 3, 8) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]  # GPUs 6 and 7 stay idle
    assert replica_gpus(0, 1, 8) == list(range(8))
    with pytest.raises(HeadvisError, match="9 processes on this machine share 8 GPU"):
        replica_gpus(0, 9, 8)


def test_rank_0_reads_the_other_ranks_rows_a_layer_at_a_time_and_the_ranks_share_the_fits(gpt2, corpus, tiny_lm,
                                                                                          one_process, tmp_path,
                                                                                          monkeypatch):
    """Pass 2's files are one per rank and layer. Rank 0 reads layer L's only after writing layer L - 1's head
    files, so it never holds more than one layer of the other ranks' rows; the projections are fitted layer i
    by rank i % world, each from every rank's edges of that layer (2 ranks, 2 layers: one each)."""
    import threading

    import headvis.scan as scan

    events: dict[int, list] = {}  # thread -> its own events, in order
    real_load, real_write = scan.load_pass2, scan.write_json

    def record(event):
        events.setdefault(threading.get_ident(), []).append(event)

    def load(path, points, **kw):
        record(("read", int(path.name.split("-L")[1].split(".")[0]), int(path.name.split("-")[1])))
        return real_load(path, points, **kw)

    def write(path, body, **kw):
        if path.parent.name in ("heads", "umap") and path.name.startswith("L"):
            record((f"wrote {path.parent.name}", int(path.name[1:].split("H")[0])))
        return real_write(path, body, **kw)

    monkeypatch.setattr(scan, "load_pass2", load)
    monkeypatch.setattr(scan, "write_json", write)
    out = tmp_path / "tree"
    ranked_scan(options(gpt2, corpus, out), tiny_lm, 2)
    assert_same_tree(one_process, out)
    squeeze = lambda seq: [e for i, e in enumerate(seq) if i == 0 or e != seq[i - 1]]  # noqa: E731
    by_thread = [squeeze(seq) for seq in events.values()]
    assert tiny_lm.info.n_layers == 2 and len(by_thread) == 2
    rank_0 = next(seq for seq in by_thread if ("wrote heads", 0) in seq)
    other = next(seq for seq in by_thread if seq is not rank_0)
    # rank 0: rank 1's layer 0 (rows and edges: it fits layer 0), its head and umap files, then rank 1's
    # layer 1 (rows only) and its head files; rank 1 fits layer 1 from rank 0's edges of it
    assert rank_0 == [("read", 0, 1), ("wrote heads", 0), ("wrote umap", 0), ("read", 1, 1), ("wrote heads", 1)]
    assert other == [("read", 1, 0), ("wrote umap", 1)]


@pytest.mark.parametrize("first_world, world", [(1, 2), (2, 3)])
def test_a_folded_prefix_bounds_the_resume_folder_and_resumes_to_the_same_tree(first_world, world, gpt2, corpus,
                                                                              tiny_lm, one_process, tmp_path,
                                                                              monkeypatch):
    """With a prefix snapshot after every fold, the folded units' files go (their sums in `prefix.safetensors`,
    their per-sequence values in segments); a scan killed after unit 2 resumes from the prefix with another
    number of processes, and every tree is the one-process tree."""
    import headvis.pipeline as pipeline

    monkeypatch.setattr("headvis.scan.snapshot_due", lambda folded_bytes, prefix_bytes: True)
    whole = tmp_path / "whole"
    ranked_scan(options(gpt2, corpus, whole), tiny_lm, world) if world > 1 else None
    if world > 1:
        assert_same_tree(one_process, whole)

    out = tmp_path / "tree"
    real_pass = pipeline.metric_pass
    seen = {}

    def killed_pass(*a, after_unit, **kw):
        def after(u, state):
            after_unit(u, state)
            if u == 2 * first_world:  # rank 0's units are 0, W, 2W: 2W is its third
                seen["files"] = sorted(p.name for p in (tmp_path / ".tree.resume").glob("*.safetensors"))
                raise KeyboardInterrupt
        real_pass(*a, after_unit=after, **kw)

    monkeypatch.setattr("headvis.scan.metric_pass", killed_pass)
    with pytest.raises(KeyboardInterrupt):
        if first_world == 1:
            run_scan(options(gpt2, corpus, out), tiny_lm, Ranks())
        else:
            ranked_scan(options(gpt2, corpus, out), tiny_lm, first_world)
    names = seen["files"]
    assert "prefix.safetensors" in names and any(n.startswith("seqs-000000-") for n in names), names
    prefix = max(int(n.split("-")[2][:6]) for n in names if n.startswith("seqs-"))  # the segments end there
    assert prefix >= 1 and not [n for n in names if n.startswith("unit-") and int(n[5:11]) < prefix], names
    monkeypatch.setattr("headvis.scan.metric_pass", real_pass)
    ranked_scan(options(gpt2, corpus, out), tiny_lm, world)
    assert_same_tree(one_process, out)


def test_a_corpus_of_three_shards_scanned_by_two_ranks_is_the_one_process_tree(gpt2, tiny_lm, tmp_path):
    """Rank 0 alone packs the shards, in sorted order, into the token store the others read: sequence id N is
    the same text whatever the shard count and the number of processes."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in (2, 0, 1):  # written out of order: read sorted
        rows = [{"text": f"shard {s} row {i}: the {i % 4} brown foxes meet {s * 3 + i % 7} grey wolves."}
                for i in range(30)]
        (shards / f"part-{s:02d}.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    run_scan(options(gpt2, shards, one), tiny_lm, Ranks())
    ranked_scan(options(gpt2, shards, two), tiny_lm, 2)
    assert_same_tree(one, two)
    config = json.loads((one / "config.json").read_text())
    assert config["dataset"]["n_sequences"] == NUM_SEQS


def _numbers_close(a, b, where: str = "") -> None:
    """The same JSON structure, strings and integers equal, floats within float tolerance (TP sums in another
    order; the tree then differs in the last printed digits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _numbers_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


def _tp_scan(flags: list[str], out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`headvis.scan` of `flags` under `torchrun --nproc-per-node 2 ... --tp 2` into `out`."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "headvis.scan", *flags, "--tp", "2", "--out", str(out)], cwd)


def _alone_and_tp(flags: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The scan of `flags` in one process (tmp_path/alone) and under --tp 2 (tmp_path/tp), both succeeding;
    the --tp run."""
    alone = _run([sys.executable, "-m", "headvis.scan", *flags, "--out", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ran = _tp_scan(flags, tmp_path / "tp", tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran


def test_tensor_parallel_over_two_processes_writes_the_tree_of_one_within_float_tolerance(tiny_model_dir, corpus,
                                                                                           tmp_path):
    """--tp 2 (transformers' tp plan, gloo): each process holds 2 of the 4 query heads and 1 of the 2 kv heads;
    rank 0 gathers them in global head order. Every file of the one-process tree is there with the same
    structure and numbers within float tolerance, and every head's metrics are its own (heads differ by more
    than the tolerance, so a swapped mapping fails)."""
    llama = tiny_model_dir("llama")
    flags = ["--model", str(llama), "--dataset", str(corpus), "--seq-len", str(SEQ_LEN), "--num-seqs",
             str(NUM_SEQS), "--batch-size", str(BATCH), "--unit-size", str(UNIT), "--per-interval", "1",
             "--max-points", "30", "--device", "cpu"]
    ran = _alone_and_tp(flags, tmp_path)
    assert ran.stdout.count("headvis: scanned 22 sequences") == 1, "one summary: rank 0's"
    one, tp = tmp_path / "alone", tmp_path / "tp"
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*.json"))
    assert names == sorted(str(p.relative_to(tp)) for p in tp.rglob("*.json"))
    for name in names:
        a, b = json.loads((one / name).read_text()), json.loads((tp / name).read_text())
        if name == "config.json":
            for config in (a, b):
                config.pop("created")
                assert len(config["model"].pop("weights_sha256")) == 64  # of the shards' digests under --tp
        _numbers_close(a, b, name)
    metrics = {(r["layer"], r["head"]): r for r in json.loads((one / "scatter_data.json").read_text())}
    for layer in (0, 1):  # (initializer_range 0.5: heads far from uniform attention, each its own pattern)
        own = [metrics[(layer, h)]["pattern_entropy"] for h in range(4)]
        assert min(abs(x - y) for i, x in enumerate(own) for y in own[i + 1:]) > 1e-3, f"heads tell apart: {own}"

    # the same command again over a tree with a user's projected point: rank 0 alone cannot run the split model,
    # so the old tree's user folders are kept aside whole (not recomputed), and the scan succeeds
    umap_file = tp / "umap" / "L1H3.json"
    body = json.loads(umap_file.read_text())
    body["projected_points"] = [{"label": "mine", "x": 0.0, "y": 0.0, "z": 0.0}]
    umap_file.write_text(json.dumps(body))
    again = _tp_scan(flags, tp, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--tp: the old tree's custom sequences and projected points are not recomputed" in again.stdout
    kept = [json.loads(p.read_text()) for p in (tmp_path / "tp.kept").rglob("L1H3.json") if p.parent.name == "umap"]
    assert [k["projected_points"][0]["label"] for k in kept] == ["mine"]

    no_plan = _tp_scan([*flags, "--model", str(tiny_model_dir("gpt2"))], tmp_path / "gpt2", tmp_path)
    assert no_plan.returncode != 0
    assert "has no tensor-parallel plan" in no_plan.stderr and "--device-map auto" in no_plan.stderr, \
        no_plan.stderr[-2000:]
    assert "headvis: rank 0: error: " in no_plan.stderr and "headvis: rank 1: error: " in no_plan.stderr

    whole = _tp_scan([*flags, "--model", str(tiny_model_dir("gpt_oss"))], tmp_path / "gpt_oss", tmp_path)
    assert whole.returncode != 0 and "does not split its attention by heads" in whole.stderr, whole.stderr[-2000:]
    assert "internal error" not in whole.stderr


def test_two_tensor_parallel_groups_side_by_side_write_the_tree_of_one_process(tiny_model_dir, corpus, tmp_path):
    """4 processes under --tp 2: two groups of 2 (transformers' (dp_replicate, tp) mesh), each a model replica
    taking half the units, each process computing its own heads. With --keep-memory 0 pass 2 runs every shown
    sequence on the group whose unit holds it, its helper mirroring the leader's batches; the tree is the
    one-process tree within float tolerance, the model digest that of one group (resumable at 2 processes);
    and with pass 1 keeping the rows (the default), pass 2 runs nothing and the tree is the same."""
    llama = tiny_model_dir("llama")
    flags = ["--model", str(llama), "--dataset", str(corpus), "--seq-len", str(SEQ_LEN), "--num-seqs",
             str(NUM_SEQS), "--batch-size", str(BATCH), "--unit-size", str(UNIT), "--per-interval", "1",
             "--max-points", "30", "--device", "cpu", "--keep-memory", "0"]
    alone = _run([sys.executable, "-m", "headvis.scan", *flags, "--out", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ran = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                "-m", "headvis.scan", *flags, "--tp", "2", "--out", str(tmp_path / "groups")], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    shown = re.search(r"pass 2 ran the shown sequences that pass 1 did not keep on 2 groups of 2 processes "
                      r"\((\d+) on rank 0\)", ran.stdout)
    assert shown and 0 < int(shown[1]), ran.stdout[-2000:]
    one, groups = tmp_path / "alone", tmp_path / "groups"
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*.json"))
    assert names == sorted(str(p.relative_to(groups)) for p in groups.rglob("*.json"))
    for name in names:
        a, b = json.loads((one / name).read_text()), json.loads((groups / name).read_text())
        if name == "config.json":
            for config in (a, b):
                config.pop("created")
                digest = config["model"].pop("weights_sha256")
        _numbers_close(a, b, name)
    pair = _tp_scan(flags, tmp_path / "pair", tmp_path)  # one group of 2: the same digest (a resume can switch)
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert json.loads((tmp_path / "pair" / "config.json").read_text())["model"]["weights_sha256"] == digest
    # pass 1 keeping every shown row (each group's leader keeps its units' rows, gathers its helper's edges)
    kept = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                 "-m", "headvis.scan", *flags[:-2], "--tp", "2", "--out", str(tmp_path / "kept")], tmp_path)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "(0 on rank 0)" in kept.stdout, kept.stdout[-2000:]
    for name in names:
        if name != "config.json":
            _numbers_close(json.loads((one / name).read_text()), json.loads((tmp_path / "kept" / name).read_text()),
                           f"kept/{name}")


def test_tensor_parallel_gathers_the_attention_sinks_with_their_heads(tiny_model_dir, corpus, tmp_path):
    """A model with one sink logit per query head (granite_swa: -2..3), its sinks split with the heads under
    --tp 2, and heads 1-3 scanned: process 0 computes and keeps head 1's statistics and rows, process 1 heads 2
    and 3's; rank 0 gathers them. The tree is the one-process tree within float tolerance; then with
    --keep-memory 0, pass 2 runs every shown sequence, gathering sinks with their heads: the same again."""
    flags = ["--model", str(tiny_model_dir("granite_swa")), "--dataset", str(corpus), "--seq-len", str(SEQ_LEN),
             "--num-seqs", str(NUM_SEQS), "--batch-size", str(BATCH), "--per-interval", "1", "--max-points", "30",
             "--heads", "1-3", "--device", "cpu"]
    ran = _alone_and_tp(flags, tmp_path)
    shown = re.search(r"pass 2 ran 0 of (\d+) shown sequences again \(pass 1 kept ([\d,]+) of the ([\d,]+) ",
                      ran.stdout)
    assert shown and int(shown[1]) > 0 and shown[2] == shown[3], ran.stdout[-2000:]  # rank 0 kept every head's rows
    rerun = _tp_scan([*flags, "--keep-memory", "0"], tmp_path / "tp2", tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    shown = re.search(r"pass 2 ran (\d+) of (\d+) shown sequences again", rerun.stdout)
    assert shown and shown[1] == shown[2], rerun.stdout[-2000:]
    for tree in ("tp", "tp2"):
        for name in ("scatter_data.json", "heads/L0H3.json", "heads/L1H1.json", "umap/L1H2.json"):
            _numbers_close(json.loads((tmp_path / "alone" / name).read_text()),
                           json.loads((tmp_path / tree / name).read_text()), f"{tree}/{name}")


def test_tp_asks_for_whole_groups_of_torchrun_processes(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    from headvis.errors import HeadvisError

    with pytest.raises(HeadvisError, match=r"torchrun --nproc-per-node 2 -m headvis.scan \.\.\. --tp 2"):
        Ranks.from_env("cpu", tp=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(HeadvisError, match="must make whole groups of 2 .*run a multiple of 2 processes"):
        Ranks.from_env("cpu", tp=2)
