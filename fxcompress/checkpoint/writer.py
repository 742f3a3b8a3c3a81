"""The one checkpoint writer, for ``fxcompress.save`` and the streamed ``compress_checkpoint``
alike, and ``save`` itself.

Tensors are appended to raw shard parts in a partial folder beside the target as they are
made (a streamed run never holds the model), committed with a progress record
(:mod:`~fxcompress.checkpoint.progress`) so an interrupted run can be resumed, and only at the
end turned into safetensors files (:mod:`~fxcompress.checkpoint.safetensors_io`) with the
index, side files and ``config.json`` (:mod:`~fxcompress.checkpoint.hf`) beside them;
then the folder is swapped into place (:mod:`~fxcompress.checkpoint.swap`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import hub
from ..recipe import Recipe
from ..sizes import parse_size
from .codecs import DEFAULT_SPARSE_LAYOUT, SPARSE_LAYOUTS, Entry, codec_for, codec_of
from .hf import copy_side_files, quantization_config, write_config
from .model import compressed_layers, dense_tensors
from .names import DEFAULT_SHARD_SIZE, INDEX_NAME, PROGRESS, WEIGHTS_NAME
from .progress import check_no_partial, fresh_state, partial_dir, read_progress, resumable
from .safetensors_io import CODES, DTYPES, write_safetensors
from .swap import carry_over, swap_into_place, sync_folder

log = logging.getLogger(__name__)


class PartialCheckpoint:
    """A checkpoint being written, as far as its progress record goes: the tensors and layers
    committed so far (what a resumed run reads back). Read-only: ranks other than the writer
    open the partial folder with this."""

    def __init__(self, out_dir: str | Path, state: dict | None = None):
        self.out_dir, self.folder = Path(out_dir).resolve(), partial_dir(out_dir)
        if state is None:
            state = read_progress(self.folder) if (self.folder / PROGRESS).is_file() \
                else fresh_state(None)
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
    :data:`~fxcompress.checkpoint.codecs.SPARSE_LAYOUTS`). :meth:`commit` makes everything
    added so far durable and records it in ``progress.json`` (tensor offsets and CRC-32s,
    finished layers), which is what ``resume`` trusts: bytes after the last commit are cut
    off. :meth:`finish` turns each part
    into a safetensors file — header first, tensors ordered by alignment (the file order
    safetensors itself uses) — writes the index, side files and ``config.json``, and swaps the
    folder into place (:func:`swap_into_place`). :meth:`discard` removes the partial folder.
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
            state = fresh_state(fingerprint)
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
        copy_side_files(model, self.folder, tokenizer)
        write_config(model, self.folder,
                      quantization_config(model, layers, recipe, to_checkpoint))
        carry_over(self.out_dir, self.folder)
        sync_folder(self.folder)
        swap_into_place(self.folder, self.out_dir)
        return self.out_dir

    def _write_shards(self, to_checkpoint: hub.Rename) -> None:
        """The safetensors files, each tensor under the name the model's own checkpoints
        give it (``to_checkpoint``)."""
        shards = self.state["shards"]
        names = [WEIGHTS_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            tensors = {to_checkpoint(t): v for t, v in shard["tensors"].items()}
            write_safetensors(self.folder / shard["part"], tensors, self.folder / name)
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


def check_sparse_layout(layout: str) -> None:
    """Refuse an unknown ``sparse_layout`` before any work is done."""
    if layout not in SPARSE_LAYOUTS:
        raise ValueError(f"sparse_layout={layout!r}: choose one of {', '.join(SPARSE_LAYOUTS)}")


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
    deleted unless ``overwrite``: :class:`~.progress.ResumeError` instead. Returns the folder.

    ``sparse_layout`` says how pruned layers are stored (:data:`~fxcompress.checkpoint.codecs.
    SPARSE_LAYOUTS`): ``"dense"`` (the default) as engines read them — a plain weight holding
    its zeros, or ``pack-quantized`` codes with pruned weights at the zero point — or
    ``"bitmask"``, a keep-mask and the kept values only (smaller, read by
    :func:`~.loading.load` alone).
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
