"""A full disk: the scan says so in one line and leaves --out as it was; the server answers 507 and loses nothing.

The scan runs on a real full file system: a small tmpfs mounted in a private
mount namespace (`unshare -rm`, no root needed where user namespaces are on).
The server's full disk is injected (ENOSPC from the file writes), since it
must fail at one exact write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import headvis.custom
import headvis.io
from headvis.custom import CustomFolder
from headvis.io import read_json
from server_helpers import Api

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

_IN_NAMESPACE = r"""
set -u
mount -t tmpfs -o size=32m tmpfs "$1" || exit 99
shift
out="$MNT/data"
"$@" --out "$out" >/dev/null 2>&1 || { echo "first scan failed"; exit 98; }
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null  # fill the disk, then free 192 KiB: less than a tree
truncate -s -192k "$MNT/filler"
"$@" --out "$out" >/dev/null 2>"$MNT/../err.txt"
echo "rc=$?"
ls -a "$MNT"
python3 -c "import json,sys; print('n_sequences', json.load(open(sys.argv[1]))['dataset']['n_sequences'])" "$out/config.json"
"""


def _can_mount_tmpfs() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                           text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"


def test_a_scan_on_a_full_disk_is_one_line_and_leaves_the_old_tree(tmp_path, tiny_model_dir):
    reason = _can_mount_tmpfs()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the full-disk test")
        pytest.skip(reason)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {i}: the quick brown fox jumps over the lazy dog."})
                                for i in range(120)), encoding="utf-8")
    mount = tmp_path / "disk"
    mount.mkdir()
    scan = [sys.executable, "-m", "headvis.scan", "--model", str(tiny_model_dir("gpt2")), "--dataset", str(corpus),
            "--seq-len", "16", "--num-seqs", "24", "--per-interval", "2", "--max-points", "40", "--device", "cpu",
            "--backend", "torch"]
    result = subprocess.run(["unshare", "-rm", "sh", "-c", _IN_NAMESPACE, "sh", str(mount), *scan],
                            capture_output=True, text=True, timeout=600, env={**ENV, "MNT": str(mount)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.split()
    assert "rc=2" in out, result.stdout  # HeadvisError, not an internal error (1)
    err = [line for line in (tmp_path / "err.txt").read_text().splitlines() if line.strip() and "it/s]" not in line]
    assert err and err[-1].startswith("headvis: error: the disk is full") and "--out" in err[-1], err
    assert "untouched" in err[-1] and not any("Traceback" in line for line in err)
    assert not [name for name in out if ".staging-" in name], result.stdout  # the staging folder is gone
    assert out[-2:] == ["n_sequences", "24"]  # the old tree, complete
    # pass 1's units and the corpus's token rows, kept to resume
    assert sorted(name for name in out if name.startswith(".data")) == [".data.resume", ".data.tokens"]


@pytest.mark.asyncio
async def test_an_add_on_a_full_disk_is_507_and_leaves_nothing(api: Api, data, monkeypatch):
    real = headvis.custom.write_json
    written = []

    def full_after_two(path, obj, **kw):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        real(path, obj, **kw)

    monkeypatch.setattr(headvis.custom, "write_json", full_after_two)
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="no room for this one")
    assert status == 507, reply
    assert reply["detail"].startswith("the disk holding the data tree is full") and "nothing was changed" in reply["detail"]
    assert (await api.data_file("custom_sequences/index.json")) == {"sequences": []}
    assert (await api.data_file("custom_sequences/L1H0.json")) == {"sequences": []}
    store = CustomFolder(data / "custom_sequences").store
    assert not store.exists() or list(store.iterdir()) == []  # no half-written sequence

    monkeypatch.setattr(headvis.custom, "write_json", real)  # space freed: the same add now works
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="no room for this one")
    assert status == 200
    assert [e["sequence_id"] for e in (await api.data_file("custom_sequences/index.json"))["sequences"]] == \
        [reply["sequence_id"]]


@pytest.mark.asyncio
async def test_saving_clusters_on_a_full_disk_is_507_and_keeps_the_file(api: Api, data, monkeypatch):
    path = data / "umap" / "L1H0.json"
    before = path.read_bytes()
    umap = read_json(path)
    point = [umap["seq_idx"][0], umap["top_q"][0], umap["top_k"][0]]

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(headvis.io, "atomic_write_bytes", full)
    status, reply = await api.post("save_umap_clusters", layer=1, head=0,
                                   clusters=[{"name": "a", "color": "#123456", "points": [point]}])
    assert status == 507 and "full" in reply["detail"], reply
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.glob(".*")) == []
