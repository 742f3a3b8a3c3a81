"""The Hugging Face side of a checkpoint: ``config.json`` with its compressed-tensors
``quantization_config`` (so transformers and vLLM read our checkpoints), the side files, and
the model skeleton built from an untrusted ``config.json`` with its sizes checked against the
stored tensors before anything real is allocated.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..paths import inside_folder
from ..recipe import Recipe
from ..version import __version__
from .codecs import CheckpointError, Entry, codec_of
from .model import dense_tensors, inside
from .names import CONFIG_NAME, COPIED_FILES, FORMAT_VERSION
from .safetensors_io import StoredTensor, read_shards

log = logging.getLogger(__name__)


def quantization_config(model: nn.Module, layers: dict[str, Entry], recipe: Recipe | None,
                        to_checkpoint: hub.Rename = str) -> dict[str, Any]:
    """``config.json["quantization_config"]``: compressed-tensors' schema plus our metadata.
    ``quant_method`` is ``"compressed-tensors"`` only if compressed-tensors can read every
    layer (its codec gives it a config group or stores it as plain linears, and it did not
    replace a transposed ``Conv1D``). ``targets`` and ``ignore`` name modules as the
    checkpoint does (``to_checkpoint``); our own ``layers`` entries keep the model's names.
    ``ignore`` lists every linear left unquantized, routers included (modules with their own
    2-D weight), and the pruned linears stored as plain ones; ``sparsity_config`` describes
    those (:func:`sparsity_config`)."""
    groups: dict[str, dict[str, Any]] = {}
    readable = not _transposed_layers(model, layers)
    plain: list[str] = []
    for name, entry in layers.items():
        codec = codec_of(entry)
        linears = codec.plain_linears(entry)
        if linears is not None:
            plain += [to_checkpoint(".".join(filter(None, (name, local)))) for local in linears]
            continue
        found = codec.config_group(to_checkpoint(name), entry)
        if found is None:
            readable = False
            continue
        args, targets = found
        group = groups.setdefault(json.dumps(args, sort_keys=True), {
            "targets": [], "weights": args, "input_activations": None,
            "output_activations": None, "format": "pack-quantized"})
        group["targets"] += targets
    dense = [to_checkpoint(n) for n, m in model.named_modules()
             if not inside(n, layers) and _dense_linear(m)]
    return {
        "quant_method": "compressed-tensors" if readable else "fxcompress",
        "format": "pack-quantized" if groups or not readable else "dense",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": dense + plain,
        "kv_cache_scheme": None,
        "sparsity_config": sparsity_config(model, layers, dense) if readable else {},
        "fxcompress": {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "layers": layers,
            "tied": dense_tensors(model, layers)[1],
        },
    }


def sparsity_config(model: nn.Module, layers: dict[str, Entry], dense: list[str]
                    ) -> dict[str, Any]:
    """compressed-tensors' ``SparsityCompressionConfig`` of a checkpoint whose pruned layers
    are all stored in the dense layout (empty when none is pruned): ``format`` ``"dense"``,
    ``sparsity_structure`` (``"2:4"`` when every pruned layer is), ``global_sparsity`` (the
    pruned share of all the model's weights) and, as ``ignore``, the linears left unpruned.
    ``targets`` stays unset (compressed-tensors: every layer not ignored): vLLM refuses a
    sparsity config that names targets, as it no longer runs sparse kernels."""
    pruned = [p for p in (codec_of(e).pruning(e) for e in layers.values()) if p is not None]
    if not pruned:
        return {}
    names, _ = dense_tensors(model, layers)
    state = model.state_dict(keep_vars=True)
    weights = sum(state[n].numel() for n in names if state[n].is_floating_point())
    weights += sum(codec_of(e).weights(e) for e in layers.values())
    removed = sum(w - kept for w, kept, _ in pruned)
    structures = {s for _, _, s in pruned}
    unpruned = [name for name, e in layers.items() if codec_of(e).pruning(e) is None]
    return {"format": "dense", "targets": None, "ignore": dense + unpruned,
            "global_sparsity": removed / weights if weights else 0.0,
            "sparsity_structure": structures.pop() if len(structures) == 1 else "unstructured"}


def _dense_linear(m: nn.Module) -> bool:
    """A linear (or a router: a module with its own 2-D weight) that stays dense."""
    w = m._parameters.get("weight")
    return type(m) is nn.Linear or (w is not None and w.dim() == 2
                                    and not isinstance(m, nn.Embedding))


def _transposed_layers(model: nn.Module, layers: dict[str, Any]) -> list[str]:
    """Compressed layers that replaced a Hugging Face ``Conv1D`` (weight stored (in, out) in
    the original model): compressed-tensors cannot read those."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    try:
        skeleton = skeleton_from_config(config, type(model))
        return [name for name in layers
                if type(skeleton.get_submodule(name)).__name__ == "Conv1D"]
    except Exception as e:  # a model class we cannot rebuild: do not claim compatibility
        log.warning("fxcompress: cannot rebuild %s from its config (%s); the checkpoint is "
                    "marked fxcompress-only", type(model).__name__, e)
        return list(layers)


def copy_side_files(model: nn.Module, folder: Path, tokenizer: Any) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    source_dir = Path(source) if source else None
    if source_dir is not None and source_dir.is_dir():
        for name in COPIED_FILES:
            if (source_dir / name).is_file() and not (folder / name).exists():
                src = inside_folder(source_dir, name, CheckpointError,
                                    f"{source_dir}: the side file {name}")
                shutil.copy2(src, folder / name)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)


def write_config(model: nn.Module, folder: Path, qconfig: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        if not data.get("architectures"):
            data["architectures"] = [type(model).__name__]
    data["quantization_config"] = qconfig
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, default=str)
                                      + "\n")



def read_hf_config(path: Path, config: dict[str, Any]) -> Any:
    """The transformers config of ``config.json``."""
    if not config.get("architectures") or "model_type" not in config:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a Hugging Face config (no "
                              f"architectures/model_type): pass build=<function returning the "
                              f"uncompressed model> to fxcompress.load")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types for a bad config
        raise CheckpointError(f"{path / CONFIG_NAME}: transformers cannot read it: {e}") from e


def meta_skeleton(path: Path, config: dict[str, Any], hf_config: Any,
                   shards: dict[str, StoredTensor]) -> nn.Module:
    """The uncompressed model with every tensor, buffers included, on the meta device: built
    from a config whose sizes are not checked yet, it allocates nothing (a ``hidden_size`` of
    10**12 is a shape, not 512 TB). Only its layer count is bounded first: each layer stores a
    tensor, and a model of 10**9 layers would take hours to build even on the meta device."""
    import transformers

    for sub in {id(c): c for c in (hf_config, hf_config.get_text_config())}.values():
        layers = getattr(sub, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > len(shards):
            field = _field_named(config, "num_hidden_layers", layers)
            raise CheckpointError(f"{path / CONFIG_NAME}: {field}={layers}, but the checkpoint "
                                  f"stores {len(shards)} tensors: the config does not describe "
                                  f"these tensors")
    arch = (hf_config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cls is not None and hasattr(cls, "_from_config"):
                return cls._from_config(hf_config)
            return transformers.AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # a config transformers accepts can still make no model
        absurd = ", ".join(f"{k}={v}" for k, v in _int_fields(config)
                           if (v < 0 or v >= 1 << 31) and not k.endswith("token_id"))
        raise CheckpointError(f"{path / CONFIG_NAME}: the model cannot be built from it"
                              + (f" ({absurd})" if absurd else "") + f": {e}") from e


def check_model_sizes(path: Path) -> None:
    """Before a Hugging Face model folder (a dense checkpoint fxcompress did not write) is built
    for real: its model, built on the meta device, holds no more parameters than the
    safetensors headers store (twice, for slack), and its computed buffers are bounded as
    :func:`~.loading.load` bounds them, so ``config.json`` cannot make the build allocate terabytes;
    otherwise :class:`CheckpointError` naming the config fields."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} cannot be read as JSON: {e}") from e
    shards = read_shards(path)
    model = meta_skeleton(path, config, read_hf_config(path, config), shards)
    stored = sum(math.prod(s.shape) for s in shards.values())
    params = list(model.parameters())
    if params and sum(p.numel() for p in params) > 2 * stored + (1 << 20):
        big = max(params, key=lambda p: p.numel())
        raise CheckpointError(f"{path / CONFIG_NAME}: "
                              + disagreeing(config, tuple(big.shape),
                                             tuple(d for s in shards.values() for d in s.shape))
                              + f"the model it describes has {sum(p.numel() for p in params)} "
                              f"parameters (one of {list(big.shape)}), the checkpoint stores "
                              f"{stored}")
    check_buffers(path, model, {n: s for n, s in shards.items()}, config)


def _int_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Every integer of ``config.json`` (sub-configs included), by dotted field name."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k != "quantization_config":
                yield from _int_fields(v, f"{prefix}{k}.")
    elif type(config) is int:
        yield prefix.rstrip("."), config


def _field_named(config: dict[str, Any], name: str, value: int) -> str:
    """The dotted name of the config field ``name`` holding ``value`` (a sub-config's, say;
    or the model's own name for it, such as GPT-2's ``n_layer``)."""
    fields = [k for k, v in _int_fields(config) if v == value]
    return next((k for k in fields if k.rpartition(".")[2] == name), fields[0] if fields
                else name)


def disagreeing(config: dict[str, Any] | None, expected: Iterator[int] | tuple[int, ...],
                 found: Iterator[int] | tuple[int, ...]) -> str:
    """``"config.json: hidden_size=10**12 disagrees with the tensors: "`` — the fields whose
    values a model shape has and the checkpoint's does not; empty if none."""
    missing = set(expected) - set(found)
    fields = [f"{k}={v}" for k, v in _int_fields(config or {}) if v in missing]
    return (f"{CONFIG_NAME}: {', '.join(fields)} disagree{'s' if len(fields) == 1 else ''} "
            f"with the tensors: ") if fields else ""


def check_buffers(path: Path, model: nn.Module, stored: dict[str, StoredTensor],
                   config: dict[str, Any]) -> None:
    """The buffers the modules compute themselves (rotary frequencies, masks), allocated when
    the model is built for real, are bounded by the stored tensors: a config field that sizes
    only those (a maximal position, say) cannot make the build allocate terabytes."""
    budget = max(2 * sum(math.prod(s.shape) * s.dtype.itemsize for s in stored.values()),
                 256 << 20)
    computed = [(n, b) for n, b in model.named_buffers() if b is not None and n not in stored]
    total = sum(b.numel() * b.element_size() for _, b in computed)
    if total > budget:
        name, b = max(computed, key=lambda nb: nb[1].numel() * nb[1].element_size())
        raise CheckpointError(f"{path / CONFIG_NAME}: "
                              + disagreeing(config, tuple(b.shape), ())
                              + f"the buffers the model computes would take {total} bytes "
                              f"({name}: {list(b.shape)}), more than twice the checkpoint's "
                              f"tensors")



def skeleton_from_config(hf_config: Any, cls: type | None) -> nn.Module:
    """The model of ``hf_config``, parameters on the meta device, buffers real (some, like
    rotary tables, are not in the checkpoint: the modules compute them)."""
    import transformers
    from accelerate import init_empty_weights

    if cls is None:
        arch = (hf_config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(include_buffers=False):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(hf_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)

