"""Local corpus files that are not UTF-8 text: one clear HeadvisError naming the file and where, never a crash.

`iter_texts` is checked directly (the messages and what still reads), and
once through `python -m headvis.scan`'s `main` with a tiny model (exit 2,
one line, no traceback).
"""

from __future__ import annotations

import json
import re

import pytest

from headvis.datasets import iter_texts
from headvis.errors import HeadvisError
from headvis.scan import main


def _jsonl(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


GOOD_ROW = json.dumps({"text": "fine"}).encode()


# -- .jsonl

def test_a_jsonl_byte_that_is_not_utf8_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = b'{"text": "caf\xe9"}'  # Latin-1 e-acute: 0xe9 followed by '"' is not UTF-8
    path.write_bytes(_jsonl(GOOD_ROW, GOOD_ROW, bad))
    offset = 2 * (len(GOOD_ROW) + 1) + bad.index(b"\xe9")
    texts = iter_texts(str(path))
    assert [next(texts), next(texts)] == ["fine", "fine"]  # streamed: the good lines come before the error
    with pytest.raises(HeadvisError) as error:
        next(texts)
    assert str(error.value) == (f"{path}:3: not UTF-8 (first bad byte at byte offset {offset} (0xe9)); "
                                "a .jsonl dataset must be UTF-8")


def test_a_utf16_jsonl_is_refused_at_its_first_line(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(json.dumps({"text": "hello"}).encode("utf-16"))  # BOM 0xff 0xfe first
    with pytest.raises(HeadvisError, match=r"utf16\.jsonl:1: not UTF-8 \(first bad byte at byte offset 0 \(0xff\)\)"):
        list(iter_texts(str(path)))


def test_utf8_jsonl_with_crlf_and_non_ascii_text_still_reads(tmp_path):
    path = tmp_path / "ok.jsonl"
    rows = ["café", "日本語", "emoji 🙂"]
    path.write_bytes(b"\r\n".join(json.dumps({"text": t}, ensure_ascii=False).encode() for t in rows) + b"\r\n\r\n")
    assert list(iter_texts(str(path))) == rows


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(GOOD_ROW))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(b'{"text": "\xff"}'))
    with pytest.raises(HeadvisError, match=r"b\.jsonl:1: not UTF-8"):
        list(iter_texts(str(tmp_path)))


# -- .txt

@pytest.mark.parametrize("data, message", [
    (b"plain text then \xff\xfe garbage", "not UTF-8 (first bad byte at byte offset 16 (0xff))"),
    (b"abc\xe2\x82", "not UTF-8 (first bad byte at byte offset 3 (0xe2))"),  # a truncated euro sign
    ("utf-16 text".encode("utf-16-le"), "not a text file (NUL byte at byte offset 1)"),
    (b"PK\x03\x04\x14\x00\x00\x00" + bytes(range(1, 32)), "not a text file (NUL byte at byte offset 5)"),  # a zip header
    (bytes(range(1, 32)) * 8 + b"some text",  # valid UTF-8, but binary (25 of each 31 bytes count)
     "not a text file (200 of its 257 characters are control characters)"),
    ("ab\u0085\u0090\u009f".encode() * 20,  # C1 controls count too
     "not a text file (60 of its 100 characters are control characters)"),
], ids=["latin1-bytes", "truncated-utf8", "utf16", "zip", "c0-controls", "c1-controls"])
def test_a_txt_that_is_not_utf8_text_is_refused(tmp_path, data, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    with pytest.raises(HeadvisError) as error:
        list(iter_texts(str(path)))
    assert str(error.value).startswith(f"{path}: {message}"), error.value
    assert str(error.value).endswith("a .txt dataset must be UTF-8 text")


def test_a_txt_of_real_text_reads_whole_and_exact(tmp_path):
    text = ("Tabs\tand\r\nnewlines, \x1b[31mcoloured\x1b[0m logs, a form feed\f, "
            "non-ASCII: café 日本語 🙂\n") * 50
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    # nothing replaced; newlines universal, as the scan read a .txt before (so old corpora give the same tokens)
    assert list(iter_texts(str(path))) == [text.replace("\r\n", "\n")]


def test_a_big_txt_is_read_in_pieces_with_the_tokens_of_the_whole_text(tmp_path, monkeypatch, smollm):
    """Pieces end where a line break meets a non-space character: the packed ids are the whole text's."""
    import headvis.datasets as datasets
    from pydoc_data.topics import topics

    text = "\n\n".join(list(topics.values())[:60])
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(datasets, "_PIECE_BYTES", 4096)  # ~100 pieces instead of one
    pieces = list(iter_texts(str(path)))
    assert len(pieces) > 20 and "".join(pieces) == text
    assert all(isinstance(p, datasets.Continued) for p in pieces[:-1]) and not isinstance(pieces[-1], datasets.Continued)
    tokenizer = smollm.tokenizer
    n = 40
    packed = datasets.pack_sequences(iter(pieces), tokenizer, 128, n)
    whole = datasets.pack_sequences(iter([text]), tokenizer, 128, n)
    assert packed.tolist() == whole.tolist()


@pytest.mark.parametrize("kind", ["crlf", "cr", "paragraphs", "one-line"])
def test_pieces_of_other_line_endings_and_layouts_keep_the_whole_texts_tokens(tmp_path, monkeypatch, smollm, kind):
    """CRLF and CR files, blank-line paragraphs (cut before a space) and one long line (cut anyway after 16 reads)."""
    import headvis.datasets as datasets
    from pydoc_data.topics import topics

    text = "\n".join(list(topics.values())[:25])
    if kind == "paragraphs":
        text = "\n\n".join(line for line in text.splitlines() if line.strip())
    if kind == "one-line":
        text = "".join(text.split())[:60_000]  # no whitespace at all: no safe place to cut
    raw = {"crlf": text.replace("\n", "\r\n"), "cr": text.replace("\n", "\r")}.get(kind, text)
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw.encode())
    monkeypatch.setattr(datasets, "_PIECE_BYTES", 2048)
    pieces = list(iter_texts(str(path)))
    assert "".join(pieces) == text and len(pieces) > 1
    assert max(len(p) for p in pieces) <= 2048 * (datasets._MAX_CARRY_PIECES + 1)
    if kind != "one-line":  # a cut inside one 60k-character word may change its tokens, by design
        n = 12
        assert datasets.pack_sequences(iter(pieces), smollm.tokenizer, 64, n).tolist() == \
            datasets.pack_sequences(iter([text]), smollm.tokenizer, 64, n).tolist()


def test_a_tokenizer_that_marks_each_call_gets_the_pieces_joined(tmp_path, monkeypatch):
    """A SentencePiece-style tokenizer (a word marker at the start of every call) tokenizes whole documents."""
    import headvis.datasets as datasets

    class Marking:  # ids: a marker, then one id per character
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3] + [10 + ord(c) % 50 for c in text]}

    text = "\n".join(f"line {i} of a text that goes on and on" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(datasets, "_PIECE_BYTES", 1024)
    assert len(list(iter_texts(str(path)))) > 5 and not datasets._splits_cleanly(Marking())
    got = datasets.pack_sequences(iter_texts(str(path)), Marking(), 32, 50)
    assert got.tolist() == datasets.pack_sequences(iter([text]), Marking(), 32, 50).tolist()


def test_a_huge_txt_stops_reading_once_it_has_the_sequences(tmp_path, monkeypatch, smollm):
    """--num-seqs 3 of a 50 MB file reads a piece or two, not the file."""
    import headvis.datasets as datasets

    path = tmp_path / "huge.txt"
    with path.open("w", encoding="utf-8") as f:
        for i in range(500_000):
            f.write(f"line {i}: some words of text to tokenize\n")
    read = []
    real_open = type(path).open

    def counting_open(self, *a, **kw):
        handle = real_open(self, *a, **kw)
        real_read = handle.read
        handle.read = lambda size=-1: (read.append(size), real_read(size))[1]
        return handle

    monkeypatch.setattr(type(path), "open", counting_open)
    packed = datasets.pack_sequences(iter_texts(str(path)), smollm.tokenizer, 64, 3)
    assert packed.shape == (3, 64)
    assert 1 <= len(read) <= 2 and all(size == datasets._PIECE_BYTES for size in read), read


def test_a_txt_just_under_the_control_share_still_reads(tmp_path):
    text = "\x07" * 9 + "a" * 91  # 9 % control characters
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    assert list(iter_texts(str(path))) == [text]
    path.write_bytes(("\x07" * 11 + "a" * 89).encode())  # 11 %
    with pytest.raises(HeadvisError, match="11 of its 100 characters are control characters"):
        list(iter_texts(str(path)))


# -- through the command line

@pytest.fixture
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))


@pytest.mark.parametrize("name, data, expected", [
    ("bad.jsonl", _jsonl(GOOD_ROW, b'{"text": "\xc0\xaf"}'), "bad.jsonl:2: not UTF-8 (first bad byte at byte offset"),
    ("bad.txt", bytes(range(256)), "bad.txt: not a text file (NUL byte at byte offset 0)"),
])
def test_the_scan_reports_a_bad_corpus_in_one_line(capsys, tmp_path, gpt2_dir, name, data, expected):
    corpus = tmp_path / name
    corpus.write_bytes(data)
    out = tmp_path / "out"
    capsys.readouterr()  # the fixture's own output (saving the tiny model)
    code = main(["--model", gpt2_dir, "--dataset", str(corpus), "--seq-len", "16", "--num-seqs", "2",
                 "--device", "cpu", "--no-umap", "--out", str(out)])
    err = capsys.readouterr().err
    # progress bars (model loading, tokenizing) redraw with \r; what is left is the one message
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("headvis:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("headvis: error: ") and expected in lines[0], err
    assert "must be UTF-8" in lines[0] and "Traceback" not in err and "internal error" not in err
    assert not out.exists()


def test_a_jsonl_text_with_a_lone_surrogate_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(HeadvisError, match=r"surrogate.jsonl:2: 'text' holds a lone UTF-16 surrogate \(\\ud800\)"):
        list(iter_texts(str(path)))
