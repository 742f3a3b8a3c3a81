"""The progress record of a checkpoint being written (``progress.json`` in its partial folder):
what a resumed run trusts, so it is checked entry by entry against the folder before anything
in it is opened, truncated or written.

A streamed compression takes hours: its writer commits the tensors and layers finished so far,
and an interrupted run continues from that record (``resume``) or is refused as a target for a
new one (:func:`check_no_partial`), so that no work is deleted by accident.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..paths import inside_folder
from .codecs import codec_of
from .names import PROGRESS
from .safetensors_io import DTYPES


class ResumeError(ValueError):
    """The partial output cannot be resumed (made by another job, or corrupted)."""


def partial_dir(out_dir: str | Path) -> Path:
    """Where a checkpoint for ``out_dir`` is written until it is complete: a hidden folder
    beside it (same file system, so that it can be renamed into place)."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f".{out_dir.name}.partial")


def read_progress(folder: Path) -> dict:
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
    state = read_progress(folder)
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


def fresh_state(fingerprint: str | None) -> dict:
    """The record of a checkpoint nothing has been written to yet."""
    return {"fingerprint": fingerprint, "shards": [], "layers": {}, "reports": {}}

