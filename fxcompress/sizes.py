"""Byte sizes as users write them: ``max_shard_size="5GB"``, ``max_memory="6GiB"``.

One parser for every size fxcompress accepts, so that the same spelling means the same number
of bytes everywhere: an ``int`` of bytes, or a number with an optional unit — ``B``, decimal
``KB``/``MB``/``GB``/``TB`` (powers of 1000, as Hugging Face's ``max_shard_size``) or binary
``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024) — in any letter case, with or without a space.
"""

from __future__ import annotations

import re

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: int | str, what: str = "a size") -> int:
    """The number of bytes ``size`` stands for: an ``int``, or a string like ``"6GiB"``,
    ``"500MB"``, ``"1.5 GiB"`` or ``"4096"``. ``what`` names the argument in the error raised
    for anything else (a unit not listed above, a negative or zero size, a non-integer type)."""
    expected = (f"{what} must be a positive number of bytes or a string like '6GiB', '500MB' "
                f"or '1.5 GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"{expected}, got {size!r} ({type(size).__name__})")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.fullmatch(size)
        unit = (m.group(2) or "B").upper() if m else None
        if unit not in UNITS:
            raise ValueError(f"{expected}, got {size!r}")
        n = int(float(m.group(1)) * UNITS[unit])
    if n <= 0:
        raise ValueError(f"{expected}, got {size!r}")
    return n


def human(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB, for messages and reports."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
