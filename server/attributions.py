"""Attributions in the server: the dictionaries it serves (`ServedDictionaries`) and the files it keeps (`AttributionStore`).

Dictionaries. Before the model loads, `read_dictionaries(paths)` reads every
`--dictionary` folder and `ServedDictionaries.check(dictionaries, tree)`
refuses, with one HeadvisError line, a dictionary that does not fit the
scanned model (`check_matches_model` against config.json's `model`: layer,
widths; the loaded model is then held to that shape), a transcoder or a
resid_mid one, two that read one residual-stream point (blocks.L.hook_resid_pre
and blocks.{L-1}.hook_resid_post are the same tensor), two with one name (the
name keys the feature library and the files), one no scanned layer uses, and
a feature library computed for another hook or width. A dictionary reading
the input of layer L is the source of layer L's QK and OV attributions; one
reading the input of layer L + 1 (= blocks.L.hook_resid_post) is layer L's OV
target.

Files. An attribution is cached as
`attributions/{qk,ov}/L{l}H{h}S{seq}Q{q}K{k}.json` and listed in
`attributions/manifest.json` (CONTRACT section 2). A file is served as it is
when it was made with the same source dictionary (`dictionary`: name, hook,
d_sae), the same OV target (`target`: kind, name, hook) and the same feature
libraries (`feature_libraries`: name -> the library's `created`, or null);
otherwise it is computed again and replaced. The file is written and listed
together, under the manifest's lock (`JsonFiles.update`), so a custom
sequence deleted meanwhile (its index entry goes first) is never written
back. `reconcile` makes the manifest list exactly the files at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable

from aiohttp import web

from headvis.attributions.edge import Describe
from headvis.dictionaries import Dictionary, check_matches_model, load_dictionary
from headvis.errors import HeadvisError
from headvis.features import FeatureLibrary
from headvis.io import read_json, write_json
from headvis.server.limits import MAX_ATTRIBUTION_FILES, MAX_SNIPPETS
from headvis.server.store import JsonFiles
from headvis.server.tree import DataTree

__all__ = ["ATTRIBUTIONS_UNAVAILABLE", "KINDS", "AttributionStore", "Served", "ServedDictionaries", "describer",
           "features_command", "read_dictionaries", "train_command"]

KINDS = ("qk", "ov")
ATTRIBUTIONS_UNAVAILABLE = ("no sparse dictionary is configured, so QK/OV attributions are off: train one "
                            "(python -m headvis.train_dictionary --layer L --hook resid_pre --out DIR) and start "
                            "the server with --dictionary DIR")
log = logging.getLogger("headvis.server")
_FILE_NAME = re.compile(r"L(\d+)H(\d+)S(0|[1-9]\d*|c[0-9a-f]{12})Q(\d+)K(\d+)\.json")


def train_command(layer: int) -> str:
    return f"python -m headvis.train_dictionary --layer {layer} --hook resid_pre --out DIR"


def features_command(served: "Served", data: Path) -> str:
    return f"python -m headvis.features --dictionary {served.path} --data {data}"


@dataclass(frozen=True)
class Served:
    """One dictionary the server was started with."""

    dictionary: Dictionary  # on the model's device once `ServedDictionaries.to` moved it
    library: FeatureLibrary | None  # data/features/{name}/, None when never computed
    path: Path  # the --dictionary folder, for messages
    stream: int  # reads the residual stream at the input of layer `stream` (n_layers: after the last)

    @property
    def name(self) -> str:
        return self.dictionary.name

    @property
    def identity(self) -> dict:
        """The `dictionary` field of the files it makes (as headvis.attributions.edge writes it)."""
        d = self.dictionary
        return {"name": d.name, "hook": d.hook_name, "d_sae": int(d.d_sae)}

    @property
    def library_stamp(self) -> str | None:
        return None if self.library is None else str(self.library.info.get("created"))

    def summary(self) -> str:
        d = self.dictionary
        sparsity = f"topk k={d.k}" if d.architecture == "topk" else d.architecture
        return f"{d.name} ({d.hook_name}, d_sae {d.d_sae}, {sparsity})"


def read_dictionaries(paths: tuple[Path, ...]) -> list[Dictionary]:
    """Every --dictionary folder read (on the CPU), in order; a HeadvisError names the first bad one."""
    return [load_dictionary(path) for path in paths]


def _stream_index(d: Dictionary) -> int:
    """Which residual-stream point `d` reads: L for blocks.L.hook_resid_pre, L + 1 for blocks.L.hook_resid_post."""
    if d.is_transcoder:
        raise HeadvisError(f"dictionary {d.name} is a transcoder ({d.hook_name} -> {d.hook_name_out}); attributions "
                           "read sparse autoencoders of the residual stream (resid_pre or resid_post)")
    if d.hook == "resid_pre":
        return d.layer
    if d.hook == "resid_post":
        return d.layer + 1
    raise HeadvisError(f"dictionary {d.name} reads {d.hook_name}; attributions read the residual stream at an "
                       "attention's input (blocks.L.hook_resid_pre, or blocks.{L-1}.hook_resid_post)")


def _hook_names(stream: int) -> str:
    """The hooks that name residual-stream point `stream`: 'blocks.2.hook_resid_pre / blocks.1.hook_resid_post'."""
    return " / ".join([f"blocks.{stream}.hook_resid_pre"] + ([f"blocks.{stream - 1}.hook_resid_post"] if stream else []))


def _open_library(data: Path, d: Dictionary) -> FeatureLibrary | None:
    """data/features/{name}/, None when never computed; refused when computed for another hook or width."""
    library = FeatureLibrary.open(data, d.name)
    if library is None:
        return None
    made_for = (library.info.get("hook"), library.info.get("d_sae"))
    if made_for != (d.hook_name, d.d_sae):
        raise HeadvisError(f"the feature library {library.folder} was computed for {made_for[0]} with d_sae "
                           f"{made_for[1]}, but dictionary {d.name} reads {d.hook_name} with d_sae {d.d_sae}; "
                           f"recompute it: python -m headvis.features --dictionary {d.path} --data {data}")
    return library


class ServedDictionaries:
    """The dictionaries of this server, by the residual-stream point they read."""

    def __init__(self, served: list[Served], tree: DataTree):
        self.tree = tree
        self._by_stream = {s.stream: s for s in served}

    @classmethod
    def check(cls, dictionaries: list[Dictionary], tree: DataTree, model_name: str | None = None) -> "ServedDictionaries":
        """Refuse (HeadvisError) what cannot be served on the scanned model; the rest with their feature libraries.

        `model_name`: a --model override, for the name check (a warning only).
        """
        scanned_model = tree.config["model"]
        info = SimpleNamespace(name=model_name or scanned_model.get("name"), n_layers=int(tree.config["n_layers"]),
                               d_model=int(scanned_model["d_model"]))
        served: list[Served] = []
        scanned = set(tree.layers)
        for d in dictionaries:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check_matches_model(d, info)
            for warning in caught:
                log.warning("%s", warning.message)
            stream = _stream_index(d)
            for other in served:
                if other.stream == stream:
                    raise HeadvisError(f"dictionaries {other.name} ({other.dictionary.hook_name}) and {d.name} "
                                       f"({d.hook_name}) both read the input of layer {stream} "
                                       f"({_hook_names(stream)}); pass one --dictionary per hook")
                if other.name == d.name:
                    raise HeadvisError(f"two dictionaries are named {d.name} ({other.path} and {d.path}); the name "
                                       "keys their feature libraries and files: rename one folder")
            if stream not in scanned and stream - 1 not in scanned:
                raise HeadvisError(f"dictionary {d.name} reads {d.hook_name}, which no scanned layer uses (scanned "
                                   f"layers: {', '.join(map(str, sorted(scanned)))}; a dictionary of layer L's input "
                                   "serves L's attributions, one of its output L's OV targets)")
            served.append(Served(dictionary=d, library=_open_library(tree.root, d), path=d.path, stream=stream))
        return cls(served, tree)

    def to(self, device) -> "ServedDictionaries":
        """The same dictionaries with their tensors on `device` (the model's)."""
        return ServedDictionaries([replace(s, dictionary=s.dictionary.to(device)) for s in self._by_stream.values()],
                                  self.tree)

    def layers(self) -> list[int]:
        """The scanned layers with a source dictionary: those whose attributions this server computes."""
        return sorted(s.stream for s in self._by_stream.values() if s.stream in self.tree.layers)

    def source(self, layer: int) -> Served | None:
        """The dictionary of layer `layer`'s attention input (QK both sides, OV's value side)."""
        return self._by_stream.get(layer)

    def target(self, layer: int) -> Served | None:
        """The dictionary of layer `layer`'s output (resid_post), OV's target; None: the head's output direction."""
        return self._by_stream.get(layer + 1)

    def require_source(self, layer: int) -> Served:
        """The source of `layer`, or the reply that says there is none: 501 with no dictionary at all, else 404."""
        if not self._by_stream:
            raise web.HTTPNotImplemented(text=ATTRIBUTIONS_UNAVAILABLE)
        source = self.source(layer)
        if source is None:
            layers = self.layers()
            served = f"layers {', '.join(map(str, layers))}" if layers else "no scanned layer"
            raise web.HTTPNotFound(text=(
                f"no dictionary reads layer {layer}'s attention input (blocks.{layer}.hook_resid_pre); this server "
                f"has dictionaries for {served}. Train one: {train_command(layer)}, then restart the server with "
                "--dictionary DIR added"))
        return source

    def log_lines(self) -> list[str]:
        """What is served, one line each, for the start-up log."""
        if not self._by_stream:
            return ["attributions: off (no --dictionary); the attribution endpoints answer 501"]
        lines = []
        for stream, s in sorted(self._by_stream.items()):
            roles = []
            if stream in self.tree.layers:
                roles.append(f"QK and OV source of layer {stream}")
            if stream - 1 in self.tree.layers:
                roles.append(f"OV target of layer {stream - 1}")
            library = (f"feature library of {s.library_stamp}" if s.library is not None else
                       f"no feature library (features show no descriptions or snippets; compute it: "
                       f"{features_command(s, self.tree.root)})")
            lines.append(f"attributions: {s.summary()}: {', '.join(roles)}; {library}")
        return lines


def describer(served: list[Served]) -> Describe:
    """describe(dictionary name, feature) -> (description, at most MAX_SNIPPETS snippets), memoized per request."""
    libraries = {s.name: s.library for s in served}
    memo: dict[tuple[str, int], tuple[str, list]] = {}

    def describe(name: str, feature: int) -> tuple[str, list]:
        key = (name, feature)
        if key not in memo:
            library = libraries.get(name)
            if library is None:
                memo[key] = (f"feature {feature}", [])
            else:  # the top-activating windows first
                memo[key] = (library.description(feature), library.snippets(feature, top=MAX_SNIPPETS,
                                                                              per_interval=0)[:MAX_SNIPPETS])
        return memo[key]

    return describe


def _provenance(served: list[Served]) -> dict:
    """The fields the server adds to a file: `feature_libraries` (name -> created or null), `note` when one is missing."""
    out: dict = {"feature_libraries": {s.name: s.library_stamp for s in served}}
    missing = [s for s in served if s.library is None]
    if missing:
        out["note"] = "; ".join(
            f"features of {s.name} have no descriptions or snippets yet (no feature library): compute them with "
            f"python -m headvis.features --dictionary <the {s.name} folder> --data <this data tree>, then restart "
            "the server" for s in missing)
    return out


def _target_key(target: dict | None) -> dict | None:
    return None if target is None else {k: target.get(k) for k in ("kind", "name", "hook")}


def _identity(body) -> tuple | None:
    """What must match for a file to be served as it is."""
    if not isinstance(body, dict):
        return None
    return body.get("dictionary"), _target_key(body.get("target")), body.get("feature_libraries")


def _expected_identity(kind: str, source: Served, target: Served | None) -> tuple:
    """`_identity` of a file made now with `source` (and for OV `target`, None: the head's output direction)."""
    if kind == "qk":
        target_key = None
    elif target is None:
        target_key = {"kind": "head_output_direction", "name": None, "hook": None}
    else:
        target_key = {"kind": "dictionary", "name": target.name, "hook": target.dictionary.hook_name}
    return source.identity, target_key, _provenance(_used(kind, source, target))["feature_libraries"]


def _used(kind: str, source: Served, target: Served | None) -> list[Served]:
    return [source] + ([target] if kind == "ov" and target is not None else [])


def _read_cached(path: Path) -> tuple[bytes, dict] | None:
    """(raw bytes, parsed) of an attribution file, or None when missing or unreadable (it is then recomputed)."""
    try:
        raw = path.read_bytes()
        return raw, json.loads(raw)
    except (OSError, ValueError):
        return None


def _count(manifest: dict) -> int:
    return sum(len(entry.get("qk", [])) + len(entry.get("ov", [])) for entry in manifest.values())


def _full() -> web.HTTPConflict:
    return web.HTTPConflict(text=f"there are already {MAX_ATTRIBUTION_FILES} attribution files, the most the server "
                                 "keeps; remove some under attributions/ (then restart the server) to compute more")


class AttributionStore:
    """attributions/{qk,ov}/ and attributions/manifest.json of one data tree."""

    def __init__(self, tree: DataTree, files: JsonFiles, custom_ids: Callable[[], frozenset[str]]):
        self.tree = tree
        self.files = files
        self.custom_ids = custom_ids  # the custom sequences listed now (CustomStore.ids)
        self._inflight: dict[Path, asyncio.Future] = {}

    async def cached(self, path: Path, identity: tuple) -> bytes | None:
        """The file's bytes when it exists and was made as `identity` says, else None."""
        found = await self.files.call(_read_cached, path)
        if found is None or _identity(found[1]) != identity:
            return None
        return found[0]

    async def get(self, kind: str, layer: int, head: int, seq_idx: int | str, query_pos: int, key_pos: int,
                  source: Served, target: Served | None, compute: Callable[[], Awaitable[dict]]) -> bytes:
        """The file's bytes: cached as it is, or `compute()`d (once for concurrent requests of one edge), written, listed.

        `target`: OV's target dictionary (None: the head's output direction; ignored for QK).
        """
        path = self.tree.attribution_file(kind, layer, head, seq_idx, query_pos, key_pos)
        raw = await self.cached(path, _expected_identity(kind, source, target))
        if raw is not None:
            return raw
        task = self._inflight.get(path)
        if task is None:
            extra = _provenance(_used(kind, source, target))
            key = f"L{layer}H{head}S{seq_idx}"  # the manifest's
            task = asyncio.ensure_future(self._compute_and_write(path, key, kind, seq_idx, [query_pos, key_pos],
                                                                 compute, extra))
            self._inflight[path] = task
            task.add_done_callback(lambda _: self._inflight.pop(path, None))
        return await asyncio.shield(task)

    async def _compute_and_write(self, path: Path, key: str, kind: str, seq_idx: int | str, edge: list[int],
                                 compute: Callable[[], Awaitable[dict]], extra: dict) -> bytes:
        manifest = await self.files.read(self.tree.attributions_manifest, dict)
        if _count(manifest) >= MAX_ATTRIBUTION_FILES:  # before the forward pass
            raise _full()
        body = {**await compute(), **extra}

        def change(manifest: dict) -> tuple[dict, bytes]:
            if isinstance(seq_idx, str) and seq_idx not in self.custom_ids():
                raise web.HTTPNotFound(text=f"no custom sequence {seq_idx!r} (it was deleted meanwhile)")
            entry = manifest.get(key, {"qk": [], "ov": []})
            edges = entry.get(kind, [])
            listed = edge in edges
            if not listed and _count(manifest) >= MAX_ATTRIBUTION_FILES:
                raise _full()
            write_json(path, body)
            raw = path.read_bytes()
            if listed:
                return None, raw
            new_entry = {"qk": list(entry.get("qk", [])), "ov": list(entry.get("ov", []))}
            new_entry[kind] = [*edges, edge]
            return {**manifest, key: new_entry}, raw

        return await self.files.update(self.tree.attributions_manifest, change, dict)

    async def forget(self, sequence_id: str) -> int:
        """Remove a custom sequence's attribution files and manifest entries; returns the files removed."""
        def change(manifest: dict) -> tuple[dict | None, int]:
            removed = 0
            for kind in KINDS:
                for path in (self.tree.attributions_dir / kind).glob(f"L*H*S{sequence_id}Q*K*.json"):
                    path.unlink(missing_ok=True)
                    removed += 1
            kept = {key: entry for key, entry in manifest.items() if not key.endswith(f"S{sequence_id}")}
            return (kept if len(kept) != len(manifest) else None), removed

        return await self.files.update(self.tree.attributions_manifest, change, dict)

    def reconcile(self) -> int:
        """At start-up: list exactly the files there are (dropping those of unlisted custom sequences) and remove
        stray temp files. Returns how many manifest edges or files changed."""
        root = self.tree.attributions_dir
        for folder in (root, *(root / kind for kind in KINDS)):
            if folder.is_dir():
                for stray in folder.glob(".*.tmp"):
                    stray.unlink(missing_ok=True)
        try:
            manifest = read_json(self.tree.attributions_manifest)
        except FileNotFoundError:
            manifest = {}
        custom = self.custom_ids()
        found: dict[str, dict[str, list[list[int]]]] = {}
        changed = 0
        for kind in KINDS:
            for path in sorted((root / kind).glob("*.json")) if (root / kind).is_dir() else []:
                match = _FILE_NAME.fullmatch(path.name)
                if match is None:
                    continue
                layer, head, seq, q, k = match.groups()
                if seq.startswith("c") and seq not in custom:
                    path.unlink(missing_ok=True)
                    changed += 1
                    continue
                entry = found.setdefault(f"L{layer}H{head}S{seq}", {"qk": [], "ov": []})
                entry[kind].append([int(q), int(k)])
        present = {(key, kind, tuple(edge)) for key, entry in found.items() for kind in KINDS for edge in entry[kind]}
        rebuilt: dict[str, dict[str, list[list[int]]]] = {}
        seen: set[tuple] = set()

        def keep(key: str, kind: str, edge: tuple) -> None:
            if (key, kind, edge) in present and (key, kind, edge) not in seen:
                seen.add((key, kind, edge))
                rebuilt.setdefault(key, {"qk": [], "ov": []})[kind].append(list(edge))

        for key, entry in manifest.items():  # the listed order, where the files are there
            for kind in KINDS:
                for edge in entry.get(kind, []) if isinstance(entry, dict) else []:
                    keep(key, kind, tuple(edge))
        for key, kind, edge in sorted(present):  # files the manifest missed (a killed server)
            keep(key, kind, edge)
        if rebuilt != manifest:
            changed += len(present ^ {(k, kind, tuple(e)) for k, entry in manifest.items() if isinstance(entry, dict)
                                      for kind in KINDS for e in entry.get(kind, [])})
            write_json(self.tree.attributions_manifest, rebuilt, rounded=True)
        return changed
