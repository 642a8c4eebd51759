"""A rescan into the same --out keeps what people made through the server, or says where it went.

Each test scans a tiny GPT-2 (2 layers x 4 heads) on a small corpus, makes
custom sequences, a projected point and clusters through the real app, stops
it, scans again into the same folder and looks at the new tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio

from headvis.custom import CustomFolder
from headvis.io import read_json, write_json
from headvis.models import load_model
from headvis.rescan import same_model
from headvis.scan import ScanOptions, run_scan
from headvis.schemas import validate_tree
from headvis.server.app import create_app
from headvis.server.state import ServerConfig
from server_helpers import Api

@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}."} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir("gpt2")
    return path, load_model(str(path))


def _scan(tiny, corpus: str, out: Path, capsys=None, **changes) -> list[str]:
    path, lm = tiny
    options = dict(model=str(path), dataset=corpus, seq_len=16, num_seqs=24, batch_size=8, per_interval=2,
                   max_points=40, min_weight=0.0, device="cpu", backend="torch", out=str(out))
    run_scan(ScanOptions(**{**options, **changes}), lm=lm)
    if capsys is None:
        return []
    return [line.removeprefix("headvis: rescan: ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("headvis: rescan: ")]


@pytest_asyncio.fixture
async def made(aiohttp_client, tiny, corpus, tmp_path):
    """A scanned tree with what a user makes: 2 custom sequences, a projected point, 2 clusters on L1H2."""
    out = tmp_path / "data"
    _scan(tiny, corpus, out)
    client = await aiohttp_client(create_app(ServerConfig(data=out, url="http://127.0.0.1:1",
                                                          frontend=tmp_path / "none"), tiny[1]))
    api = Api(client, out)
    ids = []
    for text in ("the lazy dog jumps over the quick fox", "a second prompt of my own"):
        status, reply = await api.post("add_custom_sequence", layer=1, head=2, text=text)
        assert status == 200, reply
        ids.append(reply["sequence_id"])
    status, projected = await api.post("project_to_umap", layer=1, head=2, seq_idx=ids[0], query_pos=4, key_pos=2)
    assert status == 200 and projected["found_in_projected"] is False, projected
    cloud = read_json(out / "umap" / "L1H2.json")
    points = [list(p) for p in zip(cloud["seq_idx"], cloud["top_q"], cloud["top_k"])]
    clusters = [{"name": "scanned", "color": "#ff0000", "points": points[:3]},
                {"name": "mine", "color": "#00ff00", "points": [points[3], [ids[0], 4, 2]]}]
    status, reply = await api.post("save_umap_clusters", layer=1, head=2, clusters=clusters)
    assert status == 200, reply
    records = {rel: await api.data_file(rel) for rel in ("custom_sequences/index.json",
                                                        "custom_sequences/L1H2.json", "custom_sequences/L0H3.json")}
    await client.close()  # the server stops: the tree is free to be replaced
    return out, ids, projected["point"], clusters, records


@pytest.mark.asyncio
async def test_a_rescan_with_the_same_settings_keeps_everything_exactly(made, tiny, corpus, capsys):
    out, ids, point, clusters, records = made
    lines = _scan(tiny, corpus, out, capsys)
    assert "carried 2 of 2 custom sequences, recomputed against the new scan" in lines
    assert "L1H2: kept 2 of 2 clusters" in lines and "L1H2: 1 of 1 projected points carried" in lines
    folder = CustomFolder(out / "custom_sequences")
    assert [e["sequence_id"] for e in folder.listing()] == ids
    for rel, before in records.items():  # the snapshot a static host serves, recomputed: same model, same records
        assert read_json(out / rel) == before, rel
    umap = read_json(out / "umap" / "L1H2.json")
    assert umap["clusters"] == clusters and umap["projected_points"] == [point]
    assert not (out.parent / "data.kept").exists()
    validate_tree(out)


@pytest.mark.asyncio
async def test_a_rescan_of_other_sequences_keeps_the_custom_ones_and_sets_lost_points_aside(made, tiny, corpus, capsys):
    out, ids, point, clusters, records = made
    lines = _scan(tiny, corpus, out, capsys, seq_len=12)  # every scanned sequence now holds other tokens
    assert "carried 2 of 2 custom sequences, recomputed against the new scan" in lines
    umap = read_json(out / "umap" / "L1H2.json")
    # the custom point survives (its sequence is carried, its edge projected again); scanned points do not
    assert umap["clusters"] == [{"name": "mine", "color": "#00ff00", "points": [[ids[0], 4, 2]]}]
    (again,) = umap["projected_points"]
    assert (again["seq_idx"], again["top_q"], again["top_k"], again["tokens"]) == \
        (point["seq_idx"], point["top_q"], point["top_k"], point["tokens"])
    assert "L1H2: kept 1 of 2 clusters (4 points no longer exist)" in lines
    assert "L1H2: clusters 'scanned' lost all their points" in lines
    (kept,) = (out.parent / "data.kept").iterdir()
    assert lines[-1] == f"what could not be carried whole is kept in {kept}"
    assert read_json(kept / "clusters.json") == {"L1H2": {"clusters": clusters, "projected_points": [point]}}
    assert read_json(out / "custom_sequences" / "L1H2.json")["sequences"][0]["seq_len"] == \
        records["custom_sequences/L1H2.json"]["sequences"][0]["seq_len"]  # custom lengths are their own
    validate_tree(out)


@pytest.mark.asyncio
async def test_a_rescan_under_other_weights_keeps_the_custom_sequences_aside(made, tiny, corpus, capsys):
    out, ids, point, clusters, records = made
    config = read_json(out / "config.json")
    config["model"]["weights_sha256"] = "0" * 64  # as if scanned before the checkpoint was retrained
    write_json(out / "config.json", config)
    lines = _scan(tiny, corpus, out, capsys)
    assert "2 custom sequences were made with other weights of" in lines[0]
    assert CustomFolder(out / "custom_sequences").listing() == []
    (kept,) = (out.parent / "data.kept").iterdir()
    assert [e["sequence_id"] for e in CustomFolder(kept / "custom_sequences").listing()] == ids
    assert read_json(kept / "clusters.json")["L1H2"]["clusters"] == clusters
    assert f"what could not be carried whole is kept in {kept}" in lines


@pytest.mark.asyncio
async def test_a_rescan_of_other_heads_sets_the_dropped_heads_work_aside(made, tiny, corpus, capsys):
    out, ids, point, clusters, records = made
    lines = _scan(tiny, corpus, out, capsys, layers="0")
    assert "L1H2 is not scanned any more: 2 clusters, 1 projected points" in lines
    listed = read_json(out / "custom_sequences" / "L0H3.json")["sequences"]
    assert [r["sequence_id"] for r in listed] == ids and not (out / "custom_sequences" / "L1H2.json").exists()
    (kept,) = (out.parent / "data.kept").iterdir()
    assert read_json(kept / "clusters.json")["L1H2"]["clusters"] == clusters


def test_same_model_compares_shape_and_weights_where_both_say():
    model = {"name": "m", "architecture": "gpt2", "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_head": 8,
             "d_model": 32, "causal": True}
    assert same_model(model, {**model, "weights_sha256": "a" * 64})  # a 0.2.0 tree has no digest
    assert not same_model({**model, "weights_sha256": "b" * 64}, {**model, "weights_sha256": "a" * 64})
    assert not same_model(model, {**model, "n_heads": 8})


# -- the scan's folder: stale staging folders, a symlinked --out, no moment without --out

def test_staging_folders_of_killed_scans_are_removed_and_a_live_ones_kept(tiny, corpus, tmp_path, capsys):
    from headvis.lock import TreeLock

    out = tmp_path / "data"
    killed = tmp_path / ".data.staging-killed1"
    (killed / "heads").mkdir(parents=True)
    (killed / "heads" / "L0H0.json").write_text("{")
    live = tmp_path / ".data.staging-live01"
    live.mkdir()
    with TreeLock(live, "scan"):  # the killed one is seconds old: a rerun at once cleans it up
        _scan(tiny, corpus, out)
        assert not killed.exists() and live.exists()
    assert "removed 1 staging folder(s) left beside" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".data")) == [live.name]


def test_a_symlinked_out_stays_a_symlink(tiny, corpus, tmp_path):
    target = tmp_path / "store" / "tree"
    target.parent.mkdir()
    _scan(tiny, corpus, target)
    link = tmp_path / "data"
    link.symlink_to(target)
    _scan(tiny, corpus, link, num_seqs=12)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert read_json(target / "config.json")["dataset"]["n_sequences"] == 12
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tree.staging")]


_WATCH = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
print("watching", flush=True)
while not os.path.exists(stop):
    if not os.path.exists(path):
        print("missing", flush=True)
        break
"""


def test_publishing_never_leaves_a_moment_without_out(tmp_path):
    """A separate process stats --out in a tight loop while a tree is published over it 300 times."""
    from headvis.io import publish_folder

    out = tmp_path / "data"
    out.mkdir()
    (out / "config.json").write_text("{}")
    stop = tmp_path / "stop"
    watcher = subprocess.Popen([sys.executable, "-c", _WATCH, str(out / "config.json"), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    assert watcher.stdout.readline().strip() == "watching"
    for i in range(300):
        staging = tmp_path / f".data.staging-{i}"
        staging.mkdir()
        (staging / "config.json").write_text(str(i))
        publish_folder(staging, out)
    stop.touch()
    assert watcher.wait(timeout=30) == 0
    assert watcher.stdout.read().strip() == "", "--out was missing while a tree was published"
    assert (out / "config.json").read_text() == "299"


def test_a_rescan_over_a_format_1_or_unreadable_tree_copies_its_user_folders_aside(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "data"
    _scan(tiny, corpus, out)
    config = read_json(out / "config.json")
    config["format_version"] = 1
    write_json(out / "config.json", config)
    (out / "custom").mkdir()
    (out / "custom" / "prompt.json").write_text('{"text": "an old prompt"}')
    lines = _scan(tiny, corpus, out, capsys)
    assert lines[0] == "the old tree is format_version 1: nothing is carried"
    (kept,) = (tmp_path / "data.kept").iterdir()
    assert (kept / "custom" / "prompt.json").read_text() == '{"text": "an old prompt"}'
    assert lines[1].endswith(f"are kept in {kept}")

    (out / "config.json").write_text("{")  # a damaged old tree still gets replaced, its folders kept
    lines = _scan(tiny, corpus, out, capsys)
    assert lines[0].startswith("the old tree's files could not be read (JSONDecodeError")
    assert len(list((tmp_path / "data.kept").iterdir())) in (1, 2)  # a second copy, or the same second's folder
    validate_tree(out)
