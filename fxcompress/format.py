"""Checkpoints: ``fxcompress.save(model, dir)`` and ``fxcompress.load(dir)``.

A checkpoint is a Hugging Face–style folder, so the tools that read compressed-tensors
checkpoints (transformers, vLLM) can read ours:

* ``config.json`` — the model's config plus a ``quantization_config`` in compressed-tensors'
  schema (``format: "pack-quantized"``, ``config_groups`` whose ``targets`` name every quantized
  layer exactly, ``ignore`` for the linears left dense) with an ``fxcompress`` sub-dict: the
  format version, the recipe, and one entry per compressed layer;
* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards and
  ``model.safetensors.index.json`` above ``max_shard_size``), each file's metadata carrying a
  CRC-32 of every tensor so corruption is caught and named;
* tokenizer and generation-config files, copied when present.

Quantized layers use compressed-tensors' names and ``pack-quantized`` layout; pruned layers
use fxcompress's own bitmask layout (compressed-tensors no longer ships a sparse compressor).
``docs/FORMAT.md`` documents every tensor.

``load`` reads headers and config first and checks every tensor's presence, dtype, shape and
checksum against the model rebuilt from ``config.json`` on the meta device, so a bad
checkpoint fails with the file and tensor named before anything is returned. Packed tensors
are assigned as they are, without materialising dense float weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import pack
from .modules import QuantExperts, QuantLinear, SparseExperts, SparseLinear
from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CRC_KEY = "fxcompress.crc32"
DEFAULT_SHARD_SIZE = "5GB"
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
# safetensors dtype names <-> torch dtypes (the subset a checkpoint of ours can hold)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
HEADER_KEYS = {"__metadata__", "dtype", "shape", "data_offsets", "format", CRC_KEY}
QUANTIZED, SPARSE_QUANTIZED, SPARSE = "quantized", "sparse-quantized", "sparse"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the file and tensor."""


# ============================================================================ layer codecs
#
# Each compressed layer is stored under its module name with the local names below; the
# layer's entry in config.json ("kind", shapes, grid) says which ones and with what shapes.


def _layer_meta(m: nn.Module) -> dict[str, Any]:
    """The config.json entry describing one compressed layer."""
    meta: dict[str, Any] = {"in_features": m.in_features, "out_features": m.out_features,
                            "bias": m.bias is not None}
    if m.bias is not None:
        meta["dtype"] = str(m.bias.dtype).removeprefix("torch.")
    if isinstance(m, SparseLinear):
        meta["dtype"] = str(m.weight.dtype).removeprefix("torch.")
        return {"kind": SPARSE, **meta, "nnz": int(m.mask.sum())}
    mid = 2 ** (m.bits - 1)
    symmetric = m.sym and bool((m.weight_zero_point == mid).all())
    meta.update(bits=m.bits, group_size=m.group_size, symmetric=symmetric,
                g_idx=m.weight_g_idx is not None)
    if m.weight_bitmask is None:
        return {"kind": QUANTIZED, **meta}
    mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
    return {"kind": SPARSE_QUANTIZED, **meta, "nnz": int(mask.sum())}


def _encode(m: nn.Module, meta: dict[str, Any]) -> dict[str, Tensor]:
    """The stored tensors of one compressed layer (local names)."""
    n, k = m.out_features, m.in_features
    out = {"weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if meta["kind"] == SPARSE:
        out["weight_bitmask"] = pack.pack_bitmask(m.mask)
        out["weight_values"] = m.weight.detach()[m.mask]
    else:
        out["weight_scale"] = m.weight_scale
        if not meta["symmetric"]:
            out["weight_zero_point"] = pack.pack_rows(m.weight_zero_point, m.bits)
        if m.weight_g_idx is not None:
            out["weight_g_idx"] = m.weight_g_idx
        if meta["kind"] == QUANTIZED:
            out["weight_packed"] = m.weight_packed
        else:
            out.update(_encode_sparse_codes(m))
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return out


def _encode_sparse_codes(m: QuantLinear) -> dict[str, Tensor]:
    """Bitmask plus the kept codes as one bit stream; pruned codes must equal the zero point
    of their group (the layer computes with them, so they are rebuilt from it on load)."""
    mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
    codes = m.codes()
    if not torch.equal(codes[~mask], _zero_codes(m.weight_zero_point, m.weight_g_idx,
                                                 m.group_size, m.in_features)[~mask]):
        raise ValueError("a pruned QuantLinear holds codes other than its zero point at pruned "
                         "positions; it cannot be stored in the sparse layout")
    return {"weight_bitmask": m.weight_bitmask,
            "weight_kept_packed": pack.pack(codes[mask][None], m.bits)[0]}


def _zero_codes(zero: Tensor, g_idx: Tensor | None, group_size: int, k: int) -> Tensor:
    """The zero-point code of every weight position, ``(N, K)`` uint8."""
    g = torch.arange(k) // group_size if g_idx is None else g_idx.long()
    return zero[:, g]


def _expected(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every stored tensor of one compressed layer."""
    n, k, kind = meta["out_features"], meta["in_features"], meta["kind"]
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"weight_shape": ((2,), torch.int64)}
    if kind == SPARSE:
        out["weight_bitmask"] = ((n, math.ceil(k / 8)), torch.uint8)
        out["weight_values"] = ((meta["nnz"],), _dtype(meta["dtype"]))
    else:
        bits, groups = meta["bits"], k // meta["group_size"]
        out["weight_scale"] = ((n, groups), torch.float16)
        if not meta["symmetric"]:
            out["weight_zero_point"] = ((pack.packed_width(n, bits), groups), torch.int32)
        if meta["g_idx"]:
            out["weight_g_idx"] = ((k,), torch.int32)
        if kind == QUANTIZED:
            out["weight_packed"] = ((n, pack.packed_width(k, bits)), torch.int32)
        else:
            out["weight_bitmask"] = ((n, math.ceil(k / 8)), torch.uint8)
            out["weight_kept_packed"] = ((pack.packed_width(meta["nnz"], bits),), torch.int32)
    if meta["bias"]:
        out["bias"] = ((n,), _dtype(meta["dtype"]))
    return out


def _stub(meta: dict[str, Any]) -> nn.Module:
    """An empty compressed module on the meta device, to be filled by :func:`_fill`."""
    n, k = meta["out_features"], meta["in_features"]
    if meta["kind"] == SPARSE:
        return SparseLinear(k, n, meta["bias"], device="meta", dtype=_dtype(meta["dtype"]))
    dtype = _dtype(meta["dtype"]) if meta["bias"] else torch.float32
    return QuantLinear(k, n, meta["bits"], meta["group_size"], meta["symmetric"], meta["bias"],
                       dynamic_groups=meta["g_idx"], sparse=meta["kind"] == SPARSE_QUANTIZED,
                       device="meta", dtype=dtype)


def _fill(m: nn.Module, meta: dict[str, Any], t: dict[str, Tensor], where: str) -> None:
    """Decode the stored tensors ``t`` of one layer into its module ``m``."""
    n, k = meta["out_features"], meta["in_features"]
    if t["weight_shape"].tolist() != [n, k]:
        raise CheckpointError(f"{where}weight_shape holds {t['weight_shape'].tolist()}, "
                              f"config.json says [{n}, {k}]")
    mask = None
    if "weight_bitmask" in t:
        mask = pack.unpack_bitmask(t["weight_bitmask"], k)
        if int(mask.sum()) != meta["nnz"]:
            raise CheckpointError(f"{where}weight_bitmask keeps {int(mask.sum())} weights, "
                                  f"config.json says nnz={meta['nnz']}")
    if meta["bias"]:
        m.bias = nn.Parameter(t["bias"], requires_grad=isinstance(m, SparseLinear))
    if meta["kind"] == SPARSE:
        m.weight = nn.Parameter(torch.zeros(n, k, dtype=t["weight_values"].dtype)
                                .masked_scatter_(mask, t["weight_values"]))
        m.mask = mask
        return
    bits = meta["bits"]
    m.weight_scale = t["weight_scale"]
    m.weight_zero_point = (torch.full((n, k // meta["group_size"]), 2 ** (bits - 1),
                                      dtype=torch.uint8) if meta["symmetric"]
                           else pack.unpack_rows(t["weight_zero_point"], bits, n))
    if meta["g_idx"]:
        g_idx = t["weight_g_idx"]
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= k // meta["group_size"]):
            raise CheckpointError(f"{where}weight_g_idx holds groups outside "
                                  f"[0, {k // meta['group_size']})")
        m.weight_g_idx = g_idx
    if mask is None:
        m.weight_packed = t["weight_packed"]
    else:
        codes = _zero_codes(m.weight_zero_point, m.weight_g_idx, meta["group_size"], k)
        kept = pack.unpack(t["weight_kept_packed"][None], bits, meta["nnz"])[0]
        m.weight_packed = pack.pack(codes.masked_scatter(mask, kept), bits)
        m.weight_bitmask = t["weight_bitmask"]
    m.prepare()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json: unknown dtype {name!r}")
    return dtype


# ============================================================================ config.json


def _ct_weights_args(meta: dict[str, Any]) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` for one quantized layer."""
    per_channel = meta["group_size"] == meta["in_features"]
    args = {"num_bits": meta["bits"], "type": "int", "symmetric": meta["symmetric"],
            "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else meta["group_size"], "dynamic": False}
    if meta["g_idx"]:
        args["actorder"] = "group"
    return args


def _quantization_config(layers: dict[str, dict[str, Any]], dense_linears: list[str],
                         readable: bool, recipe: Recipe | None) -> dict[str, Any]:
    """``config.json["quantization_config"]``: compressed-tensors' schema plus our metadata."""
    groups: dict[str, dict[str, Any]] = {}
    for name, meta in layers.items():
        if meta["kind"] != QUANTIZED:
            continue
        args = _ct_weights_args(meta)
        key = json.dumps(args, sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": args,
                                        "input_activations": None, "output_activations": None,
                                        "format": "pack-quantized"})
        group["targets"].append(f"re:^{re.escape(name)}$")
    from . import __version__

    return {
        "quant_method": "compressed-tensors" if readable else "fxcompress",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": dense_linears,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "fxcompress": {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "layers": layers,
        },
    }


# ============================================================================ save


def save(model: nn.Module, path: str | Path, *, tokenizer: Any = None,
         max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``model`` (compressed by :func:`fxcompress.compile`) to the folder ``path``.

    Hugging Face models get their config, generation config and tokenizer files (from
    ``tokenizer`` or the folder the model was loaded from) so the folder is a complete
    model; any other model gets a ``config.json`` holding only the quantization config and
    is loaded back with ``load(path, build=...)``. Returns the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    compressed = _compressed_layers(model)
    layers = {name: _layer_meta(m) for name, m in compressed.items()}
    tensors, tied = _tensors(model, compressed, layers)
    transposed = _transposed_layers(model, compressed)
    readable = all(meta["kind"] == QUANTIZED for meta in layers.values()) and not transposed
    dense = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    recipe = getattr(getattr(model, "fxcompress_report", None), "recipe", None) \
        or getattr(model, "fxcompress_recipe", None)
    qconfig = _quantization_config(layers, dense, readable, recipe)
    qconfig["fxcompress"]["tied"] = tied
    for stale in [path / CONFIG_NAME, *path.glob("model*.safetensors"), path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    _write_shards(tensors, path, _parse_size(max_shard_size))
    _copy_side_files(model, path, tokenizer)
    _write_config(model, path, qconfig)  # last: a folder without it is not a checkpoint
    log.info("fxcompress: saved %d compressed layers to %s", len(layers), path)
    return path


def _compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    experts = [n for n, m in model.named_modules() if isinstance(m, (QuantExperts, SparseExperts))]
    if experts:
        raise NotImplementedError(
            f"saving compressed experts ({experts[0]}, ...) is not supported yet: their "
            f"checkpoint layout (per expert, under the names vLLM's MoE loaders expect) is "
            f"still to be written. Keep the model in memory, or export it with "
            f"fxcompress.export / torch.export")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (QuantLinear, SparseLinear))}
    if not layers:
        raise ValueError("the model has no compressed layers: run fxcompress.compile first "
                         "(a dense model is saved with its own save_pretrained/state_dict)")
    return layers


def _tensors(model: nn.Module, compressed: dict[str, nn.Module],
             layers: dict[str, dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor to store, by full name, and the tied aliases ``{alias: stored name}``."""
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in compressed or value is None:
            continue
        if id(value) in seen:
            tied[name] = seen[id(value)]
            continue
        seen[id(value)] = name
        out[name] = value
    for name, m in compressed.items():
        for local, t in _encode(m, layers[name]).items():
            out[f"{name}.{local}"] = t
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}, tied


def _transposed_layers(model: nn.Module, compressed: dict[str, nn.Module]) -> list[str]:
    """Compressed layers that replaced a Hugging Face ``Conv1D`` (weight stored (in, out) in
    the original model): compressed-tensors cannot read those."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    try:
        skeleton = _skeleton_from_config(config, type(model))
        return [name for name in compressed
                if type(skeleton.get_submodule(name)).__name__ == "Conv1D"]
    except Exception as e:  # a model class we cannot rebuild: do not claim compatibility
        log.warning("fxcompress.save: cannot rebuild %s from its config (%s); the checkpoint "
                    "is marked fxcompress-only", type(model).__name__, e)
        return list(compressed)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'/'500MB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _write_shards(tensors: dict[str, Tensor], path: Path, limit: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        crcs = json.dumps({k: _crc(t) for k, t in shard.items()})
        save_file(shard, str(path / name), metadata={"format": "pt", CRC_KEY: crcs})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(model: nn.Module, path: Path, tokenizer: Any) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    source_dir = Path(source) if source else None
    if source_dir is not None and source_dir.is_dir() and source_dir.resolve() != path.resolve():
        for name in COPIED_FILES:
            if (source_dir / name).is_file() and not (path / name).exists():
                shutil.copy2(source_dir / name, path / name)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(path)


def _write_config(model: nn.Module, path: Path, qconfig: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        if not data.get("architectures"):
            data["architectures"] = [type(model).__name__]
    data["quantization_config"] = qconfig
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, default=str)
                                    + "\n")


# ============================================================================ load


@dataclass(frozen=True)
class _Stored:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    crc: int | None


def load(path: str | Path, build: Callable[[], nn.Module] | None = None, *,
         verify: bool = True) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save`, without recalibration.

    Hugging Face models are built from ``config.json`` (its ``architectures``); any other
    model needs ``build``, a function returning the uncompressed model (it is called on the
    meta device, so it allocates nothing). Every tensor's presence, dtype and shape is checked
    against that model before any is read, and (``verify``) its CRC-32 as it is read; a bad
    checkpoint raises :class:`CheckpointError` naming the file and tensor. The model comes back
    on CPU in eval mode with its kernel layouts prepared.
    """
    path = Path(path)
    config = _read_config(path)
    fx = config["quantization_config"]["fxcompress"]
    layers, tied = fx["layers"], fx.get("tied", {})
    recipe = _recipe(path, fx["recipe"]) if fx.get("recipe") is not None else None
    stored = _read_headers(path)
    model = _skeleton(path, config, build)
    _install_stubs(model, layers)
    _check(model, layers, tied, stored)
    _read_into(model, layers, stored, verify)
    for alias, source in tied.items():
        _set_tensor(model, alias, _get_tensor(model, source))
    _check_materialised(model, path)
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
    for name, meta in fx["layers"].items():
        _check_layer_meta(file, name, meta)
    return config


def _check_layer_meta(file: Path, name: str, meta: Any) -> None:
    need = {"kind", "in_features", "out_features", "bias"}
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind in (QUANTIZED, SPARSE_QUANTIZED):
        need |= {"bits", "group_size", "symmetric", "g_idx"}
    if kind in (SPARSE, SPARSE_QUANTIZED):
        need |= {"nnz"}
    if kind not in (QUANTIZED, SPARSE_QUANTIZED, SPARSE) or not need <= set(meta):
        raise CheckpointError(f"{file}: layer {name!r} has an invalid entry {meta!r}")
    if kind != SPARSE and (meta["bits"] not in pack.SUPPORTED_BITS
                           or meta["in_features"] % meta["group_size"]):
        raise CheckpointError(f"{file}: layer {name!r} has an invalid grid (bits="
                              f"{meta['bits']}, group_size={meta['group_size']})")


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        return [path / f for f in sorted(set(weight_map.values()))]
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return [path / WEIGHTS_NAME]


def _read_headers(path: Path) -> dict[str, _Stored]:
    """Every tensor of every shard, from the headers only; duplicates and index entries that
    point to the wrong file are errors."""
    stored: dict[str, _Stored] = {}
    for file in _shard_files(path):
        for name, info in read_header(file).items():
            if name in stored:
                raise CheckpointError(f"tensor {name} is stored twice: in {stored[name].file} "
                                      f"and in {file}")
            stored[name] = info
    index = path / INDEX_NAME
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in stored or stored[name].file.name != file:
                raise CheckpointError(f"{index} lists tensor {name} in {file}, which does "
                                      f"not hold it")
    return stored


def read_header(file: Path) -> dict[str, _Stored]:
    """Parse and validate one safetensors header: every tensor must lie inside the file and
    have as many bytes as its dtype and shape say. Raises :class:`CheckpointError`."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated: {size} bytes, no safetensors "
                                      f"header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{file} is truncated or corrupted: its header claims "
                                      f"{n} bytes but the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        near = _entry_before(raw, getattr(e, "pos", None))
        raise CheckpointError(f"{file} has a corrupted safetensors header"
                              + (f" in the entry of tensor {near}" if near else "")
                              + f": {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupted safetensors header")
    meta = header.pop("__metadata__", None) or {}
    try:
        crcs = json.loads(meta.get(CRC_KEY, "{}"))
    except ValueError as e:
        raise CheckpointError(f"{file}: corrupted {CRC_KEY} metadata: {e}") from e
    return {name: _check_entry(file, name, info, 8 + n, size, crcs.get(name))
            for name, info in header.items()}


def _entry_before(raw: bytes, pos: int | None) -> str | None:
    """The name of the last tensor entry that starts before byte ``pos`` of a header."""
    if pos is None:
        return None
    keys = re.findall(rb'[{,]\s*"([^"\\]+)"', raw[:pos])
    names = [k for k in keys if k.decode(errors="replace") not in HEADER_KEYS]
    return names[-1].decode(errors="replace") if names else None


def _check_entry(file: Path, name: str, info: Any, start: int, size: int, crc: int | None
                 ) -> _Stored:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: tensor {name} has a corrupted header entry "
                              f"{info!r}") from e
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes or begin < 0:
        raise CheckpointError(f"{file}: tensor {name} spans bytes [{begin}, {end}) but "
                              f"{info['dtype']}{list(shape)} needs {nbytes}")
    if start + end > size:
        raise CheckpointError(f"{file} is truncated: tensor {name} needs bytes up to "
                              f"{start + end}, the file has {size}")
    return _Stored(file, dtype, shape, crc)


def _skeleton(path: Path, config: dict[str, Any], build: Callable[[], nn.Module] | None
              ) -> nn.Module:
    """The uncompressed model, parameters on the meta device (buffers real: they are small
    and some, like rotary tables, are not in the checkpoint)."""
    from accelerate import init_empty_weights

    if build is not None:
        with init_empty_weights(include_buffers=False):
            return build()
    if not config.get("architectures") or "model_type" not in config:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a Hugging Face config (no "
                              f"architectures/model_type): pass build=<function returning the "
                              f"uncompressed model> to fxcompress.load")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types for a bad config
        raise CheckpointError(f"{path / CONFIG_NAME}: transformers cannot read it: {e}") from e
    return _skeleton_from_config(hf_config, None)


def _skeleton_from_config(hf_config: Any, cls: type | None) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    if cls is None:
        arch = (hf_config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(include_buffers=False):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(hf_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def _install_stubs(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace each compressed layer's original module with an empty compressed one, after
    checking the original's shape against the layer entry."""
    for name, meta in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"config.json names compressed layer {name}, which the "
                                  f"model built from the config does not have") from None
        w = getattr(old, "weight", None)
        shape = None if w is None else tuple(w.shape)
        if type(old).__name__ == "Conv1D" and shape is not None:
            shape = shape[::-1]
        if shape != (meta["out_features"], meta["in_features"]):
            raise CheckpointError(
                f"config.json: layer {name} is a {type(old).__name__} with weight {shape} in "
                f"the model built from the config, but the checkpoint stores "
                f"({meta['out_features']}, {meta['in_features']}) (out, in)")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _stub(meta))


def _check(model: nn.Module, layers: dict[str, dict[str, Any]], tied: dict[str, str],
           stored: dict[str, _Stored]) -> None:
    """Every expected tensor is stored with the right dtype and shape; nothing else is."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner not in layers and name not in tied and value is not None:
            expected[name] = (tuple(value.shape), None)  # dense: any float dtype
    for name, meta in layers.items():
        expected.update({f"{name}.{k}": v for k, v in _expected(meta).items()})
    for name, (shape, dtype) in expected.items():
        if name not in stored:
            raise CheckpointError(f"missing tensor {name}: not found in {_files(stored)}")
        s = stored[name]
        if s.shape != shape:
            raise CheckpointError(f"{s.file}: tensor {name} has shape {list(s.shape)}, the "
                                  f"model built from config.json expects {list(shape)}")
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


def _files(stored: dict[str, _Stored]) -> str:
    files = sorted({str(s.file) for s in stored.values()})
    return ", ".join(files) if files else "the checkpoint"


def _read_into(model: nn.Module, layers: dict[str, dict[str, Any]],
               stored: dict[str, _Stored], verify: bool) -> None:
    """Read the tensors, file by file, into ``model``."""
    from safetensors import safe_open

    by_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    for file in sorted({s.file for s in stored.values()}):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name, s in stored.items():
                    if s.file != file:
                        continue
                    t = _get(f, file, name, s, verify)
                    owner, _, local = name.rpartition(".")
                    if owner in by_layer:
                        by_layer[owner][local] = t
                    else:
                        _set_tensor(model, name, t)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read: {e}") from e
    for name, meta in layers.items():
        where = f"{stored[name + '.weight_shape'].file}: {name}."
        _fill(model.get_submodule(name), meta, by_layer[name], where)


def _get(f: Any, file: Path, name: str, s: _Stored, verify: bool) -> Tensor:
    try:
        t = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e
    if verify and s.crc is not None and _crc(t) != s.crc:
        raise CheckpointError(f"{file}: tensor {name} is corrupted (CRC-32 mismatch)")
    return t


def _get_tensor(model: nn.Module, name: str) -> Tensor:
    owner, _, local = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, local)


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, local = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if local in module._parameters:
        old = module._parameters[local]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old is None or old.requires_grad)
        module._parameters[local] = value
    else:
        module._buffers[local] = value


def _check_materialised(model: nn.Module, path: Path) -> None:
    left = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: no stored value for {', '.join(left[:5])}"
                              + (" ..." if len(left) > 5 else ""))


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if b is not None)
