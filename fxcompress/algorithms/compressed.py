"""``Compressed``: what an algorithm returns for one linear layer.

Everything needed to rebuild the compressed weight exactly, in plain tensors: integer codes
with their grid (scales, zero points, group index) for quantized layers, a keep-mask for
pruned ones, dense kept values for pruned-but-not-quantized ones, and the loss the algorithm
measured. Packing into storage layouts happens elsewhere (``kernels/pack.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import grid


@dataclass
class Compressed:
    shape: tuple[int, int]  # (out_features, in_features)
    loss: float  # ‖(W - Ŵ) Xᵀ‖² / n as the algorithm measured it (inf-free)
    codes: Tensor | None = None  # uint8 (out, in), 0 <= code < 2**bits
    scale: Tensor | None = None  # float32 (out, groups), float16-representable
    zero: Tensor | None = None  # uint8 (out, groups)
    g_idx: Tensor | None = None  # int32 (in,): group of each input column
    bits: int | None = None
    group_size: int | None = None  # effective size (in_features for per-channel)
    sym: bool = False
    mask: Tensor | None = None  # bool (out, in): True where the weight is kept
    values: Tensor | None = None  # float32 (out, in): pruned, not quantized weights
    damp: float | None = None  # relative damping that was used (None: no Hessian)

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def static_groups(self) -> bool:
        """True when column k is in group k // group_size (no index needed at inference)."""
        if self.g_idx is None:
            return True
        natural = torch.arange(self.shape[1], device=self.g_idx.device) // self.group_size
        return bool(torch.equal(self.g_idx.long(), natural))

    def dense(self) -> Tensor:
        """The compressed weight as a dense float32 ``(out, in)`` matrix."""
        if self.codes is not None:
            g = self.g_idx.long()
            w = grid.dequantize(self.codes, grid.expand(self.scale, g),
                                grid.expand(self.zero.float(), g))
            return w if self.mask is None else w * self.mask
        if self.values is not None:
            return self.values
        raise ValueError("Compressed holds neither codes nor values")

    def sparsity(self) -> float:
        return 0.0 if self.mask is None else 1.0 - self.mask.float().mean().item()
