"""Solver speed: fxcompress's GPTQ / SparseGPT against the reference sweep, side by side.

The reference is the papers' right-looking formulation (``tests/algorithms/reference.py``:
explicit Cholesky of H⁻¹, eager rank-1 updates inside 128-column blocks, lazy updates
between blocks) — the structure of the IST reference ``fasterquant`` / ``fasterprune``.
Both run on the same weight and Hessian (from correlated activations), 4-bit groups of 128
(64 where 128 does not divide the width) and 50 % sparsity; the table gives the median of
``--repeats`` runs and the loss each reached.

    python benchmarks/solver_speed.py [--repeats 3] [--threads N] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxcompress.algorithms import Hessian, Statistics  # noqa: E402
from fxcompress.methods import GPTQ, SparseGPT  # noqa: E402
from tests.algorithms import reference  # noqa: E402

SHAPES = [(4096, 4096), (576, 1536), (1536, 576)]  # (out, in): a 7B-sized layer, SmolLM2's


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 2 * cols
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5
                                             + torch.eye(cols))
    h = Hessian.zeros(cols)
    h.add(x)
    return torch.randn(rows, cols, generator=g), h.value()


def timed(fn, repeats: int) -> tuple[float, float]:
    times, loss = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        loss = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ["| layer (out x in) | solver | reference (s) | fxcompress (s) | speed-up | "
            "loss reference | loss fxcompress |", "|---|---|---:|---:|---:|---:|---:|"]
    for out_f, in_f in SHAPES:
        w, h = problem(out_f, in_f)
        gs = 128 if in_f % 128 == 0 else 64
        ref_gptq = timed(lambda w=w, h=h, gs=gs: reference.gptq(w, h, 4, gs)[1], args.repeats)
        ref_sparse = timed(lambda w=w, h=h: reference.sparsegpt(w, h, 0.5)[1], args.repeats)
        # the reference's algorithm (natural order, min-max grids, H as measured, no refit),
        # then the defaults, whose shrink fits this H less on purpose (it is chosen on text of
        # other domains), so their loss here is not their gain
        cases = {
            f"GPTQ w4 g{gs}, sweep": (GPTQ(4, gs, act_order=False, mse=False, shrink=0.0,
                                           rescale=False), ref_gptq),
            f"GPTQ w4 g{gs}, defaults": (GPTQ(4, gs), ref_gptq),
            "SparseGPT 50%, sweep": (SparseGPT(0.5, solver="sweep", shrink=0.0), ref_sparse),
            "SparseGPT 50%, defaults (ADMM)": (SparseGPT(0.5), ref_sparse),
        }
        for name, (method, (t_ref, l_ref)) in cases.items():
            t_ours, l_ours = timed(lambda w=w, h=h, m=method: m.solve(w, Statistics(h, 1)).loss,
                                   args.repeats)
            rows.append(f"| {out_f}x{in_f} | {name} | {t_ref:.2f} | {t_ours:.2f} | "
                        f"{t_ref / t_ours:.1f}x | {l_ref:.5g} | {l_ours:.5g} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    sys.path.insert(0, str(Path(__file__).parent))
    from _cpu import cpu_flags

    header = (f"median of {args.repeats} runs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, CPU flags: {' '.join(cpu_flags())}. The "
              f"sweep rows run the reference's algorithm (speed-up is the solver's); the defaults "
              f"rows are what a recipe runs (GPTQ: act-order, the H-weighted clipping search, "
              f"shrink 0.25, the scale refit; SparseGPT: ADMM, shrink 0.05): their time is the "
              f"price, and their loss on this H is not their gain, since shrink fits it less on "
              f"purpose")
    print("\n" + header + "\n" + table)
    if args.write:
        from _results import write_section

        write_section("Solver speed", f"python benchmarks/solver_speed.py --threads "
                      f"{torch.get_num_threads()} --write",
                      header + "\n\n" + table)


if __name__ == "__main__":
    main()
