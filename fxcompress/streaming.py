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
   (``offload="disk"``); see :mod:`fxcompress.passes.calibrate`.
4. **Output shard by shard.** Each compressed layer is encoded as :mod:`fxcompress.format`
   stores it and appended to the current shard (:class:`ShardWriter`) as soon as it is made,
   with a progress record; the shards, index and ``config.json`` are finalised in a temporary
   folder that is renamed to ``out_dir`` at the very end, so ``out_dir`` is never half-written.
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

import hashlib
import json
import logging
import math
import os
import shutil
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

from . import format as fmt
from .algorithms import Compressed
from .api import DEFAULT_BATCH_TOKENS, Report, _batch, _samples, _tokens, numerics, plan_sites
from .distributed import Distributed, active, check_launch, to_cpu
from .modules import QuantLinear, SparseLinear
from .passes import capture, find_sites
from .passes.calibrate import LayerReport, Local, Team, calibrate, release_freed_memory
from .passes.calibrate import estimate_memory as calibrate_estimate
from .passes.capture import as_call, call_kwargs
from .passes.liveness import (  # noqa: F401  (re-exported: the errors and sizes of max_memory)
    MemoryBudgetError,
    SegmentMemory,
    check_memory,
    human,
    parse_size,
)
from .passes.sites import Site
from .recipe import Method, Recipe

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
_CODES = {dtype: code for code, dtype in fmt.DTYPES.items()}


class ResumeError(ValueError):
    """The partial output cannot be resumed (made by another job, or corrupted)."""


# ============================================================================ the model


def skeleton(model_dir: str | Path) -> nn.Module:
    """The Hugging Face model of ``model_dir``, parameters on the meta device, buffers real,
    tied weights tied, in the dtype of its config (as ``from_pretrained`` would build it)."""
    import transformers
    from accelerate import init_empty_weights

    model_dir = Path(model_dir)
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
    """Device constants traced as ``meta`` (from meta parameters) become ``device``."""
    def fix(v: Any) -> Any:
        return device if isinstance(v, torch.device) and v.type == "meta" else v

    for node in ep.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(fix, node.args)
            node.kwargs = pytree.tree_map(fix, node.kwargs)
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
    the OS first, so the process's RSS follows the tensors it actually holds."""

    def __init__(self, model_dir: str | Path, model: nn.Module, device: torch.device):
        self.dir, self.device = Path(model_dir), device
        index = self.dir / fmt.INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / fmt.WEIGHTS_NAME).is_file():
            files = [fmt.WEIGHTS_NAME]
        else:
            raise FileNotFoundError(f"{self.dir} has neither {fmt.WEIGHTS_NAME} nor "
                                    f"{fmt.INDEX_NAME}: not a safetensors checkpoint")
        self.stored = {name: s for f in files for name, s in fmt.read_header(self.dir / f).items()}
        self.aliases = _aliases(model)
        self.dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()
                       if t is not None}

    def __contains__(self, name: str) -> bool:
        return any(a in self.stored for a in self.aliases.get(name, [name]))

    def nbytes(self, name: str) -> int:
        s = self.stored[self._stored_name(name)]
        return math.prod(s.shape) * self.dtypes.get(name, s.dtype).itemsize

    def _stored_name(self, name: str) -> str:
        for alias in [name, *self.aliases.get(name, [])]:
            if alias in self.stored:
                return alias
        raise KeyError(f"tensor {name!r} is not in the checkpoint {self.dir}")

    def load(self, name: str) -> Tensor:
        from safetensors import safe_open

        release_freed_memory()
        stored = self._stored_name(name)
        with safe_open(str(self.stored[stored].file), framework="pt") as f:
            t = f.get_tensor(stored)
        return t.to(self.device, self.dtypes.get(name, t.dtype))


# ============================================================================ memory


def estimate_memory(ep: ExportedProgram, sites: list[Site], plan: Mapping[str, Method],
                    chunks: list[tuple[tuple, dict]], source: Checkpoint,
                    offload: str | None) -> list[SegmentMemory]:
    """Peak tensor bytes of every segment of a streamed calibration: the liveness plan the
    run executes, with parameters read from ``source`` while needed and every result handed
    to the writer as it is made (:func:`fxcompress.passes.calibrate.estimate_memory`)."""
    return calibrate_estimate(ep, sites, dict(plan), chunks, offload=offload, weights=source,
                              keep_results=False)


# ============================================================================ the output


def _tensor_bytes(t: Tensor) -> Any:
    return t.reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Appends tensors to safetensors shards of at most ``shard_size`` bytes as they are made.

    Each shard grows as a raw ``.part`` file; ``commit`` makes everything added so far durable
    and records it in ``progress.json`` (tensor offsets and CRC-32s, finished layers), which is
    what ``resume`` trusts: bytes after the last commit are cut off. ``finish`` turns each part
    into a safetensors file — header first, tensors ordered by alignment (the file order
    safetensors itself uses) — and writes the index.
    """

    def __init__(self, folder: Path, shard_size: int, fingerprint: str, resume: bool):
        self.folder, self.shard_size = folder, shard_size
        self.state = self._resume(fingerprint) if resume else None
        if self.state is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            self.state = {"fingerprint": fingerprint, "shards": [], "layers": {},
                          "reports": {}}
        self._file: Any = None

    def _resume(self, fingerprint: str) -> dict | None:
        file = self.folder / PROGRESS
        if not file.is_file():
            log.info("fxcompress: nothing to resume in %s, starting afresh", self.folder)
            return None
        state = read_progress(self.folder)
        if state["fingerprint"] != fingerprint:
            raise ResumeError(f"{self.folder} holds a partial compression of another model, "
                              f"recipe or calibration set; remove it or run without resume")
        for shard in state["shards"]:  # cut off what was written after the last commit
            os.truncate(self.folder / shard["part"], shard["size"])
        return state

    @property
    def written(self) -> set[str]:
        return {name for shard in self.state["shards"] for name in shard["tensors"]}

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        shards = self.state["shards"]
        if not shards or shards[-1]["size"] and shards[-1]["size"] + nbytes > self.shard_size:
            self._close()
            shards.append({"part": f"shard-{len(shards) + 1:05d}.part", "size": 0,
                           "tensors": {}})
        shard = shards[-1]
        if self._file is None:
            self._file = open(self.folder / shard["part"], "ab")  # noqa: SIM115
        data = _tensor_bytes(t) if nbytes else b""
        self._file.write(data)
        begin = shard["size"]
        shard["tensors"][name] = [_CODES[t.dtype], list(t.shape), begin, begin + nbytes,
                                  zlib_crc(data)]
        shard["size"] += nbytes

    def read(self, name: str) -> Tensor:
        """A committed tensor, read back from its part file."""
        for shard in self.state["shards"]:
            if name in shard["tensors"]:
                code, shape, begin, end, _ = shard["tensors"][name]
                with open(self.folder / shard["part"], "rb") as f:
                    f.seek(begin)
                    data = bytearray(f.read(end - begin))
                dtype = fmt.DTYPES[code]
                if not data:
                    return torch.empty(shape, dtype=dtype)
                return torch.frombuffer(data, dtype=dtype).reshape(shape)
        raise KeyError(name)

    def commit(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        tmp = self.folder / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.folder / PROGRESS)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Write the safetensors shards (and index) and remove the parts and the record."""
        self._close()
        shards = self.state["shards"]
        names = [fmt.WEIGHTS_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            _write_safetensors(self.folder / shard["part"], shard["tensors"], self.folder / name)
            (self.folder / shard["part"]).unlink()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s["size"] for s in shards)},
                     "weight_map": {t: n for n, s in zip(names, shards, strict=True)
                                    for t in s["tensors"]}}
            (self.folder / fmt.INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (self.folder / PROGRESS).unlink()


def zlib_crc(data: Any) -> int:
    import zlib

    return zlib.crc32(data) if len(data) else 0


def read_progress(folder: Path) -> dict:
    try:
        return json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{folder / PROGRESS} cannot be read: {e}") from e


def _write_safetensors(part: Path, tensors: dict[str, list], out: Path) -> None:
    import struct

    entries = sorted(tensors.items(), key=lambda kv: -fmt.DTYPES[kv[1][0]].itemsize)
    header: dict[str, Any] = {}
    offset = 0
    for name, (code, shape, begin, end, _) in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset,
                                                                          offset + end - begin]}
        offset += end - begin
    header["__metadata__"] = {"format": "pt", fmt.CRC_KEY: json.dumps(
        {name: entry[4] for name, entry in entries})}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(part, "rb") as src, open(out, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)))
        dst.write(raw)
        for _, (_, _, begin, end, _) in entries:
            src.seek(begin)
            left = end - begin
            while left:
                block = src.read(min(left, 64 << 20))
                dst.write(block)
                left -= len(block)


class Done(Mapping[str, Compressed]):
    """The layers an interrupted run completed, read back (lazily) from its partial output."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.layers = dict(writer.state["layers"])
        self.reports = dict(writer.state["reports"])

    def __getitem__(self, fqn: str) -> Compressed:
        meta = self.layers[fqn]
        tensors = {local: self.writer.read(f"{fqn}.{local}") for local in fmt._expected(meta)}
        m = fmt._stub(meta)
        fmt._fill(m, meta, tensors, f"{self.writer.folder}: {fqn}.")
        return as_compressed(m, self.reports[fqn]["loss"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def report(self, fqn: str) -> LayerReport:
        r = dict(self.reports[fqn])
        r["shape"] = tuple(r["shape"])
        return LayerReport(**r)


def as_compressed(m: nn.Module, loss: float) -> Compressed:
    """A stored layer as the :class:`Compressed` it was made from (same dense weight)."""
    shape = (m.out_features, m.in_features)
    if isinstance(m, SparseLinear):
        return Compressed(shape, loss, mask=m.mask.clone(), values=m.weight.detach().float())
    g_idx = m.weight_g_idx if m.weight_g_idx is not None else (
        torch.arange(m.in_features) // m.group_size).to(torch.int32)
    mask = None
    if m.weight_bitmask is not None:
        from .kernels import pack

        mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
    return Compressed(shape, loss, codes=m.codes(), scale=m.weight_scale.float(),
                      zero=m.weight_zero_point.clone(), g_idx=g_idx, bits=m.bits,
                      group_size=m.group_size, sym=m.sym, mask=mask)


def _dense_tensors(model: nn.Module, compressed: set[str]) -> tuple[list[str], dict[str, str]]:
    """Names of the tensors stored as they are (as ``fxcompress.save`` chooses them), and the
    tied aliases ``{alias: stored name}``."""
    names, tied, seen = [], {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] in compressed or value is None:
            continue
        if id(value) in seen:
            tied[name] = seen[id(value)]
            continue
        seen[id(value)] = name
        names.append(name)
    return names, tied


@dataclass
class _Output:
    """Rank 0's side of a streamed compression: the partial folder and its writer."""

    model: nn.Module
    source: Checkpoint
    writer: ShardWriter
    recipe: Recipe

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
            self.writer.add(name, value)
            del value
        self.writer.commit()

    def sink(self, site: Site, c: Compressed, report: LayerReport) -> None:
        bias = self.source.load(f"{site.fqn}.bias").cpu() \
            if site.module.bias is not None else None
        m = _stored_module(to_cpu(c), bias, site.module.weight.dtype)
        meta = fmt._layer_meta(m)
        for local, t in fmt._encode(m, meta).items():
            self.writer.add(f"{site.fqn}.{local}", t)
        self.writer.state["layers"][site.fqn] = meta
        self.writer.state["reports"][site.fqn] = {**vars(report), "shape": list(report.shape)}
        self.writer.commit()

    def finish(self, tied: dict[str, str], out_dir: Path) -> None:
        """Shards, index, config and side files; then the folder becomes ``out_dir``."""
        names = [n for n, m in self.model.named_modules() if n in self.writer.state["layers"]]
        layers = {n: self.writer.state["layers"][n] for n in names}
        transposed = fmt._transposed_layers(self.model, dict.fromkeys(layers))
        readable = all(m["kind"] == fmt.QUANTIZED for m in layers.values()) and not transposed
        dense = [n for n, m in self.model.named_modules()
                 if type(m) is nn.Linear and n not in layers]
        qconfig = fmt._quantization_config(layers, dense, readable, self.recipe)
        qconfig["fxcompress"]["tied"] = tied
        folder = self.writer.folder
        self.writer.finish()
        fmt._copy_side_files(self.model, folder, None)
        fmt._write_config(self.model, folder, qconfig)
        _replace_dir(folder, out_dir)


class _Packed(QuantLinear):
    """A ``QuantLinear`` holding only its stored (packed) tensors: writing needs no CPU
    kernel layout, which ``fxcompress.load`` builds anyway."""

    def prepare(self) -> None:
        self.kernel = "canonical"


def _stored_module(c: Compressed, bias: Tensor | None, dtype: torch.dtype) -> nn.Module:
    if c.quantized:
        return _Packed.from_compressed(c, bias, dtype)
    return SparseLinear.from_compressed(c, bias, dtype)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` only once ``src`` is complete."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def partial_dir(out_dir: str | Path) -> Path:
    """Where a streamed compression into ``out_dir`` keeps its work until it is complete."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def _fingerprint(model_dir: Path, recipe: Recipe, chunks: list, source: Checkpoint) -> str:
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
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
    offload: str | None = "cpu",
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    max_shard_size: int | str = fmt.DEFAULT_SHARD_SIZE,
) -> Report:
    """Compress the Hugging Face checkpoint in ``model_dir`` into ``out_dir`` (a folder
    :func:`fxcompress.load` reads), holding one layer at a time; see the module docstring.

    ``calibration`` and ``recipe`` are as for :func:`fxcompress.compile`. ``max_memory``
    (bytes or ``"6GiB"``) bounds the tensor memory of the run, checked before it starts.
    ``offload``: where activations kept for all calibration samples live — ``"cpu"``,
    ``"disk"`` or ``None``/``"none"`` (on the compute ``device``: CUDA if available). ``resume``
    continues an interrupted run into the same ``out_dir`` with the same inputs. Under an
    initialised ``torch.distributed`` process group the work is spread over its ranks and
    rank 0 writes ``out_dir``; every rank returns the same :class:`~fxcompress.api.Report`.
    Under a launcher (``torchrun``: ``WORLD_SIZE`` > 1) with no process group it raises
    :class:`~fxcompress.distributed.DistributedError` before any work: call
    :func:`~fxcompress.distributed.init_from_env` first.
    """
    check_launch()
    t0 = time.perf_counter()
    offload = None if offload == "none" else offload
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    team: Team = Distributed() if active() else Local()
    device = torch.device(device) if device is not None else _default_device(team)
    model = skeleton(model_dir)
    source = Checkpoint(model_dir, model, device)
    _load_buffers(model, source)
    calls = [((), call_kwargs(model, *as_call(s))) for s in _samples(calibration)]
    size = batch_size or max(1, DEFAULT_BATCH_TOKENS // _tokens(calls[0]))
    chunks = _batch(calls, min(size, math.ceil(len(calls) / team.world)))
    mine = team.shard(chunks) if isinstance(team, Distributed) else chunks
    output, done = _open_output(team, model, source, recipe, out_dir, resume,
                                _fingerprint(model_dir, recipe, chunks, source),
                                parse_size(max_shard_size))
    with numerics(), torch.no_grad():
        ep = capture(model, *chunks[0])
        retarget(ep, device)
        sites, others = find_sites(ep, model)
        plan, skipped = plan_sites(recipe, sites, others, model)
        experts = [s.fqn for s in sites if s.index is not None and s.fqn in plan]
        if experts:
            raise NotImplementedError(
                f"streamed compression of experts ({experts[0]}, ...) is not supported yet: "
                f"their checkpoint layout is still to be written. Leave them dense with a "
                f"None rule, or compress the model in memory with fxcompress.compile")
        if max_memory is not None:
            check_memory(estimate_memory(ep, sites, plan, mine, source, offload),
                         parse_size(max_memory))
        dense, tied = _dense_tensors(model, set(plan))
        with team.guard("the uncompressed tensors"):
            if output is not None:
                output.write_dense(dense)
        _, reports = calibrate(ep, sites, plan, mine, progress=progress and team.rank == 0,
                               weights=source, team=team, offload=offload, done=done,
                               sink=output.sink if output is not None else _discard)
        with team.guard("the checkpoint's config and index"):
            if output is not None:
                output.finish(tied, out_dir)
        if isinstance(team, Distributed):
            team.barrier("the end")  # out_dir exists on every rank's return
    order = {s.fqn: i for i, s in enumerate(sites)}
    reports = sorted([*reports, *(done.report(f) for f in done if f in plan)] if done else
                     reports, key=lambda r: order[r.fqn])
    report = Report(recipe, reports, skipped, time.perf_counter() - t0, len(calls))
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


def _default_device(team: Team) -> torch.device:
    if isinstance(team, Distributed):
        return team.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _open_output(team: Team, model: nn.Module, source: Checkpoint, recipe: Recipe,
                 out_dir: Path, resume: bool, fingerprint: str, shard_size: int
                 ) -> tuple[_Output | None, Done | None]:
    """Rank 0 opens (or resumes) the partial output; with ``resume`` every rank reads the
    completed layers from it (a folder all ranks see)."""
    output = None
    with team.guard(f"opening {partial_dir(out_dir)}"):
        if team.rank == 0:
            writer = ShardWriter(partial_dir(out_dir), shard_size, fingerprint, resume)
            output = _Output(model, source, writer, recipe)
    if isinstance(team, Distributed):
        team.barrier("opening the output")
    if not resume:
        return output, None
    with team.guard(f"reading {partial_dir(out_dir)}"):
        writer = output.writer if output is not None else _reader(partial_dir(out_dir))
        done = Done(writer)
    if done:
        log.info("fxcompress: resuming %s: %d layers already compressed", out_dir, len(done))
    return output, done


def _reader(folder: Path) -> ShardWriter:
    """A read-only view of a partial output written by another rank."""
    writer = ShardWriter.__new__(ShardWriter)
    writer.folder, writer.shard_size, writer._file = folder, 0, None
    writer.state = read_progress(folder) if (folder / PROGRESS).is_file() else {
        "shards": [], "layers": {}, "reports": {}}
    return writer
