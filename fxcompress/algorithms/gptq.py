"""OPTQ / GPTQ: quantize a weight column by column, correcting the later columns for the error.

Names follow Algorithm 1 of Frantar et al., "OPTQ: Accurate Quantization for Generative
Pre-trained Transformers" (ICLR 2023):

=============  ==========================================================================
paper          here
=============  ==========================================================================
``W``          ``w`` (out, in): rows are output channels, columns input features
``H``          ``h = 2 XᵀX / n``, damped by ``λ = damp · mean(diag H)``
``H⁻¹``        never formed: ``H = V Vᵀ`` (``hessian.factor``), ``Cholesky(H⁻¹) = V⁻¹``
``B``          ``cfg.block_size``: the lazy-batch width (``sweep.Sweep``)
``Q``          ``codes`` with ``scale``/``zero`` per (row, group)
``E``          the per-column error ``(w_j - q_j) / [H⁻¹]_jj`` inside ``Sweep``
``quant(·)``   ``grid.quantize`` then ``grid.dequantize``
=============  ==========================================================================

Groups are fitted on the *current* (already corrected) weights when the sweep reaches their
first column. With ``act_order`` the columns are visited by decreasing ``diag H``; static
groups are fitted on the original weights before the sweep so that the stored ``g_idx`` is
the natural ``k // group_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..recipe import GPTQ
from . import grid
from .compressed import Compressed
from .hessian import factor
from .sweep import Sweep


def gptq(w: Tensor, h: Tensor, cfg: GPTQ = GPTQ(), name: str | None = None,
         cross: Tensor | None = None) -> Compressed:
    """Quantize ``w`` (out, in) given its input Hessian ``h`` (in, in); with the cross moment
    ``cross`` of dense-output calibration, fit the dense layer's output (``hessian.factor``)."""
    rows, cols = w.shape
    gs = grid.check(cfg.bits, cfg.group_size, cols)
    groups = cols // gs
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if cfg.act_order \
        else torch.arange(cols, device=w.device)
    f = factor(w[:, perm], h[perm][:, perm], cfg.damp, name,
               None if cross is None else cross[perm][:, perm])

    # Group parameters fitted before the sweep (per-channel, or act-order static groups).
    dynamic = gs < cols and not (cfg.act_order and cfg.static_groups)
    scale = torch.zeros(rows, groups, device=w.device)
    zero = torch.zeros(rows, groups, device=w.device)
    col_group = torch.arange(cols, device=w.device) // gs  # group of each swept column
    if not dynamic:
        original = torch.empty_like(f.w)
        original[:, perm] = f.w
        scale, zero = grid.fit_groups(original, cfg.bits, gs, cfg.sym, cfg.mse)
        col_group = col_group[perm]  # group of the original column that is swept j-th
    scale_t, zero_t = scale.t().contiguous(), zero.t().contiguous()

    block = (max(cfg.block_size // gs, 1) * gs) if dynamic else cfg.block_size
    sweep = Sweep(f.w, f.v, block)
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)
    maxq = 2**cfg.bits - 1
    for j, g in enumerate(col_group.tolist()):
        if dynamic and j % gs == 0:
            s, z = grid.fit(sweep.current(j, j + gs).t(), cfg.bits, cfg.sym, cfg.mse)
            scale_t[g], zero_t[g] = s, z
        s, z = scale_t[g], zero_t[g]
        wj = sweep.column()
        c = torch.div(wj, s).round_().add_(z).clamp_(0, maxq)  # grid.quantize, in place
        sweep.commit(wj, (c - z).mul_(s))
        codes_t[j] = c

    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    codes[:, perm] = codes_t.t()
    g_idx = torch.empty(cols, dtype=torch.int32, device=w.device)
    g_idx[perm] = col_group.to(torch.int32)
    row_loss = sweep.row_loss()
    return Compressed(
        shape=(rows, cols), loss=float(row_loss.sum()), row_loss=row_loss, codes=codes,
        scale=scale_t.t().contiguous(),
        zero=zero_t.t().to(torch.uint8).contiguous(), g_idx=g_idx, bits=cfg.bits,
        group_size=gs, sym=cfg.sym, damp=f.damp,
    )
