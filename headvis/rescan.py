"""A rescan keeps what people made: custom sequences, clusters and projected points move to the new tree.

    report = carry_over(old, staging, lm, sequences, kept=Path("data.kept"))

The scan calls this under `--out`'s lock (no server can write the old tree
meanwhile), once the new tree is complete in its staging folder:

- Custom sequences are recomputed against the new scan (its heads, top_k,
  min_weight) by the code the server's add uses, keeping their ids, texts and
  times, when the model is the same (name, shape and, where both trees record
  it, `weights_sha256`). Under another model they are not recomputed.
- A projected point is recomputed onto the new projection when the model is
  the same, its head is still scanned and its sequence is still there with the
  same tokens (a scanned sequence of the new corpus, or a carried custom one).
  An edge that is now a cloud point needs no projected point.
- A cluster keeps the points that still exist: a new cloud point or projected
  point whose sequence has the same tokens as before. A cluster left with no
  point is dropped.

Nothing is dropped silently: whatever was not carried whole (custom sequences
under another model, projected points or cluster points that no longer
exist) is copied to `kept/<time>/` (`custom_sequences/` as it was, and
`clusters.json` with each such head's clusters and projected points as they
were), and the returned lines, which the scan prints, say what and where.
Cached attribution files are not carried: they are recomputed on request.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web

from headvis.custom import CustomFolder
from headvis.io import read_json, write_json
from headvis.models import LoadedModel

FORMAT_VERSION = 2  # the old trees whose files this module reads

__all__ = ["carry_over", "same_model"]

_SHAPE = ("name", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "causal")


def same_model(old: dict, new: dict) -> bool:
    """Whether two config.json `model` objects name the same weights (digests compared where both have one)."""
    if any(old.get(k) != new.get(k) for k in _SHAPE):
        return False
    return old.get("weights_sha256") is None or new.get("weights_sha256") is None or \
        old["weights_sha256"] == new["weights_sha256"]


def _head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


@dataclass
class _Aside:
    """What could not be carried whole, to be copied beside the tree."""

    custom: bool = False
    heads: dict[str, dict] = field(default_factory=dict)  # "L1H0" -> {"clusters": [...], "projected_points": [...]}
    lines: list[str] = field(default_factory=list)


def carry_over(old: Path, new: Path, lm: LoadedModel, sequences: torch.Tensor, kept: Path) -> list[str]:
    """Carry the old tree's custom sequences, projected points and clusters into `new`; the lines to print.

    `sequences` (n_sequences, seq_len) are the new scan's token ids; `kept` the folder that receives, under a
    time-stamped subfolder, whatever is not carried whole. An old tree of another format, or one whose files
    cannot be read, is carried not at all: its user folders are copied aside whole; so is everything under
    --tp, where rank 0 alone cannot run the split model (the other processes have left).
    """
    if lm.tp > 1:
        return _all_aside(old, new, kept, "--tp: the old tree's custom sequences and projected points are not "
                                          "recomputed (the model is split over processes that have finished)")
    try:
        old_config = read_json(old / "config.json")
        version = old_config.get("format_version") if isinstance(old_config, dict) else None
        if version != FORMAT_VERSION:
            return _all_aside(old, new, kept, f"the old tree is format_version {version}: nothing is carried")
        return _carry(old, new, lm, sequences, kept, old_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return _all_aside(old, new, kept, f"the old tree's files could not be read ({type(e).__name__}: {e}); "
                                          "nothing is carried")


_USER_FOLDERS = ("custom_sequences", "custom", "umap")  # `custom/`: format 1's custom prompts


def _all_aside(old: Path, new: Path, kept: Path, reason: str) -> list[str]:
    """Undo any partial carry in `new`, copy the old tree's user folders aside whole."""
    from headvis.server.tree import open_data_tree

    heads = open_data_tree(new).scanned_heads
    shutil.rmtree(new / "custom_sequences" / "store", ignore_errors=True)
    CustomFolder(new / "custom_sequences").snapshot(heads)
    for layer, head in heads:
        path = new / "umap" / f"{_head_name(layer, head)}.json"
        body = read_json(path)
        if body.get("clusters") or body.get("projected_points"):
            write_json(path, {**body, "clusters": [], "projected_points": []}, rounded=True)
    present = [name for name in _USER_FOLDERS if (old / name).is_dir()]
    if not present:
        return [reason]
    where = kept / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in present:
        shutil.copytree(old / name, where / name, dirs_exist_ok=True)
    return [reason, f"the old tree's {', '.join(f'{n}/' for n in present)} are kept in {where}"]


def _carry(old: Path, new: Path, lm: LoadedModel, sequences: torch.Tensor, kept: Path, old_config: dict) -> list[str]:
    from headvis.server.compute import Edge, ModelWorker  # the server's code: one implementation of each record
    from headvis.server.tree import open_data_tree

    new_config = read_json(new / "config.json")
    model_matches = same_model(old_config.get("model", {}), new_config["model"])
    tree = open_data_tree(new)
    worker = ModelWorker(lm, tree) if model_matches else None
    aside, lines = _Aside(), []

    # -- custom sequences
    entries = CustomFolder(old / "custom_sequences").listing()
    carried: dict[str, dict] = {}  # sequence_id -> new entry
    if entries and worker is not None:
        folder = CustomFolder(new / "custom_sequences")
        for entry in entries:
            try:
                new_entry, records = worker.custom_records(entry["text"], sequence_id=entry["sequence_id"],
                                                           created=entry["created"])
            except web.HTTPException as e:
                aside.custom = True
                aside.lines.append(f"custom sequence {entry['sequence_id']}: {e.text}")
                continue
            folder.add(new_entry, records)
            carried[new_entry["sequence_id"]] = new_entry
        folder.snapshot(tree.scanned_heads)
        lines.append(f"carried {len(carried)} of {len(entries)} custom sequences, recomputed against the new scan")
    elif entries:
        aside.custom = True
        was = old_config.get("model", {})
        other = "other weights of" if was.get("name") == new_config["model"]["name"] else "another model,"
        lines.append(f"{len(entries)} custom sequences were made with {other} {was.get('name')!r}; "
                     "they are not recomputed")

    # -- projected points and clusters, head by head
    tokens_now = worker.tokens if worker is not None else None
    old_tokens = _read_or(old / "umap" / "sequences.json", {})

    def same_tokens(seq_idx, tokens: list[str] | None) -> bool:
        """Whether a point's sequence is in the new tree with the tokens it had."""
        if isinstance(seq_idx, str):
            return seq_idx in carried
        if tokens_now is None or not 0 <= seq_idx < len(sequences) or tokens is None:
            return False
        return tokens_now(sequences[seq_idx].tolist()) == tokens

    scanned = set(tree.scanned_heads)
    for layer, head in [tuple(pair) for pair in old_config.get("heads", [])]:
        body = _read_or(old / "umap" / f"{_head_name(layer, head)}.json", {})
        clusters, projected = body.get("clusters", []), body.get("projected_points", [])
        if not clusters and not projected:
            continue
        name = _head_name(layer, head)
        if (layer, head) not in scanned:
            aside.heads[name] = {"clusters": clusters, "projected_points": projected}
            aside.lines.append(f"{name} is not scanned any more: {len(clusters)} clusters, "
                               f"{len(projected)} projected points")
            continue
        new_path = new / "umap" / f"{name}.json"
        fresh = read_json(new_path)
        cloud = set(zip(fresh["seq_idx"], fresh["top_q"], fresh["top_k"]))
        points, lost_points = [], 0
        for point in projected:
            edge = (point["seq_idx"], point["top_q"], point["top_k"])
            seq_tokens = carried[edge[0]]["tokens"] if isinstance(edge[0], str) and edge[0] in carried \
                else point.get("tokens")
            if worker is None or not same_tokens(edge[0], point.get("tokens")) or not fresh["seq_idx"]:
                lost_points += 1
                continue
            if edge in cloud:
                continue
            token_ids = carried[edge[0]]["token_ids"] if isinstance(edge[0], str) else sequences[edge[0]].tolist()
            try:
                points.append(worker.project(layer, head, Edge(seq_idx=edge[0], token_ids=token_ids, tokens=seq_tokens,
                                                               query_pos=edge[1], key_pos=edge[2])))
            except web.HTTPException:
                lost_points += 1
        exists = cloud | {(p["seq_idx"], p["top_q"], p["top_k"]) for p in points}
        had = {**old_tokens, **{str(p["seq_idx"]): p.get("tokens") for p in projected}}  # tokens each point had
        kept_clusters, lost_in_clusters, emptied = [], 0, []
        for cluster in clusters:
            alive = [p for p in cluster["points"] if tuple(p) in exists and same_tokens(p[0], had.get(str(p[0])))]
            lost_in_clusters += len(cluster["points"]) - len(alive)
            if alive:
                kept_clusters.append({**cluster, "points": alive})
            else:
                emptied.append(cluster["name"])
        write_json(new_path, {**fresh, "clusters": kept_clusters, "projected_points": points}, rounded=True)
        if clusters:
            lines.append(f"{name}: kept {len(kept_clusters)} of {len(clusters)} clusters"
                         + (f" ({lost_in_clusters} points no longer exist)" if lost_in_clusters else ""))
        if projected:
            lines.append(f"{name}: {len(projected) - lost_points} of {len(projected)} projected points carried")
        if lost_points or lost_in_clusters:
            aside.heads[name] = {"clusters": clusters, "projected_points": projected}
            if emptied:
                aside.lines.append(f"{name}: clusters {', '.join(map(repr, emptied))} lost all their points")

    # -- what could not be carried whole
    if aside.custom or aside.heads:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        where = kept / stamp
        where.mkdir(parents=True, exist_ok=True)
        if aside.custom:
            shutil.copytree(old / "custom_sequences", where / "custom_sequences", dirs_exist_ok=True)
        if aside.heads:
            write_json(where / "clusters.json", aside.heads, rounded=True)
        lines.extend(aside.lines)
        lines.append(f"what could not be carried whole is kept in {where}")
    attributions = sum(1 for _ in (old / "attributions").glob("*/*.json")) if (old / "attributions").is_dir() else 0
    if attributions:
        lines.append(f"{attributions} cached attribution files were not carried (they are recomputed on request)")
    return lines


def _read_or(path: Path, default):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default
