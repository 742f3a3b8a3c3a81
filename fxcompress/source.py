"""A checkpoint folder as the pipeline's source: the model built without its weights, each
tensor read from safetensors when calibration needs it (:mod:`fxcompress.streaming`).

The model is built from its ``config.json`` with parameters on the meta device
(``accelerate.init_empty_weights(include_buffers=False)``: buffers are real, because
non-persistent ones such as rotary ``inv_freq`` are not in the checkpoint and are computed by
the modules' own ``__init__``), and captured on the meta device. Device constants the trace
recorded as ``meta`` are retargeted to the compute device (:func:`retarget`). Tensors are
memory-mapped (``safe_open``), so only the pages of the layers in flight are resident.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from . import checkpoint as fmt
from . import hub
from .modules import checkpoint_expert_names, experts_unsupported
from .osmem import release_freed_memory

log = logging.getLogger(__name__)


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


# ============================================================================ the source


@dataclass
class CheckpointSource:
    """The pipeline's source for a checkpoint folder: the skeleton to capture, computing in
    ``compute`` (``None``: the checkpoint's dtypes) on ``device``, its weights read from
    ``weights``; ``stored`` is the dtype of each tensor in the checkpoint, which what stays
    dense is written in."""

    model: nn.Module
    device: torch.device
    weights: Checkpoint
    stored: dict[str, torch.dtype]
    compute: torch.dtype | None

    def captured(self, ep: ExportedProgram) -> None:
        retarget(ep, self.device)


def open_checkpoint(model_dir: Path, model: nn.Module, device: torch.device,
                    compute_dtype: str | torch.dtype | None) -> CheckpointSource:
    """The source of ``model`` (its :func:`skeleton`), cast to the compute dtype, its
    persistent buffers read from the checkpoint."""
    stored = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items() if t is not None}
    compute = _compute_dtype(compute_dtype, device, stored)
    if compute is not None:
        model.to(compute)  # floating point tensors only; the config keeps the checkpoint's
    weights = Checkpoint(model_dir, model, device)
    _load_buffers(model, weights)
    return CheckpointSource(model, device, weights, stored, compute)


def _load_buffers(model: nn.Module, source: Checkpoint) -> None:
    """Buffers the checkpoint holds (persistent ones) take its values, as in
    ``from_pretrained``; the others keep what the modules computed."""
    for name, buf in list(model.named_buffers()):
        if buf is not None and name in source:
            owner, _, local = name.rpartition(".")
            model.get_submodule(owner)._buffers[local] = source.load(name).to(buf.device)


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
