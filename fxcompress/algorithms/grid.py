"""Quantization grids: fit scale/zero, quantize to integer codes, dequantize.

Asymmetric grids map ``[min(x, 0), max(x, 0)]`` onto ``0 .. 2**bits - 1`` with an integer zero
point; symmetric grids use ``[-max|x|, max|x|]`` with the zero point fixed at ``2**(bits-1)``
(the GPTQ reference's convention, and compressed-tensors' signed storage shifted by that
offset). Scales are rounded up to float16 when they are fitted, because that is how they are
stored: the algorithms then see exactly the grid the kernels use.

Shapes: parameters are fitted per row of ``x``; ``fit_groups`` fits one set per
``group_size`` columns and returns ``(rows, groups)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import RecipeError

BITS = (2, 3, 4, 8)  # the widths the packed layouts and kernels store (``kernels/pack.py``)
FP16_TINY = 2.0**-14  # smallest normal float16: scales never underflow in storage


@dataclass(frozen=True)
class Grid:
    """A quantization grid as the solvers take it: plain values, so that ``algorithms`` needs
    no method configuration (the methods build one from theirs)."""

    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    sym: bool = False
    # clipping: False the min-max range; True the GPTQ reference's search of shrunken ranges;
    # "hessian" min and max shrunk apart, weighted by the Hessian's diagonal (solvers given H)
    mse: bool | str = False


def check(bits: int, group_size: int, columns: int) -> int:
    """Validate a grid for a ``columns``-wide weight; return the effective group size."""
    if bits not in BITS:
        raise RecipeError(f"bits must be one of {BITS}, got {bits}")
    if group_size == -1:
        return columns
    if group_size < 1 or columns % group_size:
        raise RecipeError(f"group_size {group_size} does not divide in_features {columns} "
                          f"(use a divisor of {columns}, or -1 for per-channel)")
    return group_size


def _round_up_fp16(x: Tensor) -> Tensor:
    """Smallest float16 value >= x, so that the stored grid still spans the fitted range."""
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def _params(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = _round_up_fp16(((xmax - xmin) / maxq).clamp_min(FP16_TINY))
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


MSE = (False, True, "hessian")  # the clipping searches ``fit`` knows (see ``Grid.mse``)
HESSIAN_SHRINKS = tuple(1 - i / 20 for i in range(11))  # 1, 0.95, .., 0.5 of min and of max


def fit(x: Tensor, bits: int, sym: bool, mse: bool | str = False, *, weight: Tensor | None = None,
        grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """Scale and zero point for each row of ``x`` (2-D); both are float32, zero holds integers.

    ``mse=True`` searches shrunken ranges ``p * [min, max]`` for the one with the least
    ``|x - q|**norm`` error, as the GPTQ reference does. ``mse="hessian"`` searches
    ``[a * min, b * max]`` with ``a`` and ``b`` each in ``HESSIAN_SHRINKS`` (``a = b`` on a
    symmetric grid) for the least ``Σ_j weight_j (x_j - q_j)²``, ``weight`` (one per column)
    being the Hessian's diagonal: the layer's output error if its inputs were uncorrelated.
    Shrinking the two ends apart fits the skewed groups that one factor cannot."""
    if mse not in MSE:
        raise ValueError(f"mse must be one of {MSE}, got {mse!r}")
    if (mse == "hessian") != (weight is not None):
        raise ValueError('mse="hessian" and a weight per column go together')
    x = x.float()
    maxq = 2**bits - 1
    xmin = x.min(1).values.clamp(max=0)
    xmax = x.max(1).values.clamp(min=0)
    scale, zero = _params(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    if weight is not None:
        pairs = [(a, a) for a in HESSIAN_SHRINKS] if sym else \
            [(a, b) for a in HESSIAN_SHRINKS for b in HESSIAN_SHRINKS]
        weight, norm = weight.float(), 2.0
    else:
        pairs = [(1 - i / grid,) * 2 for i in range(int(max_shrink * grid))]
    best = torch.full_like(scale, float("inf"))
    for a, b in pairs:
        s, z = _params(a * xmin, b * xmax, maxq, sym)
        err = (dequantize(quantize(x, s[:, None], z[:, None], bits), s[:, None], z[:, None]) - x)
        err = err.abs_().pow_(norm)
        err = (err @ weight) if weight is not None else err.sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def group_weight(hd: Tensor | None, j: int, gs: int) -> Tensor | None:
    """The clipping weights (``diag H``, ``mse="hessian"``) of columns ``j .. j+gs``; None
    without them."""
    return None if hd is None else hd[j:j + gs]


def fit_groups(w: Tensor, bits: int, group_size: int, sym: bool, mse: bool = False
               ) -> tuple[Tensor, Tensor]:
    """Fit one grid per row and group of ``group_size`` columns: ``(rows, groups)`` each."""
    rows, cols = w.shape
    gs = check(bits, group_size, cols)
    groups = cols // gs
    scale, zero = fit(w.reshape(rows * groups, gs), bits, sym, mse)
    return scale.reshape(rows, groups), zero.reshape(rows, groups)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, 2**bits - 1)`` (float tensor)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(codes - zero) * scale`` in float32."""
    return (codes.float() - zero) * scale


def expand(params: Tensor, g_idx: Tensor) -> Tensor:
    """Per-group parameters ``(rows, groups)`` to per-column ``(rows, cols)``."""
    return params[:, g_idx.long()]
