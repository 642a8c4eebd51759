"""The scanned data tree as the server sees it: config.json, head bounds, file paths.

Opened once at start-up (`open_data_tree`); everything here is plain file
reading, so the command line can check `--data` before it imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headvis.errors import HeadvisError

__all__ = ["DataTree", "open_data_tree"]

_CONFIG_KEYS = ("model", "dataset", "layers", "heads", "top_k", "min_weight")


@dataclass(frozen=True)
class DataTree:
    """A scanned `data/` folder (CONTRACT section 2) and the fields of its config.json the server uses."""

    root: Path  # resolved
    config: dict  # config.json as read at start-up

    @property
    def layers(self) -> list[int]:
        return list(self.config["layers"])

    @property
    def heads(self) -> list[int]:
        return list(self.config["heads"])

    @property
    def scanned_heads(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in self.layers for head in self.heads]

    @property
    def n_sequences(self) -> int:
        return int(self.config["dataset"]["n_sequences"])

    @property
    def seq_len(self) -> int:
        return int(self.config["dataset"]["seq_len"])

    @property
    def causal(self) -> bool:
        return bool(self.config["model"].get("causal", True))

    # -- paths (every one built from validated integers or server-made ids, never from request text)
    @property
    def server_config(self) -> Path:
        return self.root / "server_config.json"

    @property
    def custom_dir(self) -> Path:
        return self.root / "custom"

    @property
    def custom_sequences(self) -> Path:
        return self.custom_dir / "sequences.json"

    def custom_head(self, layer: int, head: int) -> Path:
        return self.custom_dir / f"L{layer}H{head}.json"

    def umap_head(self, layer: int, head: int) -> Path:
        return self.root / "umap" / f"L{layer}H{head}.json"

    def umap_rotation(self, layer: int, head: int) -> Path:
        return self.root / "umap" / f"L{layer}H{head}.rotation.json"

    @property
    def umap_sequences(self) -> Path:
        return self.root / "umap" / "sequences.json"

    def clusters(self, layer: int, head: int) -> Path:
        return self.root / "umap" / "clusters" / f"L{layer}H{head}.json"


def open_data_tree(path: str | Path) -> DataTree:
    """Check that `path` is a scanned tree (a readable config.json with the needed keys)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HeadvisError(f"--data {path}: no such folder (run python -m headvis.scan --out {path} first)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise HeadvisError(f"--data {path}: not a headvis data tree (no config.json; run python -m headvis.scan first)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadvisError(f"--data {path}: config.json is not readable JSON ({e})") from e
    missing = [key for key in _CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise HeadvisError(f"--data {path}: config.json lacks {', '.join(missing)}; rescan with this headvis version")
    return DataTree(root=root.resolve(), config=config)
