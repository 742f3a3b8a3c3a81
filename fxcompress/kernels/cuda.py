"""CUDA paths of the fxcompress ops: Triton kernels launched with ``wrap_triton``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def quant_linear(x: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor,
                 g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int,
                 in_features: int) -> Tensor:
    from .ops import dequantize

    w = dequantize(w_packed, scale, zero, g_idx, bits, group_size, in_features)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
