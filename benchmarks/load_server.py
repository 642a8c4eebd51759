"""Load benchmark of `python -m headvis.serve`: N concurrent clients on loopback.

    python benchmarks/load_server.py --data data --clients 16 --static 800 --adds 48 --projects 48

Serves a temporary copy of --data (so the custom sequences and projected
points it adds never touch the original) with the real command line on a free
loopback port, waits for it to be ready, then runs four phases, each with
--clients concurrent clients sharing the requests:

- static: GET of data files (config.json, scatter_data.json, a head file);
- add_custom_sequence: POSTs of distinct texts (the model runs one at a time);
- delete_custom_sequence: POSTs deleting every sequence just added;
- project_to_umap: POSTs of distinct edges (q, q-1) of the first head's shown
  sequences that are not cloud points (one forward pass each, appended to the
  head's projected_points).

Prints a markdown table of p50/p99 latency, throughput and errors (a non-2xx
reply or a failed connection) per phase, then stops the server with SIGINT
and checks it put server_config.json back to {}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

WORDS = ("the model reads every token and each head attends to earlier positions while the residual "
         "stream carries what was written before so induction heads copy patterns they have seen").split()


def _text(i: int) -> str:
    rng = np.random.default_rng(i)
    return f"Sample {i}: " + " ".join(rng.choice(WORDS, size=40))


async def _phase(clients: int, requests: list, send) -> dict:
    """Run `send(session, request)` over `requests` with `clients` workers; latencies in ms."""
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    latencies: list[float] = []
    errors = 0
    results: list = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            request = queue.get_nowait()
            start = time.perf_counter()
            try:
                ok, result = await send(session, request)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok, result = False, None
            latencies.append((time.perf_counter() - start) * 1000)
            errors += not ok
            if ok and result is not None:
                results.append(result)

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    seconds = time.perf_counter() - start
    ms = np.asarray(latencies)
    return {"n": len(requests), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "rps": len(requests) / seconds, "errors": errors, "results": results}


def _api(url: str, name: str) -> str:
    return f"{url}/api/head_vis/public/{name}/v0"


def _new_edges(data: Path, layer: int, head: int, n: int) -> list[tuple[int, int, int]]:
    """Up to n edges (seq_idx, q, q - 1) of the head's shown sequences that are not points of its cloud."""
    umap = json.loads((data / "umap" / f"L{layer}H{head}.json").read_text())
    cloud = set(zip(umap["seq_idx"], umap["top_q"], umap["top_k"]))
    shown = json.loads((data / "heads" / f"L{layer}H{head}.json").read_text())["sequences"]
    edges = [(s["sequence_id"], q, q - 1) for s in shown for q in range(2, s["seq_len"])]
    return [e for e in edges if e not in cloud][:n]


async def _bench(url: str, context: dict, data: Path, args: argparse.Namespace) -> list[tuple[str, dict]]:
    layer, head = json.loads((data / "config.json").read_text())["heads"][0]
    files = ["config.json", "scatter_data.json", f"heads/L{layer}H{head}.json"]

    async def get(session, i):
        async with session.get(f"{url}/data/{files[i % len(files)]}") as response:
            await response.read()
            return response.status == 200, None

    async def add(session, i):
        body = {"context": context, "layer": layer, "head": head, "text": _text(i)}
        async with session.post(_api(url, "add_custom_sequence"), json=body) as response:
            reply = await response.json()
            return response.status == 200, reply.get("sequence_id")

    async def delete(session, sid):
        body = {"context": context, "layer": layer, "head": head, "sequence_id": sid}
        async with session.post(_api(url, "delete_custom_sequence"), json=body) as response:
            await response.read()
            return response.status == 200, None

    async def project(session, edge):
        seq_idx, query_pos, key_pos = edge
        body = {"context": context, "layer": layer, "head": head, "seq_idx": seq_idx, "query_pos": query_pos,
                "key_pos": key_pos}
        async with session.post(_api(url, "project_to_umap"), json=body) as response:
            reply = await response.json()
            return response.status == 200 and "point" in reply, None

    static = await _phase(args.clients, list(range(args.static)), get)
    adds = await _phase(args.clients, list(range(args.adds)), add)
    deletes = await _phase(args.clients, adds["results"], delete)
    projects = await _phase(args.clients, _new_edges(data, layer, head, args.projects), project)
    return [("static GET /data/...", static), ("add_custom_sequence", adds), ("delete_custom_sequence", deletes),
            ("project_to_umap", projects)]


def _start(data: Path, device: str | None) -> tuple[subprocess.Popen, dict]:
    command = [sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"]
    if device:
        command += ["--device", device]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    deadline = time.monotonic() + 300
    for line in process.stderr:
        if "ready" in line:
            break
        if time.monotonic() > deadline:
            break
    if process.poll() is not None:
        raise SystemExit(f"the server did not start (exit {process.returncode})")
    return process, json.loads((data / "server_config.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a scanned tree (copied; the original is not changed)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--static", type=int, default=800, help="static GETs in all")
    p.add_argument("--adds", type=int, default=48, help="add_custom_sequence POSTs in all (then as many deletes)")
    p.add_argument("--projects", type=int, default=48, help="project_to_umap POSTs of new edges in all")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="headvis-load-") as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns("server_config.json", "custom_sequences"))
        process, server = _start(data, args.device)
        try:
            phases = asyncio.run(_bench(server["server_url"], server["context"], data, args))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        restored = json.loads((data / "server_config.json").read_text()) == {}
        config = json.loads((data / "config.json").read_text())
    print(f"\nheadvis server load: {args.clients} concurrent clients on loopback, model {config['model']['name']}, "
          f"{len(config['heads'])} scanned heads, {os.cpu_count()} CPUs\n")
    print("| phase | requests | p50 ms | p99 ms | req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in phases:
        print(f"| {name} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.1f} | {r['errors']} |")
    print(f"\nclean shutdown restored server_config.json to {{}}: {restored}")
    return 0 if restored and all(r["errors"] == 0 for _, r in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
