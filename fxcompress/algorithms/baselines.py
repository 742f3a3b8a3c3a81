"""Baselines without a Hessian: round-to-nearest and magnitude pruning.

Every quality table shows them next to GPTQ and SparseGPT, on the same grids and masks, so
that the gain of the second-order methods is measured rather than assumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import grid
from .compressed import Compressed
from .grid import Grid


def rtn(w: Tensor, g: Grid, mask: Tensor | None = None) -> Compressed:
    """Round each weight to the nearest point of its group's grid (pruned weights to zero)."""
    rows, cols = w.shape
    gs = grid.check(g.bits, g.group_size, cols)
    w = w.float()
    scale, zero = grid.fit_groups(w, g.bits, gs, g.sym, g.mse)
    g_idx = (torch.arange(cols, device=w.device) // gs).to(torch.int32)
    s, z = grid.expand(scale, g_idx), grid.expand(zero, g_idx)
    codes = grid.quantize(w, s, z, g.bits)
    if mask is not None:
        codes = torch.where(mask, codes, z)
    return Compressed(shape=(rows, cols), loss=float("nan"), codes=codes.to(torch.uint8),
                      scale=scale, zero=zero.to(torch.uint8), g_idx=g_idx, bits=g.bits,
                      group_size=gs, sym=g.sym, mask=mask)


def magnitude_mask(w: Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None
                   ) -> Tensor:
    """Keep-mask removing the smallest |w|: exactly ``round(sparsity · numel)`` weights per
    layer, or all but the N largest of every M consecutive inputs."""
    rows, cols = w.shape
    score = w.abs()
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)  # contiguous, even for a
    # transposed (Conv1D) weight view
    if n_m is None:
        k = round(sparsity * w.numel())
        drop = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
        keep.view(-1)[drop] = False
        return keep
    n, m = n_m
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    drop = torch.topk(score.reshape(rows, cols // m, m), m - n, dim=2, largest=False).indices
    return keep.reshape(rows, cols // m, m).scatter_(2, drop, False).reshape(rows, cols)


def magnitude(w: Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
              quant: Grid | None = None) -> Compressed:
    """Magnitude pruning, with round-to-nearest of the kept weights onto ``quant``."""
    mask = magnitude_mask(w, sparsity, n_m)
    if quant is not None:
        return rtn(w, quant, mask)
    return Compressed(shape=tuple(w.shape), loss=float("nan"), mask=mask,
                      values=w.float() * mask)
