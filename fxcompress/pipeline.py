"""The one pipeline every compression runs, whatever holds the model and wherever it goes.

    batches -> capture -> sites -> plan -> fit memory -> calibrate -> output.finish -> report

Two seams make the in-memory verb and the streamed one the same run:

* a :class:`Source` is where the model comes from: the user's own module
  (``fxcompress.compile``), or a skeleton on the meta device whose weights are read from a
  checkpoint as calibration needs them (``fxcompress.streaming``);
* an :class:`Output` is where results go: rewritten into the user's model, or written into a
  checkpoint as they are made. It says what finishing adds to the memory estimate, how
  results are handed over (returned, or given to a sink; an interrupted run's done ones),
  and does the finishing.

A :class:`~fxcompress.distributed.Team` says which processes share the work; one process
is a team of one (:class:`~fxcompress.calibration.Local`), so nothing here asks how
many there are.

Everything that can be checked without data is checked in :func:`plan` before any forward
pass or memory estimate: which rule each linear gets, rules that match nothing or only
what cannot be compressed, and each method against its layer's shape (:func:`check_site`).
A recipe that cannot work then fails in a second, not after calibrating half the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from . import kernels  # noqa: F401  (registers torch.ops.fxcompress)
from .algorithms import Compressed
from .calibration import (
    LayerReport,
    Local,
    SegmentMemory,
    Snapshots,
    WeightSource,
    calibrate,
    check_memory,
    estimate_memory,
    over_budget,
)
from .distributed import Team
from .errors import RecipeError
from .methods import Method
from .modules import experts_unsupported
from .osmem import release_freed_memory, resident_bytes, trim_slack
from .passes import capture, find_sites
from .passes.capture import as_call, call_kwargs, evaluating
from .passes.sites import Site
from .recipe import Recipe
from .sizes import human

log = logging.getLogger(__name__)
DEFAULT_BATCH_TOKENS = 4096
Sink = Callable[[Site, Compressed, LayerReport], None]
Try = tuple[str | None, float | None]  # (where the frontier lives, the recompute price)


@dataclass
class Report:
    """What a compression did: one row per compressed linear, and what it left alone."""

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


# ============================================================================ the seams


class Source(Protocol):
    """Where the model to compress comes from."""

    model: nn.Module  # what is captured: real tensors, or parameters on the meta device
    device: torch.device  # where calibration computes
    weights: WeightSource | None  # the parameters a meta-device model lacks; None: its own

    def captured(self, ep: ExportedProgram) -> None:
        """Adapt the captured program to where it runs (a meta capture's device constants)."""
        ...


@dataclass
class Handover:
    """How calibration hands results to an output: returned (no ``sink``) or given to
    ``sink`` as they are made; ``done`` and ``snapshots`` continue an interrupted run."""

    sink: Sink | None = None
    done: Mapping[str, Compressed] | None = None
    snapshots: Snapshots | None = None


@dataclass
class Planned:
    """The captured program with the plan: what calibration runs and what outputs write."""

    ep: ExportedProgram
    sites: list[Site]
    plan: dict[str, Method]
    skipped: dict[str, str]


class Output(Protocol):
    """Where results go, and what that costs in memory."""

    keep_results: bool  # calibration returns results (True) or hands them to a sink

    def begin(self, chunks: list[tuple[tuple, dict]]) -> None:
        """Checks that need the calibration batches, before any work (a resumed run's
        inputs are those of the run it continues)."""
        ...

    def memory(self, planned: Planned) -> list[SegmentMemory]:
        """What finishing adds to the run's memory, as segments of the estimate."""
        ...

    def open(self, planned: Planned) -> Handover:
        """Start writing, once the run is known to fit; say how results arrive."""
        ...

    def finish(self, planned: Planned, results: dict[str, Compressed],
               reports: list[LayerReport]) -> list[LayerReport]:
        """Put the results where they go; return the reports of every compressed linear."""
        ...


@dataclass
class Settings:
    """How to run, resolved and checked by the verb before anything is built.

    ``tries`` are the memory plans to try in order, the first that fits ``budget`` running
    (:func:`fit_memory`). The clock and the resident set are read when the settings are
    made, so that the estimate counts what the run builds (a skeleton, the captured
    program) and the report the whole run's time."""

    tries: list[Try]
    budget: int | None = None
    precision: str = "fp32"
    progress: bool = True
    batch_size: int | None = None
    t0: float = field(default_factory=lambda: time.perf_counter())
    rss0: int = field(default_factory=lambda: resident_bytes())


# ============================================================================ the run


def run(source: Source, output: Output, calibration: Any, recipe: Recipe,
        settings: Settings, team: Team | None = None) -> Report:
    """Compress what ``source`` holds into ``output``: the pipeline of the module docstring.
    Every process of ``team`` calls it alike; each returns the same report."""
    team = team or Local()
    chunks, samples = calibration_batches(source.model, calibration, settings.batch_size,
                                          ranks=team.world)
    mine = team.shard(chunks)
    output.begin(chunks)
    with evaluating(source.model), numerics(), torch.no_grad():
        planned = plan(source, recipe, chunks[0])
        estimate_of = _estimator(planned, mine, source, output)
        offload, recompute, peak = fit_memory(settings.tries, estimate_of, settings.budget)
        release_freed_memory()  # then count what the run built (a skeleton, the program)
        estimate = max(0, resident_bytes() - settings.rss0) + peak
        handover = output.open(planned)
        results, reports = calibrate(
            planned.ep, planned.sites, planned.plan, mine,
            progress=settings.progress and team.rank == 0, weights=source.weights, team=team,
            offload=offload, recompute=recompute, done=handover.done, sink=handover.sink,
            snapshots=handover.snapshots, precision=settings.precision,
            trim_slack=trim_slack(estimate, settings.budget))
        del planned.ep  # not needed to finish: its references go before the rewrite
        reports = output.finish(planned, results, reports)
    return Report(recipe, reports, planned.skipped, time.perf_counter() - settings.t0,
                  samples, estimate, offload, settings.precision)


def _estimator(planned: Planned, chunks: list, source: Source, output: Output
               ) -> Callable[[str | None, float | None], list[SegmentMemory]]:
    """The memory estimate of one try: the liveness plan calibration runs, then what the
    output adds to finish."""
    def estimate(offload: str | None, recompute: float | None) -> list[SegmentMemory]:
        segments = estimate_memory(
            planned.ep, planned.sites, planned.plan, chunks, offload=offload,
            weights=source.weights, keep_results=output.keep_results, recompute=recompute)
        return segments + output.memory(planned)
    return estimate


def fit_memory(tries: Sequence[Try], estimate: Callable[[str | None, float | None],
               list[SegmentMemory]], budget: int | None) -> tuple[str | None, float | None, int]:
    """The first of ``tries`` whose estimate fits ``budget`` (the first, without one); a run
    that fits in none raises ``MemoryBudgetError`` naming the segment that does not fit.
    Returns ``(offload, recompute price, estimated peak bytes)``."""
    for offload, price in tries:
        segments = estimate(offload, price)
        if budget is None or over_budget(segments, budget) is None:
            break
    if budget is not None:
        check_memory(segments, budget)
    peak = max((s.total for s in segments), default=0)
    log.info("fxcompress: estimated peak %s (frontier %s)", human(peak), offload or "in place")
    return offload, price, peak


# ============================================================================ the batches


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


# ============================================================================ the plan


def plan(source: Source, recipe: Recipe, chunk: tuple[tuple, dict]) -> Planned:
    """Capture the model with one batch, find its sites and plan them, every check that
    needs no data done."""
    ep = capture(source.model, *chunk)
    source.captured(ep)
    sites, others = find_sites(ep, source.model)
    methods, skipped = plan_sites(recipe, sites, others, source.model)
    return Planned(ep, sites, methods, skipped)


def _explicit(pattern: str, name: str) -> bool:
    return pattern in (name, re.escape(name))


def first_rule(recipe: Recipe, names: Sequence[str]) -> tuple[str, Method | None] | None:
    """The first rule of ``recipe`` matching any of ``names`` (:meth:`Recipe.match` of each,
    the earliest rule winning), or None."""
    found = [m for n in names if (m := recipe.match(n)) is not None]
    return min(found, key=recipe.rules.index, default=None)


def _site_rule(recipe: Recipe, site: Site) -> tuple[str, Method | None] | None:
    """A site's rule: by its name, or for an expert also by the name of its experts module
    (``model.layers.0.mlp.experts`` covers all of that block's experts)."""
    return first_rule(recipe, (site.fqn,) if site.index is None else (site.fqn,
                                                                      site.module_name))


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
    meant, and on methods that cannot work on their layer (:func:`check_site`)."""
    others = {**others, **_unsupported_experts(sites)}
    skipped = _skip_others(recipe, others, model)
    methods, layers = {}, block_count(s.fqn for s in sites)
    for s in sites:
        if s.index is not None and s.module_name in others:
            continue  # its experts module is listed with the reason
        match = _site_rule(recipe, s)
        if match is None:
            skipped[s.fqn] = "no rule matches"
        elif match[1] is None:
            skipped[s.fqn] = f"rule {match[0]!r} leaves it dense"
        elif s.tied and not _explicit(match[0], s.fqn):
            skipped[s.fqn] = "weight tied to another parameter (name it in a rule to compress)"
        else:
            methods[s.fqn] = match[1].for_layer(s.fqn, s.shape, layers)
            check_site(s, methods[s.fqn])
    _check_experts_uniform(sites, methods)
    _check_rules_used(recipe, sites, model)
    return methods, skipped


def _skip_others(recipe: Recipe, others: dict[str, str], model: nn.Module) -> dict[str, str]:
    """Why each weight fxcompress cannot compress stays dense; a rule naming one explicitly
    is an error."""
    skipped = {}
    for name, reason in others.items():
        match = recipe.match(name)
        if match is not None and match[1] is not None and _explicit(match[0], name):
            raise RecipeError(f"rule {match[0]!r} names {name!r} "
                              f"({type(model.get_submodule(name)).__name__}), which fxcompress "
                              f"cannot compress: {reason}. Exclude it with a None rule.")
        skipped[name] = f"cannot be compressed: {reason}"
    return skipped


def _check_rules_used(recipe: Recipe, sites: list[Site], model: nn.Module) -> None:
    """A rule matching only modules that cannot be compressed is an error; one matching no
    module at all a warning (a typo, or a recipe written for another model)."""
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
                          f"are: {shown}", stacklevel=6)


def check_site(site: Site, method: Method) -> None:
    """Raise :class:`RecipeError` naming the layer when ``method`` cannot compress ``site``
    for its shape alone (:meth:`Method.check`: a group size that does not divide the input
    features, an N:M pattern that does not tile them), which the solver would find only after
    the memory estimate and a forward pass. (A llama.cpp mix checks its shapes as it resolves
    per layer, in :meth:`Method.for_layer`.)"""
    try:
        method.check(site.shape)
    except RecipeError as e:
        raise RecipeError(f"{site.fqn}: {e}") from e


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
