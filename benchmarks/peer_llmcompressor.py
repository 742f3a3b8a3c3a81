"""llm-compressor, the peer of fxcompress in the quality table: the same rows, its own code.

Why a separate script and venv: llm-compressor pins transformers/compressed-tensors versions
that differ from ours, so it lives in `.venv-peer` (made by `benchmarks/peer_setup.sh`) and this
file imports only what that venv has (never fxcompress). The inputs are plain files so that both
sides of the table see exactly the same tokens:

    bash benchmarks/peer_setup.sh
    .venv-peer/bin/python benchmarks/peer_llmcompressor.py \\
        --model /tmp/peer/smollm2 --calib calib_128x512.pt --eval eval_32x512.pt \\
        --out peer_results.json                       # all 14 rows, hours on 2 cores
    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --threads 1 \\
        --model /tmp/peer/smollm2 --calib calib_8x128.pt --eval eval_4x512.pt \\
        --rows gptq-w4g64 sparsegpt-2:4 --out small.json

The same rows on the domain suite's tokens (``--ids``: a ``benchmarks/domains.py`` ids folder):
the row is scored on every ``eval-<domain>.pt`` with fxcompress's perplexity arithmetic and
written as "llm-compressor <row>" into ``OUT/results.json`` in domains.py's row format
(replacing a row of the same name and seed), so ``domains.py --table --include OUT`` shows it
next to fxcompress's rows. The three rows of the table, one process each:

    OMP_NUM_THREADS=1 .venv-peer/bin/python benchmarks/peer_llmcompressor.py \\
        --model /root/.cache/fxcompress/smollm2-135m-instruct --ids /work/cache/s2/ids \\
        --calibration speeches --seed 0 --threads 1 --out bench/peer-llmcompressor \\
        --rows gptq-w4g64 gptq-w3g64 sparsegpt-50
    /work/main/.venv/bin/python benchmarks/domains.py --out /work/cache/s2 --table \\
        --include bench/peer-llmcompressor

``--samples N --seqlen L --windows W`` cut the inputs for a quick check (a "(smoke)" row).

Cost on the 2-core CPU machine: the full-size gptq-w4g64 row (128 x 512 calibration) took
846 CPU-seconds in `oneshot` at `--threads 1` (28 min wall on a machine shared with other jobs,
load 6-10); at 8 x 128 calibration a GPTQ or SparseGPT row is about 1 CPU-minute, RTN seconds.
llm-compressor's CPU path is slow because GPTQ and SparseGPT run a Python loop per column.

`--model` is a plain Hugging Face folder (fp32 safetensors + tokenizer), `--calib` a LongTensor
(n, seqlen) of calibration token ids, `--eval` a LongTensor (windows, seqlen).

Each row runs in its own subprocess of this script (`--worker`), so its peak RSS is its own:
the dense model is loaded fresh (fp32, CPU), `llmcompressor.oneshot` applies the row's recipe
with exactly the given calibration samples (a `datasets.Dataset` of input_ids/attention_mask,
`num_calibration_samples=n`, `max_seq_length=seqlen`, `shuffle_calibration_samples=False`,
batch size 1), then perplexity is measured on the eval windows: mean NLL of `logits[:, :-1]`
against `ids[:, 1:]`, fp32 log-softmax, 4 windows a batch, `use_cache=False`; ppl = exp(mean).

Recorded per row: ppl, `seconds` (wall time of the `oneshot` call only; `cpu_seconds`, its
CPU time over all threads, and the 1-minute load average before and after, tell how much a
shared machine distorted it), `peak_rss_mib`
(ru_maxrss of the row's process at the end of `oneshot`: load + compression) and
`peak_rss_with_eval_mib` (at the end of the row, evaluation included), the measured sparsity of
the decoder linears (of the weights the forward actually uses: fake-quantized where quantized),
the largest number of distinct levels in any quantization group (must be <= 2**bits), versions,
the recipe settings and notes.

What llm-compressor 0.14.0.1 needs here, and what this script does about it:
- Targets. Only the decoder linears are compressed (`model.layers.N.self_attn.{q,k,v,o}_proj`,
  `model.layers.N.mlp.{gate,up,down}_proj`), named by one anchored regex, never "Linear":
  SparseGPT's `ignore=["lm_head"]` does not match the name it builds for a top-level target
  ("lm_head." with a trailing dot), so with targets=["Linear"] it prunes lm_head, which is tied
  to the embedding in SmolLM2 (seen: "Sparsifying lm_head.", embedding left 50 % zeros).
  After every row the embedding and lm_head are checked bit-identical to the dense model's,
  and exactly the 7 x num_hidden_layers decoder linears (and, for quantized rows, only they)
  must carry a quantization scheme; the row fails otherwise.
- CPU. No special flag is needed: `oneshot` runs its default "independent" pipeline, which
  gives each modifier its own inferred pipeline ("sequential" for GPTQ/SparseGPT, tracing one
  LlamaDecoderLayer at a time with torch.fx; "datafree" for weight-only RTN), all on the CPU.
  GPTQ's Triton block kernel is used only on CUDA; on CPU the eager torch path runs.
  Calibration is sequential per decoder layer: all 7 linears of a layer collect their Hessians
  in one pass over the (already compressed) previous layers' outputs, then are compressed
  together; within a layer, o_proj and down_proj see the dense layer's activations.
- Threads. On a machine that other jobs oversubscribe, torch's default OpenMP threads (one per
  core) collapse on the many small per-column ops (one GPTQ module went from 0.1 s to 27 s);
  `--threads 1` keeps a row usable there. The thread count changes float summation order, and
  GPTQ's rounding decisions amplify it: gptq-w4g64 at 8 x 128 calibration gave ppl 32.99 at 2
  threads and 32.36 at 1 (each reproducible), so the JSON records `threads`; compare rows run
  with the same count.
- Groups of 64: SmolLM2's hidden size 576 is not a multiple of 128, and llm-compressor refuses
  group sizes that do not divide every targeted layer's input width.
- GPTQ act-order: in this release `actorder="static"` is an alias of "weight" and is the
  GPTQModifier default, so the "no act-order" rows pass `actorder=None` explicitly; the old
  dynamic "group" order has been removed (a ValueError). The act-order row uses "weight".
- GPTQ scales: llm-compressor fixes every scale/zero point from the weights *before* GPTQ runs
  (memoryless min-max observer), unlike the reference GPTQ, which computes a group's qparams
  from the error-updated weights when it reaches that group.
- Magnitude pruning: `MagnitudePruningModifier` is a training-time modifier. Under `oneshot`
  (start=0, end=1, init=final sparsity) it computes its masks but applies them only on
  optimizer steps or through forward hooks that `oneshot` never enables, then drops them at
  finalize: the weights stay dense. The row is run anyway and reported `unavailable` (with
  `ppl_as_run`) when the measured sparsity falls short, as it does in 0.14.0.1. Its mask
  factory has no N:M structure, so `magnitude-2:4` is reported unavailable without running.
- A pruning row whose measured sparsity is more than 1 point below the asked one is reported
  `unavailable`; for sparsegpt-2:4+w4g64 the shortfall is the finding (GPTQModifier has no
  option to keep a sparsity mask) and is written into its notes instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DECODER_LINEARS = r"re:^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
TARGETS = [DECODER_LINEARS]
DAMP = 0.01  # the modifiers' default dampening_frac
BLOCK = 128  # the modifiers' default block_size
EVAL_BATCH = 4


@dataclass(frozen=True)
class Row:
    """One line of the table: how to build its llm-compressor recipe, and what it is."""

    name: str
    build: Callable[[], list[Any]] | None  # None: dense, no compression
    settings: list[dict[str, Any]]
    notes: str = ""
    bits: int | None = None
    group_size: int | None = None  # None with bits: per-channel
    sparsity: float | None = None  # the sparsity the recipe asks for
    unavailable: str | None = None  # why llm-compressor cannot do this row


def _weight_args(bits: int, group_size: int | None) -> dict[str, Any]:
    strategy = (
        {"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}
    )
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "observer": "memoryless_minmax",
        **strategy,
    }


def _config_groups(bits: int, group_size: int | None) -> dict[str, Any]:
    return {
        "group_0": {
            "targets": TARGETS,
            "weights": _weight_args(bits, group_size),
            "input_activations": None,
            "output_activations": None,
        }
    }


def _rtn(bits: int, group_size: int | None) -> tuple[Callable[[], list[Any]], dict[str, Any]]:
    settings = {
        "modifier": "QuantizationModifier",
        "config_groups": _config_groups(bits, group_size),
    }

    def build() -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=_config_groups(bits, group_size))]

    return build, settings


DEFAULT = "default"  # leave GPTQModifier's own actorder default (static in 0.14.0.1)


def _gptq_settings(bits: int, group_size: int | None, actorder: str | None) -> dict[str, Any]:
    return {
        "modifier": "GPTQModifier",
        "config_groups": _config_groups(bits, group_size),
        "actorder": "GPTQModifier default (static)" if actorder == DEFAULT else actorder,
        "block_size": BLOCK,
        "dampening_frac": DAMP,
    }


def _gptq_modifier(bits: int, group_size: int | None, actorder: str | None) -> Any:
    from llmcompressor.modifiers.gptq import GPTQModifier

    order = {} if actorder == DEFAULT else {"actorder": actorder}
    return GPTQModifier(
        config_groups=_config_groups(bits, group_size),
        block_size=BLOCK,
        dampening_frac=DAMP,
        **order,
    )


def _gptq(
    bits: int, group_size: int | None, actorder: str | None = DEFAULT
) -> tuple[Callable[[], list[Any]], dict[str, Any]]:
    return (
        lambda: [_gptq_modifier(bits, group_size, actorder)],
        _gptq_settings(bits, group_size, actorder),
    )


def _sgpt_settings(sparsity: float, mask: str) -> dict[str, Any]:
    return {
        "modifier": "SparseGPTModifier",
        "sparsity": sparsity,
        "mask_structure": mask,
        "targets": TARGETS,
        "block_size": BLOCK,
        "dampening_frac": DAMP,
    }


def _sgpt_modifier(sparsity: float, mask: str) -> Any:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=sparsity,
        mask_structure=mask,
        targets=TARGETS,
        block_size=BLOCK,
        dampening_frac=DAMP,
    )


def _sgpt(sparsity: float, mask: str) -> tuple[Callable[[], list[Any]], dict[str, Any]]:
    return lambda: [_sgpt_modifier(sparsity, mask)], _sgpt_settings(sparsity, mask)


def _magnitude(sparsity: float, mask: str) -> tuple[Callable[[], list[Any]], dict[str, Any]]:
    settings = {
        "modifier": "MagnitudePruningModifier",
        "targets": TARGETS,
        "init_sparsity": sparsity,
        "final_sparsity": sparsity,
        "mask_structure": mask,
        "start": 0,
        "end": 1,
    }

    def build() -> list[Any]:
        from llmcompressor.modifiers.pruning import MagnitudePruningModifier

        return [
            MagnitudePruningModifier(
                targets=TARGETS,
                init_sparsity=sparsity,
                final_sparsity=sparsity,
                mask_structure=mask,
                start=0,
                end=1,
            )
        ]

    return build, settings


def _row(name: str, spec: tuple[Callable[[], list[Any]], dict[str, Any]], **kw: Any) -> Row:
    build, settings = spec
    return Row(name=name, build=build, settings=[settings], **kw)


def _sparse_w4g64() -> Row:
    def build() -> list[Any]:
        return [_sgpt_modifier(0.5, "2:4"), _gptq_modifier(4, 64, DEFAULT)]

    return Row(
        name="sparsegpt-2:4+w4g64",
        build=build,
        settings=[_sgpt_settings(0.5, "2:4"), _gptq_settings(4, 64, DEFAULT)],
        notes=(
            "one recipe [SparseGPTModifier, GPTQModifier]; oneshot's independent pipeline "
            "runs a full sequential calibration pass per modifier. GPTQModifier has no "
            "mask-preserving option: its error feedback refills pruned weights, see "
            "sparsity/sparsity_2of4."
        ),
        bits=4,
        group_size=64,
        sparsity=0.5,
    )


ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        Row(name="dense", build=None, settings=[], notes="uncompressed fp32 baseline"),
        _row("rtn-w4g64", _rtn(4, 64), bits=4, group_size=64, notes="RTN: QuantizationModifier"),
        _row("gptq-w4g64", _gptq(4, 64), bits=4, group_size=64,
             notes="the GPTQModifier defaults (actorder static)"),
        _row("gptq-w4g64-noact", _gptq(4, 64, None), bits=4, group_size=64,
             notes="actorder=None"),
        _row(
            "gptq-w4g64-act",
            _gptq(4, 64, "weight"),
            bits=4,
            group_size=64,
            notes=(
                "actorder='weight' (== 'static', the GPTQModifier default): columns processed "
                "in descending diag(H) order, groups stay the contiguous original-column "
                "groups, so the storage format is unchanged; 'group' (dynamic) is removed "
                "in this release"
            ),
        ),
        _row("rtn-w4", _rtn(4, None), bits=4, notes="RTN per-channel"),
        _row("gptq-w4", _gptq(4, None), bits=4, notes="per-channel, GPTQModifier defaults"),
        _row("rtn-w3g64", _rtn(3, 64), bits=3, group_size=64, notes="RTN"),
        _row("gptq-w3g64", _gptq(3, 64), bits=3, group_size=64,
             notes="the GPTQModifier defaults (actorder static)"),
        _row("sparsegpt-50", _sgpt(0.5, "0:0"), sparsity=0.5, notes="unstructured"),
        _row("sparsegpt-60", _sgpt(0.6, "0:0"), sparsity=0.6, notes="unstructured"),
        _row("sparsegpt-2:4", _sgpt(0.5, "2:4"), sparsity=0.5, notes="2:4"),
        _row(
            "magnitude-50",
            _magnitude(0.5, "unstructured"),
            sparsity=0.5,
            notes=(
                "MagnitudePruningModifier run one-shot (start=0, end=1, init=final=0.5): it "
                "computes masks at start but applies them only on optimizer steps or "
                "forward hooks that oneshot never enables, and removes them at finalize"
            ),
        ),
        Row(
            name="magnitude-2:4",
            build=None,
            settings=[],
            sparsity=0.5,
            unavailable=(
                "MagnitudePruningModifier's mask factory in llmcompressor 0.14.0.1 knows "
                "only 'unstructured', 'channel', 'filter' and 'block_*' structures: "
                "mask_structure='2:4' raises 'Invalid mask_structure: 2:4'"
            ),
        ),
        _sparse_w4g64(),
    ]
}


def _versions() -> dict[str, str]:
    names = ["torch", "llmcompressor", "compressed-tensors", "transformers", "datasets"]
    out = {n: importlib.metadata.version(n) for n in names}
    out["python"] = platform.python_version()
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import re

    pattern = re.compile(DECODER_LINEARS.removeprefix("re:"))
    return {n: m for n, m in model.named_modules() if pattern.match(n)}


def _check_targets(model: torch.nn.Module, row: Row) -> None:
    """Fail unless exactly the 7 linears of every decoder layer carry a quantization scheme."""
    linears = _decoder_linears(model)
    expected = 7 * model.config.num_hidden_layers
    if len(linears) != expected:
        raise RuntimeError(f"{row.name}: {len(linears)} decoder linears, expected {expected}")
    schemed = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    want = set(linears) if row.bits is not None else set()
    if schemed != want:
        extra, missing = sorted(schemed - want)[:5], sorted(want - schemed)[:5]
        raise RuntimeError(f"{row.name}: quantized outside/missing targets {extra} {missing}")


def _effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the forward uses: fake-quantized with the module's qparams if quantized."""
    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    weight = module.weight.detach()
    if args is None:
        return weight
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    return forward_quantize(module, weight, "weight", args)


def _max_levels(w: torch.Tensor, group_size: int | None) -> int:
    """Largest number of distinct values in one quantization group (row or row-group)."""
    groups = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)
    s = groups.sort(dim=-1).values
    distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(dim=-1)
    return int(distinct.max())


def _measure(model: torch.nn.Module, row: Row) -> dict[str, Any]:
    zeros = total = groups_2of4 = n_groups4 = 0
    max_levels = 0
    for module in _decoder_linears(model).values():
        w = _effective_weight(module)
        zeros += int((w == 0).sum())
        total += w.numel()
        g = (w.reshape(w.shape[0], -1, 4) == 0).sum(dim=-1)
        groups_2of4 += int((g >= 2).sum())
        n_groups4 += g.numel()
        if row.bits is not None:
            max_levels = max(max_levels, _max_levels(w, row.group_size))
    out: dict[str, Any] = {
        "n_linears": len(_decoder_linears(model)),
        "sparsity": zeros / total,
        "sparsity_2of4": groups_2of4 / n_groups4,  # share of groups of 4 with >= 2 zeros
    }
    if row.bits is not None:
        out["max_levels_per_group"] = max_levels
        if max_levels > 2**row.bits:
            raise RuntimeError(f"{row.name}: {max_levels} levels in a group > 2**{row.bits}")
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """exp(mean NLL) of logits[:, :-1] against ids[:, 1:], fp32 log-softmax."""
    nll_sum, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll_sum += float(nll.double().sum())
        count += nll.numel()
    return math.exp(nll_sum / count)


def _calibration_dataset(calib: torch.Tensor) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )


def run_row(row: Row, model_dir: str, calib: torch.Tensor, windows: torch.Tensor,
            extra: dict[str, torch.Tensor] | None = None,
            score: Callable[[torch.nn.Module, torch.Tensor], float] | None = None) -> dict:
    """Compress a fresh dense model with `row` and evaluate it (one row, this process).

    `score` (default `perplexity`) measures one LongTensor of windows; the domain-suite mode
    passes `_peer_domains.perplexity`, fxcompress's own arithmetic, so its cells match
    domains.py's rows to float rounding."""
    score = score or perplexity
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    result: dict[str, Any] = {
        "row": row.name,
        "ppl": None,
        "seconds": None,
        "peak_rss_mib": None,
        "versions": _versions(),
        "recipe": row.settings,
        "notes": row.notes,
        "calib_shape": list(calib.shape),
        "eval_shape": list(windows.shape),
        "threads": torch.get_num_threads(),
    }
    if row.unavailable:
        result["unavailable"] = row.unavailable
        return result

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    dense_embed = model.model.embed_tokens.weight.detach().clone()
    dense_head = model.lm_head.weight.detach().clone()

    if row.build is not None:
        from llmcompressor import oneshot

        recipe = row.build()
        result["loadavg_before"] = os.getloadavg()[0]
        c0, t0 = time.process_time(), time.perf_counter()
        oneshot(
            model=model,
            recipe=recipe,
            dataset=_calibration_dataset(calib),
            num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False,
            batch_size=1,
        )
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0  # all threads of this process
        result["loadavg_after"] = os.getloadavg()[0]
    result["peak_rss_mib"] = _peak_rss_mib()

    if not torch.equal(model.model.embed_tokens.weight, dense_embed):
        raise RuntimeError(f"{row.name}: embed_tokens changed by the recipe")
    if not torch.equal(model.lm_head.weight, dense_head):
        raise RuntimeError(f"{row.name}: lm_head changed by the recipe")
    _check_targets(model, row)
    result["embedding_unchanged"] = True

    result.update(_measure(model, row))
    ppl = score(model, windows)
    if row.sparsity is not None and result["sparsity"] < row.sparsity - 0.01:
        if row.bits is None:  # a pruning row that did not prune: not a result
            result["unavailable"] = (
                f"ran, but left the decoder linears at sparsity {result['sparsity']:.4f} "
                f"(asked {row.sparsity}); ppl_as_run is the unpruned model's"
            )
            result["ppl_as_run"] = ppl
            ppl = None
        else:
            result["notes"] += (
                f"; sparsity asked {row.sparsity}, measured {result['sparsity']:.4f} "
                "after quantization: the mask was not kept"
            )
    result["ppl"] = ppl
    for name, ids in (extra or {}).items():  # held-out texts of other domains
        result[f"ppl_{name}"] = score(model, ids)
    result["peak_rss_with_eval_mib"] = _peak_rss_mib()
    return result


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict, Any]:
    """calibration ids, first eval windows, the other eval windows, and the scoring function:
    from --calib/--eval/--extra-eval, or from a domains.py --ids folder (every domain)."""
    if args.ids:
        import _peer_domains as peer

        calib, evals = peer.load_ids(args.ids, args.calibration, args.seed)
        calib, evals, _ = peer.smoke_slice(calib, evals, args.samples, args.seqlen, args.windows)
        first, *rest = evals
        return calib, evals[first], {d: evals[d] for d in rest}, peer.perplexity
    calib = torch.load(args.calib, weights_only=True).long()
    windows = torch.load(args.eval, weights_only=True).long()
    extra = {name: torch.load(path, weights_only=True).long()
             for name, path in (e.split("=", 1) for e in args.extra_eval)}
    return calib, windows, extra, None


def _worker(args: argparse.Namespace) -> int:
    row = ROWS[args.worker]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        calib, windows, extra, score = _inputs(args)
        result = run_row(row, args.model, calib, windows, extra, score)
        code = 0
    except Exception:
        traceback.print_exc()
        result = {"row": row.name, "error": traceback.format_exc(limit=-3)}
        code = 1
    with open(args.worker_out, "w") as f:
        json.dump(result, f)
    return code


METHOD_NAMES = {"QuantizationModifier": "RTN", "GPTQModifier": "GPTQ",
                "SparseGPTModifier": "SparseGPT", "MagnitudePruningModifier": "Magnitude"}


def domains_row(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A worker's result as a row of benchmarks/domains.py's table (its keys, plus ours).

    The first domain's perplexity is the worker's `ppl`, the others its `ppl_<domain>`; a
    row that has no number (unavailable, failed) is refused rather than written."""
    import _peer_domains as peer

    if result.get("error") or result.get("unavailable") or result.get("ppl") is None:
        why = result.get("error") or result.get("unavailable") or "no perplexity"
        raise RuntimeError(f"{result['row']}: no row for the domain table: {why}")
    calib, evals = peer.load_ids(args.ids, args.calibration, args.seed)
    calib, evals, smoke = peer.smoke_slice(calib, evals, args.samples, args.seqlen, args.windows)
    first, *rest = evals
    ppl = {first: result["ppl"], **{d: result[f"ppl_{d}"] for d in rest}}
    recipe = result["recipe"]
    method = None if not recipe else {
        "method": "+".join(METHOD_NAMES[m["modifier"]] for m in recipe), "recipe": recipe,
        "notes": result["notes"], "tool": "llm-compressor oneshot, batch size 1"}
    extra_keys = ("cpu_seconds", "loadavg_before", "loadavg_after", "peak_rss_mib",
                  "peak_rss_with_eval_mib", "sparsity", "sparsity_2of4", "max_levels_per_group",
                  "n_linears", "versions", "calib_shape")
    return {
        "row": f"llm-compressor {result['row']}" + (" (smoke)" if smoke else ""),
        "recipe": "llm-compressor" if recipe else None, "method": method,
        "model": peer.ids_model(args.ids),
        "calibration": args.calibration if recipe else None, "seed": args.seed, "ppl": ppl,
        "seconds": result["seconds"] or 0.0, "threads": result["threads"], **peer.git_state(),
        **{k: result[k] for k in extra_keys if k in result},
        "eval_windows": {d: list(t.shape) for d, t in evals.items()},
    }


def _worker_cmd(args: argparse.Namespace, name: str, out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", out,
           "--model", args.model, "--threads", str(args.threads)]
    if args.ids:
        cmd += ["--ids", args.ids, "--calibration", args.calibration, "--seed", str(args.seed)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("samples", "seqlen", "windows")
                if getattr(args, k) is not None]
    else:
        cmd += ["--calib", args.calib, "--eval", args.eval]
        cmd += [f"--extra-eval={e}" for e in args.extra_eval]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="plain Hugging Face model folder")
    p.add_argument("--calib", help="LongTensor (n, seqlen) of calibration ids")
    p.add_argument("--eval", help="LongTensor (windows, seqlen) to evaluate")
    p.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"rows to run (default all): {' '.join(ROWS)}",
    )
    p.add_argument("--extra-eval", action="append", default=[], metavar="NAME=PATH",
                   help="another LongTensor of evaluation windows (e.g. a text of another "
                        "domain); its perplexity is recorded as ppl_NAME")
    p.add_argument("--ids", help="instead of --calib/--eval: a benchmarks/domains.py ids "
                   "folder; every eval-<domain>.pt is scored and each row is written in "
                   "domains.py's format into OUT/results.json (OUT a folder)")
    p.add_argument("--calibration", choices=["speeches", "mix"], default="speeches",
                   help="with --ids: the calibration set (calib-<set>-seed<k>.pt)")
    p.add_argument("--seed", type=int, default=0, help="with --ids: of the calibration windows")
    p.add_argument("--samples", type=int, help="with --ids, smoke: first N calibration windows")
    p.add_argument("--seqlen", type=int, help="with --ids, smoke: first L tokens of each")
    p.add_argument("--windows", type=int, help="with --ids, smoke: first W eval windows")
    p.add_argument("--out", help="JSON file (default peer_results.json); with --ids a folder")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads per row (default: torch's own choice, one per core); "
        "1 keeps a row usable on a machine that other jobs oversubscribe",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ids and (args.calib or args.eval or args.extra_eval):
        p.error("--ids replaces --calib/--eval/--extra-eval: give one or the other")
    if not args.ids and not (args.calib and args.eval):
        p.error("give --calib and --eval, or --ids (a domains.py ids folder)")
    if args.ids and not args.out and not args.worker:
        p.error("--ids needs --out FOLDER (the row goes into FOLDER/results.json)")
    if args.worker:
        return _worker(args)
    if args.ids:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    args.out = args.out or "peer_results.json"

    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            print(f"== {name}", file=sys.stderr, flush=True)
            proc = subprocess.run(_worker_cmd(args, name, out))
            if os.path.exists(out):
                with open(out) as f:
                    result = json.load(f)
            else:
                result = {"row": name, "error": f"worker exited {proc.returncode}, no result"}
        if proc.returncode != 0 or "error" in result:
            failed.append(name)
        results.append(result)
        if args.ids:
            if name not in failed:
                try:
                    _write_domains_row(result, args)
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    failed.append(name)
        else:
            with open(args.out, "w") as f:  # rewritten after every row: partial tables survive
                json.dump(results, f, indent=2)
        print(
            json.dumps(
                {
                    k: result.get(k)
                    for k in (
                        "row",
                        "ppl",
                        "seconds",
                        "peak_rss_mib",
                        "sparsity",
                        "error",
                        "unavailable",
                    )
                }
            ),
            file=sys.stderr,
            flush=True,
        )
    if failed:
        print(f"FAILED rows: {failed}", file=sys.stderr)
        return 1
    return 0


def _write_domains_row(result: dict[str, Any], args: argparse.Namespace) -> None:
    import _peer_domains as peer

    row = domains_row(result, args)
    meta = {"tool": "benchmarks/peer_llmcompressor.py --ids", "ids": os.path.abspath(args.ids),
            "versions": result.get("versions")}
    path = peer.write_row(args.out, row, meta)
    cells = " ".join(f"{d} {v:.3f}" for d, v in row["ppl"].items())
    print(f"{row['row']}: {cells} -> {path}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
