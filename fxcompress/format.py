"""Checkpoints: ``fxcompress.save(model, dir)``, ``fxcompress.load(dir)``, and the one writer
both ``save`` and the streamed ``compress_checkpoint`` use.

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

How each kind of compressed layer is stored is its codec's business (:mod:`fxcompress.codecs`);
``docs/FORMAT.md`` documents every tensor.

**Writing** (:class:`CheckpointWriter`) appends tensors to raw shard parts in a partial folder
beside the target as they are made, then turns the parts into safetensors files, writes the
index, side files and ``config.json``, and swaps the folder into place — one atomic exchange
of the two folders where the OS has one (Linux) — so a crash at any point leaves the old
checkpoint or the new one. The streamed path commits a progress record as it goes, so an
interrupted run can be resumed.

**Loading** reads ``config.json`` and every safetensors header first and checks every tensor's
presence, dtype and shape against the model rebuilt from ``config.json`` on the meta device;
then it reads every tensor, checking its CRC-32, and decodes every compressed layer; only then
is anything assigned to the model. Folders are untrusted input: a file named by an index or a
progress record must lie inside its folder (:func:`~fxcompress.paths.inside_folder`), a
config's sizes are checked against the headers before anything is allocated, and a checkpoint
of ours must carry its CRC-32s. A bad checkpoint fails with the file and tensor named and
leaves no half-loaded model. Packed tensors are assigned as they are, without materialising
dense float weights.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import hub
from .codecs import (
    DEFAULT_SPARSE_LAYOUT,
    SPARSE_LAYOUTS,
    CheckpointError,
    Entry,
    codec_for,
    codec_of,
    compressed_layers,
    dense_tensors,
    get_tensor,
    inside,
    set_tensor,
)
from .modules import set_module
from .passes.calibrate import release_freed_memory
from .paths import inside_folder
from .recipe import Recipe, RecipeError
from .sizes import parse_size

__all__ = ["CheckpointError", "CheckpointWriter", "PartialCheckpoint", "ResumeError", "load",
           "partial_dir", "read_header", "save"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROGRESS = "progress.json"
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
CODES = {dtype: code for code, dtype in DTYPES.items()}
HEADER_KEYS = {"__metadata__", "dtype", "shape", "data_offsets", "format", CRC_KEY}


class ResumeError(ValueError):
    """The partial output cannot be resumed (made by another job, or corrupted)."""


# ============================================================================ writing


def partial_dir(out_dir: str | Path) -> Path:
    """Where a checkpoint for ``out_dir`` is written until it is complete: a hidden folder
    beside it (same file system, so that it can be renamed into place)."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f".{out_dir.name}.partial")


def _read_progress(folder: Path) -> dict:
    """The progress record of the partial folder ``folder``, checked entry by entry against
    the folder before anything in it is opened or written (:func:`_check_progress`)."""
    if folder.is_symlink():
        raise ResumeError(f"{folder} is a symbolic link: a partial output is a folder of its "
                          f"own; remove it or start again with overwrite")
    try:
        state = json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{folder / PROGRESS} cannot be read: {e}") from e
    if not isinstance(state, dict) or not {"fingerprint", "shards", "layers",
                                           "reports"} <= set(state):
        raise ResumeError(f"{folder / PROGRESS} is not a progress record of fxcompress")
    _check_progress(folder, state)
    return state


def _check_progress(folder: Path, state: dict) -> None:
    """A resumed run truncates, reads, converts and deletes the parts the record names, and
    writes the final files beside them: every part must be a file of its own inside the folder,
    as long as the record says, every tensor must lie inside its part with the bytes its dtype
    and shape need, every layer must be a valid entry whose tensors are recorded, and the folder
    must hold nothing else. Raises :class:`ResumeError` naming the entry."""
    file = folder / PROGRESS
    if not isinstance(state["fingerprint"], str | None) or not isinstance(state["shards"], list) \
            or not isinstance(state["layers"], dict) or not isinstance(state["reports"], dict) \
            or not all(isinstance(r, dict) for r in state["reports"].values()):
        raise ResumeError(f"{file} is not a progress record of fxcompress")
    parts: set[str] = set()
    recorded: dict[str, list] = {}
    for i, shard in enumerate(state["shards"], 1):
        what = f"{file}: shard {i}"
        if not isinstance(shard, dict) or set(shard) != {"part", "size", "tensors"} \
                or not _count(shard["size"]) or not isinstance(shard["tensors"], dict):
            raise ResumeError(f"{what} is not a shard record: {str(shard)[:200]}")
        part = inside_folder(folder, shard["part"], ResumeError, f"{what}'s part")
        if part.name in parts or part.parent != folder or not part.is_file() \
                or part.is_symlink():
            raise ResumeError(f"{what}'s part {shard['part']!r} is not a file of its own in "
                              f"{folder}")
        if part.stat().st_size < shard["size"]:
            raise ResumeError(f"{what}'s part {part.name} has {part.stat().st_size} bytes, the "
                              f"record says {shard['size']}: the partial output is damaged")
        parts.add(part.name)
        for name, entry in shard["tensors"].items():
            problem = _tensor_problem(entry, shard["size"])
            if problem is not None:
                raise ResumeError(f"{what}: tensor {name} has {problem}")
            recorded[name] = entry
    for name, entry in state["layers"].items():
        codec = codec_of(entry)
        problem = f"an invalid entry {entry!r}" if codec is None else codec.entry_problem(entry)
        for local, (shape, dtype) in ({} if problem else codec.expected(entry)).items():
            t = recorded.get(f"{name}.{local}")
            if t is None or tuple(t[1]) != tuple(shape) or dtype not in (None, DTYPES[t[0]]):
                problem = f"tensor {local} missing or not {dtype}{list(shape)}"
                break
        if problem is not None:
            raise ResumeError(f"{file}: layer {name!r} has {problem}")
    _check_partial_files(folder, parts)


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def _tensor_problem(entry: object, size: int) -> str | None:
    """What is wrong with a ``[dtype code, shape, begin, end, crc]`` record of a part of
    ``size`` bytes, or None."""
    if not isinstance(entry, list) or len(entry) != 5:
        return f"a corrupted record {str(entry)[:200]}"
    code, shape, begin, end, crc = entry
    if code not in DTYPES or not isinstance(shape, list) or not all(map(_count, shape)) \
            or not all(map(_count, (begin, end, crc))):
        return f"a corrupted record {str(entry)[:200]}"
    nbytes = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != nbytes or end > size:
        return (f"bytes [{begin}, {end}) of a {size}-byte part, but {code}{shape} needs "
                f"{nbytes}")
    return None


# what a partial folder holds besides its parts: the record, the frontier snapshots
_PARTIAL_FILES = {PROGRESS: False, PROGRESS + ".tmp": False, "frontier": True,
                  "frontier.tmp": True, "frontier.old": True}


def _check_partial_files(folder: Path, parts: set[str]) -> None:
    """The partial folder holds only what fxcompress writes there, and no links: the final
    shards, index and config are written into it, and must never be written through a link."""
    for item in folder.iterdir():
        is_dir = _PARTIAL_FILES.get(item.name, False if item.name in parts else None)
        if is_dir is None or item.is_symlink() or (item.is_dir() if is_dir is False
                                                   else not item.is_dir()):
            raise ResumeError(f"{folder} holds {item.name!r}, which is not a file fxcompress "
                              f"wrote there: the partial output was altered; remove it or "
                              f"start again with overwrite")


def resumable(out_dir: str | Path, fingerprint: str | None) -> dict | None:
    """The checked progress record of ``out_dir``'s partial output if it continues the job
    ``fingerprint`` names; None where there is none; :class:`ResumeError` for one of another
    job or one that fails the checks (:func:`_check_progress`). Opens nothing but the record."""
    folder = partial_dir(out_dir)
    if not (folder / PROGRESS).is_file():
        return None
    state = _read_progress(folder)
    if state["fingerprint"] != fingerprint:
        raise ResumeError(f"{folder} holds a partial compression of another model, recipe or "
                          f"calibration set; remove it or start again with overwrite")
    return state


def check_no_partial(out_dir: str | Path, hint: str = "resume=True to continue it, or "
                     "overwrite=True to delete it and start again") -> None:
    """Refuse to start a new checkpoint of ``out_dir`` over an interrupted run's partial output
    (hours of work): :class:`ResumeError` naming the folder and ``hint`` (what to pass). A
    partial folder without a progress record holds nothing to resume (a save that died) and
    is not in the way."""
    folder = partial_dir(out_dir)
    if (folder / PROGRESS).exists() or (folder / PROGRESS).is_symlink():
        raise ResumeError(f"{folder} holds the partial output of an interrupted run into "
                          f"{Path(out_dir)}; pass {hint}")


def _fresh_state(fingerprint: str | None) -> dict:
    return {"fingerprint": fingerprint, "shards": [], "layers": {}, "reports": {}}


class PartialCheckpoint:
    """A checkpoint being written, as far as its progress record goes: the tensors and layers
    committed so far (what a resumed run reads back). Read-only: ranks other than the writer
    open the partial folder with this."""

    def __init__(self, out_dir: str | Path, state: dict | None = None):
        self.out_dir, self.folder = Path(out_dir).resolve(), partial_dir(out_dir)
        if state is None:
            state = _read_progress(self.folder) if (self.folder / PROGRESS).is_file() \
                else _fresh_state(None)
        self.state = state

    @property
    def layers(self) -> dict[str, Entry]:
        """The ``config.json`` entry of every compressed layer written, by name."""
        return self.state["layers"]

    @property
    def reports(self) -> dict[str, dict]:
        """What the caller recorded with each layer (:meth:`CheckpointWriter.add_layer`)."""
        return self.state["reports"]

    @property
    def written(self) -> set[str]:
        return {name for shard in self.state["shards"] for name in shard["tensors"]}

    def read(self, name: str) -> Tensor:
        """A committed tensor, read back from its part file."""
        for shard in self.state["shards"]:
            if name in shard["tensors"]:
                code, shape, begin, end, _ = shard["tensors"][name]
                with open(self.folder / shard["part"], "rb") as f:
                    f.seek(begin)
                    data = bytearray(f.read(end - begin))
                dtype = DTYPES[code]
                if not data:
                    return torch.empty(shape, dtype=dtype)
                return torch.frombuffer(data, dtype=dtype).reshape(shape)
        raise KeyError(name)

    def read_layer(self, name: str) -> nn.Module:
        """A committed compressed layer, decoded by its codec."""
        entry = self.layers[name]
        codec = codec_of(entry)
        tensors = {local: self.read(f"{name}.{local}") for local in codec.expected(entry)}
        return codec.decode(entry, tensors, f"{self.folder}: {name}.")


class CheckpointWriter(PartialCheckpoint):
    """Writes the checkpoint folder ``out_dir``, for ``save`` and the streamed path alike.

    Tensors are appended, as they are made, to raw ``.part`` files of at most ``shard_size``
    bytes in :func:`partial_dir`; compressed layers go through their codec
    (:meth:`add_layer`), pruned ones in ``sparse_layout`` (one of
    :data:`~fxcompress.codecs.SPARSE_LAYOUTS`). :meth:`commit` makes everything added so far
    durable and records it in ``progress.json`` (tensor offsets and CRC-32s, finished
    layers), which is what
    ``resume`` trusts: bytes after the last commit are cut off. :meth:`finish` turns each part
    into a safetensors file — header first, tensors ordered by alignment (the file order
    safetensors itself uses) — writes the index, side files and ``config.json``, and swaps the
    folder into place (:func:`_swap_into_place`). :meth:`discard` removes the partial folder.
    """

    def __init__(self, out_dir: str | Path, shard_size: int | str = DEFAULT_SHARD_SIZE, *,
                 fingerprint: str | None = None, resume: bool = False, overwrite: bool = False,
                 hint: str | None = None, sparse_layout: str = DEFAULT_SPARSE_LAYOUT):
        check_sparse_layout(sparse_layout)
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a folder: a checkpoint is a "
                                     f"folder")
        cwd = Path.cwd().resolve()
        if out.resolve() in (cwd, *cwd.parents):
            raise ValueError(f"{out} is the working directory or holds it: a checkpoint "
                             f"replaces its folder when complete, so write it to another one")
        self.shard_size = parse_size(shard_size, "max_shard_size")
        self.folder = partial_dir(out)
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the "
                             "partial output, overwrite deletes it")
        if not resume and not overwrite:
            check_no_partial(out, *([hint] if hint else []))
        state = self._resume(out, fingerprint) if resume else None
        if state is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            state = _fresh_state(fingerprint)
        super().__init__(out, state)
        self.sparse_layout = sparse_layout
        self._file: Any = None

    def _resume(self, out: Path, fingerprint: str | None) -> dict | None:
        state = resumable(out, fingerprint)
        if state is None:
            log.info("fxcompress: nothing to resume in %s, starting afresh", self.folder)
            return None
        for shard in state["shards"]:  # cut off what was written after the last commit
            os.truncate(self.folder / shard["part"], shard["size"])
        return state

    def add(self, name: str, t: Tensor) -> None:
        """Append one tensor, stored as it is under ``name``."""
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
        data = t.reshape(-1).view(torch.uint8).numpy() if nbytes else b""
        self._file.write(data)
        begin = shard["size"]
        shard["tensors"][name] = [CODES[t.dtype], list(t.shape), begin, begin + nbytes,
                                  zlib.crc32(data) if nbytes else 0]
        shard["size"] += nbytes

    def add_layer(self, name: str, m: nn.Module, report: dict | None = None) -> None:
        """Append the compressed module ``m`` (the layer ``name``) as its codec stores it, and
        record its entry (and ``report``, kept for a resumed run)."""
        codec = codec_for(m)
        if codec is None:
            raise TypeError(f"{name} is a {type(m).__name__}, which no codec stores")
        entry = codec.describe_as(m, self.sparse_layout)
        for local, t in codec.encode(m, entry).items():
            self.add(f"{name}.{local}", t)
        self.layers[name] = entry
        if report is not None:
            self.reports[name] = report

    def commit(self) -> None:
        """Make what was added durable and record it in ``progress.json``."""
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

    def finish(self, model: nn.Module, recipe: Recipe | None = None, tokenizer: Any = None
               ) -> Path:
        """Complete the checkpoint of ``model`` (whose compressed layers were added; any
        module, a meta-device skeleton included) and put it in place of ``out_dir``."""
        self._close()
        order = [name for name, _ in model.named_modules() if name in self.layers]
        if len(order) != len(self.layers):
            raise ValueError(f"layers {sorted(set(self.layers) - set(order))[:5]} were "
                             f"written but are not modules of the model")
        layers = {name: self.layers[name] for name in order}
        to_checkpoint, _ = hub.renamings(model)
        self._write_shards(to_checkpoint)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        _copy_side_files(model, self.folder, tokenizer)
        _write_config(model, self.folder,
                      quantization_config(model, layers, recipe, to_checkpoint))
        _carry_over(self.out_dir, self.folder)
        _sync(self.folder)
        _swap_into_place(self.folder, self.out_dir)
        return self.out_dir

    def _write_shards(self, to_checkpoint: hub.Rename) -> None:
        """The safetensors files, each tensor under the name the model's own checkpoints
        give it (``to_checkpoint``)."""
        shards = self.state["shards"]
        names = [WEIGHTS_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            tensors = {to_checkpoint(t): v for t, v in shard["tensors"].items()}
            _write_safetensors(self.folder / shard["part"], tensors, self.folder / name)
            (self.folder / shard["part"]).unlink()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s["size"] for s in shards)},
                     "weight_map": {to_checkpoint(t): n for n, s in zip(names, shards, strict=True)
                                    for t in s["tensors"]}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def discard(self) -> None:
        """Remove the partial folder (the target is left as it was)."""
        self._close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_safetensors(part: Path, tensors: dict[str, list], out: Path) -> None:
    """A safetensors file holding ``tensors`` (``[dtype code, shape, begin, end, crc]`` in the
    raw ``part``), their CRC-32s in the metadata."""
    entries = sorted(tensors.items(), key=lambda kv: -DTYPES[kv[1][0]].itemsize)
    header: dict[str, Any] = {}
    offset = 0
    for name, (code, shape, begin, end, _) in entries:
        header[name] = {"dtype": code, "shape": shape,
                        "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    header["__metadata__"] = {"format": "pt", CRC_KEY: json.dumps(
        {name: entry[4] for name, entry in entries})}
    raw = json.dumps(header, separators=(",", ":")).encode()  # compact, as safetensors
    raw += b" " * (-len(raw) % 8)
    with open(part, "rb") as src, open(out, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)))
        dst.write(raw)
        dst.flush()
        for _, (_, _, begin, end, _) in entries:
            _copy_range(src, dst, begin, end - begin)


def _copy_range(src: Any, dst: Any, begin: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``begin`` to ``dst``: in the kernel where it can
    (``copy_file_range``), through a buffer otherwise."""
    if hasattr(os, "copy_file_range"):
        try:
            while count:
                n = os.copy_file_range(src.fileno(), dst.fileno(), count, begin)
                if n == 0:
                    raise CheckpointError(f"{src.name} ends before byte {begin + count}")
                begin, count = begin + n, count - n
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    src.seek(begin)
    while count:
        block = src.read(min(count, 64 << 20))
        if not block:
            raise CheckpointError(f"{src.name} ends before byte {begin + count}")
        dst.write(block)
        count -= len(block)
    dst.flush()


def check_sparse_layout(layout: str) -> None:
    if layout not in SPARSE_LAYOUTS:
        raise ValueError(f"sparse_layout={layout!r}: choose one of {', '.join(SPARSE_LAYOUTS)}")


def quantization_config(model: nn.Module, layers: dict[str, Entry], recipe: Recipe | None,
                        to_checkpoint: hub.Rename = str) -> dict[str, Any]:
    """``config.json["quantization_config"]``: compressed-tensors' schema plus our metadata.
    ``quant_method`` is ``"compressed-tensors"`` only if compressed-tensors can read every
    layer (its codec gives it a config group or stores it as plain linears, and it did not
    replace a transposed ``Conv1D``). ``targets`` and ``ignore`` name modules as the
    checkpoint does (``to_checkpoint``); our own ``layers`` entries keep the model's names.
    ``ignore`` lists every linear left unquantized, routers included (modules with their own
    2-D weight), and the pruned linears stored as plain ones; ``sparsity_config`` describes
    those (:func:`_sparsity_config`)."""
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
    from . import __version__

    return {
        "quant_method": "compressed-tensors" if readable else "fxcompress",
        "format": "pack-quantized" if groups or not readable else "dense",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": dense + plain,
        "kv_cache_scheme": None,
        "sparsity_config": _sparsity_config(model, layers, dense) if readable else {},
        "fxcompress": {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "layers": layers,
            "tied": dense_tensors(model, layers)[1],
        },
    }


def _sparsity_config(model: nn.Module, layers: dict[str, Entry], dense: list[str]
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
    weights += sum(_layer_weights(e) for e in layers.values())
    removed = sum(w - kept for w, kept, _ in pruned)
    structures = {s for _, _, s in pruned}
    unpruned = [name for name, e in layers.items() if codec_of(e).pruning(e) is None]
    return {"format": "dense", "targets": None, "ignore": dense + unpruned,
            "global_sparsity": removed / weights if weights else 0.0,
            "sparsity_structure": structures.pop() if len(structures) == 1 else "unstructured"}


def _layer_weights(entry: Entry) -> int:
    """Weights of one compressed layer (the product of its linears' shapes)."""
    if "out_features" in entry:
        return entry["out_features"] * entry["in_features"]
    if entry.get("kind") == "experts":
        return 3 * entry["num_experts"] * entry["hidden"] * entry["intermediate"]
    return 0


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
        skeleton = _skeleton_from_config(config, type(model))
        return [name for name in layers
                if type(skeleton.get_submodule(name)).__name__ == "Conv1D"]
    except Exception as e:  # a model class we cannot rebuild: do not claim compatibility
        log.warning("fxcompress: cannot rebuild %s from its config (%s); the checkpoint is "
                    "marked fxcompress-only", type(model).__name__, e)
        return list(layers)


def _copy_side_files(model: nn.Module, folder: Path, tokenizer: Any) -> None:
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


def _write_config(model: nn.Module, folder: Path, qconfig: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        if not data.get("architectures"):
            data["architectures"] = [type(model).__name__]
    data["quantization_config"] = qconfig
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, default=str)
                                      + "\n")


def _owned(name: str) -> bool:
    """Whether a file name belongs to a checkpoint (replaced as a whole, never carried over)."""
    return name in (CONFIG_NAME, INDEX_NAME, PROGRESS) or fnmatch.fnmatch(name,
                                                                          "model*.safetensors")


def _carry_over(old: Path, new: Path) -> None:
    """Keep what an existing target folder holds besides a checkpoint (a README, weights in
    another format, files the new checkpoint does not bring), as saving in place would:
    hard links where possible, copies otherwise."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        if _owned(item.name) or (new / item.name).exists() or (new / item.name).is_symlink():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, new / item.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, new / item.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if not Path(src).is_symlink():
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst, follow_symlinks=False)


def _sync(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk, so that the swap never
    exposes files whose data a power loss could still take."""
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_into_place(partial: Path, out: Path) -> None:
    """Make the complete folder ``partial`` the folder ``out``. A new ``out`` is one rename;
    an existing one is exchanged with ``partial`` in one atomic step where the OS can
    (Linux ``renameat2(RENAME_EXCHANGE)``), and the old checkpoint, now in ``partial``,
    removed. Elsewhere the old folder is first renamed aside to ``.<name>.old``: a crash between
    the two renames leaves it there (``load`` says so)."""
    if not out.exists():
        os.replace(partial, out)
    elif _exchange(partial, out):
        _remove(partial)
    else:
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(partial, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)
    _sync_dir(out.parent)


def _remove(folder: Path) -> None:
    try:
        shutil.rmtree(folder)
    except OSError as e:  # the new checkpoint is in place: only the old one lingers
        log.warning("fxcompress: could not remove the previous checkpoint in %s: %s", folder, e)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the OS or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) \
        if sys.platform.startswith("linux") else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _recipe_of(model: nn.Module) -> Recipe | None:
    return getattr(getattr(model, "fxcompress_report", None), "recipe", None) \
        or getattr(model, "fxcompress_recipe", None)


def save(model: nn.Module, path: str | Path, *, tokenizer: Any = None,
         max_shard_size: int | str = DEFAULT_SHARD_SIZE, overwrite: bool = False,
         sparse_layout: str = DEFAULT_SPARSE_LAYOUT) -> Path:
    """Write ``model`` (compressed by :func:`fxcompress.compile`) to the folder ``path``.

    Hugging Face models get their config, generation config and tokenizer files (from
    ``tokenizer`` or the folder the model was loaded from) so the folder is a complete
    model; any other model gets a ``config.json`` holding only the quantization config and
    is loaded back with ``load(path, build=...)``. The checkpoint is written beside ``path``
    and replaces it only when complete: an existing checkpoint there survives any failure, and
    the files it holds besides a checkpoint are kept. The partial output of an interrupted
    streamed run into ``path`` (:func:`fxcompress.streaming.compress_checkpoint`) is not
    deleted unless ``overwrite``: :class:`ResumeError` instead. Returns the folder.

    ``sparse_layout`` says how pruned layers are stored (:data:`~fxcompress.codecs.
    SPARSE_LAYOUTS`): ``"dense"`` (the default) as engines read them — a plain weight holding
    its zeros, or ``pack-quantized`` codes with pruned weights at the zero point — or
    ``"bitmask"``, a keep-mask and the kept values only (smaller, read by :func:`load` alone).
    """
    layers = compressed_layers(model)
    if not layers:
        raise ValueError("the model has no compressed layers: run fxcompress.compile first "
                         "(a dense model is saved with its own save_pretrained/state_dict)")
    writer = CheckpointWriter(path, max_shard_size, overwrite=overwrite,
                              hint="overwrite=True to delete it and save anyway",
                              sparse_layout=sparse_layout)
    try:
        names, _ = dense_tensors(model, layers)
        state = model.state_dict(keep_vars=True)
        for name in names:
            writer.add(name, state[name])
        for name, m in layers.items():
            writer.add_layer(name, m)
        writer.finish(model, _recipe_of(model), tokenizer)
    except BaseException:
        writer.discard()
        raise
    log.info("fxcompress: saved %d compressed layers to %s", len(layers), path)
    return Path(path)


# ============================================================================ loading


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    crc: int | None
    key: str = ""  # its name in the file, where the model names it otherwise


def load(path: str | Path, build: Callable[[], nn.Module] | None = None, *,
         verify: bool = True) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save`, without recalibration.

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
    shards = _read_shards(path)
    if build is not None:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = build()
    else:  # config.json is untrusted: nothing is allocated before its sizes are checked
        hf_config = _hf_config(path, config)
        model = _meta_skeleton(path, config, hf_config, shards)
    stored = _by_model_name(path, shards, hub.renamings(model)[1])
    _check_originals(model, layers, config)
    _check(_expected(model, layers, tied), tied, stored, config)
    if build is None:
        _check_buffers(path, model, stored, config)
        model = _skeleton_from_config(hf_config, type(model))  # buffers computed, sizes checked
    _check_complete(model, layers, tied, stored, path)
    if verify:
        _check_checksums(shards)
    tensors = _read_all(stored, verify)
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


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint folder ``path``: ``model.safetensors``, or the
    files its index maps tensors to — each checked to lie inside ``path`` before any is opened
    (:func:`~fxcompress.paths.inside_folder`). Raises :class:`CheckpointError`."""
    index = path / INDEX_NAME
    if index.is_file():
        files: dict[str, Path] = {}
        for key, name in _weight_map(index).items():
            if name not in files:
                files[name] = inside_folder(path, name, CheckpointError,
                                            f"{index}: the entry of tensor {key}")
        return [files[name] for name in sorted(files)]
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return [inside_folder(path, WEIGHTS_NAME, CheckpointError, f"{path}: {WEIGHTS_NAME}")]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map is not a map of tensor names to file "
                              f"names")
    return weight_map


def _read_shards(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of every shard, from the headers only, by its name in the file;
    duplicates are errors."""
    stored: dict[str, StoredTensor] = {}
    for file in shard_files(path):
        for key, info in read_header(file).items():
            if key in stored:
                raise CheckpointError(f"tensor {key} is stored twice: in {stored[key].file} "
                                      f"and in {file}")
            stored[key] = StoredTensor(info.file, info.dtype, info.shape, info.crc, key)
    return stored


def _by_model_name(path: Path, shards: dict[str, StoredTensor], to_model: hub.Rename
                   ) -> dict[str, StoredTensor]:
    """The tensors of ``shards`` by the name the model gives them (``to_model`` of the name
    in the file); two names for one tensor and index entries that point to the wrong file are
    errors."""
    stored: dict[str, StoredTensor] = {}
    for key, s in shards.items():
        name = to_model(key)
        if name in stored:
            raise CheckpointError(f"tensor {name} is stored twice: as {stored[name].key} "
                                  f"in {stored[name].file} and as {key} in {s.file}")
        stored[name] = s
    index = path / INDEX_NAME
    if index.is_file():
        for key, file in _weight_map(index).items():
            name = to_model(key)
            if name not in stored or stored[name].file != path / file:
                raise CheckpointError(f"{index} lists tensor {key} in {file}, which does "
                                      f"not hold it")
    return stored


def read_header(file: Path) -> dict[str, StoredTensor]:
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
                 ) -> StoredTensor:
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
    return StoredTensor(file, dtype, shape, crc)


def _hf_config(path: Path, config: dict[str, Any]) -> Any:
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


def _meta_skeleton(path: Path, config: dict[str, Any], hf_config: Any,
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
    :func:`load` bounds them, so ``config.json`` cannot make the build allocate terabytes;
    otherwise :class:`CheckpointError` naming the config fields."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} cannot be read as JSON: {e}") from e
    shards = _read_shards(path)
    model = _meta_skeleton(path, config, _hf_config(path, config), shards)
    stored = sum(math.prod(s.shape) for s in shards.values())
    params = list(model.parameters())
    if params and sum(p.numel() for p in params) > 2 * stored + (1 << 20):
        big = max(params, key=lambda p: p.numel())
        raise CheckpointError(f"{path / CONFIG_NAME}: "
                              + _disagreeing(config, tuple(big.shape),
                                             tuple(d for s in shards.values() for d in s.shape))
                              + f"the model it describes has {sum(p.numel() for p in params)} "
                              f"parameters (one of {list(big.shape)}), the checkpoint stores "
                              f"{stored}")
    _check_buffers(path, model, {n: s for n, s in shards.items()}, config)


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


def _disagreeing(config: dict[str, Any] | None, expected: Iterator[int] | tuple[int, ...],
                 found: Iterator[int] | tuple[int, ...]) -> str:
    """``"config.json: hidden_size=10**12 disagrees with the tensors: "`` — the fields whose
    values a model shape has and the checkpoint's does not; empty if none."""
    missing = set(expected) - set(found)
    fields = [f"{k}={v}" for k, v in _int_fields(config or {}) if v in missing]
    return (f"{CONFIG_NAME}: {', '.join(fields)} disagree{'s' if len(fields) == 1 else ''} "
            f"with the tensors: ") if fields else ""


def _check_buffers(path: Path, model: nn.Module, stored: dict[str, StoredTensor],
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
                              + _disagreeing(config, tuple(b.shape), ())
                              + f"the buffers the model computes would take {total} bytes "
                              f"({name}: {list(b.shape)}), more than twice the checkpoint's "
                              f"tensors")


def _check_checksums(shards: dict[str, StoredTensor]) -> None:
    """An fxcompress checkpoint carries a CRC-32 of every tensor: a shard without them was
    altered (or written by another tool) and is not read as if it were verified."""
    missing = [s for s in shards.values() if s.crc is None]
    if not missing:
        return
    file = missing[0].file
    if all(s.crc is None for s in shards.values() if s.file == file):
        raise CheckpointError(f"{file} has no {CRC_KEY} metadata, but config.json says "
                              f"fxcompress wrote it: its tensors cannot be verified "
                              f"(load(..., verify=False) reads them unverified)")
    raise CheckpointError(f"{file}: tensor {missing[0].key} has no CRC-32 in the {CRC_KEY} "
                          f"metadata: it cannot be verified (load(..., verify=False) reads it "
                          f"unverified)")


def _skeleton_from_config(hf_config: Any, cls: type | None) -> nn.Module:
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
            raise CheckpointError((_disagreeing(config, tuple(dims), tuple(_ints(entry)))
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
            raise CheckpointError(f"{_disagreeing(config, shape, s.shape)}{s.file}: tensor "
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


def _read_all(stored: dict[str, StoredTensor], verify: bool) -> dict[str, Tensor]:
    """Every stored tensor, file by file, its CRC-32 checked (``verify``)."""
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    for file in sorted({s.file for s in stored.values()}):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name, s in stored.items():
                    if s.file == file:
                        tensors[name] = _get(f, file, name, s, verify)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read: {e}") from e
    return tensors


def _get(f: Any, file: Path, name: str, s: StoredTensor, verify: bool) -> Tensor:
    try:
        t = f.get_tensor(s.key or name)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e
    if verify and s.crc is not None and _crc(t) != s.crc:
        raise CheckpointError(f"{file}: tensor {name} is corrupted (CRC-32 mismatch)")
    return t


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


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
