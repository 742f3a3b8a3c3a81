"""Solver workspace: how much one GPTQ / SparseGPT call grows the process, against the reference.

Each measurement runs in a fresh subprocess: build the weight and the Hessian, hand freed memory
back to the OS, reset the peak-RSS mark (``/proc/self/clear_refs``), make one call, and read the
peak (``VmHWM``) back. The growth is everything the call allocated and touched — the copies of
H, the factor, weight-sized buffers, the result — and not the inputs, which the caller holds
anyway. The table gives the median of ``--repeats`` subprocesses per cell.

    python benchmarks/solver_memory.py [--repeats 5] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (1024, 4096)]  # (out, in)
SOLVERS = ["gptq", "sparsegpt"]


def measure(solver: str, side: str, rows: int, cols: int) -> float:
    """MiB by which one call grows the peak RSS of this (fresh) process."""
    import torch

    from benchmarks.solver_speed import problem
    from fxcompress.algorithms import Statistics
    from fxcompress.methods import GPTQ, SparseGPT
    from fxcompress.osmem import release_freed_memory
    from tests.algorithms import reference
    from tests.memory import PeakRSS

    w, h = problem(rows, cols)
    calls = {
        ("gptq", "fxcompress"): lambda: GPTQ(4, 128).solve(w, Statistics(h, 1)),
        ("gptq", "reference"): lambda: reference.gptq(w, h, 4, 128),
        ("sparsegpt", "fxcompress"): lambda: SparseGPT(0.5).solve(w, Statistics(h, 1)),
        ("sparsegpt", "reference"): lambda: reference.sparsegpt(w, h, 0.5),
    }
    call = calls[solver, side]
    torch.set_num_threads(1)
    release_freed_memory()
    with PeakRSS() as peak:
        result = call()
    del result
    return peak.growth / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        solver, side, rows, cols = args.one
        print(json.dumps(measure(solver, side, int(rows), int(cols))))
        return
    lines = ["| layer (out x in) | solver | H (MiB) | W (MiB) | reference (MiB) | "
             "fxcompress (MiB) | ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for rows, cols in SHAPES:
        for solver in SOLVERS:
            cell = {}
            for side in ("reference", "fxcompress"):
                runs = [json.loads(subprocess.run(
                    [sys.executable, __file__, "--one", solver, side, str(rows), str(cols)],
                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    for _ in range(args.repeats)]
                cell[side] = statistics.median(runs)
            lines.append(f"| {rows}x{cols} | {solver} | {cols * cols * 4 / 2**20:.0f} | "
                         f"{rows * cols * 4 / 2**20:.0f} | {cell['reference']:.0f} | "
                         f"{cell['fxcompress']:.0f} | "
                         f"{cell['fxcompress'] / cell['reference']:.2f} |")
            print(lines[-1], flush=True)
    body = (f"Growth of the peak RSS during one call (median of {args.repeats} fresh processes; "
            f"inputs W and H excluded, the result included); GPTQ w4 g128, SparseGPT 50 %, "
            f"fp32 weights; the reference is `tests/algorithms/reference.py`.\n\n"
            + "\n".join(lines))
    print("\n" + body)
    if args.write:
        from _results import write_section

        write_section("Solver workspace", "python benchmarks/solver_memory.py --write", body)


if __name__ == "__main__":
    main()
