"""What the row-statistics kernels cost per (q, k) pair on Hopper, read off the compiled code (no GPU needed).

    python benchmarks/kernel_resources.py              # all launch configurations, ~2 minutes
    python benchmarks/kernel_resources.py --baseline e911b70   # and an earlier revision, side by side
    python benchmarks/kernel_resources.py --quick      # the launcher's default configuration only

Each configuration of `_row_stats_fwd_kernel` is compiled for sm_90 through
Triton's own pipeline (TTIR, TTGIR, PTX, the bundled ptxas), at the shape the
issue's targets name: causal, fp16, d_head 64, top-8, the distance bins of
T = 2048. The report gives, per configuration:

- registers per thread, spill stores/loads and shared memory (ptxas -v);
- for each key loop of the SASS (an outermost loop that runs a matrix
  product): its instructions, the loops nested in it (distance bins crossed,
  top-k insertions: data-dependent, so left out of the per-pair count) and
  its barriers. The unmasked loop (key blocks before the diagonal) is the
  cheapest such loop; the masked one is read from the kernel compiled with
  padding on, where every block is masked;
- instructions per (q, k) pair per lane: every key block a causal head of
  length T visits, unmasked and masked, times its loop's instructions and
  the threads of a program, over the T(T+1)/2 pairs; plus the same for the
  column pass (`_key_weight_kernel`);
- an issue-bound ceiling in pairs/s: an H200's 132 SMs x 4 schedulers x
  32 lanes x 1.98 GHz issue at most one instruction per scheduler per clock,
  so pairs/s <= 3.35e13 / (instructions per pair). It ignores memory stalls,
  barriers and the nested loops, so a measured rate can only be lower.

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
                         BINS_PAD=16, TOKEN_COUNTED=True,
                         EDGES_PAD=16)  # EDGES_PAD: the constexpr of earlier versions (baselines)
# (block_m, block_n, num_warps, num_stages); gpu_check.py times the same ones.
CONFIGS = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2),
           (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2), (64, 64, 8, 3)]
# Pointer arguments that are not float32.
_POINTER_TYPES = {"TOKENS": "*i32", "KEY_VALID": "*i8", "EDGES": "*i32", "BIN_OF": "*i32", "COUNTED": "*i8",
                  "ARGMAX_NOBOS": "*i64", "TOP_INDICES": "*i64"}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")


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
            signature[name] = "fp32" if name in ("scaling", "softcap") else "i32"
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


def sass_instructions(cubin: bytes) -> list[Instruction]:
    """The kernel's SASS, one entry per instruction, from the bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([str(_nvidia_tool("cuobjdump")), "-sass", handle.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    instructions = []
    for match in _SASS_LINE.finditer(text):
        address, opcode, operands = int(match.group(1), 16), match.group(3), match.group(4)
        target = None
        if opcode.startswith("BRA"):
            found = re.search(r"0x([0-9a-f]+)", operands)
            target = int(found.group(1), 16) if found else None
        instructions.append(Instruction(address, opcode, target))
    return instructions


def _loop_counts(instructions: list[Instruction], start: int, end: int, backward: list[tuple[int, int]]) -> dict:
    body = [i for i in instructions if start <= i.address <= end]
    inner = sorted((s, e) for s, e in backward if (s, e) != (start, end) and start <= s and e <= end)
    inner_sizes = [sum(1 for i in body if s <= i.address <= e) for s, e in inner]
    return {
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


def measure(row_stats, block_m: int, block_n: int, num_warps: int, num_stages: int, dtype: str = "fp16",
            seq_len: int = 2048) -> dict:
    """One configuration's report row for the module `row_stats` (see the module docstring)."""
    constexprs = dict(TARGET_CONSTEXPRS, BLOCK_M=block_m, BLOCK_N=block_n)
    ints = target_int_args(seq_len=seq_len)
    compiled = compile_for_hopper(row_stats._row_stats_fwd_kernel, dtype, constexprs, num_warps, num_stages, ints)
    # The cheapest outermost loop runs the key blocks before the diagonal. The diagonal blocks may compile to
    # straight-line code (one block when BLOCK_M <= BLOCK_N), so their cost is read from the kernel compiled
    # with padding on, where every block takes the masked path (its largest loop; one load and one AND per pair
    # more than the causal diagonal needs). A kernel with a single loop masks every block.
    unmasked = min(key_loops(sass_instructions(compiled.asm["cubin"])), key=lambda loop: loop["instructions"])
    padded = compile_for_hopper(row_stats._row_stats_fwd_kernel, dtype, dict(constexprs, HAS_KEY_VALID=True),
                                num_warps, num_stages, ints)
    masked = max(key_loops(sass_instructions(padded.asm["cubin"])), key=lambda loop: loop["instructions"])
    n_unmasked, n_masked = causal_block_counts(seq_len, block_m, block_n)
    pairs = seq_len * (seq_len + 1) / 2
    fwd_instructions = n_unmasked * unmasked["straight_line"] + n_masked * masked["straight_line"]
    fwd_per_pair = 32 * num_warps * fwd_instructions / pairs
    # The second pass (column sums) over the query blocks at or after each key block, read the same way.
    weight = compile_for_hopper(row_stats._key_weight_kernel, dtype, constexprs, num_warps, num_stages, ints)
    weight_loop = min(key_loops(sass_instructions(weight.asm["cubin"])), key=lambda loop: loop["instructions"])
    weight_padded = compile_for_hopper(row_stats._key_weight_kernel, dtype, dict(constexprs, HAS_KEY_VALID=True),
                                       num_warps, num_stages, ints)
    weight_masked = max(key_loops(sass_instructions(weight_padded.asm["cubin"])),
                        key=lambda loop: loop["instructions"])
    weight_unmasked_blocks, weight_masked_blocks = causal_column_block_counts(seq_len, block_m, block_n)
    weight_blocks = weight_unmasked_blocks + weight_masked_blocks
    weight_per_pair = 32 * num_warps * (weight_unmasked_blocks * weight_loop["straight_line"]
                                        + weight_masked_blocks * weight_masked["straight_line"]) / pairs
    per_pair = fwd_per_pair + weight_per_pair
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages,
            "dtype": dtype, "seq_len": seq_len, "shared_bytes": compiled.metadata.shared,
            **ptxas_usage(compiled.asm["ptx"]), "unmasked_loop": unmasked, "masked_loop": masked,
            "key_weight_loop": weight_loop,
            "blocks_per_head": {"unmasked": n_unmasked, "masked": n_masked, "key_weight": weight_blocks},
            "fwd_instructions_per_pair": fwd_per_pair, "key_weight_instructions_per_pair": weight_per_pair,
            "instructions_per_pair": per_pair, "issue_bound_pairs_per_s": H200_LANE_ISSUE_PER_S / per_pair}


def _loop_cell(loop: dict) -> str:
    return f"{loop['instructions']} ({', '.join(map(str, loop['inner_loops'])) or '-'}), {loop['barriers']}"


def _row_cells(r: dict) -> str:
    return (f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {_loop_cell(r['unmasked_loop'])} "
            f"| {_loop_cell(r['masked_loop'])} | {r['fwd_instructions_per_pair']:.1f} + "
            f"{r['key_weight_instructions_per_pair']:.1f} = {r['instructions_per_pair']:.1f} "
            f"| {r['issue_bound_pairs_per_s']:.3g}")


def to_markdown(report: dict) -> str:
    baseline = report.get("baseline")
    lines = [f"# Row-statistics kernel on sm_90, read off the compiled code ({report['date']})", "",
             f"Triton {report['triton']}; `_row_stats_fwd_kernel` at causal fp16, d_head 64, top-8, "
             f"T = {report['seq_len']}. No GPU was used: these are compile-time facts, not timings (see the "
             "docstring of `benchmarks/kernel_resources.py`). Loop cells: SASS instructions (nested loops), "
             "barriers. Instructions per pair count every key block a causal head visits, masked ones included.",
             ""]
    cells = ["registers", "spills st/ld B", "unmasked loop", "masked loop",
             "instr per (q,k) pair per lane: row pass + column pass",
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
    lines += ["", f"The issue-bound ceiling assumes one instruction per scheduler per clock on every lane (H200: "
              f"{report['lane_issue_per_s']:.3g} lane-instructions/s) and leaves out the nested loops, memory "
              "stalls and barriers: a measured rate can only be lower. The target is 1.0e12 pairs/s at this shape."]
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


def report_for(row_stats, configs: list[tuple[int, int, int, int]], seq_len: int, label: str) -> list[dict]:
    rows = []
    for config in configs:
        row = measure(row_stats, *config, seq_len=seq_len)
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
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "triton": triton.__version__,
              "target": "sm_90", "seq_len": args.seq_len, "launch_defaults": list(defaults),
              "shape": TARGET_CONSTEXPRS, "lane_issue_per_s": H200_LANE_ISSUE_PER_S,
              "configs": report_for(current, configs, args.seq_len, "now")}
    if args.baseline:
        report["baseline"] = {"ref": args.baseline, "configs": report_for(
            load_kernel_module(args.baseline), configs, args.seq_len, args.baseline)}
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
