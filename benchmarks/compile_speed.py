"""Wall time and peak memory of ``fxcompress.compile`` on the real SmolLM2-135M.

Each row runs in a fresh subprocess (so its peak RSS is its own): load the model, sample
128 x 512 calibration tokens from the SOTU calibration text, compile. Reported per row: wall
time and its split into phases (forward through the segments, statistics, solves, rewrite),
the peak RSS, the peak growth over the RSS just before ``compile`` (what compression adds to
the loaded model), and the estimate of that growth that ``compile`` makes before it starts
(``model.fxcompress_report.estimate``, when the source tree has one).

``--before PATH`` runs the same rows with another source tree of fxcompress first (e.g. a
``git worktree`` of an older commit), interleaved, so that times are compared side by side on
the same (shared) machine.

    python benchmarks/compile_speed.py [--recipes gptq-w4g64,sparsegpt-50] [--samples 128]
        [--seqlen 512] [--threads N] [--before PATH] [--calibration-precision fp32] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def row(recipe: str, samples: int, seqlen: int, threads: int, price: float | None,
        tree: str | None, precision: str = "auto") -> dict:
    if tree:  # another source tree of fxcompress goes first
        sys.path.insert(0, tree)
    import torch

    import fxcompress
    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples
    from fxcompress.inputs import load_model
    from fxcompress.recipe import resolve

    sys.path.insert(0, str(Path(__file__).parent))
    from _profile import Profile, status

    if threads:
        torch.set_num_threads(threads)
    if price is not None:  # an experiment: another recompute price than the default
        import importlib

        value = None if price < 0 else price
        pass_module = importlib.import_module("fxcompress.calibration.entry")
        pass_module.calibrate.__kwdefaults__["recompute"] = value
        api = importlib.import_module("fxcompress.api")
        if hasattr(api, "PRICE"):  # compile() passes fit_memory()'s price, whose first try is this
            api.PRICE = value
    profile = Profile()
    model, tok, _ = load_model("smollm2", progress=False)
    text = assets.load_text(assets.sotu(progress=False) / "calibration.txt")
    calib = calibration_samples(tok, text, samples, seqlen, 0)
    profile.start()
    t = time.perf_counter()
    options = {} if precision == "auto" else {"calibration_precision": precision}
    fxcompress.compile(model, calib, resolve(recipe), progress=False, **options)
    seconds = time.perf_counter() - t
    report = model.fxcompress_report
    estimate = getattr(report, "estimate", None)
    return {
        "recipe": recipe, "seconds": seconds, "phases": profile.seconds,
        "peak_rss_mib": max(profile.peak, status("VmHWM")) / 2**20,
        "rss_before_compile_mib": profile.baseline / 2**20,
        "growth_mib": profile.growth() / 2**20,
        "estimate_mib": None if estimate is None else estimate / 2**20,
        "threads": torch.get_num_threads(), "fxcompress": fxcompress.__file__,
        "precision": getattr(report, "precision", "fp32"),
        "losses": [r.loss for r in report.layers],
    }


def _run(recipe: str, args: argparse.Namespace, tree: Path | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--row", recipe, "--samples",
                          str(args.samples), "--seqlen", str(args.seqlen), "--threads",
                          str(args.threads), "--calibration-precision", args.calibration_precision,
                          *(["--price", str(args.price)] if args.price
                                               is not None and tree is None else []),
                          *(["--tree", str(tree)] if tree is not None else [])],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="gptq-w4g64,sparsegpt-50")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--before", help="another fxcompress source tree to run first")
    ap.add_argument("--price", type=float, help="recompute price (experiment; < 0: none)")
    ap.add_argument("--calibration-precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(args.row, args.samples, args.seqlen, args.threads, args.price,
                             args.tree, args.calibration_precision)))
        return
    lines = ["| recipe | source | wall time (s) | forward (s) | statistics (s) | solves (s) | "
             "rewrite (s) | peak RSS (MiB) | growth (MiB) | estimate (MiB) | estimate / growth |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    trees = ([("before", Path(args.before))] if args.before else []) + [("this", None)]
    rows = {}
    for recipe in args.recipes.split(","):
        for label, tree in trees:
            r = rows[recipe, label] = _run(recipe, args, tree)
            p, est = r["phases"], r["estimate_mib"]
            lines.append(
                f"| {recipe} | {label} | {r['seconds']:.0f} | {p.get('forward', 0):.0f} | "
                f"{p.get('statistics', 0):.0f} | {p.get('solve', 0):.0f} | "
                f"{p.get('write', 0):.0f} | {r['peak_rss_mib']:.0f} | {r['growth_mib']:.0f} | "
                + (f"{est:.0f} | {est / r['growth_mib']:.2f} |" if est else "— | — |"))
            print(lines[-1], flush=True)
        if args.before:
            a, b = rows[recipe, "before"], rows[recipe, "this"]
            same = a["losses"] == b["losses"]
            print(f"{recipe}: time ratio {b['seconds'] / a['seconds']:.2f}, identical layer "
                  f"losses: {same}", flush=True)
    import torch

    body = (f"SmolLM2-135M (fp32), calibration {args.samples} x {args.seqlen} tokens of the SOTU "
            f"calibration text (seed 0), torch {torch.__version__}, "
            f"{args.threads or torch.get_num_threads()} threads, calibration matmuls "
            f"{', '.join(sorted({r['precision'] for r in rows.values()}))}, load average "
            f"{os.getloadavg()[0]:.1f} at the end. Growth: peak RSS minus the RSS just before "
            f"`compile` (model and data loaded); peak RSS includes the Python, torch and "
            f"transformers runtime.\n\n" + "\n".join(lines))
    print("\n" + body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("Compile time and memory (SmolLM2-135M)",
                      "python benchmarks/compile_speed.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
