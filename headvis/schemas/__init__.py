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

# data-tree glob -> schema file
TREE_SCHEMAS: dict[str, str] = {
    "config.json": "config.schema.json",
    "scatter_data.json": "scatter_data.schema.json",
    "heads/L*H*.json": "head.schema.json",
    "umap/sequences.json": "umap_sequences.schema.json",
    "umap/L*H*.rotation.json": "umap_rotation.schema.json",
    "custom/sequences.json": "custom_sequences.schema.json",
    "custom/L*H*.json": "custom_head.schema.json",
    "umap/clusters/L*H*.json": "clusters.schema.json",
    "server_config.json": "server_config.schema.json",
}


@cache
def load_schema(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def validate_file(path: Path, schema_name: str) -> None:
    """Raise jsonschema.ValidationError if `path` does not match."""
    import jsonschema

    jsonschema.validate(json.loads(Path(path).read_text(encoding="utf-8")), load_schema(schema_name))


def validate_tree(root: Path) -> int:
    """Validate every known file under `root`; returns how many were checked."""
    root = Path(root)
    checked = 0
    for pattern, schema in TREE_SCHEMAS.items():
        for path in sorted(root.glob(pattern)):
            if pattern == "umap/L*H*.json" or (pattern == "heads/L*H*.json" and path.name.endswith(".rotation.json")):
                continue
            if not resources.files(__name__).joinpath(schema).is_file():
                raise FileNotFoundError(f"no schema {schema} for {path}")
            validate_file(path, schema)
            checked += 1
    for path in sorted(root.glob("umap/L*H*.json")):
        if not path.name.endswith(".rotation.json"):
            validate_file(path, "umap_head.schema.json")
            checked += 1
    return checked
