"""The stored feature library of one dictionary, `data/features/{name}/`, and `FeatureLibrary` that reads it.

    index.json            what was computed: dictionary, hook, d_sae, corpus, window, n_tokens, created, ...
    features.safetensors  fixed-size arrays, one row per feature (shapes below), and the corpus token ids
    descriptions.json     [d_sae strings]: the derived description of each feature
    tokens.json           {"<token id>": "<token string>"} for every id of the corpus
    labels.json           optional {"<feature>": "<text>"}, the user's labels; a label replaces the
                          derived description (re-read when the file changes)

Arrays (F = d_sae, P = top windows, I = n_intervals, M = per_interval, W = window width; -1 = empty):
    count (F,) int64, total (F,) float64, max_activation (F,) float32,
    top_seq, top_pos (F, P) int32, top_value (F, P) float32, top_acts (F, P, W) float32,
    sample_seq, sample_pos (F, I, M) int32, sample_value (F, I, M) float32, sample_acts (F, I, M, W) float32,
    token_ids (F, TOP_TOKENS) int32, token_counts (F, TOP_TOKENS) int64, corpus (n_sequences, seq_len) int32.
A window's activations cover positions pos - before .. pos + after (0 outside the sequence).
Snippet dicts are built on demand; opening reads the arrays once (tens of MB for d_sae = 16k).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from headvis.errors import HeadvisError
from headvis.features.collect import TOP_WINDOWS, FeatureTables, Window, interval_of
from headvis.features.describe import derive_description
from headvis.io import FILE_MODE, read_json, round_sig, write_json

__all__ = ["ARRAYS_FILE", "DESCRIPTIONS_FILE", "FEATURES_DIR", "FORMAT_VERSION", "INDEX_FILE", "LABELS_FILE",
           "SNIPPET_KEYS", "TOKENS_FILE", "FeatureLibrary", "read_labels", "write_library"]

FEATURES_DIR = "features"  # under the data tree
INDEX_FILE = "index.json"
ARRAYS_FILE = "features.safetensors"
DESCRIPTIONS_FILE = "descriptions.json"
TOKENS_FILE = "tokens.json"
LABELS_FILE = "labels.json"
FORMAT_VERSION = 1
SNIPPET_KEYS = ("tokens", "activations", "interval", "sequence_id", "start", "position")
_ARRAYS = ("count", "total", "max_activation", "top_seq", "top_pos", "top_value", "top_acts", "sample_seq",
           "sample_pos", "sample_value", "sample_acts", "token_ids", "token_counts", "corpus")


def read_labels(path: Path, d_sae: int) -> dict[int, str]:
    """{feature: text} from a JSON object {"<feature>": "<text>"}; a HeadvisError says what is wrong."""
    try:
        raw = read_json(path)
    except json.JSONDecodeError as e:
        raise HeadvisError(f"labels {path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise HeadvisError(f"labels {path}: cannot read it ({e})") from e
    if not isinstance(raw, dict):
        raise HeadvisError(f"labels {path}: must be a JSON object {{\"<feature>\": \"<text>\"}}")
    labels = {}
    for key, text in raw.items():
        try:
            feature = int(key)
        except ValueError:
            raise HeadvisError(f"labels {path}: key {key!r} is not a feature index") from None
        if not 0 <= feature < d_sae:
            raise HeadvisError(f"labels {path}: feature {feature} is out of range (0-{d_sae - 1})")
        if not isinstance(text, str):
            raise HeadvisError(f"labels {path}: the label of feature {feature} is not a string")
        labels[feature] = text
    return labels


def _descriptions(tables: FeatureTables, corpus: np.ndarray, strings: dict[int, str]) -> list[str]:
    out = []
    for f in range(tables.d_sae):
        top_tokens = [(strings[int(t)], int(n)) for t, n in zip(tables.token_ids[f], tables.token_counts[f]) if t >= 0]
        examples = []
        for seq, pos in zip(tables.top_seq[f], tables.top_pos[f]):
            if seq >= 0:
                before = strings[int(corpus[seq, pos - 1])] if pos > 0 else None
                examples.append((strings[int(corpus[seq, pos])], before))
        out.append(derive_description(n_tokens=tables.n_tokens, count=int(tables.count[f]),
                                      max_activation=float(tables.max_activation[f]), top_tokens=top_tokens,
                                      top_examples=examples, exact=tables.token_counts_exact))
    return out


def write_library(folder: Path, tables: FeatureTables, corpus: np.ndarray, strings: dict[int, str],
                  info: dict) -> None:
    """Write every file but labels.json into `folder` (a staging folder: the caller publishes it)."""
    arrays = {
        "count": tables.count.astype(np.int64), "total": tables.total.astype(np.float64),
        "max_activation": tables.max_activation.astype(np.float32),
        "top_seq": tables.top_seq.astype(np.int32), "top_pos": tables.top_pos.astype(np.int32),
        "top_value": tables.top_value.astype(np.float32), "top_acts": tables.top_acts.astype(np.float32),
        "sample_seq": tables.sample_seq.astype(np.int32), "sample_pos": tables.sample_pos.astype(np.int32),
        "sample_value": tables.sample_value.astype(np.float32),
        "sample_acts": tables.sample_acts.astype(np.float32),
        "token_ids": tables.token_ids.astype(np.int32), "token_counts": tables.token_counts.astype(np.int64),
        "corpus": np.asarray(corpus, np.int32),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / ARRAYS_FILE))
    os.chmod(folder / ARRAYS_FILE, FILE_MODE)
    write_json(folder / DESCRIPTIONS_FILE, _descriptions(tables, corpus, strings))
    write_json(folder / TOKENS_FILE, {str(i): s for i, s in sorted(strings.items())})
    write_json(folder / INDEX_FILE, info)


class FeatureLibrary:
    """Descriptions and snippets of one dictionary's features, answered from memory in microseconds."""

    def __init__(self, folder: Path, info: dict, arrays: dict[str, np.ndarray], strings: dict[int, str],
                 descriptions: list[str]):
        self.folder = folder
        self.info = info  # index.json
        self._arrays = arrays
        self._strings = strings
        self._descriptions = descriptions
        self._window = Window(info["window_before"], info["window_after"])
        self._seq_len = int(arrays["corpus"].shape[1])
        self._labels: dict[int, str] = {}
        self._labels_stamp: tuple[int, int] | None = None
        self.labels  # read labels.json now, so a broken file fails at open

    @classmethod
    def open(cls, data_root: Path, dictionary_name: str) -> "FeatureLibrary | None":
        """The library under `data_root/features/{dictionary_name}/`, or None when it was never computed."""
        if not dictionary_name or dictionary_name.startswith(".") or {"/", os.sep} & set(dictionary_name):
            raise HeadvisError(f"{dictionary_name!r} is not a dictionary name")
        folder = Path(data_root) / FEATURES_DIR / dictionary_name
        if not (folder / INDEX_FILE).is_file():
            return None
        rerun = f"re-run python -m headvis.features --dictionary ... --data {data_root}"
        try:
            info = read_json(folder / INDEX_FILE)
            if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
                version = info.get("format_version") if isinstance(info, dict) else None
                raise HeadvisError(f"features of {dictionary_name}: format_version {version!r} is not "
                                   f"{FORMAT_VERSION}; {rerun}")
            arrays = load_file(str(folder / ARRAYS_FILE))
            strings = {int(k): v for k, v in read_json(folder / TOKENS_FILE).items()}
            descriptions = read_json(folder / DESCRIPTIONS_FILE)
        except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
            raise HeadvisError(f"features of {dictionary_name} in {folder} are unreadable ({e}); {rerun}") from e
        d_sae = info.get("d_sae")
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing or len(descriptions) != d_sae or len(arrays["count"]) != d_sae:
            raise HeadvisError(f"features of {dictionary_name} in {folder} are incomplete; {rerun}")
        return cls(folder, info, arrays, strings, descriptions)

    @property
    def d_sae(self) -> int:
        return len(self._descriptions)

    @property
    def labels(self) -> dict[int, str]:
        """labels.json as {feature: text}, re-read whenever the file changes."""
        path = self.folder / LABELS_FILE
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._labels_stamp:
            self._labels = read_labels(path, self.d_sae) if stamp is not None else {}
            self._labels_stamp = stamp
        return self._labels

    def _check(self, feature: int) -> int:
        if not 0 <= feature < self.d_sae:
            raise HeadvisError(f"feature {feature} is out of range for {self.info['dictionary']} (0-{self.d_sae - 1})")
        return int(feature)

    def derived_description(self, feature: int) -> str:
        """The description derived from the data (headvis.features.describe), whatever the labels say."""
        return self._descriptions[self._check(feature)]

    def description(self, feature: int) -> str:
        """The user's label of `feature` if it has one, else the derived description."""
        label = self.labels.get(self._check(feature))
        return label if label is not None else self._descriptions[feature]

    def _snippet(self, seq: int, pos: int, window_acts: np.ndarray, interval: int) -> dict:
        start, end = (int(v) for v in self._window.bounds(np.int64(pos), self._seq_len))
        offset = start - (pos - self._window.before)  # index of `start` in the stored window
        ids = self._arrays["corpus"][seq, start:end + 1]
        return {"tokens": [self._strings[int(i)] for i in ids],
                "activations": round_sig(window_acts[offset:offset + end - start + 1]),
                "interval": int(interval), "sequence_id": int(seq), "start": start, "position": int(pos)}

    def snippets(self, feature: int, *, top: int = TOP_WINDOWS, per_interval: int = 1) -> list[dict]:
        """The `top` top windows (interval: that of their centre), then `per_interval` samples of each
        interval from the highest down, by activation within an interval."""
        f = self._check(feature)
        a = self._arrays
        max_activation = a["max_activation"][f]
        out = []
        top_seq, top_pos, top_value = a["top_seq"][f], a["top_pos"][f], a["top_value"][f]
        intervals = interval_of(top_value, max_activation)
        for j in range(min(top, len(top_seq))):
            if top_seq[j] >= 0:
                out.append(self._snippet(int(top_seq[j]), int(top_pos[j]), a["top_acts"][f, j], intervals[j]))
        seq, pos, value = a["sample_seq"][f], a["sample_pos"][f], a["sample_value"][f]  # (I, M)
        for i in range(seq.shape[0] - 1, -1, -1):
            slots = [m for m in range(min(per_interval, seq.shape[1])) if seq[i, m] >= 0]
            for m in sorted(slots, key=lambda m: -value[i, m]):
                out.append(self._snippet(int(seq[i, m]), int(pos[i, m]), a["sample_acts"][f, i, m], i + 1))
        return out

    def describe(self, feature: int) -> tuple[str, list[dict]]:
        """(description, snippets) of `feature`: what an attribution reply shows for it."""
        return self.description(feature), self.snippets(feature)

    def statistics(self, feature: int) -> dict:
        """count, frequency, max and mean activation of `feature` over the scanned tokens."""
        f = self._check(feature)
        count = int(self._arrays["count"][f])
        return {"count": count, "frequency": count / max(self.info["n_tokens"], 1),
                "max_activation": float(self._arrays["max_activation"][f]),
                "mean_activation": float(self._arrays["total"][f]) / count if count else 0.0}
