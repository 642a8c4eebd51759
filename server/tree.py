"""The scanned data tree as the server sees it: config.json, the scanned heads, file paths.

Opened once at start-up (`open_data_tree`); everything here is plain file
reading, so the command line can check `--data` before it imports torch.
Only format 2 trees (CONTRACT section 2) are served; a format 1 tree is
refused with a message that says to re-scan, and so is a config.json that
breaks headvis/schemas/config.schema.json or names heads outside its model
(the server would otherwise start, then answer 500).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from headvis.errors import HeadvisError

__all__ = ["FORMAT_VERSION", "DataTree", "in_use_error", "open_data_tree"]

FORMAT_VERSION = 2  # the format of config.json `format_version` this server speaks
_CONFIG_KEYS = ("model", "dataset", "layers", "heads", "top_k", "min_weight")


@dataclass(frozen=True)
class DataTree:
    """A scanned `data/` folder (CONTRACT section 2) and the fields of its config.json the server uses."""

    root: Path  # resolved
    config: dict  # config.json as read at start-up

    @cached_property
    def scanned_heads(self) -> list[tuple[int, int]]:
        """config.json `heads`: every scanned (layer, head), in the scan's order."""
        return [(int(layer), int(head)) for layer, head in self.config["heads"]]

    def is_scanned(self, layer: int, head: int) -> bool:
        return (layer, head) in self._scanned_set

    @cached_property
    def _scanned_set(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.scanned_heads)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.scanned_heads})

    @property
    def heads(self) -> list[int]:
        """Every query head scanned in some layer (the model worker captures these in every scanned layer)."""
        return sorted({head for _, head in self.scanned_heads})

    @property
    def n_sequences(self) -> int:
        return int(self.config["dataset"]["n_sequences"])

    @property
    def seq_len(self) -> int:
        return int(self.config["dataset"]["seq_len"])

    @property
    def causal(self) -> bool:
        return bool(self.config["model"].get("causal", True))

    # -- paths (every one built from validated integers, never from request text)
    @property
    def server_config(self) -> Path:
        return self.root / "server_config.json"

    def head_file(self, layer: int, head: int) -> Path:
        return self.root / "heads" / f"L{layer}H{head}.json"

    @property
    def custom_dir(self) -> Path:
        return self.root / "custom_sequences"

    @property
    def custom_index(self) -> Path:
        return self.custom_dir / "index.json"

    def custom_head(self, layer: int, head: int) -> Path:
        return self.custom_dir / f"L{layer}H{head}.json"

    @property
    def umap_dir(self) -> Path:
        return self.root / "umap"

    def umap_head(self, layer: int, head: int) -> Path:
        return self.umap_dir / f"L{layer}H{head}.json"

    def umap_rotation(self, layer: int, head: int) -> Path:
        return self.umap_dir / f"L{layer}H{head}.rotation.json"

    @property
    def attributions_dir(self) -> Path:
        return self.root / "attributions"

    @property
    def attributions_manifest(self) -> Path:
        return self.attributions_dir / "manifest.json"

    def attribution_file(self, kind: str, layer: int, head: int, seq_idx: int | str, query_pos: int,
                         key_pos: int) -> Path:
        """attributions/{qk,ov}/L{l}H{h}S{seq}Q{q}K{k}.json; `seq_idx` a scanned id or a validated custom id."""
        return self.attributions_dir / kind / f"L{layer}H{head}S{seq_idx}Q{query_pos}K{key_pos}.json"


def in_use_error(root: Path, holder: dict) -> HeadvisError:
    """The refusal of a second server on a tree another process holds (`headvis.lock`)."""
    from headvis.lock import holder_text

    return HeadvisError(f"--data {root} is already in use by {holder_text(holder)}; two writers would lose each "
                        "other's changes: stop it first, or serve another tree")


def _is_head_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        for pair in value)


def _listed(values: list) -> str:
    return f"[{', '.join(str(x)[:20] for x in values)}]"


def _config_problem(config: dict) -> str | None:
    """The first thing wrong with config.json: its schema (config.schema.json), then what a schema cannot say."""
    # jsonschema and the request validator's messages, imported here: the tree module stays light to import
    from headvis.schemas import load_schema
    from headvis.server.validation import first_problem, strict_validator

    problem = first_problem(strict_validator(load_schema("config.schema.json")), config)
    if problem is not None:
        return problem
    model = config["model"]
    for name in ("n_layers", "n_heads"):
        if config[name] != model[name]:
            return f"{name} {config[name]} differs from model.{name} {model[name]}"
    for name in ("heads", "umap_heads"):
        for i, (layer, head) in enumerate(config[name]):
            if layer >= model["n_layers"]:
                return f"{name}.{i} {_listed([layer, head])} names layer {layer}, past model.n_layers {model['n_layers']}"
            if head >= model["n_heads"]:
                return f"{name}.{i} {_listed([layer, head])} names head {head}, past model.n_heads {model['n_heads']}"
    if config["top_k"] > config["dataset"]["seq_len"]:
        return f"top_k {str(config['top_k'])[:20]} is more than dataset.seq_len {config['dataset']['seq_len']}"
    scanned = {tuple(pair) for pair in config["heads"]}
    for i, pair in enumerate(config["umap_heads"]):
        if tuple(pair) not in scanned:
            return f"umap_heads.{i} {_listed(pair)} is not one of `heads`"
    if set(config["layers"]) != {layer for layer, _ in scanned}:
        return (f"layers {_listed(sorted(config['layers']))} are not the layers of `heads` "
                f"{_listed(sorted({layer for layer, _ in scanned}))}")
    return None


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a number JSON allows", name, 0)


def open_data_tree(path: str | Path) -> DataTree:
    """Check that `path` is a format 2 scanned tree: a readable config.json, valid under its schema and consistent."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HeadvisError(f"--data {path}: no such folder (run python -m headvis.scan --out {path} first)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise HeadvisError(f"--data {path}: not a headvis data tree (no config.json; run python -m headvis.scan first)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadvisError(f"--data {path}: config.json is not readable JSON ({e})") from e
    except RecursionError as e:
        raise HeadvisError(f"--data {path}: config.json is nested too deeply to be a headvis config") from e
    if not isinstance(config, dict):
        raise HeadvisError(f"--data {path}: config.json is not a JSON object; re-scan with python -m headvis.scan")
    version = config.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:  # 2.0 is not format 2
        found = "has no format_version (format 1)" if version is None else f"has format_version {json.dumps(version)[:20]}"
        raise HeadvisError(f"--data {path}: config.json {found}, and this server reads format {FORMAT_VERSION} only; "
                           f"re-scan it: python -m headvis.scan --out {path}")
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
        raise HeadvisError(f"--data {path}: config.json lacks {', '.join(missing)}; re-scan with this headvis version")
    if not _is_head_list(config["heads"]):
        raise HeadvisError(f"--data {path}: config.json `heads` is not a list of [layer, head] pairs; re-scan it")
    problem = _config_problem(config)
    if problem is not None:  # else a request would meet it later, as a 500
        raise HeadvisError(f"--data {path}: config.json is damaged: {problem}; re-scan it: "
                           f"python -m headvis.scan --out {path}")
    return DataTree(root=root.resolve(), config=config)
