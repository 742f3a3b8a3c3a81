"""The GPTQ / SparseGPT sweeps written as in the papers' reference code: right-looking, eager
rank-1 updates inside a block, ``Cholesky(H⁻¹)`` formed explicitly. Used as the oracle that
fxcompress's left-looking sweep must reproduce, and as the baseline of the solver-speed
benchmark.

The quantization grid is written here too, from the GPTQ reference's ``Quantizer`` (IST-DASLab
``gptq/quant.py``), not imported from ``fxcompress.algorithms.grid``: an oracle sharing the
grid under test could not see a bug in it."""

from __future__ import annotations

import torch
from torch import Tensor

FP16_MIN_NORMAL = 2.0**-14
FP16_MANTISSA_BITS = 10


def fp16_ceil(x: Tensor) -> Tensor:
    """The least float16 value >= ``x`` (positive, normal range), as float32. fxcompress stores
    scales in float16 and rounds them up when fitting, so that the stored grid still spans the
    row; the reference does the same (its own way: one float16 step above the rounded value
    where rounding went down), so that results stay comparable code for code."""
    h = x.half().float()
    step = torch.exp2(torch.floor(torch.log2(h)) - FP16_MANTISSA_BITS)  # float16 ulp at h
    return torch.where(h < x, h + step, h)


def find_params(x: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """``Quantizer.find_params`` for each row of ``x``: the range ``[min(x, 0), max(x, 0)]``,
    ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; symmetric grids span
    ``[-max|x|, max|x|]`` with ``zero = (maxq + 1) / 2``; an all-zero row gets ``[-1, 1]``.
    (The paper's code keeps ``xmin = 0`` for a symmetric row without negatives; fxcompress's
    documented grid is symmetric about zero for every row, which is what is checked here.)
    Scales are at least float16's smallest normal, rounded up to float16."""
    x = x.float()
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = fp16_ceil(torch.clamp((xmax - xmin) / maxq, min=FP16_MIN_NORMAL))
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The reference's ``quantize``: ``scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)``
    — the dequantized value, as the sweeps use it."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def find_group_params(w: Tensor, bits: int, group_size: int, sym: bool
                      ) -> tuple[Tensor, Tensor]:
    """One grid per row and group of ``group_size`` consecutive columns: ``(rows, groups)``."""
    rows, cols = w.shape
    scale, zero = find_params(w.reshape(rows * (cols // group_size), group_size), bits, sym)
    return scale.reshape(rows, -1), zero.reshape(rows, -1)


def _inverse_factor(h: Tensor, w: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    h, w = h.clone(), w.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), w


def gptq(w: Tensor, h: Tensor, bits: int, group_size: int = -1, sym: bool = False,
         act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
         block_size: int = 128) -> tuple[Tensor, float]:
    """Returns (Ŵ, loss)."""
    rows, cols = w.shape
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order \
        else torch.arange(cols)
    gs = cols if group_size == -1 else group_size
    hinv, W = _inverse_factor(h[perm][:, perm], w[:, perm], damp)
    original = torch.empty_like(W)
    original[:, perm] = W
    static = find_group_params(original, bits, gs, sym)
    Q = torch.zeros_like(W)
    losses = 0.0
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if gs == cols or (act_order and static_groups):
                g = int(perm[j]) // gs
                scale, zero = static[0][:, g], static[1][:, g]
            elif j % gs == 0:
                cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                scale, zero = find_params(cur, bits, sym)
            wj, d = W1[:, i], hinv1[i, i]
            q = quantize(wj, scale, zero, bits)
            Q[:, j] = q
            losses += float(((wj - q) ** 2 / d**2).sum()) / 2
            e = (wj - q) / d
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out, losses


def sparsegpt(w: Tensor, h: Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
              bits: int | None = None, damp: float = 0.01, block_size: int = 128
              ) -> tuple[Tensor, float]:
    """Returns (Ŵ, loss); joint quantization is per-channel (as in the reference)."""
    rows, cols = w.shape
    hinv, W = _inverse_factor(h, w, damp)
    if bits:
        scale, zero = find_params(W, bits, sym=False)
    Q = torch.zeros_like(W)
    losses = 0.0
    total = rows * cols * sparsity
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        keep = torch.ones_like(W1, dtype=torch.bool)
        if n_m is None:
            score = W1**2 / torch.diag(hinv1)[None, :] ** 2
            k = round(total * i2 / cols) - round(total * i1 / cols)
            keep.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                score = W1[:, i:i + m] ** 2 / torch.diag(hinv1)[i:i + m][None, :] ** 2
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                keep[:, i:i + m].scatter_(1, drop, False)
            wj, d = W1[:, i], hinv1[i, i]
            q = wj * keep[:, i]
            if bits:
                q = quantize(q, scale, zero, bits)
            Q[:, i1 + i] = q
            losses += float(((wj - q) ** 2 / d**2).sum()) / 2
            e = (wj - q) / d
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q, losses
