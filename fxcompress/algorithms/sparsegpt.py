"""SparseGPT: prune (and optionally quantize) a weight column by column with OBS corrections.

Names follow Algorithm 1 of Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot" (ICML 2023):

=============  ==========================================================================
paper          here
=============  ==========================================================================
``W``, ``H``   ``w`` (out, in) and ``h = 2 XᵀX / n`` damped by ``damp · mean(diag H)``
``B_s``        ``block_size``: mask-selection block (unstructured sparsity)
``M``          ``keep`` (transposed): True where a weight survives
``p``          ``sparsity``; ``n_m = (N, M)`` keeps N of every M inputs
``w²/[H⁻¹]²``  the OBS saliency ``score``: current weight² / d_j², d_j = [U]_jj
``E``          the error of column j, inside ``sweep.Sweep`` (shared with GPTQ)
=============  ==========================================================================

Unstructured masks are selected adaptively per block of ``B_s`` columns on the current
(corrected) weights, with exactly ``round(p · rows · cols)`` weights removed overall; N:M masks
are selected every M columns. With ``quant`` the kept weights are quantized in the same sweep,
their groups fitted when the sweep reaches them (as GPTQ does), so that pruning and
quantization errors are compensated together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import grid
from .admm import admm_prune
from .compressed import Compressed
from .grid import Grid
from .hessian import WeightedCross, factor
from .sweep import Sweep

SOLVERS = ("sweep", "admm")  # how the mask and the kept weights are chosen


def sparsegpt(w: Tensor | Sequence[Tensor], h: Tensor, sparsity: float = 0.5,
              n_m: tuple[int, int] | None = None, *, quant: Grid | None = None,
              damp: float = 0.01, block_size: int = 128, solver: str = "admm",
              name: str | None = None, cross: Tensor | WeightedCross | None = None,
              shrink: float = 0.0) -> Compressed:
    """Prune ``w`` (out, in) given its input Hessian ``h`` (in, in), and quantize the kept
    weights onto ``quant`` when given; with the cross moment ``cross`` of dense-output
    calibration, fit the dense layer's output (``hessian.factor``).

    A sequence of weights sharing ``h`` is swept as one stacked weight (see ``gptq``); with
    N:M sparsity the parts then equal their own solves, while unstructured masks are chosen
    over all the stacked rows together. With ``solver="admm"`` the mask and kept
    weights come from ``admm_prune``, and a quantized result is the sweep over those weights
    with that mask fixed."""
    cols = h.shape[0]
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"{n_m[0]}:{n_m[1]} sparsity needs in_features divisible by "
                         f"{n_m[1]}, got {cols}" + (f" (layer {name!r})" if name else ""))
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "admm":
        w = w if isinstance(w, Tensor) else torch.cat(list(w))  # stacked parts: one problem
        pruned = admm_prune(w, h, sparsity, n_m, name=name, cross=cross, shrink=shrink)
        if quant is None:
            return pruned
        # the kept weights are the least-squares optimum for the mask: quantizing them with
        # the plain objective ‖X̃(Q - Ẑ)ᵀ‖² is the same problem (the cross term vanishes)
        out = _sweep(pruned.values, h, sparsity, n_m, quant, damp, block_size, name, None,
                     pruned.mask.t().contiguous(), shrink)
        # the loss of pruning and quantizing together, on the original W
        delta = w.to(h.dtype) - out.dense().to(h.dtype)
        out.row_loss = 0.5 * ((delta @ h) * delta).sum(1)
        out.loss = float(out.row_loss.sum())
        return out
    return _sweep(w, h, sparsity, n_m, quant, damp, block_size, name, cross, None, shrink)


def _sweep(w: Tensor | Sequence[Tensor], h: Tensor, sparsity: float,
           n_m: tuple[int, int] | None, q: Grid | None, damp: float, block_size: int,
           name: str | None, cross: Tensor | WeightedCross | None, fixed: Tensor | None,
           shrink: float = 0.0) -> Compressed:
    """The paper's sweep: masks chosen on the current weights as the columns come (or the
    ``fixed`` keep-mask, transposed), kept weights rounded onto ``q``'s grid when given, every
    error spread over the later columns."""
    cols = h.shape[0]
    gs = grid.check(q.bits, q.group_size, cols) if q else cols
    hd = torch.diagonal(h).float() if q and q.mse == "hessian" else None  # clipping weights
    f = factor(w, h, damp, name, cross, shrink=shrink)
    rows, dev = f.wt.shape[1], f.wt.device
    scale_t = zero_t = None
    if q:
        scale_t, zero_t = (torch.stack(t) for t in zip(*(
            grid.fit(f.wt[g0:g0 + gs].t(), q.bits, q.sym, q.mse,
                     weight=grid.group_weight(hd, g0, gs))
            for g0 in range(0, cols, gs)), strict=True))
        out_t = torch.empty(cols, rows, dtype=torch.uint8, device=dev)  # codes
    else:
        out_t = torch.empty_like(f.wt)  # kept values

    sweep = Sweep(f, block_size)
    keep = torch.ones(cols, rows, dtype=torch.bool, device=dev) if fixed is None else fixed
    total = rows * cols * sparsity
    for j in range(cols):
        if fixed is None:
            _select(sweep, keep, j, n_m, block_size, total)
        if q and gs < cols and j % gs == 0:
            s, z = grid.fit(sweep.current(j, j + gs).t(), q.bits, q.sym, q.mse,
                            weight=grid.group_weight(hd, j, gs))
            scale_t[j // gs], zero_t[j // gs] = s, z
        wj = sweep.column()
        if q:
            g = j // gs
            c = torch.where(keep[j], grid.quantize(wj, scale_t[g], zero_t[g], q.bits),
                            zero_t[g])
            out_t[j] = c
            sweep.commit(wj, grid.dequantize(c, scale_t[g], zero_t[g]))
        else:
            sweep.commit(wj, torch.mul(wj, keep[j], out=out_t[j]))
    row_loss, damp = sweep.row_loss(), f.damp
    del sweep, f

    mask = keep.t().contiguous()
    del keep
    out = Compressed(shape=(rows, cols), loss=float(row_loss.sum()), row_loss=row_loss,
                     mask=mask, damp=damp)
    if not q:
        out.values = out_t.t().contiguous()
        return out
    out.codes = out_t.t().contiguous()
    out.scale = scale_t.t().contiguous()
    out.zero = zero_t.t().to(torch.uint8).contiguous()
    out.g_idx = (torch.arange(cols, device=dev) // gs).to(torch.int32)
    out.bits, out.group_size, out.sym = q.bits, gs, q.sym
    return out


def _select(sweep: Sweep, keep: Tensor, j: int, n_m: tuple[int, int] | None,
            block_size: int, total: float) -> None:
    """Drop, in ``keep`` (transposed), the weights of least OBS saliency among the current
    values: per block of ``block_size`` columns (unstructured, ``total`` spread evenly), or
    all but the N largest of every M inputs."""
    cols = keep.shape[0]
    if n_m is None and j % block_size == 0:
        j1 = min(j + block_size, cols)
        score = sweep.current(j, j1).square_() / sweep.d(j, j1)[:, None].square()
        k = round(total * j1 / cols) - round(total * j / cols)
        drop = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
        keep[j:j1].view(-1)[drop] = False
    elif n_m is not None and j % n_m[1] == 0:
        n, m = n_m
        score = sweep.current(j, j + m).square_() / sweep.d(j, j + m)[:, None].square()
        drop = torch.topk(score, m - n, dim=0, largest=False, sorted=False).indices
        keep[j:j + m].scatter_(0, drop, False)
