"""``fxcompress.load``: a checkpoint folder back into a model, every check before any change.

Folders are untrusted input. ``config.json`` and every safetensors header are read first, and
every tensor's presence, dtype and shape is checked against the model rebuilt from
``config.json`` on the meta device (its sizes bounded by the headers:
:mod:`~fxcompress.checkpoint.hf`); then every tensor is read with its CRC-32 checked and every
compressed layer decoded by its codec; only then is anything assigned to the model, so a bad
checkpoint fails with the file and tensor named and leaves no half-loaded model. Packed
tensors are assigned as they are, without materialising dense float weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import hub
from ..errors import RecipeError
from ..modules import set_module
from ..osmem import release_freed_memory
from ..recipe import Recipe
from .codecs import CheckpointError, Entry, codec_of
from .hf import check_buffers, disagreeing, meta_skeleton, read_hf_config, skeleton_from_config
from .model import get_tensor, inside, set_tensor
from .names import CONFIG_NAME, FORMAT_VERSION
from .safetensors_io import StoredTensor, by_model_name, check_checksums, read_all, read_shards


def load(path: str | Path, build: Callable[[], nn.Module] | None = None, *,
         verify: bool = True) -> nn.Module:
    """Rebuild a compressed model saved by :func:`~.writer.save`, without recalibration.

    Hugging Face models are built from ``config.json`` (its ``architectures``); any other
    model needs ``build``, a function returning the uncompressed model (it is called on the
    meta device, so it allocates nothing). Every tensor's presence, dtype and shape is checked
    against that model before any data is read; then every tensor is read (and, with
    ``verify``, its CRC-32 checked) and every compressed layer decoded before anything is
    assigned to the model, so a bad checkpoint raises :class:`CheckpointError`, naming the file
    and tensor, with the model ``build`` returned left as it was. The model comes back on CPU
    in eval mode with its kernel layouts prepared.
    """
    path = Path(path)
    config = _read_config(path)
    fx = config["quantization_config"]["fxcompress"]
    layers, tied = fx["layers"], fx.get("tied", {})
    recipe = _recipe(path, fx["recipe"]) if fx.get("recipe") is not None else None
    shards = read_shards(path)
    if build is not None:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = build()
    else:  # config.json is untrusted: nothing is allocated before its sizes are checked
        hf_config = read_hf_config(path, config)
        model = meta_skeleton(path, config, hf_config, shards)
    stored = by_model_name(path, shards, hub.renamings(model)[1])
    _check_originals(model, layers, config)
    _check(_expected(model, layers, tied), tied, stored, config)
    if build is None:
        check_buffers(path, model, stored, config)
        model = skeleton_from_config(hf_config, type(model))  # buffers computed, sizes checked
    _check_complete(model, layers, tied, stored, path)
    if verify:
        check_checksums(shards)
    tensors = read_all(stored, verify)
    modules = _decode(layers, tensors, stored)
    # every check has passed: only now is the model changed
    for name, m in modules.items():
        set_module(model, name, m)
    for name, t in tensors.items():
        set_tensor(model, name, t)
    for alias, source in tied.items():
        set_tensor(model, alias, get_tensor(model, source))
    if recipe is not None:
        model.fxcompress_recipe = recipe
    return model.eval()


def _recipe(path: Path, data: dict[str, Any]) -> Recipe:
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: invalid recipe: {e}") from e


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not path.is_dir():
        old = path.with_name(f".{path.name}.old")
        if old.is_dir():
            raise CheckpointError(f"{path} is missing, but {old} holds the checkpoint that was "
                                  f"there: a save was interrupted while swapping folders; "
                                  f"rename {old.name} back to {path.name}")
        raise CheckpointError(f"{path} is not a checkpoint folder")
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete fxcompress "
                              f"checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read as JSON: {e}") from e
    fx = (config.get("quantization_config") or {}).get("fxcompress")
    if not isinstance(fx, dict):
        raise CheckpointError(f"{file} has no quantization_config.fxcompress entry: not a "
                              f"checkpoint written by fxcompress.save")
    version = fx.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unknown fxcompress format version {version!r} (this "
                              f"fxcompress reads version {FORMAT_VERSION}); upgrade fxcompress")
    if not isinstance(fx.get("layers"), dict):
        raise CheckpointError(f"{file}: quantization_config.fxcompress.layers is missing")
    for name, entry in fx["layers"].items():
        codec = codec_of(entry)
        problem = f"an invalid entry {entry!r}" if codec is None else codec.entry_problem(entry)
        if problem is not None:
            raise CheckpointError(f"{file}: layer {name!r} has {problem}")
    return config



def _check_originals(model: nn.Module, layers: dict[str, Entry],
                     config: dict[str, Any] | None = None) -> None:
    """Each compressed layer names a module of the model built from the config that its
    codec can have replaced."""
    for name, entry in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"config.json names compressed layer {name}, which the "
                                  f"model built from the config does not have") from None
        problem = codec_of(entry).original_problem(module, entry)
        if problem is not None:
            dims = [d for p in module.parameters() for d in p.shape]
            raise CheckpointError((disagreeing(config, tuple(dims), tuple(_ints(entry)))
                                   or f"{CONFIG_NAME}: ") + f"layer {name} {problem}")


def _ints(value: Any) -> Iterator[int]:
    if isinstance(value, dict | list | tuple):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _ints(v)
    elif type(value) is int:
        yield value


Expected = dict[str, tuple[tuple[int, ...], torch.dtype | None]]


def _expected(model: nn.Module, layers: dict[str, Entry], tied: dict[str, str]) -> Expected:
    """Shape and dtype (None: any) of every tensor the checkpoint must hold: the model's own
    tensors outside compressed layers (tied aliases excepted) as they are, and what each
    layer's codec stores."""
    expected: Expected = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if value is not None and name not in tied and not inside(name, layers):
            expected[name] = (tuple(value.shape), None)
    for name, entry in layers.items():
        expected.update({f"{name}.{k}": v for k, v in codec_of(entry).expected(entry).items()})
    return expected


def _check(expected: Expected, tied: dict[str, str], stored: dict[str, StoredTensor],
           config: dict[str, Any] | None = None) -> None:
    """Every expected tensor is stored with the right dtype and shape; nothing else is. A
    shape that differs names the ``config`` fields that made it."""
    for name, (shape, dtype) in expected.items():
        if name not in stored:
            raise CheckpointError(f"missing tensor {name}: not found in {_files(stored)}")
        s = stored[name]
        if s.shape != shape:
            raise CheckpointError(f"{disagreeing(config, shape, s.shape)}{s.file}: tensor "
                                  f"{name} has shape {list(s.shape)}, the model built from "
                                  f"config.json expects {list(shape)}")
        if dtype is not None and s.dtype != dtype:
            raise CheckpointError(f"{s.file}: tensor {name} is {s.dtype}, expected {dtype}")
    for alias, source in tied.items():
        if source not in stored:
            raise CheckpointError(f"missing tensor {source} (tied to {alias})")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        s = stored[unexpected[0]]
        raise CheckpointError(f"{s.file}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1
                                 else "")
                              + ": the model built from config.json has no such tensor")


def _check_complete(model: nn.Module, layers: dict[str, Entry], tied: dict[str, str],
                    stored: dict[str, StoredTensor], path: Path) -> None:
    """No tensor of the model would stay on the meta device (e.g. a buffer that is neither
    computed by its module nor stored)."""
    left = [n for n, t in _named_tensors(model) if t.device.type == "meta"
            and n not in stored and n not in tied and not inside(n, layers)]
    if left:
        raise CheckpointError(f"{path}: no stored value for {', '.join(left[:5])}"
                              + (" ..." if len(left) > 5 else ""))


def _files(stored: dict[str, StoredTensor]) -> str:
    files = sorted({str(s.file) for s in stored.values()})
    return ", ".join(files) if files else "the checkpoint"



_TRIM_EVERY = 8 << 20  # bytes of stored tensors decoded between two trims of the heap


def _decode(layers: dict[str, Entry], tensors: dict[str, Tensor],
            stored: dict[str, StoredTensor]) -> dict[str, nn.Module]:
    """Each compressed layer's module, built by its codec from its tensors (taken out of
    ``tensors``: what is left is stored as it is)."""
    modules, since_trim = {}, 0
    for name, entry in layers.items():
        codec = codec_of(entry)
        local = {k: tensors.pop(f"{name}.{k}") for k in codec.expected(entry)}
        file = stored[f"{name}.{next(iter(local))}"].file if local else CONFIG_NAME
        modules[name] = codec.decode(entry, local, f"{file}: {name}.")
        # decoding frees temporaries (unpacked codes, kernel-layout staging) between the
        # tensors the model keeps: hand them back now and then, or the heap keeps them all
        since_trim += sum(t.numel() * t.element_size() for t in local.values())
        if since_trim > _TRIM_EVERY:
            release_freed_memory()
            since_trim = 0
    release_freed_memory()
    return modules


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if b is not None)
