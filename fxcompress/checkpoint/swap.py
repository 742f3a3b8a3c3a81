"""Putting a finished checkpoint folder in place: flushing it to disk, keeping what the old
folder held besides a checkpoint, and swapping the two folders so that a crash at any point
leaves the old checkpoint or the new one, never a mixture.

Linux exchanges two folders in one atomic step (``renameat2(RENAME_EXCHANGE)``); elsewhere the
old folder is renamed aside first, and ``load`` names what a crash between the two renames
left behind.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import logging
import os
import shutil
import sys
from pathlib import Path

from .names import CONFIG_NAME, INDEX_NAME, PROGRESS

log = logging.getLogger(__name__)


def _owned(name: str) -> bool:
    """Whether a file name belongs to a checkpoint (replaced as a whole, never carried over)."""
    return name in (CONFIG_NAME, INDEX_NAME, PROGRESS) or fnmatch.fnmatch(name,
                                                                          "model*.safetensors")


def carry_over(old: Path, new: Path) -> None:
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


def sync_folder(folder: Path) -> None:
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


def swap_into_place(partial: Path, out: Path) -> None:
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

