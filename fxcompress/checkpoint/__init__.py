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

How each kind of compressed layer is stored is its codec's business
(:mod:`fxcompress.checkpoint.codecs`); ``docs/FORMAT.md`` documents every tensor.

**Writing** (:class:`~.writer.CheckpointWriter`) appends tensors to raw shard parts in a
partial folder beside the target as they are made, then turns the parts into safetensors files,
writes the index, side files and ``config.json``, and swaps the folder into place — one atomic
exchange of the two folders where the OS has one (Linux) — so a crash at any point leaves the
old checkpoint or the new one (:mod:`.swap`). The streamed path commits a progress record as it
goes (:mod:`.progress`), so an interrupted run can be resumed.

**Loading** (:mod:`.loading`) reads ``config.json`` and every safetensors header first and
checks every tensor's presence, dtype and shape against the model rebuilt from ``config.json``
on the meta device; then it reads every tensor, checking its CRC-32, and decodes every
compressed layer; only then is anything assigned to the model. Folders are untrusted input: a
file named by an index or a progress record must lie inside its folder
(:func:`~fxcompress.paths.inside_folder`), a config's sizes are checked against the headers
before anything is allocated, and a checkpoint of ours must carry its CRC-32s. A bad checkpoint
fails with the file and tensor named and leaves no half-loaded model. Packed tensors are
assigned as they are, without materialising dense float weights.

The rooms: :mod:`.names` (the folder's file names), :mod:`.safetensors_io` (headers, reading
with CRC-32 checks, writing a file from a raw part), :mod:`.swap`, :mod:`.progress`,
:mod:`.writer` (``CheckpointWriter``, ``PartialCheckpoint``, ``save``), :mod:`.hf`
(``config.json``, ``quantization_config``, the model skeleton), :mod:`.loading`, :mod:`.model`
(the model's tensors and modules by name) and :mod:`.codecs` (one codec per layer kind).
"""

from .codecs import DEFAULT_SPARSE_LAYOUT, SPARSE_LAYOUTS, CheckpointError
from .hf import check_model_sizes
from .loading import load
from .names import CONFIG_NAME, DEFAULT_SHARD_SIZE, INDEX_NAME, WEIGHTS_NAME
from .progress import ResumeError, check_no_partial, partial_dir, resumable
from .safetensors_io import read_header, shard_files
from .writer import CheckpointWriter, PartialCheckpoint, check_sparse_layout, save

__all__ = ["CONFIG_NAME", "DEFAULT_SHARD_SIZE", "DEFAULT_SPARSE_LAYOUT", "INDEX_NAME",
           "SPARSE_LAYOUTS", "WEIGHTS_NAME", "CheckpointError", "CheckpointWriter",
           "PartialCheckpoint", "ResumeError", "check_model_sizes", "check_no_partial",
           "check_sparse_layout", "load", "partial_dir", "read_header", "resumable", "save",
           "shard_files"]

