"""osmem: what the operating system holds of this process — handing freed heap back, giving a
file's pages back, reading the resident set.

Tensors freed by a run stay in glibc's heap (blocks below its dynamic mmap threshold, up to
32 MiB each) and count as resident memory; weights transformers maps from a safetensors file
stay resident after the run last reads them. A calibration run that promises a peak under
``max_memory`` has to give both back, and the memory estimate needs to know what the process
already holds. Everything here is Linux/glibc specific and does nothing elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
from collections.abc import Sequence
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim()
TRIM_SLACK = 256 << 20  # the most the heap may grow inside a calibration run between trims
_trimmed_at = 0  # resident bytes after the last trim


def trim_slack(estimate: int, budget: int | str | None) -> int:
    """How far a run lets the resident set grow past the last trim (see
    :func:`release_freed_memory`): not at all under a memory budget; else a quarter of its
    estimated peak, at most ``TRIM_SLACK``, so that the peak stays within the estimate's 25 %."""
    return 0 if budget is not None else min(TRIM_SLACK, estimate // 4)


def release_freed_memory(slack: int = 0) -> None:
    """Hand memory freed by tensors back to the OS (glibc keeps freed blocks below its
    dynamic mmap threshold in its heap, where they count as RSS).

    With ``slack``, only once the resident set has grown by more than that since the last
    trim: a trimmed block is faulted in again page by page when the next chunk reuses it, so
    trimming after every chunk costs a run a large share of its time in page faults
    (benchmarks/RESULTS.md, "Trims only past a slack")."""
    global _trimmed_at
    if _TRIM is None or slack and resident_bytes() <= _trimmed_at + slack:
        return
    _TRIM(0)
    _trimmed_at = resident_bytes()


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (clean file pages are dropped)
_madvise: Any = None


def file_mapped(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor lies in a private mapping of a regular file (Linux
    ``/proc/self/maps``; all False elsewhere). transformers maps a safetensors checkpoint
    this way when it loads it at its stored dtype: such a weight's pages are the file's
    until something writes to them."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return [False] * len(tensors)
    ranges = []
    for line in lines:  # "lo-hi perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0" \
                and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))

    def mapped(t: Tensor) -> bool:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return False
        a = t.data_ptr()
        return any(lo <= a and a + t.numel() * t.element_size() <= hi for lo, hi in ranges)
    return [mapped(t) for t in tensors]


def page_out(t: Tensor) -> None:
    """Give this process's pages of ``t`` back (``madvise(MADV_PAGEOUT)``, whole pages inside
    it only). Values are kept: a clean file page is read from the file again if touched, and a
    written one stays (without swap) or is swapped. Nothing happens where madvise is missing."""
    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    a, b = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    a, b = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE, b // mmap.PAGESIZE * mmap.PAGESIZE
    if b > a and _madvise(a, b - a, _MADV_PAGEOUT) != 0:
        log.debug("madvise(MADV_PAGEOUT) failed (errno %d): pages kept", ctypes.get_errno())


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where there is
    none): what the memory estimate adds for the program and modules a run has built before
    it estimates."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError, ImportError):
        return 0
