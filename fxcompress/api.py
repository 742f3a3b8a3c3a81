"""``fxcompress.compile``: capture, find the linears, calibrate, rewrite — one verb."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import kernels  # noqa: F401  (registers torch.ops.fxcompress)
from .calibration import (
    EAGER,
    PRICE,
    LayerReport,
    SegmentMemory,
    calibrate,
    check_memory,
    estimate_memory,
    folds,
    held_bytes,
    over_budget,
    resolve_precision,
)
from .errors import RecipeError
from .methods import Method
from .modules import experts_unsupported
from .osmem import release_freed_memory, resident_bytes, trim_slack
from .passes import capture, find_sites, rewrite
from .passes.capture import as_call, call_kwargs, evaluating
from .passes.sites import Site
from .recipe import Recipe
from .sizes import human, parse_size

log = logging.getLogger(__name__)
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class Report:
    """What ``compile`` did: one row per compressed linear, and what it left alone."""

    recipe: Recipe
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # linear -> reason
    seconds: float = 0.0
    samples: int = 0
    estimate: int | None = None  # peak bytes the run was estimated to add, before it started
    offload: str | None = None  # where the values kept between layers lived
    precision: str = "fp32"  # of the calibration passes' matmuls (see compile())

    def expert_tokens(self) -> dict[str, int]:
        """Calibration tokens routed to each compressed expert, by site name."""
        return {r.fqn: r.routed for r in self.layers if r.routed is not None}

    def table(self) -> str:
        """The per-layer table as Markdown (with each pruned layer's sparsity, which OWL
        makes differ between layers)."""
        pruned = any(r.sparsity is not None for r in self.layers)
        rows = ["| layer | method | shape |" + (" sparsity |" if pruned else "") +
                " loss | seconds |", "|---|---|---|" + ("---|" if pruned else "") + "---|---|"]
        for r in self.layers:
            sparsity = "" if not pruned else \
                " - |" if r.sparsity is None else f" {r.sparsity:.1%} |"
            rows.append(f"| {r.fqn} | {r.method} | {r.shape[0]}x{r.shape[1]} |{sparsity} "
                        f"{r.loss:.4g} | {r.seconds:.2f} |")
        return "\n".join(rows)


@contextlib.contextmanager
def numerics() -> Iterator[None]:
    """Full-precision fp32 matmuls while compressing; the user's settings come back after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _samples(calibration: Any) -> list[Any]:
    if isinstance(calibration, torch.Tensor):
        return [row[None] for row in calibration]  # an (n, ...) tensor holds n samples
    if isinstance(calibration, (dict, str)) or not isinstance(calibration, Iterable):
        raise TypeError("calibration must be an iterable of samples (tensors, tuples or dicts "
                        "of keyword inputs) or a tensor whose rows are samples")
    samples = list(calibration)
    if not samples:
        raise ValueError("calibration data is empty: give at least one sample")
    return samples


def _signature(sample: tuple[tuple, dict]) -> tuple:
    leaves, spec = pytree.tree_flatten(sample)
    return (spec, tuple(tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else x
                        for x in leaves))


def _batch(calls: list[tuple[tuple, dict]], batch_size: int) -> list[tuple[tuple, dict]]:
    """Concatenate runs of same-shaped samples along dim 0, ``batch_size`` at a time."""
    chunks, run = [], []
    for call in calls + [None]:
        if run and (call is None or len(run) == batch_size
                    or _signature(call) != _signature(run[0])):
            flat = [pytree.tree_flatten(c)[0] for c in run]
            spec = pytree.tree_flatten(run[0])[1]
            leaves = [torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0]
                      for xs in zip(*flat, strict=True)]
            chunks.append(pytree.tree_unflatten(leaves, spec))
            run = []
        if call is not None:
            run.append(call)
    return chunks


def _tokens(call: tuple[tuple, dict]) -> int:
    leaves = [x for x in pytree.tree_flatten(call)[0] if isinstance(x, torch.Tensor)]
    return max(1, leaves[0][:1].numel()) if leaves else 1


def calibration_batches(model: nn.Module, calibration: Any, batch_size: int | None = None, *,
                        ranks: int = 1) -> tuple[list[tuple[tuple, dict]], int]:
    """The calibration samples as keyword calls of ``model``, runs of same-shaped samples
    concatenated ``batch_size`` at a time (default: about ``DEFAULT_BATCH_TOKENS`` tokens a
    batch, and no more than an equal share of the samples per rank, so every rank gets a
    batch); and the number of samples."""
    calls = [((), call_kwargs(model, *as_call(s))) for s in _samples(calibration)]
    size = batch_size or max(1, DEFAULT_BATCH_TOKENS // _tokens(calls[0]))
    return _batch(calls, min(size, math.ceil(len(calls) / ranks))), len(calls)


def _explicit(pattern: str, name: str) -> bool:
    return pattern in (name, re.escape(name))


def _rule(recipe: Recipe, site: Site) -> tuple[str, Method | None] | None:
    """The first rule matching a site: by its name, or for an expert also by the name of its
    experts module (``model.layers.0.mlp.experts`` covers all of that block's experts)."""
    names = (site.fqn,) if site.index is None else (site.fqn, site.module_name)
    for pattern, method in recipe.rules:
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern, method
    return None


def _unsupported_experts(sites: list[Site]) -> dict[str, str]:
    """Experts modules whose computation the compressed experts module cannot reproduce."""
    reasons = {}
    for s in sites:
        if s.index is not None and s.module_name not in reasons:
            reasons[s.module_name] = experts_unsupported(s.module)
    return {name: why for name, why in reasons.items() if why}


def plan_sites(recipe: Recipe, sites: list[Site], others: dict[str, str], model: nn.Module
               ) -> tuple[dict[str, Method], dict[str, str]]:
    """Which method each site gets; why the others are left dense. What fxcompress cannot
    compress (routers, unsupported experts) is skipped with its reason, and is an error only
    when a rule names it explicitly. Raises or warns on recipes that cannot be what the user
    meant."""
    plan, skipped = {}, {}
    layers = block_count(s.fqn for s in sites)
    others = {**others, **_unsupported_experts(sites)}
    for name, reason in others.items():
        match = recipe.match(name)
        if match is not None and match[1] is not None and _explicit(match[0], name):
            raise RecipeError(f"rule {match[0]!r} names {name!r} "
                              f"({type(model.get_submodule(name)).__name__}), which fxcompress "
                              f"cannot compress: {reason}. Exclude it with a None rule.")
        skipped[name] = f"cannot be compressed: {reason}"
    for s in sites:
        if s.index is not None and s.module_name in others:
            continue  # its experts module is listed with the reason
        match = _rule(recipe, s)
        if match is None:
            skipped[s.fqn] = "no rule matches"
        elif match[1] is None:
            skipped[s.fqn] = f"rule {match[0]!r} leaves it dense"
        elif s.tied and not _explicit(match[0], s.fqn):
            skipped[s.fqn] = "weight tied to another parameter (name it in a rule to compress)"
        else:
            plan[s.fqn] = match[1].for_layer(s.fqn, s.shape, layers)
    _check_experts_uniform(sites, plan)
    site_names = [s.fqn for s in sites] + [s.module_name for s in sites if s.index is not None]
    for pattern, method in recipe.rules:
        if any(re.fullmatch(pattern, n) for n in site_names):
            continue
        matched = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
        if matched and method is not None and pattern != ".*":
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})"
                              for n in matched[:5])
            raise RecipeError(f"rule {pattern!r} matches no linear layer, only modules "
                              f"fxcompress cannot compress: {kinds}")
        if not matched:
            shown = ", ".join(site_names[:12]) + (" ..." if len(site_names) > 12 else "")
            warnings.warn(f"recipe pattern {pattern!r} matches no module; the linear layers "
                          f"are: {shown}", stacklevel=3)
    return plan, skipped


def block_count(names: Iterable[str]) -> int:
    """How many blocks (decoder layers) a model has, from its linears' names: one more than
    the largest index in a ``.N.`` path component (0 when no name has one)."""
    found = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))]
    return max(found) + 1 if found else 0


def _check_experts_uniform(sites: list[Site], plan: dict[str, Method]) -> None:
    """One compressed experts module holds one format: all its experts share one method."""
    methods: dict[str, dict[Method | None, list[str]]] = {}
    for s in sites:
        if s.index is not None:
            methods.setdefault(s.module_name, {}).setdefault(plan.get(s.fqn), []).append(s.fqn)
    for module, by_method in methods.items():
        if len(by_method) > 1:
            parts = "; ".join(f"{len(names)} ({names[0]}, ...) get {m}"
                              for m, names in by_method.items())
            raise RecipeError(f"the experts of {module!r} get different methods ({parts}): a "
                              f"compressed experts module holds one format, so give all its "
                              f"experts one method, or None")


def compile(model: nn.Module, calibration: Any, recipe: Recipe | Method | dict,
            *, progress: bool = True, batch_size: int | None = None,
            max_memory: int | str | None = None,
            calibration_precision: str = "auto") -> nn.Module:
    """Compress ``model``'s linear layers in place and return it.

    ``calibration`` is an iterable of samples — tensors, tuples of positional inputs or dicts
    of keyword inputs (e.g. 128 × 512 tokens of real text) — or one tensor whose rows are
    samples. ``recipe`` is a :class:`Recipe`, a ``{pattern: method}`` dict, or a single method
    for every linear (tied heads excepted). Samples are run ``batch_size`` at a time (default:
    about 4096 tokens per batch). The per-layer report is left in ``model.fxcompress_report``.

    ``max_memory`` (bytes or a size like ``"2GiB"``) bounds the memory compression adds to
    the loaded model, estimated before any work starts: when the values kept between layers
    for all samples would not fit, more of them are recomputed, then they are offloaded — to
    CPU memory for a model on a GPU, to disk for a model on the CPU; a layer that cannot fit
    even so raises ``MemoryBudgetError`` naming it. The estimate is in the report: the
    tensors at the peak, plus what the run had built when it estimated (the captured
    program), as measured.

    ``calibration_precision`` is that of the matmuls of the calibration forward passes and of
    the statistics (Hessians, cross moments): ``"bf16"`` takes bf16-rounded inputs with
    float32 accumulation and results, as a model run in bf16 computes; ``"fp32"`` full
    float32; ``"auto"`` (the default) ``"bf16"`` for a model on a CPU that multiplies bf16 in
    hardware (AVX512-BF16 or AMX; on AMX its products measured 2–4× faster), ``"fp32"``
    elsewhere. The solves (GPTQ, SparseGPT) always compute in float32. Measured on SmolLM2
    with GPTQ w4 g64, one thread of an AMX CPU: perplexity 29.14 against 29.31 in float32,
    in 278 s against 493 s (benchmarks/RESULTS.md).
    """
    t0, rss0 = time.perf_counter(), resident_bytes()
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    precision = resolve_precision(calibration_precision, _device(model))
    chunks, samples = calibration_batches(model, calibration, batch_size)
    with evaluating(model), numerics(), torch.no_grad():
        ep = capture(model, *chunks[0])
        sites, others = find_sites(ep, model)
        plan, skipped = plan_sites(recipe, sites, others, model)
        offload, recompute, estimate = fit_memory(ep, sites, plan, chunks, max_memory,
                                                  _device(model))
        release_freed_memory()
        estimate += max(0, resident_bytes() - rss0)
        results, layers = calibrate(ep, sites, plan, chunks, progress=progress,
                                    offload=offload, recompute=recompute, precision=precision,
                                    trim_slack=trim_slack(estimate, max_memory))
        del ep
        count = rewrite(model, sites, results)
        del results
        release_freed_memory()
    report = Report(recipe, layers, skipped, time.perf_counter() - t0, samples, estimate,
                    offload, precision)
    model.fxcompress_report = report
    log.info("fxcompress: compressed %d linear layers in %.1fs", count, report.seconds)
    return model


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def fit_memory(ep: Any, sites: list[Site], plan: dict[str, Method], chunks: list,
               max_memory: int | str | None, device: torch.device
               ) -> tuple[str | None, float, int]:
    """How an in-memory calibration runs within ``max_memory`` (see :func:`compile`): the
    frontier's place and the recompute price, from the liveness plan's estimate, trying the
    default first, then recomputing whatever saves memory, then offloading. Returns
    ``(offload, price, estimated peak bytes)``, the peak including the final rewrite."""
    offloaded = "cpu" if device.type == "cuda" else "disk"
    tries = [(None, PRICE), (None, EAGER), (offloaded, PRICE), (offloaded, EAGER)]
    budget = None if max_memory is None else parse_size(max_memory, "max_memory")
    for offload, price in tries:
        segments = estimate_memory(ep, sites, plan, chunks, offload=offload, recompute=price)
        planned = [s for s in sites if s.fqn in plan]
        held = [held_bytes(s, plan[s.fqn], True) for s in planned]
        masks = [s.shape[0] * s.shape[1] for s in planned if folds(s, plan[s.fqn])]
        # the results held, the kernel layouts their modules add, the masks of folded ones
        segments.append(SegmentMemory("the rewrite into compressed modules",
                                      2 * sum(held) + sum(masks), 0, 0))
        if budget is None or over_budget(segments, budget) is None:
            break
    if budget is not None:
        check_memory(segments, budget)
    peak = max(s.total for s in segments)
    log.info("fxcompress: estimated peak %s (frontier %s)", human(peak), offload or "in place")
    return offload, price, peak
