"""Compress a checkpoint on disk with memory bounded by one layer, not by the model.

``compress_checkpoint(model_dir, calibration, recipe, out_dir)`` never materialises the model:

1. **Capture on the meta device.** The model is built from its ``config.json`` with parameters
   on the meta device (``accelerate.init_empty_weights(include_buffers=False)``: buffers are
   real, because non-persistent ones such as rotary ``inv_freq`` are not in the checkpoint and
   are computed by the modules' own ``__init__``), and ``torch.export`` captures it with the
   first calibration batch. Device constants the trace recorded as ``meta`` (``arange(...,
   device=...)``, ``.to(device)``) are retargeted to the compute device.
2. **Weights streamed from safetensors.** The calibrate pass asks a :class:`Checkpoint` for
   each parameter just before the first segment that reads it and drops it after its last
   use; tensors are memory-mapped (``safe_open``), so only the pages of the layers in flight
   are resident.
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
process's fixed overhead (Python, torch, transformers: a few hundred MiB of RSS) is not
included.

Under an initialised ``torch.distributed`` process group (``torchrun --nproc_per_node=N``) the
same call shards the calibration batches over the ranks, all-reduces the Hessians, spreads
the solves (:mod:`fxcompress.distributed`), and rank 0 writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from . import checkpoint as fmt
from . import hub
from .algorithms import Compressed
from .api import Report, calibration_batches, numerics, plan_sites
from .calibration import (  # noqa: F401  (re-exported: the errors and sizes of max_memory)
    LayerReport,
    Local,
    MemoryBudgetError,
    SegmentMemory,
    Snapshots,
    Team,
    calibrate,
    check_memory,
    over_budget,
    resolve_precision,
)
from .calibration import estimate_memory as calibrate_estimate
from .checkpoint import ResumeError, partial_dir
from .checkpoint.codecs import codec_for
from .checkpoint.model import dense_tensors
from .distributed import Distributed, active, check_launch, to_cpu
from .methods import Method
from .modules import (
    checkpoint_expert_names,
    compressed_experts,
    compressed_module,
    experts_unsupported,
)
from .osmem import release_freed_memory, resident_bytes, trim_slack
from .passes import capture, find_sites
from .passes.sites import Site
from .recipe import Recipe
from .sizes import parse_size

log = logging.getLogger(__name__)
SNAPSHOT, SNAPSHOT_EVERY = "frontier", 300.0  # a snapshot of the frontier at most every 5 min
__all__ = ["MemoryBudgetError", "ResumeError", "compress_checkpoint", "parse_size",
           "partial_dir"]


# ============================================================================ the model


def skeleton(model_dir: str | Path) -> nn.Module:
    """The Hugging Face model of ``model_dir``, parameters on the meta device, buffers real,
    tied weights tied, in the dtype of its config (as ``from_pretrained`` would build it)."""
    import transformers
    from accelerate import init_empty_weights

    model_dir = Path(model_dir)
    fmt.check_model_sizes(model_dir)  # config.json is untrusted: its sizes, before any build
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = cls._from_config(config, dtype=dtype) if cls is not None \
            else transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config._name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def retarget(ep: ExportedProgram, device: torch.device) -> None:
    """Device constants traced as ``meta`` (from meta parameters) become ``device``; and
    where the model chose an op variant by device that ``device`` lacks, the graph takes the
    one it would have chosen there: ``histc`` of integers (transformers' grouped experts,
    traced on meta) counts float copies of them on CPU, as the model does on CPU."""
    def fix(v: Any) -> Any:
        return device if isinstance(v, torch.device) and v.type == "meta" else v

    for node in ep.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(fix, node.args)
            node.kwargs = pytree.tree_map(fix, node.kwargs)
        if (device.type == "cpu" and node.target is torch.ops.aten.histc.default
                and not node.args[0].meta["val"].dtype.is_floating_point):
            with ep.graph.inserting_before(node):
                as_float = ep.graph.call_function(torch.ops.aten._to_copy.default,
                                                  (node.args[0],), {"dtype": torch.float32})
            as_float.meta["val"] = node.args[0].meta["val"].float()
            node.args = (as_float, *node.args[1:])
    ep.graph_module.recompile()


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state-dict name, with the other names of the same (tied) tensor."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {n: group for group in names.values() for n in group}


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read
    one at a time, memory-mapped, cast to the dtype of the model's tensor of that name (tied
    names resolved to the one stored). Memory freed since the last read is handed back to
    the OS first, so the process's RSS follows the tensors it actually holds.

    Names are the model's: a checkpoint that stores them otherwise (Mixtral's
    ``block_sparse_moe``) is read through transformers' renamings (:mod:`fxcompress.hub`),
    and the fused 3-D expert parameters of a mixture-of-experts model are assembled from the
    per-expert linears its checkpoints store (``experts.{e}.w1.weight`` ...)."""

    def __init__(self, model_dir: str | Path, model: nn.Module, device: torch.device):
        self.dir, self.device = Path(model_dir), device
        if not any((self.dir / f).is_file() for f in (fmt.INDEX_NAME, fmt.WEIGHTS_NAME)):
            raise FileNotFoundError(f"{self.dir} has neither {fmt.WEIGHTS_NAME} nor "
                                    f"{fmt.INDEX_NAME}: not a safetensors checkpoint")
        to_model = hub.renamings(model)[1]
        self.stored = {to_model(key): dataclasses.replace(s, key=key)
                       for f in fmt.shard_files(self.dir)
                       for key, s in fmt.read_header(f).items()}
        if any(s.crc is None for s in self.stored.values()):
            log.warning("fxcompress: %s was not written by fxcompress: its tensors carry no "
                        "CRC-32, so they are read unverified (only their headers are checked)",
                        self.dir)
        self.fused = _fused_experts(model, self.stored)
        self.aliases = _aliases(model)
        self.dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()
                       if t is not None}

    def __contains__(self, name: str) -> bool:
        return name in self.fused or any(a in self.stored for a in self.aliases.get(name, [name]))

    def nbytes(self, name: str) -> int:
        if name in self.fused:
            parts = [self.stored[k] for row in self.fused[name][0] for k in row]
            return sum(math.prod(s.shape) for s in parts) * self.dtypes[name].itemsize
        s = self.stored[self._stored_name(name)]
        return math.prod(s.shape) * self.dtypes.get(name, s.dtype).itemsize

    def _stored_name(self, name: str) -> str:
        for alias in [name, *self.aliases.get(name, [])]:
            if alias in self.stored:
                return alias
        raise KeyError(f"tensor {name!r} is not in the checkpoint {self.dir}")

    def load(self, name: str, index: int | None = None) -> Tensor:
        """The tensor ``name`` in the model's dtype on :attr:`device`; with ``index``, only
        its slice ``[index]`` (one expert of a 3-D bank), read without the rest."""
        release_freed_memory()
        if name in self.fused:  # (E, out, in): expert e's linears stacked along out
            rows, transposed = self.fused[name]
            dtype = self.dtypes[name]
            out = torch.stack([torch.cat([self._read(k).to(dtype) for k in row])
                               for row in (rows if index is None else [rows[index]])])
            out = out.transpose(1, 2).contiguous() if transposed else out
            return (out if index is None else out[0]).to(self.device)
        t = self._read(self._stored_name(name), index)
        return t.to(self.device, self.dtypes.get(name, t.dtype))

    def _read(self, name: str, index: int | None = None) -> Tensor:
        from safetensors import safe_open

        s = self.stored[name]
        with safe_open(str(s.file), framework="pt") as f:
            if index is None:
                return f.get_tensor(s.key or name)
            return f.get_slice(s.key or name)[index]


def _fused_experts(model: nn.Module, stored: Mapping[str, Any]
                   ) -> dict[str, tuple[list[list[str]], bool]]:
    """``{fused parameter: (stored names of each expert's rows, stored transposed)}`` for the
    3-D expert parameters the checkpoint stores per expert (``<experts>.{e}.{gate}.weight``
    and ``{up}`` for ``gate_up_proj``, ``{down}`` for ``down_proj``)."""
    fused = {}
    for name, m in model.named_modules():
        if experts_unsupported(m):
            continue
        gate, up, down = checkpoint_expert_names(m)
        for bank, parts in (("gate_up_proj", (gate, up)), ("down_proj", (down,))):
            rows = [[f"{name}.{e}.{p}.weight" for p in parts]
                    for e in range(getattr(m, bank).shape[0])]
            if f"{name}.{bank}" not in stored and all(k in stored for r in rows for k in r):
                fused[f"{name}.{bank}"] = (rows, bool(getattr(m, "is_transposed", False)))
    return fused


# ============================================================================ memory


def estimate_memory(ep: ExportedProgram, sites: list[Site], plan: Mapping[str, Method],
                    chunks: list[tuple[tuple, dict]], source: Checkpoint,
                    offload: str | None) -> list[SegmentMemory]:
    """Peak tensor bytes of every segment of a streamed calibration: the liveness plan the
    run executes, with parameters read from ``source`` while needed and every result handed
    to the writer as it is made (:func:`fxcompress.calibration.estimate_memory`)."""
    return calibrate_estimate(ep, sites, dict(plan), chunks, offload=offload, weights=source,
                              keep_results=False)


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
class _Output:
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


def _fingerprint(model_dir: Path, recipe: Recipe, chunks: list, source: Checkpoint,
                 compute: torch.dtype | None, precision: str, layout: str) -> str:
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(f"{compute}:{precision}:{layout}".encode())
    h.update((model_dir / fmt.CONFIG_NAME).read_bytes())
    for name, s in sorted(source.stored.items()):
        h.update(f"{name}:{s.dtype}:{s.shape}".encode())
    for leaf in pytree.tree_leaves(chunks):
        h.update(leaf.cpu().numpy().tobytes() if isinstance(leaf, Tensor) else repr(leaf).encode())
    return h.hexdigest()


# ============================================================================ entry point


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
    CPU for a 16-bit checkpoint (bf16/fp16 matrix products run 10–100× slower than float32 on
    CPUs without native bf16 arithmetic, and float32 is the more accurate), the checkpoint's
    own dtype on CUDA; ``None`` the checkpoint's dtype; or a dtype. Whatever it is, the output
    stores what stays dense in the checkpoint's dtype. ``calibration_precision``: that of the
    calibration passes' float32 matmuls, as for :func:`fxcompress.compile`.
    ``sparse_layout``: how pruned layers are stored, as for :func:`fxcompress.save`. Under an
    initialised ``torch.distributed`` process group the work is spread over its ranks and
    rank 0 writes ``out_dir``; every rank returns the same :class:`~fxcompress.api.Report`.
    Under a launcher (``torchrun``: ``WORLD_SIZE`` > 1) with no process group it raises
    :class:`~fxcompress.distributed.DistributedError` before any work: call
    :func:`~fxcompress.distributed.init_from_env` first.
    """
    check_launch()
    t0, rss0 = time.perf_counter(), resident_bytes()
    if offload not in ("auto", "cpu", "disk", "none", None):
        raise ValueError(f"offload={offload!r}: expected 'auto', 'cpu', 'disk' or 'none'")
    places = ["cpu", "disk"] if offload == "auto" else [None if offload == "none" else offload]
    fmt.check_sparse_layout(sparse_layout)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else None
    shard_size = parse_size(max_shard_size, "max_shard_size")
    team: Team = Distributed() if active() else Local()
    _check_output(team, out_dir, resume, overwrite)
    device = torch.device(device) if device is not None else _default_device(team)
    model = skeleton(model_dir)
    stored = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items() if t is not None}
    compute = _compute_dtype(compute_dtype, device, stored)
    precision = resolve_precision(calibration_precision, device)
    if compute is not None:
        model.to(compute)  # floating point tensors only; the config keeps the checkpoint's
    source = Checkpoint(model_dir, model, device)
    _load_buffers(model, source)
    chunks, samples = calibration_batches(model, calibration, batch_size, ranks=team.world)
    mine = team.shard(chunks) if isinstance(team, Distributed) else chunks
    fingerprint = _fingerprint(model_dir, recipe, chunks, source, compute, precision,
                               sparse_layout)
    if resume:  # a partial output of another job, or a damaged one, is refused before work
        with team.guard(f"checking {partial_dir(out_dir)}"):
            if team.rank == 0:
                fmt.resumable(out_dir, fingerprint)
    with numerics(), torch.no_grad():
        ep = capture(model, *chunks[0])
        retarget(ep, device)
        sites, others = find_sites(ep, model)
        plan, skipped = plan_sites(recipe, sites, others, model)
        for offload in places:  # the first that fits
            segments = estimate_memory(ep, sites, plan, mine, source, offload)
            if budget is None or over_budget(segments, budget) is None:
                break
        # the estimate of the run's growth: what it built so far (the model skeleton, the
        # captured program: ~20 KiB a graph node) and the tensors at the peak
        release_freed_memory()
        estimate = max(0, resident_bytes() - rss0) + max((s.total for s in segments), default=0)
        if budget is not None:
            check_memory(segments, budget)
        # only a run that will start opens (resumes, or deletes with overwrite) the output
        output, done = _open_output(team, model, source, recipe, out_dir, resume, overwrite,
                                    fingerprint, shard_size, stored, sparse_layout)
        dense, _ = dense_tensors(model, {*plan, *(s.module_name for s in sites if s.fqn in plan)})
        with team.guard("the uncompressed tensors"):
            if output is not None:
                output.write_dense(dense)
        # one process's frontier is saved now and then, to resume from (ranks replay)
        snapshots = Snapshots(output.writer.folder / SNAPSHOT, SNAPSHOT_EVERY,
                              lambda: not output.pending) if output and team.world == 1 else None
        _, reports = calibrate(ep, sites, plan, mine, progress=progress and team.rank == 0,
                               weights=source, team=team, offload=offload, done=done,
                               sink=output.sink if output is not None else _discard,
                               snapshots=snapshots, precision=precision,
                               trim_slack=trim_slack(estimate, budget))
        with team.guard("the checkpoint's config and index"):
            if snapshots is not None:
                snapshots.remove()
            if output is not None:
                output.finish()
        if isinstance(team, Distributed):
            team.barrier("the end")  # out_dir exists on every rank's return
    order = {s.fqn: i for i, s in enumerate(sites)}
    reports = sorted([*reports, *(done.report(f) for f in done if f in plan)] if done else
                     reports, key=lambda r: order[r.fqn])
    report = Report(recipe, reports, skipped, time.perf_counter() - t0, samples, estimate,
                    offload, precision)
    log.info("fxcompress: compressed %d linear layers of %s into %s in %.1fs", len(reports),
             model_dir, out_dir, report.seconds)
    return report


def _load_buffers(model: nn.Module, source: Checkpoint) -> None:
    """Buffers the checkpoint holds (persistent ones) take its values, as in
    ``from_pretrained``; the others keep what the modules computed."""
    for name, buf in list(model.named_buffers()):
        if buf is not None and name in source:
            owner, _, local = name.rpartition(".")
            model.get_submodule(owner)._buffers[local] = source.load(name).to(buf.device)


def _discard(site: Site, c: Compressed, report: LayerReport) -> None:
    """The sink of ranks that do not write: results live on only as replaced weights."""


def _compute_dtype(choice: str | torch.dtype | None, device: torch.device,
                   stored: Mapping[str, torch.dtype]) -> torch.dtype | None:
    """The dtype to compute in, or ``None`` for the checkpoint's (see ``compress_checkpoint``)."""
    if choice == "auto":
        half = any(d in (torch.bfloat16, torch.float16) for d in stored.values())
        return torch.float32 if device.type == "cpu" and half else None
    if isinstance(choice, str):
        value = getattr(torch, choice, None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"compute_dtype={choice!r}: expected 'auto', None or a floating "
                             f"point dtype such as 'float32' or 'bfloat16'")
        return value
    if choice is not None and not (isinstance(choice, torch.dtype) and choice.is_floating_point):
        raise ValueError(f"compute_dtype={choice!r}: expected 'auto', None or a floating point "
                         f"dtype")
    return choice


def _default_device(team: Team) -> torch.device:
    if isinstance(team, Distributed):
        return team.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def _open_output(team: Team, model: nn.Module, source: Checkpoint, recipe: Recipe,
                 out_dir: Path, resume: bool, overwrite: bool, fingerprint: str,
                 shard_size: int, stored: dict[str, torch.dtype], sparse_layout: str
                 ) -> tuple[_Output | None, Done | None]:
    """Rank 0 opens (or resumes) the partial output; with ``resume`` every rank reads the
    completed layers from it (a folder all ranks see)."""
    output = None
    with team.guard(f"opening {partial_dir(out_dir)}"):
        if team.rank == 0:
            writer = fmt.CheckpointWriter(out_dir, shard_size, fingerprint=fingerprint,
                                          resume=resume, overwrite=overwrite,
                                          sparse_layout=sparse_layout)
            output = _Output(model, source, writer, recipe, stored)
    if isinstance(team, Distributed):
        team.barrier("opening the output")
    if not resume:
        return output, None
    with team.guard(f"reading {partial_dir(out_dir)}"):
        done = Done(output.writer if output is not None else fmt.PartialCheckpoint(out_dir))
    if done:
        log.info("fxcompress: resuming %s: %d layers already compressed", out_dir, len(done))
    return output, done
