"""What GPTQ's scale refit (``rescale``) adds to a solve's time, side by side.

Random 4-bit g64 problems (correlated activations with uneven feature scales), one thread,
the same weight and Hessian solved with and without the refit; median of ``--repeats``.

    python benchmarks/rescale_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxcompress.algorithms import Grid, gptq  # noqa: E402

SHAPES = [(1024, 4096), (4096, 1024)]  # (out, in): a wide layer, a tall one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(__file__).parent))
    from _cpu import cpu_flags

    flags = cpu_flags()
    print(f"CPU flags: {' '.join(flags)}; one thread; median of {args.repeats}\n")
    print("| shape (out x in) | sweep (s) | sweep + rescale (s) | ratio |")
    print("|---|---:|---:|---:|")
    for rows, cols in SHAPES:
        x = torch.randn(8192, cols) * torch.linspace(0.2, 3, cols)
        h = 2 * x.t() @ x / x.shape[0]
        w = 0.05 * torch.randn(rows, cols)
        times = []
        for rescale in (False, True):
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                gptq(w, h, Grid(4, 64, False, "hessian"), shrink=0.25, rescale=rescale)
                runs.append(time.perf_counter() - t)
            times.append(statistics.median(runs))
        print(f"| {rows} x {cols} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.2f} |")


if __name__ == "__main__":
    main()
