"""GGUF for llama.cpp: write an fxcompress checkpoint as a GGUF file that llama.cpp runs.

Each compressed layer kind says how its weight is stored in GGUF through :func:`encoder`: a
function from the module to ``(ggml type, raw blocks)``. GPTQ's grids that map onto a ggml
type exactly (Q4_0, Q4_1, Q8_0) are written as that type with the same codes and scales, and
layers solved on llama.cpp's own grids (K-quants) are written block for block.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

# (ggml type as gguf.GGMLQuantizationType's value, the tensor's raw bytes: uint8 of shape
# (rows, bytes per row), the layout gguf-py's GGUFWriter.add_tensor(raw_dtype=...) takes)
Encoded = tuple[int, np.ndarray]
Encoder = Callable[[nn.Module], Encoded]

ENCODERS: dict[type, Encoder] = {}


def encoder(cls: type) -> Callable[[Encoder], Encoder]:
    """Register how modules of class ``cls`` are written to GGUF."""

    def register(fn: Encoder) -> Encoder:
        ENCODERS[cls] = fn
        return fn

    return register
