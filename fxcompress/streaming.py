"""Compress a checkpoint on disk with memory bounded by one layer, not by the model.

``compress_checkpoint(model_dir, calibration, recipe, out_dir)`` runs the pipeline
(:mod:`fxcompress.pipeline`) from a checkpoint source to a checkpoint output, and never
materialises the model:

1. **Capture on the meta device.** The model is built from its ``config.json`` with parameters
   on the meta device and captured with the first calibration batch
   (:mod:`fxcompress.source`).
2. **Weights streamed from safetensors.** The calibrate pass asks a
   :class:`~fxcompress.source.Checkpoint` for each parameter just before the first segment
   that reads it and drops it after its last use; tensors are memory-mapped, so only the
   pages of the layers in flight are resident.
3. **Bounded frontier.** Activations that cross a barrier are kept for all calibration
   samples on CPU (``offload="cpu"``, moved to the compute device op by op) or on disk
   (``offload="disk"``); see :mod:`fxcompress.calibration`.
4. **Output shard by shard.** Each compressed layer is encoded by its codec
   (:mod:`fxcompress.checkpoint.codecs`) and appended to the current shard by the checkpoint writer
   ``fxcompress.save`` uses too (:class:`fxcompress.checkpoint.CheckpointWriter`) as soon as it is
   made, with a progress record; the shards, index and ``config.json`` are finalised in a
   partial folder that replaces ``out_dir`` at the very end, so ``out_dir`` is never
   half-written.
   ``resume=True`` continues an interrupted run: the completed layers are read back and only
   replayed (forward with their stored weights), so the result equals an uninterrupted run.

``max_memory`` bounds the bytes of *tensors* the run holds at once — resident parameters,
compressed weights waiting to be used, the activation frontier held in RAM, one batch's
intermediate values, and the Hessian and solver workspace — estimated per segment before any
work starts; a layer that cannot fit raises :class:`MemoryBudgetError` naming it. The
process's fixed overhead (Python, torch, transformers) is not included.

Under an initialised ``torch.distributed`` process group (``torchrun --nproc_per_node=N``) the
same call shards the calibration batches over the ranks, all-reduces the Hessians, spreads
the solves (:mod:`fxcompress.distributed`), and rank 0 writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import checkpoint as fmt
from .algorithms import Compressed
from .calibration import (  # noqa: F401  (re-exported: the errors and sizes of max_memory)
    PRICE,
    LayerReport,
    MemoryBudgetError,
    SegmentMemory,
    Snapshots,
    resolve_precision,
)
from .checkpoint import ResumeError, partial_dir
from .checkpoint.codecs import codec_for
from .checkpoint.model import dense_tensors
from .distributed import Team, check_launch, current_team, to_cpu
from .methods import Method
from .modules import compressed_experts, compressed_module
from .passes.sites import Site
from .pipeline import Handover, Planned, Report, Settings, run
from .recipe import Recipe
from .sizes import parse_size
from .source import Checkpoint, CheckpointSource, open_checkpoint, skeleton

log = logging.getLogger(__name__)
SNAPSHOT, SNAPSHOT_EVERY = "frontier", 300.0  # a snapshot of the frontier at most every 5 min
__all__ = ["MemoryBudgetError", "ResumeError", "compress_checkpoint", "parse_size",
           "partial_dir"]


# ============================================================================ the output


class Done(Mapping[str, Compressed]):
    """The sites an interrupted run completed, read back (lazily) from its partial output:
    one per layer, or one per expert and bank of an experts layer (whose report names it)."""

    def __init__(self, partial: fmt.PartialCheckpoint):
        self.partial = partial
        self.layers = dict(partial.layers)
        self.reports = {fqn: r for fqn, r in partial.reports.items()
                        if self._layer(fqn)[0] in self.layers}
        self._last: tuple[str, nn.Module] | None = None  # the layer decoded last

    @staticmethod
    def _layer(fqn: str) -> tuple[str, str]:
        """(layer, part): an expert site ``<experts>.<bank>.<e>`` lies in layer ``<experts>``."""
        head, bank, e = (fqn.rsplit(".", 2) + ["", ""])[:3]
        if e.isdigit() and bank in ("gate_up_proj", "down_proj"):
            return head, f"{bank}.{e}"
        return fqn, ""

    def __getitem__(self, fqn: str) -> Compressed:
        layer, part = self._layer(fqn)
        if self._last is None or self._last[0] != layer:
            self._last = (layer, self.partial.read_layer(layer))
        m = self._last[1]
        return codec_for(m).to_compressed(m, self.reports[fqn]["loss"], part)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def report(self, fqn: str) -> LayerReport:
        r = dict(self.reports[fqn])
        r["shape"] = tuple(r["shape"])
        return LayerReport(**r)


@dataclass
class _Writer:
    """Rank 0's side of a streamed compression: the checkpoint writer and what feeds it."""

    model: nn.Module
    source: Checkpoint
    writer: fmt.CheckpointWriter
    recipe: Recipe
    stored: dict[str, torch.dtype]  # the dtype each tensor is written in (the checkpoint's)
    # expert results of blocks not complete yet: module name -> {site fqn: (site, c, report)}
    pending: dict[str, dict[str, tuple]] = dataclasses.field(default_factory=dict)

    def write_dense(self, names: list[str]) -> None:
        """Copy the tensors that stay as they are, one at a time."""
        state = self.model.state_dict(keep_vars=True)
        for name in [n for n in names if n not in self.writer.written]:
            if name in self.source:
                value = self.source.load(name)
            elif not state[name].is_meta:
                value = state[name]  # a buffer the checkpoint does not hold
            else:
                raise KeyError(f"parameter {name} is not in the checkpoint {self.source.dir}")
            self.writer.add(name, value.to(self.stored.get(name, value.dtype)))
            del value
        self.writer.commit()

    def sink(self, site: Site, c: Compressed, report: LayerReport) -> None:
        if site.index is not None:
            self._expert(site, c, report)
            return
        bias = self.source.load(f"{site.fqn}.bias").cpu() \
            if site.module.bias is not None else None
        # writing needs the stored tensors only, not a kernel layout (load builds that)
        m = compressed_module(to_cpu(c), bias, self.stored[f"{site.fqn}.weight"], prepare=False)
        self.writer.add_layer(site.fqn, m, _report(report))
        self.writer.commit()

    def _expert(self, site: Site, c: Compressed, report: LayerReport) -> None:
        """Hold an expert's result until every expert of its block has one, then write the
        block as one experts layer (its sites' reports recorded each under its own name)."""
        block = self.pending.setdefault(site.module_name, {})
        block[site.fqn] = (site, to_cpu(c), report)
        if len(block) < 2 * site.module.gate_up_proj.shape[0]:
            return
        del self.pending[site.module_name]
        by_bank: dict[str, list[Compressed]] = {}
        for s, result, _ in sorted(block.values(), key=lambda v: v[0].index):
            by_bank.setdefault(s.attr, []).append(result)
        dtype = self.stored[f"{site.module_name}.gate_up_proj"]
        self.writer.add_layer(site.module_name, compressed_experts(site.module, by_bank, dtype))
        for fqn, (_, _, r) in block.items():
            self.writer.reports[fqn] = _report(r)
        self.writer.commit()

    def finish(self) -> None:
        """Shards, index, config and side files; then the folder becomes ``out_dir``."""
        self.writer.finish(self.model, self.recipe)


def _report(r: LayerReport) -> dict:
    return {**vars(r), "shape": list(r.shape)}


def _fingerprint(model_dir: Path, recipe: Recipe, chunks: list, source: CheckpointSource,
                 precision: str, layout: str) -> str:
    """What a resumed run must share with the run it continues: model, recipe, calibration
    batches and how they are computed and stored."""
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(f"{source.compute}:{precision}:{layout}".encode())
    h.update((model_dir / fmt.CONFIG_NAME).read_bytes())
    for name, s in sorted(source.weights.stored.items()):
        h.update(f"{name}:{s.dtype}:{s.shape}".encode())
    for leaf in pytree.tree_leaves(chunks):
        h.update(leaf.cpu().numpy().tobytes() if isinstance(leaf, Tensor) else repr(leaf).encode())
    return h.hexdigest()


@dataclass
class CheckpointOutput:
    """The pipeline's output into a checkpoint folder, on every rank of ``team``: rank 0
    writes (:class:`_Writer`), the others only compute; with ``resume`` every rank reads the
    layers an interrupted run completed (a folder all ranks see)."""

    model_dir: Path
    out_dir: Path
    source: CheckpointSource
    recipe: Recipe
    team: Team
    resume: bool = False
    overwrite: bool = False
    shard_size: int = fmt.DEFAULT_SHARD_SIZE
    sparse_layout: str = fmt.DEFAULT_SPARSE_LAYOUT
    precision: str = "fp32"
    keep_results: bool = False  # results go to the writer as they are made
    fingerprint: str = ""
    rank0: _Writer | None = None  # rank 0's writer, once open
    done: Done | None = None
    snapshots: Snapshots | None = None

    def begin(self, chunks: list[tuple[tuple, dict]]) -> None:
        """A partial output of another job, or a damaged one, is refused before work."""
        self.fingerprint = _fingerprint(self.model_dir, self.recipe, chunks, self.source,
                                        self.precision, self.sparse_layout)
        if self.resume:
            with self.team.guard(f"checking {partial_dir(self.out_dir)}"):
                if self.team.rank == 0:
                    fmt.resumable(self.out_dir, self.fingerprint)

    def memory(self, planned: Planned) -> list[SegmentMemory]:
        return []  # each result is written as it is made: the estimate counts it there

    def open(self, planned: Planned) -> Handover:
        """Only a run that will start opens (resumes, or deletes with overwrite) the output;
        the tensors that stay dense are written first."""
        self._open()
        compressed = {*planned.plan, *(s.module_name for s in planned.sites
                                       if s.fqn in planned.plan)}
        dense, _ = dense_tensors(self.source.model, compressed)
        with self.team.guard("the uncompressed tensors"):
            if self.rank0 is not None:
                self.rank0.write_dense(dense)
        # one process's frontier is saved now and then, to resume from (ranks replay)
        if self.rank0 is not None and self.team.world == 1:
            rank0 = self.rank0
            self.snapshots = Snapshots(rank0.writer.folder / SNAPSHOT, SNAPSHOT_EVERY,
                                       lambda: not rank0.pending)
        return Handover(self.rank0.sink if self.rank0 is not None else _discard, self.done,
                        self.snapshots)

    def _open(self) -> None:
        """Rank 0 opens (or resumes) the partial output; with ``resume`` every rank reads
        the completed layers from it."""
        with self.team.guard(f"opening {partial_dir(self.out_dir)}"):
            if self.team.rank == 0:
                writer = fmt.CheckpointWriter(
                    self.out_dir, self.shard_size, fingerprint=self.fingerprint,
                    resume=self.resume, overwrite=self.overwrite,
                    sparse_layout=self.sparse_layout)
                self.rank0 = _Writer(self.source.model, self.source.weights, writer, self.recipe,
                                     self.source.stored)
        self.team.barrier("opening the output")
        if not self.resume:
            return
        with self.team.guard(f"reading {partial_dir(self.out_dir)}"):
            self.done = Done(self.rank0.writer if self.rank0 is not None
                             else fmt.PartialCheckpoint(self.out_dir))
        if self.done:
            log.info("fxcompress: resuming %s: %d layers already compressed", self.out_dir,
                     len(self.done))

    def finish(self, planned: Planned, results: dict[str, Compressed],
               reports: list[LayerReport]) -> list[LayerReport]:
        """Config, index and side files; then ``out_dir`` exists on every rank's return.
        The reports are every compressed site's, those a resumed run read back included,
        in the model's order."""
        with self.team.guard("the checkpoint's config and index"):
            if self.snapshots is not None:
                self.snapshots.remove()
            if self.rank0 is not None:
                self.rank0.finish()
        self.team.barrier("the end")
        if self.done:
            reports = [*reports, *(self.done.report(f) for f in self.done
                                   if f in planned.plan)]
        order = {s.fqn: i for i, s in enumerate(planned.sites)}
        return sorted(reports, key=lambda r: order[r.fqn])


def compress_checkpoint(
    model_dir: str | Path,
    calibration: Any,
    recipe: Recipe | Method | dict,
    out_dir: str | Path,
    *,
    max_memory: int | str | None = None,
    offload: str | None = "auto",
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    max_shard_size: int | str = fmt.DEFAULT_SHARD_SIZE,
    compute_dtype: str | torch.dtype | None = "auto",
    calibration_precision: str = "auto",
    sparse_layout: str = fmt.DEFAULT_SPARSE_LAYOUT,
) -> Report:
    """Compress the Hugging Face checkpoint in ``model_dir`` into ``out_dir`` (a folder
    :func:`fxcompress.load` reads), holding one layer at a time; see the module docstring.

    ``calibration`` and ``recipe`` are as for :func:`fxcompress.compile`. ``max_memory``
    (bytes or ``"6GiB"``) bounds the tensor memory of the run, checked before it starts.
    ``offload``: where activations kept for all calibration samples live — ``"cpu"``,
    ``"disk"`` or ``None``/``"none"`` (on the compute ``device``: CUDA if available); ``"auto"``
    (the default) is ``"cpu"``, or ``"disk"`` when only that fits ``max_memory``. ``resume``
    continues an interrupted run into the same ``out_dir`` with the same inputs; without it,
    an interrupted run's partial output is a :class:`ResumeError` before any work (it can hold
    hours of it), unless ``overwrite`` says to delete it and start again — which happens only
    once the run has passed its memory check.
    ``compute_dtype``: what calibration computes in — ``"auto"`` (the default) is float32 on
    CPU for a 16-bit checkpoint (bf16/fp16 matrix products run many times slower than float32
    on CPUs without native bf16 arithmetic, and float32 is the more accurate), the
    checkpoint's own dtype on CUDA; ``None`` the checkpoint's dtype; or a dtype. Whatever it
    is, the output stores what stays dense in the checkpoint's dtype.
    ``calibration_precision``: that of the calibration passes' float32 matmuls, as for
    :func:`fxcompress.compile`.
    ``sparse_layout``: how pruned layers are stored, as for :func:`fxcompress.save`. Under an
    initialised ``torch.distributed`` process group the work is spread over its ranks and
    rank 0 writes ``out_dir``; every rank returns the same :class:`~fxcompress.pipeline.Report`.
    Under a launcher (``torchrun``: ``WORLD_SIZE`` > 1) with no process group it raises
    :class:`~fxcompress.distributed.DistributedError` before any work: call
    :func:`~fxcompress.distributed.init_from_env` first.
    """
    check_launch()
    team = current_team()
    device = torch.device(device) if device is not None else team.device
    settings = Settings(
        tries=[(place, PRICE) for place in _offload_places(offload)],
        budget=parse_size(max_memory, "max_memory") if max_memory is not None else None,
        precision=resolve_precision(calibration_precision, device), progress=progress,
        batch_size=batch_size)
    fmt.check_sparse_layout(sparse_layout)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    shard_size = parse_size(max_shard_size, "max_shard_size")
    _check_output(team, out_dir, resume, overwrite)
    source = open_checkpoint(model_dir, skeleton(model_dir), device, compute_dtype)
    output = CheckpointOutput(model_dir, out_dir, source, recipe, team, resume, overwrite,
                              shard_size, sparse_layout, settings.precision)
    report = run(source, output, calibration, recipe, settings, team)
    log.info("fxcompress: compressed %d linear layers of %s into %s in %.1fs",
             len(report.layers), model_dir, out_dir, report.seconds)
    return report


def _offload_places(offload: str | None) -> list[str | None]:
    """Where the frontier may live, in the order tried: ``"auto"`` is CPU memory, or disk
    when only that fits."""
    if offload not in ("auto", "cpu", "disk", "none", None):
        raise ValueError(f"offload={offload!r}: expected 'auto', 'cpu', 'disk' or 'none'")
    return ["cpu", "disk"] if offload == "auto" else [None if offload == "none" else offload]


def _discard(site: Site, c: Compressed, report: LayerReport) -> None:
    """The sink of ranks that do not write: results live on only as replaced weights."""


def _check_output(team: Team, out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: ``resume`` and ``overwrite`` exclude each other, and without either an
    interrupted run's partial output is refused, not deleted (rank 0 looks; every rank
    raises)."""
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True exclude each other: resume continues "
                         "the partial output, overwrite deletes it")
    with team.guard(f"checking {partial_dir(out_dir)}"):
        if team.rank == 0 and not resume and not overwrite:
            fmt.check_no_partial(out_dir)
