"""Wall time and peak memory of ``fxcompress.compile`` on the real SmolLM2-135M.

Each method runs in a fresh subprocess (so its peak RSS is its own): load the model, sample
128 x 512 calibration tokens from the SOTU calibration text, compile. The memory target is
peak RSS under 2 x (model fp32 size + one layer's activations for all samples).

    python benchmarks/compile_speed.py [--samples 128] [--seqlen 512] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["gptq-w4g64", "sparsegpt-50"]


def row(recipe: str, samples: int, seqlen: int) -> dict:
    import torch

    import fxcompress
    from fxcompress import assets
    from fxcompress.cli import load_model
    from fxcompress.evaluate import calibration_samples
    from fxcompress.recipe import resolve

    model, tok, _ = load_model("smollm2", progress=False)
    text = assets.load_text(assets.sotu(progress=False) / "calibration.txt")
    calib = calibration_samples(tok, text, samples, seqlen, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    fxcompress.compile(model, calib, resolve(recipe), progress=False)
    seconds = time.perf_counter() - t
    return {
        "recipe": recipe, "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_compile_mib": before, "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(args.row, args.samples, args.seqlen)))
        return
    from transformers import AutoConfig

    from fxcompress import assets

    folder = assets.smollm2(progress=False)
    fp32_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    cfg = AutoConfig.from_pretrained(folder)
    act_mib = args.samples * args.seqlen * cfg.hidden_size * 4 / 2**20
    target = 2 * (fp32_mib + act_mib)
    lines = ["| method | wall time (s) | peak RSS (MiB) | target (MiB) | within target |",
             "|---|---:|---:|---:|---|"]
    for recipe in METHODS:
        out = subprocess.run([sys.executable, __file__, "--row", recipe, "--samples",
                              str(args.samples), "--seqlen", str(args.seqlen)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        lines.append(f"| {recipe} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{target:.0f} | {'yes' if r['peak_rss_mib'] < target else 'no'} |")
        print(lines[-1], flush=True)
    body = (f"SmolLM2-135M (fp32 {fp32_mib:.0f} MiB), calibration {args.samples} x {args.seqlen}"
            f" tokens (one hidden-size activation for all samples: {act_mib:.0f} MiB); target"
            f" = 2 x ({fp32_mib:.0f} + {act_mib:.0f}) MiB. Peak RSS includes the Python, torch"
            f" and transformers runtime and the model load.\n\n" + "\n".join(lines))
    print("\n" + body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("Compile time and memory (SmolLM2-135M)",
                      "python benchmarks/compile_speed.py --write", body)


if __name__ == "__main__":
    main()
