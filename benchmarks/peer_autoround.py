"""Intel's AutoRound (SignRound) as an outside anchor of the domain-suite table.

Its own code, fxcompress's tokens. Why a separate script and venv: auto-round comes with
llm-compressor into ``.venv-peer`` (``benchmarks/peer_setup.sh``), whose transformers pins
differ from ours, so this file imports only what that venv has (never fxcompress), like
``peer_llmcompressor.py``. Its inputs are the ``ids`` folder of ``benchmarks/domains.py``
(``calib-<set>-seed<k>.pt``: LongTensor (128, 512); ``eval-<domain>.pt``: LongTensor
(32, 512)), its output one row of ``domains.py``'s format in ``OUT/results.json`` (an
existing row of the same name and seed is replaced), so the table takes it with
``domains.py --table --include OUT``. Full-size rows, one process each:

    bash benchmarks/peer_setup.sh
    OMP_NUM_THREADS=1 .venv-peer/bin/python benchmarks/peer_autoround.py \\
        --model /root/.cache/fxcompress/smollm2-135m-instruct --ids /work/cache/s2/ids \\
        --calibration speeches --seed 0 --bits 4 --group-size 64 --iters 200 \\
        --threads 1 --out bench/peer-autoround           # "autoround-w4g64 iters200"
    OMP_NUM_THREADS=1 .venv-peer/bin/python benchmarks/peer_autoround.py \\
        --model /root/.cache/fxcompress/smollm2-135m-instruct --ids /work/cache/s2/ids \\
        --calibration speeches --seed 0 --bits 4 --group-size 64 --iters 50 --lr 5e-3 \\
        --threads 1 --out bench/peer-autoround           # "autoround-w4g64 iters50 (light)"
    # --bits 3 for w3g64; --calibration mix for the mixed calibration set
    /work/main/.venv/bin/python benchmarks/domains.py --out /work/cache/s2 --table \\
        --include bench/peer-autoround

A quick check (a "(smoke)" row, never to be mixed with full-size ones):

    OMP_NUM_THREADS=1 .venv-peer/bin/python benchmarks/peer_autoround.py --model ... \\
        --ids ... --calibration speeches --seed 0 --iters 2 --samples 4 --seqlen 128 \\
        --windows 2 --threads 1 --out /tmp/ar-smoke

What runs: ``auto_round.AutoRound(model, tokenizer, scheme="W4A16", bits, group_size,
sym=False, dataset=<the calibration windows as a list of (batch, seqlen) LongTensors>,
nsamples=<all of them>, seqlen=<their width>, batch_size=8, iters, lr, device_map="cpu")``
then ``quantize()``. ``sym=False`` is the one departure from AutoRound's defaults (its
W4A16 scheme is symmetric; ``--sym`` runs that, a "... sym ..." row): asymmetric min-max
levels are what fxcompress's and llm-compressor's rows use. Everything else is AutoRound
0.15.1's default, and these defaults matter:

- lr ``None`` means ``1 / iters`` (5e-3 at 200 iters, 2e-2 at 50: the CLI's "light" recipe
  instead fixes 5e-3 at 50 iters, hence ``--lr 5e-3`` above); ``minmax_lr`` falls back to lr.
- Min-max (clipping) tuning is on: per group two factors in [0, 1] scale the weight's min and
  max, learned by signed SGD next to the rounding offsets; the step with the lowest block
  loss is kept (``not_use_best_mse=False``); the lr decays linearly to 0.
- Each iteration takes one batch of ``batch_size`` samples drawn from the cached block
  inputs; the loss is the block's output MSE against the dense block's, on the quantized
  previous blocks' outputs (``enable_quanted_input``), masking the last position of every
  sample (and pad tokens: the ids are checked to hold none).
- On a CPU with bf16 (avx512_bf16/amx) AutoRound casts the whole model to bf16 and tunes in
  bf16 (``amp``; ``--no-amp`` tunes in fp32). Scales are fp16 (``scale_dtype``).
- ``torch.compile`` of the block forward is on by default on Linux from 10 iterations up
  (inductor, needs a C compiler); ``--no-compile`` turns it off.
- The library's own seed (42) drives the batch sampling; ``--seed`` picks the calibration
  windows, as in domains.py.

Only the decoder linears are quantized (lm_head is left out by AutoRound's default
``quant_lm_head=False``; the embedding is not a Linear; SmolLM2 ties the two). After tuning,
each decoder linear holds its fake-quantized weight in the tuning dtype plus ``scale`` and
``zp``; the script recovers the integers ``q``, rebuilds the weight in fp32 as
``scale * (q - zp)`` (what a checkpoint of q, fp16 scales and zero points dequantizes to),
checks that this rounds back to AutoRound's weight exactly and has at most 2**bits levels per
group, and loads those weights into a fresh fp32 copy of the dense model, so the embedding,
norms and lm_head are the dense fp32 ones. Perplexity is then scored on every domain as
``fxcompress.evaluate.perplexity`` does (``_peer_domains.perplexity``). ``--dense`` skips
tuning and scores the dense model, to check this evaluation against domains.py's dense row.

Recorded: ``seconds`` (wall time of ``quantize()`` alone), ``cpu_seconds``, ``threads``, the
load average around it, peak RSS, versions, the settings as AutoRound resolved them (in
``method``), the calibration and eval shapes, and the level count.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import resource
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_domains as peer  # noqa: E402

DECODER_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
LIGHT = (50, 5e-3)  # auto-round's CLI "light" recipe: iters 50, lr 5e-3
AUTOROUND_SEED = 42  # AutoRound's default seed (batch sampling during tuning)


def _versions() -> dict[str, str]:
    names = ["torch", "auto-round", "transformers", "accelerate"]
    out = {n: importlib.metadata.version(n) for n in names}
    out["python"] = platform.python_version()
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def row_name(bits: int, group_size: int, iters: int, lr: float | None, smoke: bool,
             sym: bool = False) -> str:
    """e.g. "autoround-w4g64 iters200", "autoround-w4g64 iters50 (light)"."""
    name = f"autoround-w{bits}g{group_size}{' sym' if sym else ''} iters{iters}"
    if (iters, lr) == LIGHT:
        name += " (light)"
    elif lr is not None:
        name += f" lr{lr:g}"
    return name + (" (smoke)" if smoke else "")


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if DECODER_LINEAR.match(n)}


def _load(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _tune(args: argparse.Namespace, calib: torch.Tensor, tokenizer: Any) -> tuple[Any, dict]:
    """Run AutoRound on a fresh dense model; return it and what the call cost."""
    from auto_round import AutoRound

    batch = min(args.batch_size, calib.shape[0])
    extra: dict[str, Any] = {} if args.lr is None else {"lr": args.lr}
    if not args.amp:
        extra["amp"] = False
    if not args.compile:
        extra["enable_torch_compile"] = False
    ar = AutoRound(
        _load(args.model),
        tokenizer,
        scheme="W4A16",
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        dataset=list(calib.split(batch)),
        iters=args.iters,
        nsamples=calib.shape[0],
        seqlen=calib.shape[1],
        batch_size=batch,
        seed=AUTOROUND_SEED,
        device_map="cpu",
        **extra,
    )
    cost: dict[str, Any] = {"loadavg_before": os.getloadavg()[0]}
    c0, t0 = time.process_time(), time.perf_counter()
    ar.quantize()
    cost["seconds"] = time.perf_counter() - t0
    cost["cpu_seconds"] = time.process_time() - c0  # all threads of this process
    cost["loadavg_after"] = os.getloadavg()[0]
    cost["peak_rss_mib"] = _peak_rss_mib()
    return ar, cost


def _settings(ar: Any, args: argparse.Namespace, calib: torch.Tensor) -> dict[str, Any]:
    """The settings as AutoRound resolved them (lr from iters, amp from the CPU, ...)."""
    cfg = ar.quantize_config
    amp_dtype = ar.model_context.amp_dtype
    return {
        "method": "AutoRound", "algorithm": type(cfg).__name__.removesuffix("Config"),
        "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
        "iters": cfg.iters, "lr": float(cfg.lr), "minmax_lr": float(cfg.minmax_lr),
        "lr_given": args.lr, "enable_minmax_tuning": cfg.enable_minmax_tuning,
        "not_use_best_mse": cfg.not_use_best_mse, "enable_quanted_input": cfg.enable_quanted_input,
        "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
        "batch_size": int(ar.calibration_context.batch_size),
        "gradient_accumulate_steps": cfg.gradient_accumulate_steps,
        "tuning_dtype": str(amp_dtype).removeprefix("torch."),
        "scale_dtype": str(ar.scale_dtype).removeprefix("torch."),
        "enable_torch_compile": bool(ar.enable_torch_compile),
        "seed": AUTOROUND_SEED,
        "targets": "decoder linears (7 per layer); lm_head, embedding dense",
    }


def dequantized(layer: torch.nn.Module, bits: int, group_size: int) -> torch.Tensor:
    """fp32 ``scale * (q - zp)`` of a tuned layer, checked against AutoRound's own weight.

    AutoRound leaves ``weight = (fp32(scale) * (q - zp)).to(tuning dtype)`` with ``scale``
    (fp16) of shape (out, in / group_size) and, asymmetric, ``zp`` (float, same shape, q in
    [0, 2**bits - 1]); symmetric, ``zp`` is the number 2**(bits-1) and the stored integers
    are q - zp in [-2**(bits-1), 2**(bits-1) - 1]. The integers are recovered by rounding,
    and the fp32 rebuild must round back to the stored weight bit for bit."""
    name = getattr(layer, "global_name", "a decoder linear")
    w = layer.weight.detach()
    scale, zp = getattr(layer, "scale", None), getattr(layer, "zp", None)
    if scale is None or zp is None:
        raise RuntimeError(f"{name}: no scale/zp after AutoRound: not quantized")
    out_f, in_f = w.shape
    s = scale.float().reshape(out_f, in_f // group_size, 1)
    asym = isinstance(zp, torch.Tensor)
    z = zp.float().reshape(s.shape) if asym else torch.tensor(0.0)
    lo, hi = (0, 2**bits - 1) if asym else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    q = torch.round(w.float().reshape(out_f, -1, group_size) / s + z)
    if q.min() < lo or q.max() > hi:
        raise RuntimeError(f"{name}: integer levels outside [{lo}, {hi}]")
    w32 = (s * (q - z)).reshape(out_f, in_f)
    if not torch.equal(w32.to(w.dtype), w):
        raise RuntimeError(f"{name}: scale * (q - zp) does not give AutoRound's "
                           "weight back; the scale/zp layout is not the one assumed")
    return w32


def _check_scope(tuned: torch.nn.Module, n_layers: int) -> list[str]:
    """Exactly the 7 x n_layers decoder linears must carry a scale; nothing else."""
    scaled = sorted(n for n, m in tuned.named_modules()
                    if isinstance(getattr(m, "scale", None), torch.Tensor))
    want = sorted(_decoder_linears(tuned))
    if len(want) != 7 * n_layers or scaled != want:
        extra, missing = sorted(set(scaled) - set(want))[:5], sorted(set(want) - set(scaled))[:5]
        raise RuntimeError(f"quantized outside/missing the decoder linears: {extra} {missing}")
    return want


def quantized_model(ar: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """A fresh fp32 dense model whose decoder linears hold AutoRound's dequantized weights."""
    model = _load(args.model)
    names = _check_scope(ar.model_context.model, model.config.num_hidden_layers)
    tuned = dict(ar.model_context.model.named_modules())
    levels = 0
    with torch.no_grad():
        for name in names:
            w32 = dequantized(tuned[name], args.bits, args.group_size)
            levels = max(levels, peer.max_levels(w32, args.group_size))
            model.get_submodule(name).weight.copy_(w32)
    if levels > 2**args.bits:
        raise RuntimeError(f"{levels} distinct levels in a group > 2**{args.bits}")
    return model, levels


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One row: tune (unless --dense), rebuild in fp32, score every domain, write the row."""
    calib, evals = peer.load_ids(args.ids, args.calibration, args.seed)
    calib, evals, smoke = peer.smoke_slice(calib, evals, args.samples, args.seqlen, args.windows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id
    if pad is not None and bool((calib == pad).any()):
        raise SystemExit(f"calibration ids hold the pad token {pad}: AutoRound would mask it")
    torch.manual_seed(0)
    row: dict[str, Any] = {
        "row": ("peer dense (.venv-peer)" + (" (smoke)" if smoke else "")) if args.dense
        else row_name(args.bits, args.group_size, args.iters, args.lr, smoke, args.sym),
        "recipe": None if args.dense else "autoround", "method": None,
        "model": peer.ids_model(args.ids),
        "calibration": None if args.dense else args.calibration, "seed": args.seed,
        "ppl": {}, "seconds": 0.0, "threads": torch.get_num_threads(), **peer.git_state(),
        "versions": _versions(), "calib_shape": list(calib.shape),
        "eval_windows": {d: list(t.shape) for d, t in evals.items()},
    }
    if args.dense:
        model = _load(args.model)
    else:
        ar, cost = _tune(args, calib, tokenizer)
        row.update(cost, method=_settings(ar, args, calib))
        model, row["max_levels_per_group"] = quantized_model(ar, args)
        del ar
    for domain, windows in evals.items():
        row["ppl"][domain] = peer.perplexity(model, windows)
        print(f"{row['row']}: {domain} {row['ppl'][domain]:.4f}", file=sys.stderr, flush=True)
    row["peak_rss_with_eval_mib"] = _peak_rss_mib()
    meta = {"tool": "benchmarks/peer_autoround.py", "ids": os.path.abspath(args.ids),
            "versions": row["versions"]}
    peer.write_row(args.out, row, meta)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="plain Hugging Face model folder (fp32)")
    p.add_argument("--ids", required=True, help="a domains.py ids folder")
    p.add_argument("--calibration", choices=["speeches", "mix"], default="speeches")
    p.add_argument("--seed", type=int, default=0, help="of the calibration windows (file name)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=200, help="AutoRound's default 200; light 50")
    p.add_argument("--lr", type=float, default=None,
                   help="default: AutoRound's own (1/iters); the light recipe uses 5e-3")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric levels (W4A16's own default); default asymmetric, as "
                   "fxcompress's and llm-compressor's rows")
    p.add_argument("--batch-size", type=int, default=8, help="AutoRound's default 8")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="AutoRound's mixed precision (bf16 on a CPU that has it); default on")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="leave torch.compile to AutoRound's default (on from 10 iters)")
    p.add_argument("--dense", action="store_true", help="no tuning: score the dense model")
    p.add_argument("--out", required=True, help="folder; the row goes into its results.json")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's)")
    p.add_argument("--samples", type=int, help="smoke: first N calibration windows only")
    p.add_argument("--seqlen", type=int, help="smoke: first L tokens of each calibration window")
    p.add_argument("--windows", type=int, help="smoke: first W eval windows of each domain")
    args = p.parse_args(argv)
    if args.group_size <= 0:
        p.error("--group-size must be positive (per-channel is not a row of this table)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    row = run(args)
    cells = " ".join(f"{d} {v:.3f}" for d, v in row["ppl"].items())
    print(f"{row['row']}: {cells} (quantize {row['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
