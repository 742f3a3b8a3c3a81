"""Ablation: what each technique buys on each row of the quality table.

Every row is one ``fxcompress _row`` process (the code path of ``fxcompress compare``: load
SmolLM2-135M, ``fxcompress.compile`` with the row's recipe on the calibration ids, perplexity
with dequantized float32 weights on the evaluation ids and on the other-domain ids), so its
time and peak memory are its own. Rows are a named recipe (with fxcompress's defaults, as
``fxcompress compress --recipe NAME`` runs it) or a variant that switches techniques on and off
explicitly; results accumulate in ``OUT/results.json`` (the format of ``compare``), rows already
there are not run again, so an interrupted run continues where it stopped:

    python benchmarks/ablation.py --out bench/ablation [--rows NAME ...] [--threads 1]
    python benchmarks/ablation.py --out bench/ablation --table [--write]

The token ids (128 x 512 SOTU <= 2000 calibration windows, seed 0; 32 x 512 windows of SOTU
2001-2021 and of Moby-Dick) are made once into ``OUT`` like ``compare`` makes them; pass the
same ids to the peer (``peer_llmcompressor.py``) for the quality table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fxcompress import GPTQ, RTN, Magnitude, Recipe, SparseGPT
from fxcompress.recipe import NAMED

A = {"act_order": True}
DO = {"dense_output": True}
NO_OWL = {"owl_lmbda": 0.0}  # the steps before OWL (its default spread is on since be35d75)
# family -> [(row name, method)]: the ablation steps, from the plain algorithm up
VARIANTS = {
    "gptq-w4g64": [("no act-order", GPTQ(4, 64, act_order=False)),
                   ("act-order", GPTQ(4, 64, **A)),
                   ("act-order + mse", GPTQ(4, 64, **A, mse=True)),
                   ("act-order + dense-output", GPTQ(4, 64, **A, **DO)),
                   ("act-order + dense-output + mse", GPTQ(4, 64, **A, **DO, mse=True))],
    "gptq-w3g64": [("act-order", GPTQ(3, 64, **A)),
                   ("act-order + dense-output", GPTQ(3, 64, **A, **DO)),
                   ("act-order + dense-output + mse", GPTQ(3, 64, **A, **DO, mse=True))],
    "gptq-w4": [("act-order", GPTQ(4, -1, **A)),
                ("act-order + dense-output", GPTQ(4, -1, **A, **DO)),
                ("act-order + dense-output + mse", GPTQ(4, -1, **A, **DO, mse=True))],
    "sparsegpt-50": [("sweep", SparseGPT(0.5, **NO_OWL)),
                     ("sweep + dense-output", SparseGPT(0.5, **DO, **NO_OWL)),
                     ("admm", SparseGPT(0.5, solver="admm", **NO_OWL)),
                     ("admm + dense-output", SparseGPT(0.5, solver="admm", **DO, **NO_OWL)),
                     ("admm + dense-output + owl", SparseGPT(0.5, solver="admm", **DO)),
                     ("admm + dense-output + owl 0.08",
                      SparseGPT(0.5, solver="admm", **DO, owl_lmbda=0.08)),
                     ("admm + dense-output + owl 0.15",
                      SparseGPT(0.5, solver="admm", **DO, owl_lmbda=0.15))],
    "sparsegpt-60": [("admm + dense-output", SparseGPT(0.6, solver="admm", **DO, **NO_OWL)),
                     ("admm + dense-output + owl", SparseGPT(0.6, solver="admm", **DO)),
                     ("admm + dense-output + owl 0.08",
                      SparseGPT(0.6, solver="admm", **DO, owl_lmbda=0.08))],
    "sparsegpt-2:4": [("sweep", SparseGPT(n_m=(2, 4))),
                      ("sweep + dense-output", SparseGPT(n_m=(2, 4), **DO)),
                      ("admm", SparseGPT(n_m=(2, 4), solver="admm")),
                      ("admm + dense-output", SparseGPT(n_m=(2, 4), solver="admm", **DO))],
    "sparsegpt-2:4+w4g64": [("sweep", SparseGPT(n_m=(2, 4), quant=GPTQ(4, 64))),
                            ("admm + dense-output", SparseGPT(n_m=(2, 4), solver="admm", **DO,
                                                              quant=GPTQ(4, 64)))],
}
BASELINES = ["rtn-w4g64", "rtn-w3g64", "rtn-w4", "magnitude-50", "magnitude-60", "magnitude-2:4",
             "magnitude-2:4+rtn-w4g64"]
assert all(isinstance(NAMED[b].rules[-1][1], (RTN, Magnitude)) for b in BASELINES)


def rows() -> dict[str, Recipe | None]:
    """Every row: name -> recipe (None: a named recipe, run by its name)."""
    out: dict[str, Recipe | None] = {"dense": None, **{b: None for b in BASELINES}}
    for family, steps in VARIANTS.items():
        out[family] = None  # fxcompress's defaults
        for step, method in steps:
            out[f"{family}: {step}"] = Recipe({"lm_head": None, ".*": method})
    return out


def _ids(out: Path) -> None:
    """The calibration and evaluation token ids, as ``fxcompress compare`` makes them."""
    if all((out / f).exists() for f in ("calib_ids.pt", "eval_ids.pt", "other_ids.pt")):
        return
    from transformers import AutoTokenizer

    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples, evaluation_windows

    tok = AutoTokenizer.from_pretrained(assets.smollm2())
    sotu = assets.sotu()
    torch.save(calibration_samples(tok, assets.load_text(sotu / "calibration.txt"), 128, 512, 0),
               out / "calib_ids.pt")
    torch.save(evaluation_windows(tok, assets.load_text(sotu / "evaluation.txt"), 512, 32),
               out / "eval_ids.pt")
    torch.save(evaluation_windows(tok, assets.load_text(assets.moby_dick()), 512, 32),
               out / "other_ids.pt")


def _load(results_file: Path) -> list[dict]:
    return json.loads(results_file.read_text()) if results_file.exists() else []


def run(out: Path, names: list[str], threads: int | None, precision: str = "auto") -> None:
    out.mkdir(parents=True, exist_ok=True)
    _ids(out)
    results_file = out / "results.json"
    table = rows()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for name in names:
        if any(r["recipe"] == name for r in _load(results_file)):
            continue
        recipe = table[name]
        with tempfile.TemporaryDirectory() as tmp:
            spec = name
            if recipe is not None:
                spec = f"{tmp}/recipe.json"
                Path(spec).write_text(recipe.to_json())
            cmd = [sys.executable, "-m", "fxcompress", "_row", "--model", "smollm2", "--recipe",
                   spec, "--calib-ids", str(out / "calib_ids.pt"), "--eval-ids",
                   str(out / "eval_ids.pt"), "--other-ids", str(out / "other_ids.pt"), "--json",
                   f"{tmp}/row.json", "--quiet", "--calibration-precision", precision]
            subprocess.run(cmd, check=True, env=env)
            row = json.loads(Path(f"{tmp}/row.json").read_text())
        row["recipe"] = name
        row["method"] = None if recipe is None else recipe.to_dict()["rules"][-1]
        row["loadavg"] = os.getloadavg()[0]
        with open(out / ".lock", "w") as lock:  # several runners may share one folder
            fcntl.flock(lock, fcntl.LOCK_EX)
            results_file.write_text(json.dumps(_load(results_file) + [row], indent=2))
        print(f"{name}: ppl {row['ppl']:.2f} other {row['ppl_other']:.2f} "
              f"in {row['seconds']:.0f}s ({row['cpu_seconds']:.0f} CPU s), "
              f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)


def table(out: Path) -> str:
    """Per family: each step's perplexity (evaluation / other domain) and what it changed
    against the step before, with time and peak memory."""
    by = {r["recipe"]: r for r in json.loads((out / "results.json").read_text())}
    dense = by.get("dense")
    lines = ["| row | ppl | Δ vs previous step | other domain | Δ vs previous step | "
             "time (s) | CPU (s) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if dense:
        lines.append(f"| dense | {dense['ppl']:.2f} | | {dense['ppl_other']:.2f} | | | | "
                     f"{dense['peak_rss_mib']:.0f} |")
    for name in [b for b in BASELINES if b in by]:
        r = by[name]
        lines.append(f"| {name} | {r['ppl']:.2f} | | {r['ppl_other']:.2f} | | "
                     f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    for family, steps in VARIANTS.items():
        prev = None
        for name in [f"{family}: {s}" for s, _ in steps] + [family]:
            if name not in by:
                continue
            r = by[name]
            shown = f"**{name} (defaults)**" if name == family else name
            d = d2 = ""
            if prev is not None and name != family:
                d = f"{r['ppl'] - prev['ppl']:+.2f}"
                d2 = f"{r['ppl_other'] - prev['ppl_other']:+.2f}"
            lines.append(f"| {shown} | {r['ppl']:.2f} | {d} | {r['ppl_other']:.2f} | {d2} | "
                         f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                         f"{r['peak_rss_mib']:.0f} |")
            prev = r if name != family else prev
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/ablation")
    ap.add_argument("--rows", nargs="+", help=f"rows to run (default all): {list(rows())}")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each row")
    ap.add_argument("--calibration-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="of each row's calibration matmuls (see fxcompress.compile)")
    ap.add_argument("--table", action="store_true", help="print the table of what has run")
    ap.add_argument("--write", action="store_true", help="write it into benchmarks/RESULTS.md")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        run(out, args.rows or list(rows()), args.threads, args.calibration_precision)
    text = table(out)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("Ablation: what each technique buys (SmolLM2-135M)",
                      f"python benchmarks/ablation.py --out {args.out} --threads 1", text)


if __name__ == "__main__":
    main()
