"""``fxcompress.compile``: the pipeline (:mod:`fxcompress.pipeline`) over a model in memory,
its results rewritten into the model itself — one verb."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from .algorithms import Compressed
from .calibration import (
    EAGER,
    PRICE,
    LayerReport,
    SegmentMemory,
    folds,
    held_bytes,
    resolve_precision,
)
from .methods import Method
from .osmem import release_freed_memory
from .passes import rewrite
from .pipeline import Handover, Planned, Settings, Try, run
from .recipe import Recipe
from .sizes import parse_size

log = logging.getLogger(__name__)


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
    hardware (AVX512-BF16 or AMX, where its products are several times faster), ``"fp32"``
    elsewhere. The solves (GPTQ, SparseGPT) always compute in float32; the perplexity and
    time of both on SmolLM2 are in benchmarks/RESULTS.md.
    """
    source = InMemory(model)
    settings = Settings(
        tries=memory_tries(source.device),
        budget=None if max_memory is None else parse_size(max_memory, "max_memory"),
        precision=resolve_precision(calibration_precision, source.device),
        progress=progress, batch_size=batch_size)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    output = Rewrite(model)
    report = run(source, output, calibration, recipe, settings)
    model.fxcompress_report = report
    log.info("fxcompress: compressed %d linear layers in %.1fs", output.count, report.seconds)
    return model


def memory_tries(device: torch.device) -> list[Try]:
    """How an in-memory run fits ``max_memory``: the default first, then recomputing
    whatever saves memory, then offloading the frontier (to CPU memory from a GPU, to disk
    from the CPU), then both."""
    offloaded = "cpu" if device.type == "cuda" else "disk"
    return [(None, PRICE), (None, EAGER), (offloaded, PRICE), (offloaded, EAGER)]


@dataclass
class InMemory:
    """The user's model as the pipeline's source: its own tensors, where they are."""

    model: nn.Module
    weights: None = None

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def captured(self, ep: ExportedProgram) -> None:
        pass  # captured where it runs


@dataclass
class Rewrite:
    """The pipeline's output into the user's model: calibration returns the results, which
    replace their layers at the end (:mod:`fxcompress.passes.rewrite`)."""

    model: nn.Module
    keep_results: bool = True
    count: int = 0  # the linears rewritten

    def begin(self, chunks: list[tuple[tuple, dict]]) -> None:
        pass

    def memory(self, planned: Planned) -> list[SegmentMemory]:
        """The rewrite's peak: the results held, the kernel layouts their modules add, the
        masks of folded ones."""
        sites = [s for s in planned.sites if s.fqn in planned.plan]
        held = [held_bytes(s, planned.plan[s.fqn], True) for s in sites]
        masks = [s.shape[0] * s.shape[1] for s in sites if folds(s, planned.plan[s.fqn])]
        return [SegmentMemory("the rewrite into compressed modules", 2 * sum(held) + sum(masks),
                              0, 0)]

    def open(self, planned: Planned) -> Handover:
        return Handover()

    def finish(self, planned: Planned, results: dict[str, Compressed],
               reports: list[LayerReport]) -> list[LayerReport]:
        self.count = rewrite(self.model, planned.sites, results)  # consumes results
        release_freed_memory()
        return reports
