"""The scan's first stage: the corpus as token rows in a memory-mapped file beside --out (`TokenStore`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from headvis.datasets import iter_texts, pack_sequences
from headvis.errors import HeadvisError
from headvis.token_store import TokenStore


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"Paragraph {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n"
                            for i in range(400)), encoding="utf-8")
    return path


def _open(folder, path, tokenizer, num_seqs, **kw):
    return TokenStore.open_or_build(folder, dataset=str(path), split="train", text_column="text",
                                    tokenizer=tokenizer, seq_len=32, num_seqs=num_seqs, progress=False, **kw)


def _no_tokenizing(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("tokenized again")
    monkeypatch.setattr("headvis.token_store.pack_blocks", refuse)


def test_the_rows_on_disk_are_the_packed_sequences_and_are_read_again(tmp_path, text_file, smollm, monkeypatch):
    expected = pack_sequences(iter_texts(str(text_file)), smollm.tokenizer, 32, 50, progress=False)
    store = _open(tmp_path / "s", text_file, smollm.tokenizer, 50)
    assert len(store) == 50 and store.shape == (50, 32)
    assert torch.equal(store[list(range(50))], expected) and store[7].dtype == torch.int64
    assert torch.equal(store[torch.tensor([3, 1])], expected[[3, 1]])
    assert store.sha256 == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
    assert store.max_id == int(expected.max())
    assert np.array_equal(store.present, np.unique(expected[:, 1:].numpy()))

    _no_tokenizing(monkeypatch)  # the same settings, or fewer sequences: the file is read, not written
    again = _open(tmp_path / "s", text_file, smollm.tokenizer, 50)
    assert again.sha256 == store.sha256
    fewer = _open(tmp_path / "s", text_file, smollm.tokenizer, 20)
    assert len(fewer) == 20 and torch.equal(fewer[list(range(20))], expected[:20])
    assert fewer.sha256 == hashlib.sha256(expected[:20].numpy().tobytes()).hexdigest()


def test_a_corpus_that_ended_is_not_read_again_for_more_sequences(tmp_path, text_file, smollm, monkeypatch):
    store = _open(tmp_path / "s", text_file, smollm.tokenizer, 10_000)
    n = len(store)
    assert 0 < n < 10_000
    _no_tokenizing(monkeypatch)
    assert len(_open(tmp_path / "s", text_file, smollm.tokenizer, 20_000)) == n


def test_more_sequences_another_file_or_a_cut_file_are_tokenized_again(tmp_path, text_file, smollm):
    folder = tmp_path / "s"
    _open(folder, text_file, smollm.tokenizer, 10)
    assert len(_open(folder, text_file, smollm.tokenizer, 30)) == 30  # more than it holds: written anew
    time.sleep(0.01)
    text_file.write_text("Another text entirely, " * 400, encoding="utf-8")
    changed = _open(folder, text_file, smollm.tokenizer, 30)
    assert torch.equal(changed[list(range(len(changed)))],
                       pack_sequences(iter_texts(str(text_file)), smollm.tokenizer, 32, 30, progress=False))
    with open(folder / "tokens.bin", "r+b") as f:  # a file cut short (a full disk) is never read as rows
        f.truncate(100)
    assert len(_open(folder, text_file, smollm.tokenizer, 30)) == len(changed)


def test_another_rank_finds_no_store_and_says_why(tmp_path, text_file, smollm):
    with pytest.raises(HeadvisError, match="rank 0 writes it; is --out on a file system every process sees"):
        _open(tmp_path / "s", text_file, smollm.tokenizer, 10, build=False)


def test_an_empty_corpus_leaves_nothing_behind(tmp_path, smollm):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(HeadvisError, match="no full sequence"):
        _open(tmp_path / "s", empty, smollm.tokenizer, 10)
    assert not (tmp_path / "s").exists()


_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def test_a_100_mb_text_file_is_scanned_in_the_memory_of_a_small_one(tmp_path, tiny_model_dir):
    """--num-seqs 20 of a 100 MB .txt: the scan's peak memory is that of a 1 MB file's, within 64 MiB."""
    line = "words of a generated corpus, line after line, to be tokenized and packed\n"
    peaks = {}
    for size in (1 << 20, 100 << 20):
        path = tmp_path / f"{size}.txt"
        with path.open("w", encoding="utf-8") as f:
            f.write(line * (size // len(line)))
        cmd = [sys.executable, "-m", "headvis.scan", "--model", str(tiny_model_dir("gpt2")), "--dataset", str(path),
               "--num-seqs", "20", "--seq-len", "32", "--out", str(tmp_path / f"out-{size}")]
        done = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        peaks[size] = int(done.stdout.split()[-1]) / 1024  # MiB
        assert (tmp_path / f"out-{size}" / "config.json").is_file()
        assert not (tmp_path / f".out-{size}.tokens").exists(), "a finished scan removes its token store"
    assert peaks[100 << 20] < peaks[1 << 20] + 64, peaks


def test_a_tokenizer_with_other_special_tokens_is_tokenized_again(tmp_path, text_file, smollm, monkeypatch):
    """Same vocabulary, another EOS (which packing puts between documents): the rows are written anew."""
    import copy

    import headvis.token_store as token_store

    _open(tmp_path / "s", text_file, smollm.tokenizer, 30)
    other = copy.deepcopy(smollm.tokenizer)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id != smollm.tokenizer.eos_token_id
    packed = []
    real = token_store.pack_blocks
    monkeypatch.setattr(token_store, "pack_blocks", lambda *a, **kw: (packed.append(1), real(*a, **kw))[1])
    second = _open(tmp_path / "s", text_file, other, 30)
    assert packed == [1]
    assert torch.equal(second[list(range(len(second)))],
                       pack_sequences(iter_texts(str(text_file)), other, 32, 30, progress=False))


def test_a_folder_corpus_is_fingerprinted_by_the_files_it_reads(tmp_path, smollm, monkeypatch):
    """Other files in the folder (the scan's own output beside the texts, logs) do not make it tokenize again."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Some text of the corpus. " * 300, encoding="utf-8")
    _open(tmp_path / "s", folder, smollm.tokenizer, 10)
    (folder / "notes.log").write_text("written while scanning", encoding="utf-8")
    (folder / ".data.tokens").mkdir()
    _no_tokenizing(monkeypatch)
    assert len(_open(tmp_path / "s", folder, smollm.tokenizer, 10)) == 10


def test_opening_every_row_reads_none_and_fewer_rows_are_summarized_again(tmp_path, text_file, smollm, monkeypatch):
    """The rows' digest, largest id and token set are made while writing and kept beside them: a rank or a resume
    opening the whole store reads no row; a store used in part gets the part's own summary."""
    import headvis.token_store as token_store

    written = _open(tmp_path / "s", text_file, smollm.tokenizer, 40)
    real_add = token_store._Summary.add
    monkeypatch.setattr(token_store._Summary, "add", lambda self, block: pytest.fail("read the rows"))
    for build in (True, False):
        again = _open(tmp_path / "s", text_file, smollm.tokenizer, 40, build=build)
        assert (again.sha256, again.max_id) == (written.sha256, written.max_id)
        assert np.array_equal(again.present, written.present)
    monkeypatch.setattr(token_store._Summary, "add", real_add)
    part = _open(tmp_path / "s", text_file, smollm.tokenizer, 25)
    rows = part[list(range(25))]
    assert part.sha256 == hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    assert np.array_equal(part.present, np.unique(rows[:, 1:].numpy()))


def test_a_hub_dataset_is_tokenized_again_at_a_new_commit_and_read_at_its_pinned_one(tmp_path, smollm, monkeypatch):
    """The store records the commit a hub dataset's name points to and streams that commit; a new commit is
    tokenized again, the same one is read, and offline (no commit known) the stored rows are read."""
    import headvis.datasets as datasets_module

    commit = {"now": "c1"}
    streamed = []
    texts = {"c1": [f"first revision, paragraph {i}." for i in range(200)],
             "c2": [f"second revision, another paragraph {i}." for i in range(200)]}

    def load_dataset(name, split, streaming, revision):
        assert name == "someone/corpus" and split == "train" and streaming
        streamed.append(revision)
        return [{"text": t} for t in texts[revision]]

    monkeypatch.setattr(datasets_module, "hub_revision", lambda name: commit["now"])
    monkeypatch.setattr("headvis.token_store.hub_revision", lambda name: commit["now"])
    monkeypatch.setattr("datasets.load_dataset", load_dataset)

    def open_hub():
        return TokenStore.open_or_build(tmp_path / "s", dataset="someone/corpus", split="train", text_column="text",
                                        tokenizer=smollm.tokenizer, seq_len=16, num_seqs=20, progress=False)

    first = open_hub()
    assert streamed == ["c1"], "the commit of the fingerprint is the one streamed"
    expected = pack_sequences(iter(texts["c1"]), smollm.tokenizer, 16, 20, progress=False)
    assert torch.equal(first[list(range(20))], expected)
    assert open_hub().sha256 == first.sha256 and streamed == ["c1"], "the same commit: read, not streamed"
    commit["now"] = "c2"
    second = open_hub()
    assert streamed == ["c1", "c2"] and second.sha256 != first.sha256
    assert torch.equal(second[list(range(20))], pack_sequences(iter(texts["c2"]), smollm.tokenizer, 16, 20,
                                                               progress=False))
    commit["now"] = None  # offline: the commit cannot be told, the rows there are used
    assert open_hub().sha256 == second.sha256 and streamed == ["c1", "c2"]


def test_the_hub_commit_comes_from_the_hub_and_is_not_asked_for_offline(monkeypatch):
    import types

    from headvis.datasets import hub_revision

    asked = []

    def dataset_info(self, name, timeout=None):
        asked.append(name)
        return types.SimpleNamespace(sha="0123abcd")

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", dataset_info)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert hub_revision("someone/corpus") == "0123abcd" and asked == ["someone/corpus"]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert hub_revision("someone/corpus") is None and asked == ["someone/corpus"], "offline: the hub is not asked"

    def unreachable(self, name, timeout=None):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert hub_revision("someone/corpus") is None
