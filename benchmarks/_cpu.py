"""The CPU features printed next to every speed figure and recorded with every results file.

They are the ones that decide what fxcompress runs on a CPU: AVX2 and AVX-512 for aten's int4
kernels, AVX512-BF16 and AMX for the bf16 calibration matmuls (``calibration_precision``),
so a number measured on one machine is read against the right ones on another.
"""

from __future__ import annotations

import re
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Those of :data:`FLAGS` this CPU has (none where ``/proc/cpuinfo`` is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(" + "|".join(FLAGS) + r")\b", text)))
