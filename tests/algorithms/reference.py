"""The GPTQ / SparseGPT sweeps written as in the papers' reference code: right-looking, eager
rank-1 updates inside a block, ``Cholesky(H⁻¹)`` formed explicitly. Used as the oracle that
fxcompress's left-looking sweep must reproduce, and as the baseline of the solver-speed
benchmark."""

from __future__ import annotations

import torch
from torch import Tensor

from fxcompress.algorithms import grid


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
    static = grid.fit_groups(original, bits, gs, sym)
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
                scale, zero = grid.fit(cur, bits, sym)
            wj, d = W1[:, i], hinv1[i, i]
            q = grid.dequantize(grid.quantize(wj, scale, zero, bits), scale, zero)
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
        scale, zero = grid.fit(W, bits, sym=False)
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
                q = grid.dequantize(grid.quantize(q, scale, zero, bits), scale, zero)
            Q[:, i1 + i] = q
            losses += float(((wj - q) ** 2 / d**2).sum()) / 2
            e = (wj - q) / d
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q, losses
