"""`python -m headvis.features`: run a dictionary over the scan's corpus and store what describes each feature.

    python -m headvis.features --dictionary dictionaries/L5-topk --data data
    python -m headvis.features --dictionary DIR --data data --labels my_labels.json --num-seqs 1024

By default the corpus is the scan's own (config.json's `dataset`: name, split, text column,
seq_len, n_sequences), packed the same way, so sequence ids agree with the tree; the first head
file's sequences are checked against it. The library is built in a staging folder under
`data/features/` and replaces `data/features/{dictionary name}/` only when complete. A labels.json
already there is kept unless --labels gives a new one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import headvis
from headvis.datasets import iter_texts, pack_sequences
from headvis.dictionaries import Dictionary, capture_hooks, check_matches_model, load_dictionary
from headvis.errors import HeadvisError, run_cli
from headvis.features.collect import N_INTERVALS, PER_INTERVAL, TOP_WINDOWS, WINDOW, FeatureTables, collect_features
from headvis.features.library import FEATURES_DIR, FORMAT_VERSION, LABELS_FILE, read_labels, write_library
from headvis.io import publish_folder, read_json, write_json
from headvis.models import LoadedModel, load_model
from headvis.pipeline import Tokens

__all__ = ["CACHE_BYTES", "FeatureOptions", "build_features", "build_parser", "compute_tables", "main"]

CACHE_BYTES = 1 << 30  # pass 1 keeps the hook activations up to this size, so pass 2 needs no forward pass


@dataclass
class FeatureOptions:
    """Every flag of `python -m headvis.features`."""

    dictionary: str  # a SAELens dictionary folder
    data: str = "data"  # the scan's data tree; the library goes to data/features/{dictionary name}/
    num_seqs: int | None = None  # default: config.json dataset.n_sequences
    seq_len: int | None = None  # default: config.json dataset.seq_len (another value: ids no longer match the scan)
    batch_size: int = 8  # sequences per forward pass
    labels: str | None = None  # a JSON {"<feature>": "<text>"} copied in as labels.json
    device: str | None = None  # cpu or cuda; default cuda when available
    seed: int = 0  # seeds the interval samples


def _read_config(data: Path) -> dict:
    path = data / "config.json"
    if not path.is_file():
        raise HeadvisError(f"--data {data}: no config.json (run python -m headvis.scan --out {data} first)")
    try:
        config = read_json(path)
    except (OSError, ValueError) as e:
        raise HeadvisError(f"--data {data}: config.json is unreadable ({e})") from e
    dataset = config.get("dataset") if isinstance(config, dict) else None
    needed = ("name", "split", "text_column", "seq_len", "n_sequences")
    if not isinstance(dataset, dict) or any(key not in dataset for key in needed) or "model_name" not in config:
        raise HeadvisError(f"--data {data}: config.json has no model_name or dataset block "
                           "(a headvis format 2 tree is needed; re-scan)")
    return config


def _check_scan_sequences(data: Path, config: dict, sequences: torch.Tensor) -> None:
    """Refuse a corpus that no longer packs into the scan's sequences (the first head file's records)."""
    heads = config.get("heads") or []
    if not heads:
        return
    layer, head = heads[0]
    path = data / "heads" / f"L{layer}H{head}.json"
    if not path.is_file():
        return
    for record in read_json(path).get("sequences", []):
        sid = record.get("sequence_id")
        if isinstance(sid, int) and 0 <= sid < len(sequences) and record.get("token_ids") != sequences[sid].tolist():
            raise HeadvisError(f"the corpus {config['dataset']['name']!r} no longer gives the scan's sequence {sid} "
                               f"({path.name}): the dataset or tokenizer changed; re-scan")


def compute_tables(lm: LoadedModel, dictionary: Dictionary, sequences: torch.Tensor, *, batch_size: int = 8,
                   seed: int = 0) -> FeatureTables:
    """Both passes of `collect_features` over `sequences` (n, seq_len), reading `dictionary.hook_name`.

    Pass 2 encodes the hook activations pass 1 captured (float32, n * seq_len * d_in * 4 bytes) when
    they fit CACHE_BYTES, else it runs the model again.
    """
    d = dictionary.to(lm.device)
    n, seq_len = sequences.shape
    cache_bytes = n * seq_len * d.d_in * 4
    cache: list[torch.Tensor] | None = [] if cache_bytes <= CACHE_BYTES else None
    if cache is None:
        print(f"headvis: the hook activations of {n * seq_len:,} tokens take {cache_bytes / 2**30:.1f} GiB "
              f"(more than {CACHE_BYTES / 2**30:.0f} GiB): pass 2 runs the model again", flush=True)

    def batches(desc: str):
        for i, start in enumerate(tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False)):
            ids = sequences[start:start + batch_size].to(lm.device)  # (batch, seq_len)
            if cache is not None and i < len(cache):
                x = cache[i]
            else:
                x = capture_hooks(lm.model, [d.hook_name], ids)[d.hook_name]  # (batch, seq_len, d_in)
                if cache is not None:
                    cache.append(x)
            with torch.no_grad():
                acts = d.encode(x)  # (batch, seq_len, d_sae)
            yield torch.arange(start, start + len(ids), device=lm.device), ids, acts

    vocab = max(lm.info.vocab_size, int(sequences.max()) + 1)
    with torch.no_grad():
        return collect_features(batches, d_sae=d.d_sae, vocab=vocab, seq_len=seq_len, seed=seed, device=lm.device)


def _validate(opts: FeatureOptions) -> None:
    counts = {"--num-seqs": opts.num_seqs, "--seq-len": opts.seq_len, "--batch-size": opts.batch_size}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise HeadvisError(f"{flag} must be at least 1, not {value}")
    if opts.device not in (None, "cpu", "cuda") and not str(opts.device).startswith("cuda:"):
        raise HeadvisError(f"--device must be cpu or cuda, not {opts.device!r}")


def build_features(opts: FeatureOptions, lm: LoadedModel | None = None,
                   dictionary: Dictionary | None = None) -> Path:
    """Compute and publish data/features/{dictionary name}/; returns that folder."""
    start_time = time.perf_counter()
    _validate(opts)
    data = Path(opts.data).expanduser()
    config = _read_config(data)
    d = dictionary if dictionary is not None else load_dictionary(opts.dictionary)
    out = data / FEATURES_DIR / d.name
    if opts.labels is not None:
        labels = read_labels(Path(opts.labels).expanduser(), d.d_sae)
    elif (out / LABELS_FILE).is_file():
        labels = read_labels(out / LABELS_FILE, d.d_sae)  # the user's labels outlive a rebuild
    else:
        labels = None
    if lm is None:
        lm = load_model(config["model_name"], device=opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_matches_model(d, lm.info)
    dataset = config["dataset"]
    seq_len = opts.seq_len or int(dataset["seq_len"])
    num_seqs = opts.num_seqs or int(dataset["n_sequences"])
    if lm.info.max_positions and seq_len > lm.info.max_positions:
        raise HeadvisError(f"--seq-len {seq_len} exceeds the model's context of {lm.info.max_positions} tokens")
    sequences = pack_sequences(iter_texts(dataset["name"], dataset["split"], dataset["text_column"]),
                               lm.tokenizer, seq_len, num_seqs)
    matches_scan = seq_len == int(dataset["seq_len"])
    if matches_scan:
        _check_scan_sequences(data, config, sequences)

    tables = compute_tables(lm, d, sequences, batch_size=opts.batch_size, seed=opts.seed)
    ids = torch.unique(sequences).tolist()
    strings = dict(zip(ids, Tokens(lm.tokenizer)(ids)))
    n_dead = int((tables.count == 0).sum())
    info = {
        "format_version": FORMAT_VERSION,
        "headvis_version": headvis.__version__,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dictionary": d.name,
        "dictionary_path": str(d.path),
        "hook": d.hook_name,
        "architecture": d.architecture,
        "is_transcoder": d.is_transcoder,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "k": d.k,
        "model_name": config["model_name"],
        "dataset": {"name": dataset["name"], "split": dataset["split"], "text_column": dataset["text_column"],
                    "n_sequences": len(sequences), "seq_len": seq_len, "n_tokens": tables.n_tokens},
        "n_tokens": tables.n_tokens,
        "matches_scan": matches_scan,
        "window_before": WINDOW.before,
        "window_after": WINDOW.after,
        "top_windows": TOP_WINDOWS,
        "n_intervals": N_INTERVALS,
        "per_interval": PER_INTERVAL,
        "seed": opts.seed,
        "token_counts_exact": tables.token_counts_exact,
        "n_dead": n_dead,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as e:
        raise HeadvisError(f"cannot write to {out.parent}: {e.strerror or e}") from e
    try:
        write_library(staging, tables, sequences.numpy(), strings, info)
        if labels is not None:
            write_json(staging / LABELS_FILE, {str(f): text for f, text in sorted(labels.items())})
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"headvis: described {d.d_sae} features of {d.name} ({n_dead} never active) over {len(sequences)} "
          f"sequences ({tables.n_tokens:,} tokens) in {time.perf_counter() - start_time:.1f} s -> {out}/",
          flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headvis.features", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dictionary", required=True, help="a SAELens dictionary folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--data", default="data", help="the scan's data tree; writes data/features/{dictionary name}/")
    p.add_argument("--num-seqs", type=int, default=None, help="sequences to run (default: the scan's n_sequences)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the scan's; another value gives ids that do not match the scan)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--labels", default=None, help='JSON {"<feature>": "<text>"} copied in as labels.json')
    p.add_argument("--device", default=None, help="cpu or cuda; unset: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="seeds the interval samples")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = FeatureOptions(**vars(args))
    return run_cli(lambda: build_features(opts), interrupted="interrupted; the previous features folder is untouched")


if __name__ == "__main__":
    sys.exit(main())
