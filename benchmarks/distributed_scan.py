"""The scan across processes on this machine, and its memory against the corpus size.

    python benchmarks/distributed_scan.py [--num-seqs 64] [--seq-len 128] [--sizes-mb 10,100,1000]

1. Pass 1 throughput: the default model over --num-seqs sequences of --seq-len tokens (all heads, the
   default backend), as one process with 1 thread, one process with 2 threads, and
   `torchrun --standalone --nproc-per-node 2` (1 thread each, torchrun's default), whole processes;
   the pass-1 time from the scan's own "time by step" line (rank 0's, which waits for the slower rank).
2. Peak memory against the corpus: generated .txt files of --sizes-mb megabytes scanned with --num-seqs 20
   (layer 0, head 0): the peak RSS of the scan process (getrusage of the child), which should not grow with
   the file now that a .txt is read in 1 MiB pieces and reading stops once the sequences exist.
Writes benchmarks/results/distributed_scan.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from versions import write_results

ROOT = Path(__file__).resolve().parents[1]


def _steps(stdout: str) -> dict[str, float]:
    line = next((l for l in stdout.splitlines() if l.startswith("headvis: time by step:")), "")
    return {name.strip(): float(s) for name, s in re.findall(r"([a-z0-9 ]+?) ([0-9.]+) s", line.split(":", 2)[-1])}


# a fresh wrapper per command, so that its children's peak RSS is that command's alone
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def _run(cmd: list[str], threads: int) -> tuple[float, dict, float]:
    """(seconds, steps, peak RSS MiB of the command's largest process) of one command."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed: {done.stderr[-2000:]}")
    peak = int(re.search(r"PEAK_KIB (\d+)", done.stdout)[1])
    return seconds, _steps(done.stdout), peak / 1024


def _corpus(path: Path, megabytes: int) -> None:
    line = "the quick brown fox jumps over the lazy dog while the scan reads its corpus line by line\n"
    block = line * (1 << 14)
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 2**20:
            f.write(block)
            written += len(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sizes-mb", default="10,100,1000")
    args = parser.parse_args()
    scan = [sys.executable, "-m", "headvis.scan", "--num-seqs", str(args.num_seqs), "--seq-len", str(args.seq_len),
            "--no-resume"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "headvis.scan", "--num-seqs", str(args.num_seqs), "--seq-len", str(args.seq_len), "--no-resume"]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dist-scan-") as tmp:
        for name, cmd, threads in (("1 process, 1 thread", scan, 1), ("1 process, 2 threads", scan, 2),
                                   ("torchrun, 2 processes x 1 thread", torchrun, 1)):
            seconds, steps, _ = _run([*cmd, "--out", f"{tmp}/{len(rows)}"], threads)
            rows[name] = {"seconds": seconds, "pass 1": steps.get("pass 1"), "steps": steps}
            print(name, rows[name], flush=True)
        memory = {}
        for mb in (int(s) for s in args.sizes_mb.split(",")):
            corpus = Path(tmp) / f"corpus-{mb}.txt"
            _corpus(corpus, mb)
            seconds, _, peak = _run([sys.executable, "-m", "headvis.scan", "--dataset", str(corpus), "--num-seqs",
                                     "20", "--layers", "0", "--heads", "0", "--no-resume", "--out",
                                     f"{tmp}/mem-{mb}"], 2)
            memory[mb] = {"seconds": seconds, "peak_rss_mib": peak}
            corpus.unlink()
            print(mb, memory[mb], flush=True)
    lines = ["# The scan across processes (this 2-core CPU)", "",
             f"`python benchmarks/distributed_scan.py`: default model, {args.num_seqs} x {args.seq_len} tokens, all "
             "heads, default backend; whole processes.", "",
             "| run | whole scan (s) | pass 1 (s) | sequences / s in pass 1 |", "|---|---|---|---|"]
    for name, r in rows.items():
        rate = args.num_seqs / r["pass 1"] if r["pass 1"] else float("nan")
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['pass 1']:.1f} | {rate:.2f} |")
    lines += ["", "Peak memory of `--num-seqs 20` against the size of a generated .txt corpus (layer 0, head 0; "
              "the scan process's peak RSS):", "",
              "| corpus | whole scan (s) | peak RSS (MiB) |", "|---|---|---|"]
    for mb, r in memory.items():
        lines.append(f"| {mb} MB | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    print("\n".join(lines))
    write_results("distributed_scan", {"throughput": rows, "memory": memory}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
