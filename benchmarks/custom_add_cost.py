"""What one add_custom_sequence costs as custom sequences accumulate: latency and bytes the server writes.

    python benchmarks/custom_add_cost.py --data data --adds 24 \
        --version before=/tmp/before-pkg --version after=.

For each `--version NAME=DIR` (DIR is put first on PYTHONPATH, so `headvis`
is imported from there: the checkout itself, or a folder holding an older
checkout's package) it serves a fresh copy of --data with that version's
`python -m headvis.serve` on a free loopback port, then adds --adds custom
sequences one after another (distinct texts of about --words words) and
records, per add (after --warmup adds left out: the first one compiles the
CPU kernel), the request's latency and the bytes the server process
wrote (`wchar` of /proc/PID/io, every write call: JSON files, temp files,
renames). The versions run side by side on the same tree and machine; the
table compares the first adds with the last ones, and each version with the
first. Writes benchmarks/results/custom_add_cost_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from versions import add_version_argument, environment, parse_versions, write_results

WORDS = ("the model reads every token and each head attends to earlier positions while the residual "
         "stream carries what was written before so induction heads copy patterns they have seen").split()


def _text(i: int, words: int) -> str:
    rng = np.random.default_rng(i)
    return f"Sample {i}: " + " ".join(rng.choice(WORDS, size=words))


def _written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/PID/io")


def _start(data: Path, pythonpath: Path) -> tuple[subprocess.Popen, dict]:
    env = environment(pythonpath)
    process = subprocess.Popen([sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd="/")
    deadline = time.monotonic() + 300
    while True:
        line = process.stderr.readline()
        if "ready" in line:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {line}{process.stderr.read()}")
    return process, json.loads((data / "server_config.json").read_text())


async def _adds(config: dict, pid: int, adds: int, words: int, layer: int, head: int, warmup: int) -> list[dict]:
    """The rows of `adds` measured adds, after `warmup` adds that are not reported (first-call compilation)."""
    url = f"{config['server_url']}/api/head_vis/public/add_custom_sequence/v0"
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for i in range(warmup + adds):
            before = _written(pid)
            start = time.perf_counter()
            async with session.post(url, json={"context": config["context"], "layer": layer, "head": head,
                                               "text": _text(i, words)}) as response:
                body = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"add {i}: {response.status} {body}")
            if i < warmup:
                continue
            rows.append({"existing": i, "ms": 1000 * (time.perf_counter() - start),
                         "written_bytes": _written(pid) - before, "tokens": body["seq_len"]})
    return rows


def run(data: Path, name: str, pythonpath: Path, adds: int, words: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="custom-add-") as tmp:
        copy = Path(tmp) / "data"
        shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".headvis.lock"))
        config_json = json.loads((copy / "config.json").read_text())
        layer, head = config_json["heads"][0]
        process, config = _start(copy, pythonpath)
        try:
            rows = asyncio.run(_adds(config, process.pid, adds, words, layer, head, warmup))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=600)
    return {"version": name, "heads": len(config_json["heads"]), "rows": rows}


def _table(runs: list[dict], window: int) -> str:
    lines = ["| version | heads | tokens | adds | first adds: ms | last adds: ms | last / first | "
             "first adds: MB written | last adds: MB written | MB written, all adds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        rows = run["rows"]
        first, last = rows[:window], rows[-window:]
        ms = lambda part: float(np.mean([r["ms"] for r in part]))  # noqa: E731
        mb = lambda part: float(np.mean([r["written_bytes"] for r in part])) / 1e6  # noqa: E731
        total = sum(r["written_bytes"] for r in rows) / 1e6
        lines.append(f"| {run['version']} | {run['heads']} | {rows[0]['tokens']} | {len(rows)} | {ms(first):.0f} | "
                     f"{ms(last):.0f} | {ms(last) / ms(first):.2f} | {mb(first):.1f} | {mb(last):.1f} | {total:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a scanned tree (copied; never changed)")
    add_version_argument(parser)
    parser.add_argument("--adds", type=int, default=24)
    parser.add_argument("--words", type=int, default=100, help="words per custom text")
    parser.add_argument("--window", type=int, default=4, help="adds averaged at the start and at the end")
    parser.add_argument("--warmup", type=int, default=1, help="adds made first and not reported (compilation)")
    args = parser.parse_args()
    runs = []
    for name, folder in parse_versions(args.version):
        print(f"{name}: {args.adds} adds ...", flush=True)
        runs.append(run(args.data, name, folder, args.adds, args.words, args.warmup))
    table = _table(runs, args.window)
    print(table)
    write_results("custom_add_cost_cpu", runs,
        f"# add_custom_sequence cost as custom sequences accumulate (CPU)\n\n"
        f"`python benchmarks/custom_add_cost.py --data DATA --adds {args.adds} --words {args.words}`, after "
        f"{args.warmup} unreported add(s); first and last {args.window} adds averaged; written bytes: the server "
        f"process's wchar (every write call). DATA: the default model, all heads, 8 sequences of 32 tokens."
        f"\n\n{table}\n")


if __name__ == "__main__":
    main()
