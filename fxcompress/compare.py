"""``fxcompress compare``: recipes side by side with the dense model in one table and plot.
Each row runs in its own process (the hidden ``_row`` command) so that its peak memory is its
own; the measures a row reports (stored bits, sparsity, peak memory) live here too, and
``compress`` prints two of them."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .inputs import echo, from_hub, load_model, model_source, read_other_text, read_text


def peak_rss_mib() -> float:
    """Peak resident memory of this process. ``VmHWM`` where Linux has it: ``ru_maxrss``
    survives ``exec`` and so can report the peak of the process that started this one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bits_per_weight(model: torch.nn.Module, layout: str = "bitmask") -> tuple[float, int]:
    """Stored bits per weight of the compressed linears, and how many weights they hold, with
    pruned layers in the sparse ``layout`` (dense: every weight stored); each kind counts its
    own (:meth:`~fxcompress.checkpoint.codecs.Codec.stored_bits`)."""
    from .checkpoint.codecs import codec_for

    bits, weights = 0, 0
    for m in model.modules():
        codec = codec_for(m)
        counted = codec.stored_bits(m, layout) if codec is not None else None
        if counted is not None:
            bits, weights = bits + counted[0], weights + counted[1]
    return (bits / weights if weights else 16.0), weights


def cmd_row(args: argparse.Namespace) -> int:
    """One row of ``compare``, run in its own process so its peak memory is its own."""
    import fxcompress

    from .checkpoint.model import decompress
    from .recipe import resolve

    model, tokenizer, _ = load_model(args.model, progress=False)
    calib = torch.load(args.calib_ids, weights_only=True)
    row: dict[str, Any] = {"recipe": args.recipe}
    t, cpu = time.perf_counter(), time.process_time()
    if args.recipe != "dense":
        fxcompress.compile(model, calib, resolve(args.recipe), progress=not args.quiet,
                           calibration_precision=args.calibration_precision)
        row["precision"] = model.fxcompress_report.precision
    row["seconds"] = time.perf_counter() - t if args.recipe != "dense" else 0.0
    row["cpu_seconds"] = time.process_time() - cpu if args.recipe != "dense" else 0.0
    row["threads"] = torch.get_num_threads()
    row["peak_rss_mib"] = peak_rss_mib()
    row["bits_per_weight"], _ = bits_per_weight(model)
    row["sparsity"] = sparsity(model)
    if args.recipe != "dense":
        row["loss"] = sum(r.loss for r in model.fxcompress_report.layers
                          if r.loss == r.loss)  # NaN for baselines
    decompress(model)
    from .evaluate import perplexity

    for key, path in (("ppl", args.eval_ids), ("ppl_other", args.other_ids)):
        if path is not None:
            ids = torch.load(path, weights_only=True)
            row[key] = perplexity(model, None, ids.flatten(), ids.shape[1], ids.shape[0],
                                  progress=False).ppl
    Path(args.json).write_text(json.dumps(row))
    return 0


def sparsity(model: torch.nn.Module) -> float:
    """The pruned share of the compressed linears' weights (each kind counts its own:
    :meth:`~fxcompress.checkpoint.codecs.Codec.pruned_weights`)."""
    from .checkpoint.codecs import codec_for

    zeros, total = 0, 0
    for m in model.modules():
        codec = codec_for(m)
        counted = codec.pruned_weights(m) if codec is not None else None
        if counted is not None:
            zeros, total = zeros + counted[0], total + counted[1]
    return zeros / total if total else 0.0


def cmd_compare(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .evaluate import calibration_samples, evaluation_windows

    # the rows load the model, each in its own process: check it here, once
    source = model_source(args.model, not args.quiet, dense=True)
    tokenizer = from_hub(AutoTokenizer.from_pretrained, source, "tokenizer")
    calib = calibration_samples(tokenizer, read_text(args.calib, "calibration", not args.quiet),
                                args.samples, args.seqlen, args.seed)
    ids = evaluation_windows(tokenizer, read_text(args.text, "evaluation", not args.quiet),
                             args.eval_seqlen, args.windows)
    other = None if args.other_text == "none" else evaluation_windows(
        tokenizer, read_other_text(args.other_text, not args.quiet), args.eval_seqlen, args.windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    # the exact token ids, so that another tool can be run on the same samples
    torch.save(calib, out / "calib_ids.pt")
    torch.save(ids, out / "eval_ids.pt")
    # how the ids were made, so that results can be told apart by seed and sizes
    (out / "settings.json").write_text(json.dumps(
        {"seed": args.seed, "samples": args.samples, "seqlen": args.seqlen,
         "windows": args.windows, "eval_seqlen": args.eval_seqlen, "calib": args.calib,
         "text": args.text, "other_text": args.other_text}, indent=2))
    extra = []
    if other is not None:
        torch.save(other, out / "other_ids.pt")
        extra = ["--other-ids", str(out / "other_ids.pt")]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ["dense", *args.recipes.split(",")]:
            echo(f"[compare] {recipe} ...")
            cmd = [sys.executable, "-m", "fxcompress", "_row", "--model", args.model,
                   "--recipe", recipe, "--calib-ids", str(out / "calib_ids.pt"),
                   "--eval-ids", str(out / "eval_ids.pt"), *extra, "--json", f"{tmp}/row.json",
                   "--quiet"]
            subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            rows.append(json.loads(Path(f"{tmp}/row.json").read_text()))
            # after every row: an interrupted comparison keeps the rows it finished
            (out / "results.json").write_text(json.dumps(rows, indent=2))
            echo(f"[compare] {recipe}: ppl {rows[-1]['ppl']:.3f} in {rows[-1]['seconds']:.0f}s")
    settings = (f"calibration {calib.shape[0]} x {calib.shape[1]} tokens (seed {args.seed}); "
                f"evaluation {ids.shape[0]} windows x {ids.shape[1]} tokens"
                + ("" if other is None else " of the evaluation text and of the other-domain "
                   "text") + "; perplexity with dequantized float32 weights")
    table = compare_table(rows, settings)
    (out / "table.md").write_text(table + "\n")
    _plot(rows, out / "plot.png")
    echo("\n" + table + f"\n\nwritten: {out / 'table.md'}, {out / 'plot.png'}")
    return 0


def compare_table(rows: list[dict[str, Any]], settings: str) -> str:
    other = any("ppl_other" in r for r in rows)
    lines = [f"_{settings}_", "",
             "| recipe | perplexity |" + (" other domain |" if other else "")
             + " bits/weight | sparsity | time (s) | CPU time (s) | peak RSS (MiB) |",
             "|---|---:|" + ("---:|" if other else "") + "---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['ppl']:.2f} | "
                     + (f"{r['ppl_other']:.2f} | " if other else "")
                     + f"{r['bits_per_weight']:.2f} | {r['sparsity']:.0%} | {r['seconds']:.0f} | "
                     f"{r.get('cpu_seconds', 0):.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r["ppl"] for r in rows if r["recipe"] == "dense"), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        quantized, sparse = r["bits_per_weight"] < 15.9 and r["sparsity"] < 0.01, \
            r["sparsity"] >= 0.01
        baseline = r["recipe"].startswith(("rtn", "magnitude"))
        style = dict(marker="s" if baseline else "o", color="tab:gray" if baseline else "tab:blue")
        if quantized:
            left.scatter(r["bits_per_weight"], r["ppl"], **style)
            left.annotate(r["recipe"], (r["bits_per_weight"], r["ppl"]), fontsize=7)
        if sparse:
            right.scatter(r["sparsity"] * 100, r["ppl"], **style)
            right.annotate(r["recipe"], (r["sparsity"] * 100, r["ppl"]), fontsize=7)
    for ax, xlabel in ((left, "stored bits per weight"), (right, "sparsity (%)")):
        if dense:
            ax.axhline(dense, color="tab:green", linestyle="--", label=f"dense {dense:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.legend()
    left.set_title("quantization (o: GPTQ, s: RTN)")
    right.set_title("sparsity (o: SparseGPT, s: magnitude)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
