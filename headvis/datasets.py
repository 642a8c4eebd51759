"""Reading a corpus and packing it into fixed-length token sequences.

`--dataset` is one of
- `pydoc_data.topics` (the default): the Python documentation text shipped in
  the standard library, one document per topic, in the module's order;
- a local `.txt` (the whole file is one document), `.jsonl` (one JSON object
  per line, text in `--text-column`) or `.parquet` file, or a folder holding
  such files (read recursively in sorted path order). `.txt` and `.jsonl`
  must be UTF-8 text: a byte that is not UTF-8, a NUL byte or (in a `.txt`)
  control characters making over a tenth of it are refused, naming the file
  and where;
- a Hugging Face hub name, streamed (`--split`, `--text-column`).

Packing: each document is tokenized without special tokens and followed by the
tokenizer's EOS token when it has one; the token stream is cut into
consecutive chunks. With a BOS token (or, for BERT-style encoders, CLS) every
sequence is `[BOS] + seq_len - 1 stream tokens`, otherwise `seq_len` stream
tokens. A final partial chunk is dropped. Sequence ids are 0, 1, 2, ... in
this order, so the same corpus and tokenizer always give the same ids.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from headvis.errors import HeadvisError

__all__ = ["DEFAULT_DATASET", "corpus_files", "iter_texts", "pack_blocks", "pack_sequences", "prefix_token"]

DEFAULT_DATASET = "pydoc_data.topics"
_SUFFIXES = (".txt", ".jsonl", ".parquet")


# A .txt more than this share of whose characters are control characters is binary that happens to decode
# as UTF-8; real text has almost none (whitespace and ESC, which coloured logs use, are not counted).
_MAX_CONTROL_SHARE = 0.1
_C0_CONTROLS = bytes(b for b in [*range(0x20), 0x7F] if b not in b"\t\n\r\f\v\x1b")  # one byte each in UTF-8
_C1_CONTROL = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080-U+009F, two bytes each in UTF-8


def _control_characters(data: bytes) -> int:
    """How many C0/C1 control characters (and DEL) the UTF-8 `data` holds; counted on bytes, at C speed."""
    return len(data) - len(data.translate(None, _C0_CONTROLS)) + len(_C1_CONTROL.findall(data))


def _bad_byte(data: bytes, error: UnicodeDecodeError, offset: int = 0) -> str:
    """'byte offset 1234 (0xff)' for the first byte `error` could not decode; `offset`: where `data` starts."""
    return f"byte offset {offset + error.start} (0x{data[error.start]:02x})"


class Continued(str):
    """A piece of a document that goes on in the next text: `pack_sequences` puts no EOS after it."""


_PIECE_BYTES = 1 << 20  # a .txt is read, checked and tokenized this much at a time


_MAX_CARRY_PIECES = 16  # a piece with no safe cut in this many reads is cut anyway (memory stays bounded)
# where a piece may end: a single line break between two non-space characters, else before a space between two
_CUTS = (re.compile(r"\S\n(?=\S)"), re.compile(r"\S(?= \S)"))


def _text_pieces(path: Path) -> Iterator[str]:
    """A .txt as one document, read in pieces of about _PIECE_BYTES (memory bounded whatever its size).

    Each piece but the last is `Continued`. Newlines are made universal first; a piece then ends at a
    single line break between two characters that are not whitespace, or, in a read with none, before a
    space between two such characters: where a byte-level BPE pre-tokenizer splits the same way with or
    without what follows (a run of line breaks would not: at a piece's end it becomes one pre-token), so
    the tokens are those of the whole text. `pack_sequences` checks that the tokenizer splits so, and
    joins the pieces again for one that does not. HeadvisError unless it is UTF-8 text: no NUL byte, and
    control characters at most a tenth of what was read (checked piece by piece, so a binary file stops
    at its first piece).
    """
    piece_bytes = _PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, controls, chars, carry, searched, held, cr = 0, 0, 0, "", 0, 0, False
    with path.open("rb") as f:
        while True:
            data = f.read(piece_bytes)
            final = len(data) < piece_bytes  # a short read: the file ends here
            nul = data.find(b"\x00")
            if nul >= 0:  # UTF-16 text and every binary format have NUL bytes; UTF-8 text never does
                raise HeadvisError(f"{path}: not a text file (NUL byte at byte offset {offset + nul}); a .txt "
                                   "dataset must be UTF-8 text")
            pending = len(decoder.getstate()[0])  # bytes of a character split by the previous read
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise HeadvisError(f"{path}: not UTF-8 (first bad byte at byte offset {at} (0x{(e.object[e.start]):02x})); "
                                   "a .txt dataset must be UTF-8 text") from e
            offset += len(data)
            controls += _control_characters(data)
            chars += len(text)
            if controls > _MAX_CONTROL_SHARE * chars and controls:
                raise HeadvisError(f"{path}: not a text file ({controls} of {'its' if final else 'the first'} {chars} "
                                   "characters are control characters); a .txt dataset must be UTF-8 text")
            text = ("\r" if cr else "") + text
            cr = not final and text.endswith("\r")  # a CR LF pair may be split by the read: the CR waits
            text = carry + _universal_newlines(text[:-1] if cr else text)
            if final:
                yield text
                return
            held += 1
            cut = -1
            for pattern in _CUTS:  # only the new text is searched (and the last characters before it)
                cut = max((m.end() for m in pattern.finditer(text, max(0, searched - 2))), default=-1)
                if cut > 0:
                    break
            if cut <= 0 and held >= _MAX_CARRY_PIECES:
                cut = len(text)  # no safe place in 16 reads (one huge "word"): cut anyway, memory first
            if cut > 0:
                yield Continued(text[:cut])
                carry, held = text[cut:], 0
            else:
                carry = text
            searched = len(carry)


def _universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode reading gives


def _jsonl_rows(path: Path, text_column: str) -> Iterator[str]:
    """Line by line (a large file is never read whole); each line must be UTF-8 JSON holding `text_column`."""
    offset = 0  # of the line's first byte in the file
    with open(path, "rb") as f:  # binary: a text-mode decode error names no line (it decodes 8 KiB ahead)
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HeadvisError(f"{path}:{line_no}: not UTF-8 (first bad byte at {_bad_byte(raw, e, offset)}); "
                                   "a .jsonl dataset must be UTF-8") from e
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HeadvisError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or text_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise HeadvisError(f"{path}:{line_no}: no text column {text_column!r} (found {keys})")
            text = row[text_column]
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate is no text
                    raise HeadvisError(f"{path}:{line_no}: {text_column!r} holds a lone UTF-16 surrogate "
                                       f"({text[e.start:e.end].encode('unicode_escape').decode()}), which is not "
                                       "text") from e
                yield text


def _texts_from_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _text_pieces(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path, text_column)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise HeadvisError(f"{path}: not a readable parquet file ({e})") from e
        if text_column not in parquet.schema_arrow.names:
            raise HeadvisError(f"{path}: no text column {text_column!r} (found {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(columns=[text_column]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def hub_revision(name: str) -> str | None:
    """The commit a hub dataset's name points to now, or None when the hub cannot say (offline,
    HF_HUB_OFFLINE=1, an unknown name: loading then reports it)."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().dataset_info(name, timeout=10).sha
    except Exception:  # no network, no such dataset, an old huggingface_hub: the name alone identifies it
        return None


def _texts_from_hub(name: str, split: str, text_column: str, revision: str | None = None) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True, revision=revision)
        first = next(iter(stream))
    except Exception as e:  # datasets raises many types for a missing or offline set
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadvisError(f"cannot load dataset {name!r} (split {split!r}): {message}") from e
    if text_column not in first:
        raise HeadvisError(f"dataset {name!r} has no text column {text_column!r} (found {sorted(first)})")
    for row in stream:
        if isinstance(row[text_column], str):
            yield row[text_column]


def iter_texts(dataset: str, split: str = "train", text_column: str = "text",
               revision: str | None = None) -> Iterator[str]:
    """Documents of `dataset` in a stable order; revision: a hub dataset's commit (None: what its name points to)."""
    if dataset == DEFAULT_DATASET:
        from pydoc_data.topics import topics

        yield from topics.values()
        return
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise HeadvisError(f"{path}: unsupported file type (use {', '.join(_SUFFIXES)})")
        yield from _texts_from_file(path, text_column)
    elif path.is_dir():
        files = corpus_files(path)
        if not files:
            raise HeadvisError(f"{path}: folder holds no {', '.join(_SUFFIXES)} files")
        for file in files:
            yield from _texts_from_file(file, text_column)
    elif dataset.startswith((".", "/", "~")) or dataset.endswith(_SUFFIXES):
        raise HeadvisError(f"dataset path {dataset!r} does not exist")
    else:
        yield from _texts_from_hub(dataset, split, text_column, revision)


def corpus_files(folder: Path) -> list[Path]:
    """The files a folder `--dataset` reads, in the order it reads them."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in _SUFFIXES)


def prefix_token(tokenizer) -> int | None:
    """The token every sequence starts with: BOS, or CLS for BERT-style tokenizers, or None."""
    for name in ("bos_token_id", "cls_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    return None


def _splits_cleanly(tokenizer) -> bool:
    """Does `tokenizer` give the same ids for a text as for its halves, cut as `_text_pieces` cuts?

    True for byte-level BPE (GPT-2, Llama 3, SmolLM2); False for tokenizers that prepend a word marker to
    every call (SentencePiece: Llama 2, Mistral), whose pieces are then joined again before tokenizing.
    """
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [("Alpha beta.\n", "Gamma delta"), ("alpha beta", " gamma delta"), ("x = 1\n", "y = 2")]
    return all(ids(a + b) == ids(a) + ids(b) for a, b in pairs)


def pack_sequences(texts: Iterator[str], tokenizer, seq_len: int, num_seqs: int, progress: bool = True) -> torch.Tensor:
    """(n, seq_len) int64 token ids, n <= num_seqs, packed as the module docstring says (a bar unless not `progress`).

    In memory: the scan streams `pack_blocks` into a `headvis.token_store.TokenStore` instead.
    """
    return torch.from_numpy(np.concatenate(list(pack_blocks(texts, tokenizer, seq_len, num_seqs, progress=progress))))


def pack_blocks(texts: Iterator[str], tokenizer, seq_len: int, num_seqs: int, progress: bool = True,
                block_rows: int = 4096) -> Iterator[np.ndarray]:
    """`pack_sequences` as a stream: consecutive (k <= block_rows, seq_len) int64 blocks, memory bounded by one
    block and one text (piece); the corpus is read only until num_seqs sequences exist. Raises HeadvisError
    when not one full sequence comes out."""
    prefix = prefix_token(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    body = seq_len - (prefix is not None)
    if body < 1:
        raise HeadvisError(f"--seq-len {seq_len} leaves no room for text after the BOS token")
    rows: list[list[int]] = []
    n = 0
    stream: list[int] = []
    clean: bool | None = None  # whether the tokenizer splits at the pieces' cuts as it does inside a text
    document: list[str] = []  # a document's pieces, joined again for a tokenizer that does not
    with tqdm(total=num_seqs, desc="tokenizing", unit="seq", leave=False, disable=not progress) as bar:
        for text in texts:
            if isinstance(text, Continued) or document:
                clean = _splits_cleanly(tokenizer) if clean is None else clean
                if not clean:
                    document.append(text)
                    if isinstance(text, Continued):
                        continue
                    text, document = "".join(document), []
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None and not isinstance(text, Continued):
                stream.append(int(eos))
            at = 0  # cut at offsets, then drop the used part once: linear in the text's tokens
            while len(stream) - at >= body and n < num_seqs:
                rows.append(([prefix] if prefix is not None else []) + stream[at : at + body])
                at += body
                n += 1
                bar.update(1)
                if len(rows) == block_rows:
                    yield np.asarray(rows, dtype=np.int64)
                    rows = []
            del stream[:at]
            if n >= num_seqs:
                break
    if rows:
        yield np.asarray(rows, dtype=np.int64)
    if n == 0:
        raise HeadvisError(f"the corpus yields no full sequence of {seq_len} tokens (is it empty?)")
