"""JSON Schemas of every file in the data tree, and a validator for a whole tree.

`validate_tree(path)` checks every file a scan writes (and the server's
custom and cluster files when present) against these schemas plus the
cross-file rules the schemas cannot express.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["load_schema", "validate_file", "validate_tree"]

# data-tree glob -> schema file (format 2, CONTRACT section 2)
TREE_SCHEMAS: dict[str, str] = {
    "config.json": "config.schema.json",
    "scatter_data.json": "scatter_data.schema.json",
    "heads/L*H*.json": "head.schema.json",
    "umap/L*H*.json": "umap_head.schema.json",
    "umap/L*H*.rotation.json": "umap_rotation.schema.json",
    "umap/sequences.json": "umap_sequences.schema.json",
    "custom_sequences/index.json": "custom_sequences.schema.json",
    "custom_sequences/L*H*.json": "custom_head.schema.json",
    "attributions/manifest.json": "attributions_manifest.schema.json",
    "attributions/qk/*.json": "attribution_file.schema.json",
    "attributions/ov/*.json": "attribution_file.schema.json",
    "server_config.json": "server_config.schema.json",
}
# files every scan writes
REQUIRED = ("config.json", "scatter_data.json", "umap/sequences.json", "custom_sequences/index.json",
            "attributions/manifest.json", "server_config.json")


@cache
def load_schema(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def _read(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def validate_file(path: Path, schema_name: str) -> None:
    """Raise jsonschema.ValidationError if `path` does not match."""
    import jsonschema

    jsonschema.validate(_read(path), load_schema(schema_name))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _cross_file(root: Path) -> None:
    """The rules between files that the schemas cannot express; ValueError on the first broken one."""
    config = _read(root / "config.json")
    heads = [tuple(pair) for pair in config["heads"]]
    names = {f"L{layer}H{head}.json" for layer, head in heads}
    _check({p.name for p in (root / "heads").glob("L*H*.json")} == names, "heads/ does not hold exactly config.heads")
    scatter = _read(root / "scatter_data.json")
    _check([(r["layer"], r["head"]) for r in scatter] == heads, "scatter_data.json rows differ from config.heads")
    _check(sorted(map(tuple, config["umap_heads"])) == sorted(
        (int(p.stem.split("H")[0][1:]), int(p.stem.split("H")[1])) for p in (root / "umap").glob("L*H*.json")
        if not p.name.endswith(".rotation.json")), "config.umap_heads differs from the umap/ files")
    sequences = _read(root / "umap" / "sequences.json")
    for layer, head in heads:
        body = _read(root / "heads" / f"L{layer}H{head}.json")
        _check((body["layer"], body["head"]) == (layer, head), f"heads/L{layer}H{head}.json names another head")
        ids = [s["sequence_id"] for s in body["sequences"]]
        _check(len(ids) == len(set(ids)), f"heads/L{layer}H{head}.json lists a sequence twice")
        for s in body["sequences"]:
            _check(len(s["tokens"]) == len(s["token_ids"]) == s["seq_len"], f"L{layer}H{head} {s['sequence_id']}: lengths differ")
            _check(len(s["attention_indices"]) == len(s["attention_values"]), f"L{layer}H{head}: COO lengths differ")
        _check(len(body["qk_distance_histogram"]["bin_values"]) == len(body["qk_distance_histogram"]["bin_edges"]) - 1,
               f"L{layer}H{head}: qk_distance_histogram bins")
        umap_path = root / "umap" / f"L{layer}H{head}.json"
        if not umap_path.exists():
            continue
        cloud = _read(umap_path)
        n = len(cloud["seq_idx"])
        columns = [cloud["top_q"], cloud["top_k"], cloud["norms"]]
        columns += [cloud["pca"][v][d] for v in "QKVO" for d in ("d0", "d1", "d2")]
        columns += [view["embeddings"][v][d] for view in cloud.get("views", []) for v in "QKVO" for d in ("d0", "d1", "d2")]
        _check(all(len(c) == n for c in columns), f"umap/L{layer}H{head}.json: columns of different lengths")
        _check(all(str(i) in sequences for i in cloud["seq_idx"]), f"umap/L{layer}H{head}.json names a sequence absent from umap/sequences.json")
        _check(all(k <= q for q, k in zip(cloud["top_q"], cloud["top_k"])) or not config["model"]["causal"],
               f"umap/L{layer}H{head}.json: a causal edge with top_k > top_q")
    _attributions_cross_file(root)


def _attributions_cross_file(root: Path) -> None:
    """attributions/manifest.json lists exactly the attribution files, once each; each file is the edge its name says."""
    manifest = _read(root / "attributions" / "manifest.json")
    listed = []
    for key, entry in manifest.items():
        for kind in ("qk", "ov"):
            listed += [(kind, f"{key}Q{q}K{k}.json") for q, k in entry[kind]]
    _check(len(listed) == len(set(listed)), "attributions/manifest.json lists an edge twice")
    found = set()
    for kind in ("qk", "ov"):
        for path in (root / "attributions" / kind).glob("*.json"):
            body = _read(path)
            name = f"L{body['layer']}H{body['head']}S{body['seq_idx']}Q{body['query_pos']}K{body['key_pos']}.json"
            _check(body["kind"] == kind and path.name == name, f"attributions/{kind}/{path.name} holds {body['kind']} {name}")
            found.add((kind, path.name))
    _check(found == set(listed), "attributions/manifest.json does not list exactly the files of attributions/qk and ov")


def validate_tree(root: Path) -> int:
    """Validate every known file under `root` and the rules between them; returns how many files were checked."""
    root = Path(root)
    for name in REQUIRED:
        if not (root / name).is_file():
            raise FileNotFoundError(f"the tree has no {name}")
    checked = 0
    for pattern, schema in TREE_SCHEMAS.items():
        for path in sorted(root.glob(pattern)):
            if pattern == "umap/L*H*.json" and path.name.endswith(".rotation.json"):
                continue
            if pattern == "custom_sequences/L*H*.json" and path.name == "index.json":
                continue
            validate_file(path, schema)
            checked += 1
    checked += _validate_store(root / "custom_sequences" / "store")
    _cross_file(root)
    return checked


def _validate_store(store: Path) -> int:
    """custom_sequences/store/ (headvis.custom): each entry and record as the snapshot files would list it."""
    import jsonschema

    checked = 0
    folders = sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.is_dir() else []
    for folder in folders:
        entry = _read(folder / "entry.json")
        jsonschema.validate({"sequences": [entry]}, load_schema("custom_sequences.schema.json"))
        _check(folder.name.endswith(f"-{entry['sequence_id']}"), f"{folder.name} holds {entry['sequence_id']}")
        for path in sorted(folder.glob("L*H*.json")):
            record = _read(path)
            jsonschema.validate({"sequences": [record]}, load_schema("custom_head.schema.json"))
            _check(record["sequence_id"] == entry["sequence_id"], f"{folder.name}/{path.name} names another sequence")
        checked += 1
    return checked
