"""Checkpoint writing and loading: ``fxcompress.save`` (into a new folder and over an existing
checkpoint) and ``fxcompress.load`` (time and peak memory), SmolLM2-135M at RTN w4 g64.

Each measurement runs in a fresh process so that its memory is its own, importing fxcompress
from each source tree given with ``--tree NAME=PATH`` (e.g. an older commit unpacked with
``git archive REV fxcompress | tar -x -C DIR``), round-robin over the trees so that a shared
machine's load falls on all of them alike; the table shows medians over rounds. The
checkpoint is made once with this tree and cached under the fxcompress cache folder (the
layout is the same for every tree measured).

    python benchmarks/checkpoint_io.py [--tree main=/tmp/main] [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, shutil, sys, time
sys.path.insert(0, sys.argv[1])
import fxcompress
from transformers import LlamaForCausalLM  # import cost is not load's

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak mark
before = kib("VmRSS:")
t = time.perf_counter()
model = fxcompress.load(sys.argv[2])
load_s = time.perf_counter() - t
peak = (kib("VmHWM:") - before) / 1024
out = sys.argv[3]
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
fxcompress.save(model, out)
fresh_s = time.perf_counter() - t
t = time.perf_counter()
fxcompress.save(model, out)
over_s = time.perf_counter() - t
shutil.rmtree(out)
print(json.dumps({"load_s": load_s, "load_peak_mib": peak, "save_new_s": fresh_s,
                  "save_over_s": over_s}))
"""


def checkpoint() -> Path:
    """SmolLM2-135M, every linear but the tied head at RTN w4 g64 (made once, cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    import fxcompress
    from fxcompress import RTN, assets

    folder = assets.cache_dir() / "bench" / "smollm2-rtn-w4g64"
    if not (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(assets.smollm2(progress=False),
                                                     dtype=torch.float32)
        ids = torch.randint(0, model.config.vocab_size, (2, 32),
                            generator=torch.Generator().manual_seed(0))
        fxcompress.compile(model, ids, {"lm_head": None, ".*": RTN(4, 64)}, progress=False)
        fxcompress.save(model, folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=PATH of another source tree to measure (repeatable)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = p.parse_args()
    trees = {"this tree": str(ROOT), **dict(t.split("=", 1) for t in args.tree)}
    folder = checkpoint()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    sys.path.insert(0, str(Path(__file__).parent))
    from _cpu import cpu_flags

    flags = cpu_flags()
    load_avg = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, "-c", CHILD, tree, str(folder),
                                  str(folder.with_name("checkpoint-io-out"))],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ["save_new_s", "save_over_s", "load_s", "load_peak_mib"]
    rows = ["| source tree | save, new folder (s) | save over a checkpoint (s) | load (s) | "
            "peak added by load (MiB) |", "|---|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        med = [statistics.median(r[k] for r in rs) for k in keys]
        rows.append(f"| {name} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.0f} |")
    peaks = {name: sorted(round(r["load_peak_mib"]) for r in rs) for name, rs in runs.items()}
    body = (f"Checkpoint: {size:.0f} MiB of safetensors. CPU flags: {', '.join(flags)}; "
            f"{os.cpu_count()} cores; load average {load_avg:.1f} at the start (shared "
            f"machine); medians of {args.rounds} rounds, each tree once per round in a fresh "
            f"process; default torch threads.\n\n" + "\n".join(rows)
            + f"\n\nPeaks added by load, every round (MiB): {peaks}\n")
    print(body)
    if args.write:
        from benchmarks._results import write_section

        extra = " ".join(f"--tree {t}" for t in args.tree)
        write_section("Checkpoint save and load (SmolLM2-135M, RTN w4 g64)",
                      f"python benchmarks/checkpoint_io.py {extra} --rounds {args.rounds} "
                      f"--write".replace("  ", " "), body)


if __name__ == "__main__":
    main()
