"""Safetensors files, byte by byte: their headers (parsed and checked as untrusted input),
the shard files and index of a folder, reading every tensor with its CRC-32 checked, and
writing a file from the raw part the writer appended tensors to.

The safetensors library reads tensors, but neither checks a header against the file's size
before anything is allocated nor knows our CRC-32s: both are done here so that a corrupted or
hostile file fails with the file and tensor named.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import hub
from ..paths import inside_folder
from .codecs import CheckpointError
from .names import INDEX_NAME, WEIGHTS_NAME

CRC_KEY = "fxcompress.crc32"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
HEADER_KEYS = {"__metadata__", "dtype", "shape", "data_offsets", "format", CRC_KEY}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    crc: int | None
    key: str = ""  # its name in the file, where the model names it otherwise



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


def read_shards(path: Path) -> dict[str, StoredTensor]:
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


def by_model_name(path: Path, shards: dict[str, StoredTensor], to_model: hub.Rename
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



def check_checksums(shards: dict[str, StoredTensor]) -> None:
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



def read_all(stored: dict[str, StoredTensor], verify: bool) -> dict[str, Tensor]:
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



def write_safetensors(part: Path, tensors: dict[str, list], out: Path) -> None:
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

