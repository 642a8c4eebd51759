"""How many sequences pass 2 runs again: the union over heads of their shown samples, independent vs coordinated.

    python benchmarks/sample_union.py --heads 270 --sizes 256 4096 20000

Pass 2 computes the sparse rows of every sequence some head shows, so its
cost is the size of that union. Per-sequence activations are synthetic here
(the count depends on how heads' deciles overlap, not on the text): for each
head, max_activation = a shared per-sequence factor (sequences strong for
many heads) times a head weight, plus the head's own noise, so heads are
partly alike, as real heads are. "independent": each head draws its decile
samples with its own random stream (headvis 0.3.0 and before, one generator
for all heads in turn); "coordinated": every head takes the lowest-priority
sequences of `headvis.sampling.sequence_priorities` (seeded by (seed, id)).
The top interval (the true top per_interval of each head) is the same in both.
Pass 2's share assumes a re-run sequence costs what a pass-1 sequence costs
(both are one forward pass with row statistics), so it is union / (n + union).
Writes benchmarks/results/sample_union.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from headvis.sampling import choose_samples, interval_edges, sequence_priorities

RESULTS = Path(__file__).resolve().parent / "results"


def unions(n: int, heads: int, per_interval: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shared = rng.lognormal(0.0, 0.5, size=n)  # (n,) how strong a sequence is for heads in general
    priority = sequence_priorities(seed, n)
    independent, coordinated, top = set(), set(), set()
    for _ in range(heads):
        values = shared * rng.uniform(0.0, 1.0) + rng.lognormal(0.0, 0.5, size=n)  # (n,) this head's activations
        edges = interval_edges(values)
        picks = choose_samples(values, edges, per_interval, priority)
        top |= {i for i, interval in picks if interval == len(edges) - 1}
        coordinated |= {i for i, _ in picks}
        independent |= {i for i, _ in choose_samples(values, edges, per_interval, rng.random(n))}
    share = lambda union: len(union) / (n + len(union))  # noqa: E731
    return {"n_sequences": n, "heads": heads, "per_interval": per_interval, "top_union": len(top),
            "independent_union": len(independent), "coordinated_union": len(coordinated),
            "independent_pass2_share": share(independent), "coordinated_pass2_share": share(coordinated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=270)
    parser.add_argument("--per-interval", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 4096, 20000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [unions(n, args.heads, args.per_interval, args.seed) for n in args.sizes]
    lines = ["| sequences | heads | top-interval union | union, independent | union, coordinated | "
             "pass 2 share, independent | pass 2 share, coordinated |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_sequences']} | {r['heads']} | {r['top_union']} | {r['independent_union']} | "
                     f"{r['coordinated_union']} | {r['independent_pass2_share']:.0%} | "
                     f"{r['coordinated_pass2_share']:.0%} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sample_union.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "sample_union.md").write_text(
        "# Sequences pass 2 runs again (union of every head's shown samples)\n\n"
        f"`python benchmarks/sample_union.py --heads {args.heads} --sizes {' '.join(map(str, args.sizes))}`, "
        f"per_interval {args.per_interval}; synthetic activations (see the script's docstring).\n\n{table}\n")


if __name__ == "__main__":
    main()
