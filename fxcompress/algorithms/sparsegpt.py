"""SparseGPT: prune (and optionally quantize) a weight column by column with OBS corrections.

Names follow Algorithm 1 of Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot" (ICML 2023):

=============  ==========================================================================
paper          here
=============  ==========================================================================
``W``, ``H``   ``w`` (out, in) and ``h = 2 XᵀX / n`` damped by ``damp · mean(diag H)``
``B_s``        ``cfg.block_size``: mask-selection block (unstructured sparsity)
``M``          ``keep`` (transposed): True where a weight survives
``p``          ``cfg.sparsity``; ``n_m = (N, M)`` keeps N of every M inputs
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

from ..recipe import SparseGPT
from . import grid
from .admm import admm_prune
from .compressed import Compressed
from .hessian import WeightedCross, factor
from .sweep import Sweep


def sparsegpt(w: Tensor | Sequence[Tensor], h: Tensor, cfg: SparseGPT = SparseGPT(),
              name: str | None = None, cross: Tensor | WeightedCross | None = None) -> Compressed:
    """Prune ``w`` (out, in) given its input Hessian ``h`` (in, in); with the cross moment
    ``cross`` of dense-output calibration, fit the dense layer's output (``hessian.factor``).

    A sequence of weights sharing ``h`` is swept as one stacked weight (see ``gptq``); with
    N:M sparsity the parts then equal their own solves, while unstructured masks are chosen
    over all the stacked rows together. With ``cfg.solver == "admm"`` the mask and kept
    weights come from ``admm_prune``, and a quantized result is the sweep over those weights
    with that mask fixed."""
    cols = h.shape[0]
    if cfg.n_m is not None and cols % cfg.n_m[1]:
        raise ValueError(f"{cfg.n_m[0]}:{cfg.n_m[1]} sparsity needs in_features divisible by "
                         f"{cfg.n_m[1]}, got {cols}" + (f" (layer {name!r})" if name else ""))
    fixed = None
    if cfg.solver == "admm":
        w = w if isinstance(w, Tensor) else torch.cat(list(w))  # stacked parts: one problem
        pruned = admm_prune(w, h, cfg.sparsity, cfg.n_m, name=name, cross=cross)
        if cfg.quant is None:
            return pruned
        # the kept weights are the least-squares optimum for the mask: quantizing them with
        # the plain objective ‖X̃(Q - Ẑ)ᵀ‖² is the same problem (the cross term vanishes)
        original, w, cross = w, pruned.values, None
        fixed = pruned.mask.t().contiguous()
    q = cfg.quant
    gs = grid.check(q.bits, q.group_size, cols) if q else cols
    f = factor(w, h, cfg.damp, name, cross)
    rows, dev = f.wt.shape[1], f.wt.device
    if q:
        scale_t, zero_t = (torch.stack(t) for t in zip(*(
            grid.fit(f.wt[g0:g0 + gs].t(), q.bits, q.sym, q.mse) for g0 in range(0, cols, gs)),
            strict=True))
        codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=dev)
    else:
        values_t = torch.empty_like(f.wt)

    sweep = Sweep(f, cfg.block_size)
    keep = torch.ones(cols, rows, dtype=torch.bool, device=dev) if fixed is None else fixed
    total = rows * cols * cfg.sparsity
    for j in range(cols):
        if fixed is not None:  # the mask is given
            pass
        elif cfg.n_m is None and j % cfg.block_size == 0:
            j1 = min(j + cfg.block_size, cols)
            score = sweep.current(j, j1).square_() / sweep.d(j, j1)[:, None].square()
            k = round(total * j1 / cols) - round(total * j / cols)
            drop = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
            keep[j:j1].view(-1)[drop] = False
        elif cfg.n_m is not None and j % cfg.n_m[1] == 0:
            n, m = cfg.n_m
            score = sweep.current(j, j + m).square_() / sweep.d(j, j + m)[:, None].square()
            drop = torch.topk(score, m - n, dim=0, largest=False, sorted=False).indices
            keep[j:j + m].scatter_(0, drop, False)
        if q and gs < cols and j % gs == 0:
            s, z = grid.fit(sweep.current(j, j + gs).t(), q.bits, q.sym, q.mse)
            scale_t[j // gs], zero_t[j // gs] = s, z
        wj = sweep.column()
        if q:
            g = j // gs
            c = torch.where(keep[j], grid.quantize(wj, scale_t[g], zero_t[g], q.bits),
                            zero_t[g])
            codes_t[j] = c
            sweep.commit(wj, grid.dequantize(c, scale_t[g], zero_t[g]))
        else:
            sweep.commit(wj, torch.mul(wj, keep[j], out=values_t[j]))
    row_loss, damp = sweep.row_loss(), f.damp
    del sweep, f

    mask = keep.t().contiguous()
    del keep
    out = Compressed(shape=(rows, cols), loss=float(row_loss.sum()), row_loss=row_loss,
                     mask=mask, damp=damp)
    if not q:
        out.values = values_t.t().contiguous()
        return out
    out.codes = codes_t.t().contiguous()
    out.scale = scale_t.t().contiguous()
    out.zero = zero_t.t().to(torch.uint8).contiguous()
    out.g_idx = (torch.arange(cols, device=dev) // gs).to(torch.int32)
    out.bits, out.group_size, out.sym = q.bits, gs, q.sym
    if fixed is not None:  # the loss of pruning and quantizing together, on the original W
        delta = original.to(h.dtype) - out.dense().to(h.dtype)
        out.row_loss = 0.5 * ((delta @ h) * delta).sum(1)
        out.loss = float(out.row_loss.sum())
    return out
