"""benchmarks/kernel_resources.py charges every loop of the compiled kernel, each as often as it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_resources as kr  # noqa: E402


def _replay_row_by_row(scores: np.ndarray, block_m: int, block_n: int, keep: int, floor=None) -> dict:
    """The kernel's top-K `if` / `while` for one head, literally: per block, while any row's best remaining
    allowed score beats its set's minimum, every such row evicts its weakest slot for it. floor: each row's
    starting slots (q -> score; -inf without)."""
    seq_len = scores.shape[0]
    out = {}
    for q0 in range(0, seq_len, block_m):
        rows = list(range(q0, min(seq_len, q0 + block_m)))
        top = {q: [-np.inf if floor is None else floor[q]] * keep for q in rows}
        for _, k0, _ in [b for b in kr.causal_blocks(seq_len, block_m, block_n) if b[0] == q0]:
            cand = {q: [float(scores[q, k]) for k in range(k0, min(seq_len, k0 + block_n)) if k <= q] for q in rows}
            trips = 0
            while any(cand[q] and max(cand[q]) > min(top[q]) for q in rows):
                for q in rows:
                    if cand[q] and max(cand[q]) > min(top[q]):
                        best = max(cand[q])
                        top[q][top[q].index(min(top[q]))] = best
                        cand[q].remove(best)
                trips += 1
            out[(q0, k0)] = (float(trips > 0), float(trips))
    return out


def test_the_top_k_replay_is_the_kernels_loop_row_by_row():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 40, 40)).astype(np.float32) + np.linspace(0, 3, 40)[None, None, :]
    got = kr.simulate_topk(scores, 8, 8, 3)
    for head in range(2):
        want = _replay_row_by_row(scores[head], 8, 8, 3)
        one = kr.simulate_topk(scores[head : head + 1], 8, 8, 3)
        assert one == want, head
    assert set(got) == set(want)
    for key, (entered, trips) in got.items():  # the mean of the two heads
        a, b = (kr.simulate_topk(scores[h : h + 1], 8, 8, 3)[key] for h in range(2))
        assert (entered, trips) == ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)


def test_a_bounded_replay_starts_each_row_at_the_kernels_entry_bound():
    """`simulate_topk(bounded=True)` replays the BOUNDED kernel: its rows' sets start at `entry_bound`, which is
    the bound `_row_bound_kernel` computes (run here under the interpreter on the same scores), and from there
    the insertions are the literal loop's."""
    import torch

    from headvis.kernels import row_stats
    from headvis.metrics import AttentionSpec, chunk_scores

    device = torch.device("cpu" if row_stats._interpreted() else "cuda")  # the interpreter, or a GPU
    gen = torch.Generator().manual_seed(3)
    t, d = 40, 16
    query, key = torch.randn(1, 2, t, d, generator=gen) * 2, torch.randn(1, 1, t, d, generator=gen)
    spec = AttentionSpec(causal=True, scaling=d**-0.5)
    scores = chunk_scores(query, key, spec, 0, t)[0].numpy()  # (heads, T, T)
    query, key = query.to(device), key.to(device)
    for min_weight in (0.05, None):
        theta = torch.empty(1, 2, t, device=device)
        row_stats._row_bound_kernel[(3, 2)](
            query, key, torch.ones(1, t, dtype=torch.int8, device=device), theta, *query.stride(), *key.stride(), t, 2, 2, 0,
            spec.scaling, 1.0, float(np.log(min_weight)) if min_weight else 0.0, HEAD_DIM=d, HEAD_DIM_PAD=d,
            BLOCK_M=16, BLOCK_N=16, CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_KEY_VALID=False,
            DOT_PRECISION="ieee", RANKED=min_weight is not None, FOLD=True)
        for q0 in (0, 16, 32):
            rows = np.arange(q0, min(t, q0 + 16))
            blocks = [k0 for b0, k0, _ in kr.causal_blocks(t, 16, 16) if b0 == q0]
            want = kr.entry_bound(scores, rows, blocks, 16, min_weight)
            np.testing.assert_allclose(theta[0, :, rows].cpu().numpy(), want, rtol=1e-5, atol=1e-5)
            assert q0 == 0 or np.isfinite(want).all()  # a second block: every row has a bound
    for head in range(2):
        got = kr.simulate_topk(scores[head : head + 1], 16, 16, 3, bounded=True, min_weight=0.05)
        floor = {}
        for q0 in (0, 16, 32):
            rows = np.arange(q0, min(t, q0 + 16))
            blocks = [k0 for b0, k0, _ in kr.causal_blocks(t, 16, 16) if b0 == q0]
            floor.update(zip(rows.tolist(), kr.entry_bound(scores[head : head + 1], rows, blocks, 16, 0.05)[0]))
        assert got == _replay_row_by_row(scores[head], 16, 16, 3, floor)
    # scores growing with the key: an unbounded set fills with a row's first keys and evicts them block by block
    ramp = scores + np.linspace(0.0, 8.0, t, dtype=np.float32)[None, None, :]
    bounded = kr.simulate_topk(ramp, 16, 16, 3, bounded=True, min_weight=0.05)
    free = kr.simulate_topk(ramp, 16, 16, 3)
    assert sum(v[1] for v in bounded.values()) < sum(v[1] for v in free.values())


def test_the_bin_loop_trips_are_the_bins_a_block_crosses_but_the_last_one_it_fills_whole():
    edges = [0, 1, 2, 4, 8, 16, 32, 64]
    for q0 in range(0, 64, 16):
        for k0 in range(0, q0 + 16, 8):
            distances = [q - k for q in range(q0, q0 + 16) for k in range(k0, k0 + 8)]
            crossed = {int(np.searchsorted(edges, d, side="right")) - 1 for d in distances if edges[0] <= d < edges[-1]}
            trips, inside = kr.hist_trips(q0, k0, 16, 8, edges)
            assert inside == (min(distances) >= edges[0] and max(distances) < edges[-1])
            assert trips == len(crossed) - inside, (q0, k0)


_COMPILE = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_resources as kr
from headvis.kernels import row_stats
block_m, block_n, warps, stages = kr.launch_defaults(row_stats)
constexprs = dict(kr.TARGET_CONSTEXPRS, BLOCK_M=block_m, BLOCK_N=block_n)
kernel = kr.compile_for_hopper(row_stats._row_stats_fwd_kernel, "fp16", constexprs, warps, stages, kr.target_int_args())
sass = [[i.address, i.opcode, i.target, i.line] for i in kr.sass_instructions(kernel.asm["cubin"])]
json.dump({"file": row_stats.__file__, "sass": sass}, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The launcher's default configuration compiled for sm_90 (no GPU; a process without the interpreter),
    its SASS with line info: (kernel source path, [Instruction])."""
    import json

    out = tmp_path_factory.mktemp("sass") / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads(out.read_text())
    return body["file"], [kr.Instruction(*row) for row in body["sass"]]


def test_every_loop_of_the_kernel_is_charged(compiled):
    source, sass = compiled
    spans = kr.kernel_spans(source)
    loops = kr.key_loops(sass)
    assert loops and all(i.line is not None for i in sass[:50]), "nvdisasm gave the source lines"
    for loop in loops:
        program = kr.block_program(sass, loop, spans)
        assert program["hist_loop"] > 0 and program["topk_loop"] > 0
        pieces = sum(program[k] for k in ("straight", "hist_setup", "hist_loop", "inside", "topk_if", "topk_setup",
                                          "topk_loop"))
        assert pieces == loop["instructions"], (program, loop["instructions"])  # every instruction in one piece
    backward = [i for i in sass if i.target is not None and i.target < i.address]
    outer = {(loop["start"], loop["end"]) for loop in loops}
    nested = [(i.target, i.address) for i in backward if (i.target, i.address) not in outer]
    assert all(any(s <= lo and hi <= e for s, e in outer) for lo, hi in nested), "a loop outside the key loops"


def test_a_loop_the_model_cannot_name_stops_the_report(compiled):
    source, sass = compiled
    spans = kr.kernel_spans(source)
    loop = min(kr.key_loops(sass), key=lambda lp: lp["instructions"])
    far = kr.Spans((1, 1), (2, 2), (3, 3), (4, 4))  # names no line of this kernel: its nested loops are unknown
    with pytest.raises(kr.UnchargedLoop, match="is not charged"):
        kr.block_program(sass, loop, far)
    assert kr.block_program(sass, loop, spans)["straight"] > 0


def test_the_report_runs_on_the_compiled_kernel_without_a_gpu():
    script = ("import sys; sys.path.insert(0, 'benchmarks'); import kernel_resources as kr; "
              "from headvis.kernels import row_stats; r = kr.measure(row_stats, *kr.launch_defaults(row_stats)); "
              "print(r['straight_line_instructions_per_pair'], r['instructions_per_pair'], r['hist_trips_per_block'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    straight, charged, bins = (float(x) for x in done.stdout.split())
    assert bins > 0 and charged > 0 and straight > 0
