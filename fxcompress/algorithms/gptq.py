"""OPTQ / GPTQ: quantize a weight column by column, correcting the later columns for the error.

Names follow Algorithm 1 of Frantar et al., "OPTQ: Accurate Quantization for Generative
Pre-trained Transformers" (ICLR 2023):

=============  ==========================================================================
paper          here
=============  ==========================================================================
``W``          ``w`` (out, in): rows are output channels, columns input features
``H``          ``h = 2 XᵀX / n``, damped by ``λ = damp · mean(diag H)``
``H⁻¹``        never formed: ``H = V Vᵀ`` (``hessian.factor``), ``Cholesky(H⁻¹) = V⁻¹``
``B``          ``block_size``: the lazy-batch width (``sweep.Sweep``)
``Q``          ``codes`` with ``scale``/``zero`` per (row, group)
``E``          the per-column error ``(w_j - q_j) / [H⁻¹]_jj`` inside ``Sweep``
``quant(·)``   ``grid.quantize`` then ``grid.dequantize``
=============  ==========================================================================

Groups are fitted on the *current* (already corrected) weights when the sweep reaches their
first column. With ``act_order`` the columns are visited by decreasing ``diag H``; static
groups are fitted on the original weights before the sweep so that the stored ``g_idx`` is
the natural ``k // group_size``.

The sweep fixes each column once, correcting only the columns after it. ``refine`` then runs
that many cyclic passes of coordinate descent on the same objective ``½ tr(R H Rᵀ)``
(``R = W - Q``, ``H`` damped and shrunk as the sweep had it), with every grid held fixed: each
code moves to the grid point nearest its optimum given all the others, so the loss never
grows (the algorithm of QuantEase, Behdin et al. 2023, and of CDQuant, Nair & Suggala 2024,
started from GPTQ's solution). Unlike the sweep it lets a column answer the errors of the
columns after it.

``rescale`` finally refits the grids' scales to the codes: each row's dequantized weight is
linear in its groups' scales once the codes and zero points are fixed, so the scales that
minimise the same objective solve a small least-squares system per row (``_rescale``). The
grids were fitted before the sweep on the weights alone, each column weighted by ``H_jj`` as
if the inputs were uncorrelated; the refit sees the correlations and the codes the sweep
actually chose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import grid
from .compressed import Compressed
from .grid import FP16_TINY, Grid
from .hessian import WeightedCross, conditioned, factor
from .sweep import Sweep


def gptq(w: Tensor | Sequence[Tensor], h: Tensor, g: Grid, *, act_order: bool = True,
         static_groups: bool = True, damp: float = 0.01, block_size: int = 128,
         name: str | None = None, cross: Tensor | WeightedCross | None = None,
         shrink: float = 0.0, refine: int = 0, rescale: bool = False) -> Compressed:
    """Quantize ``w`` (out, in) onto grid ``g`` given its input Hessian ``h`` (in, in); with
    the cross moment ``cross`` of dense-output calibration, fit the dense layer's output
    (``hessian.factor``). ``act_order`` sweeps by decreasing ``diag H``; ``static_groups``
    then fits the groups before the sweep (see the module docstring); ``shrink`` pulls ``H``
    toward its diagonal (``hessian.factor``); ``refine`` passes of coordinate descent follow
    the sweep (see the module docstring); ``rescale`` then refits every group's scale
    (``_rescale``).

    Several weights sharing ``h`` (q/k/v, gate/up) may be given as a sequence: they are swept
    as one stacked weight (one factorisation, one pass of per-column work) and the result
    covers their rows in order; ``Compressed.split`` cuts it. The rows of GPTQ are
    independent given ``h``, so each part equals its own solve."""
    cols = h.shape[0]
    gs = grid.check(g.bits, g.group_size, cols)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else None
    hd = torch.diagonal(h).float() if g.mse == "hessian" else None  # the clipping weights
    f = factor(w, h, damp, name, cross, perm, shrink)
    rows, dev = f.wt.shape[1], f.wt.device

    # Group parameters fitted before the sweep (per-channel, or act-order static groups).
    dynamic = gs < cols and not (act_order and static_groups)
    col_group = torch.arange(cols, device=dev) // gs  # group of each swept column
    if dynamic:
        scale_t = torch.empty(cols // gs, rows, device=dev)
        zero_t = torch.empty(cols // gs, rows, device=dev)
    else:
        scale_t, zero_t = _fixed_grid(f.wt, perm, gs, g, hd)
        if perm is not None:
            col_group = col_group[perm]  # group of the original column that is swept j-th

    block = (max(block_size // gs, 1) * gs) if dynamic else block_size
    sweep = Sweep(f, block)
    hd_swept = hd[perm] if hd is not None and perm is not None else hd
    codes_t = _round_columns(sweep, g, gs if dynamic else 0, col_group.tolist(), scale_t,
                             zero_t, hd_swept)
    if refine < 0:
        raise ValueError(f"refine must be a number of passes >= 0, got {refine}")
    row_loss, damp, rt = sweep.row_loss(), f.damp, f.wt
    del sweep, f  # frees the factor before the refinement's copy of H
    if refine > 0 or rescale:
        hc = conditioned(h, damp, perm, shrink)[0]
        if refine > 0:
            row_loss = _coordinate_descent(rt, hc, codes_t, col_group.tolist(), scale_t,
                                           zero_t, g.bits, refine)
        if rescale:
            row_loss = _rescale(rt, hc, codes_t, col_group, scale_t, zero_t)
        del hc
    del rt

    codes = _unpermute(codes_t, perm)
    g_idx = torch.empty(cols, dtype=torch.int32, device=dev)
    g_idx[perm if perm is not None else slice(None)] = col_group.to(torch.int32)
    return Compressed(
        shape=(rows, cols), loss=float(row_loss.sum()), row_loss=row_loss, codes=codes,
        scale=scale_t.t().contiguous(),
        zero=zero_t.t().to(torch.uint8).contiguous(), g_idx=g_idx, bits=g.bits,
        group_size=gs, sym=g.sym, damp=damp,
    )


def _round_columns(sweep: Sweep, g: Grid, dynamic: int, groups: list[int], scale_t: Tensor,
                   zero_t: Tensor, hd: Tensor | None) -> Tensor:
    """Round every column in sweep order onto its group's grid, committing each to ``sweep``;
    the codes ``(cols, rows)``. With ``dynamic`` (the group size; 0: the grids are fixed) a
    group's grid is fitted, into ``scale_t``/``zero_t``, on the current values of its columns
    when the sweep reaches its first one (clipping weighted by ``hd``, ``diag H`` in sweep
    order, with ``mse="hessian"``)."""
    cols, rows = sweep.rt.shape
    dev, block = sweep.rt.device, sweep.block
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=dev)
    c_block = torch.empty(min(block, cols), rows, dtype=sweep.rt.dtype, device=dev)  # codes
    c_rows, scales, zeros = c_block.unbind(0), scale_t.unbind(0), zero_t.unbind(0)
    maxq = 2**g.bits - 1
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        for j in range(b0, b1):
            k = groups[j]
            if dynamic and j % dynamic == 0:
                s, z = grid.fit(sweep.current(j, j + dynamic).t(), g.bits, g.sym, g.mse,
                                weight=grid.group_weight(hd, j, dynamic))
                scales[k].copy_(s)
                zeros[k].copy_(z)
            s, z = scales[k], zeros[k]
            wj = sweep.column()
            c = torch.div(wj, s, out=c_rows[j - b0]).round_().add_(z).clamp_(0, maxq)
            sweep.commit(wj, (c - z).mul_(s))  # grid.quantize / dequantize, in place
        codes_t[b0:b1] = c_block[:b1 - b0]
    return codes_t


def _coordinate_descent(rt: Tensor, h: Tensor, codes_t: Tensor, groups: list[int],
                        scale_t: Tensor, zero_t: Tensor, bits: int, passes: int,
                        block: int = 128) -> Tensor:
    """``passes`` cyclic passes of coordinate descent on ``½ tr(R H Rᵀ)`` over the codes, in
    place: ``rt`` holds ``Rᵀ = (W - Q)ᵀ`` and ``codes_t`` the codes, both ``(cols, rows)`` in
    the sweep's order, as is ``h``. Returns the loss per row.

    With ``P = R H``, column j's optimum given the others is ``q_j + P_j / H_jj``; its new
    code is the nearest on its grid, and the change ``δ`` updates ``P -= δ ⊗ H_j``: eagerly
    for the columns of the block, with one product for the rest when the block ends."""
    if rt.shape[1] == 0:
        return torch.zeros(0, dtype=rt.dtype, device=rt.device)
    maxq, cols = 2**bits - 1, rt.shape[0]
    inv_d = h.diagonal().reciprocal()
    h_rows, scales, zeros = h.unbind(0), scale_t.unbind(0), zero_t.unbind(0)
    delta = torch.empty(min(block, cols), rt.shape[1], dtype=rt.dtype, device=rt.device)
    pt = torch.empty_like(rt)  # H, rt, pt: inside methods.base's estimate (reasoned, unmeasured)
    for _ in range(passes):
        torch.mm(h, rt, out=pt)  # recomputed each pass: no drift from the rank-1 updates
        for b0 in range(0, cols, block):
            b1 = min(b0 + block, cols)
            for j in range(b0, b1):
                s, z = scales[groups[j]], zeros[groups[j]]
                cz = codes_t[j].to(rt.dtype).sub_(z)  # q_j in steps of the grid
                d = torch.addcmul(cz, pt[j], inv_d[j] / s).round_().clamp_(-z, maxq - z)
                d.sub_(cz)  # the code change
                if not d.any():
                    delta[j - b0].zero_()
                    continue
                codes_t[j] = cz.add_(d).add_(z).to(codes_t.dtype)
                d.mul_(s)
                rt[j].sub_(d)
                pt[b0:b1].addr_(h_rows[j][b0:b1], d, alpha=-1.0)
                delta[j - b0] = d
            n = b1 - b0
            if b0:
                pt[:b0].addmm_(h[:b0, b0:b1], delta[:n], alpha=-1.0)
            if b1 < cols:
                pt[b1:].addmm_(h[b1:, b0:b1], delta[:n], alpha=-1.0)
    return torch.mm(h, rt, out=pt).mul_(rt).sum(0).mul_(0.5)


RESCALE_CHUNK = 256  # rows whose scales ``_rescale`` refits at once


def rescale_workspace(rows: int, cols: int, group_size: int) -> int:
    """Bytes ``_rescale`` allocates beyond what it is given, for the memory plan: for each row
    of a chunk its groups x groups system, built from a list and stacked, copied to float64 and
    factored (20 bytes an entry), and about six float32 columns; one group's columns of H
    (none per channel, where the one group is all of H and is read in place)."""
    n = min(rows, RESCALE_CHUNK)
    groups = cols // group_size if 0 < group_size < cols else 1
    group_copy = 4 * cols * (cols // groups) if groups > 1 else 0
    return n * (20 * groups * groups + 24 * cols) + group_copy


def _rescale(rt: Tensor, h: Tensor, codes_t: Tensor, groups: Tensor, scale_t: Tensor,
             zero_t: Tensor, chunk: int = RESCALE_CHUNK) -> Tensor:
    """Refit every group's scale to the codes the solve chose, in place: the least-squares
    scales of ``½ tr(R H Rᵀ)`` with the codes and zero points held, ``rt`` (``Rᵀ``, cols x
    rows, sweep order) updated to match. Returns the loss per row.

    Why: the grids were fitted before the sweep, to the weights alone, weighting each column
    by ``H_jj`` as if the inputs were uncorrelated; once the codes are known, a row's
    ``Q = Σ_g s_g a_g`` (``a_g``: its codes minus zero on group g) is linear in its scales, so
    the best ones solve a groups x groups system ``M s = b`` per row, ``M_gh = a_g H a_hᵀ``,
    ``b_g = a_g H w*ᵀ``. A row keeps its old scales where the new ones (rounded to float16,
    as stored) do not lower its loss."""
    cols, rows = rt.shape
    n_groups = scale_t.shape[0]
    loss = torch.empty(rows, dtype=rt.dtype, device=rt.device)
    # per channel the one group is every column: a slice views H where an index would copy it
    members = ([slice(None)] if n_groups == 1 else
               [torch.nonzero(groups == k).flatten() for k in range(n_groups)])

    def by_group(x: Tensor) -> Tensor:  # (cols, n) summed over each group's columns: (n, groups)
        return x.new_zeros(n_groups, x.shape[1]).index_add_(0, groups, x).t()

    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        a = codes_t[:, r0:r1].to(rt.dtype).sub_(zero_t[groups, r0:r1])  # (cols, n)
        old = scale_t[:, r0:r1]
        target = torch.addcmul(rt[:, r0:r1], a, old[groups])  # W*ᵀ on this chunk's rows
        m = torch.stack([by_group((h[:, cols_k] @ a[cols_k]).mul_(a))  # a_i (H a_k)_i
                         for cols_k in members], dim=2)  # (n, groups, groups)
        b = by_group((h @ target).mul_(a))
        m64, b64 = m.double(), b.double()  # the loss's change, below, in float64
        ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        m.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        new = torch.linalg.solve(m, b.add_(ridge[:, None] * old.t())).t()  # (groups, n)
        new = new.clamp(min=FP16_TINY).half().float()  # what the checkpoint stores
        both = torch.stack([old, new]).transpose(1, 2).double()  # (2, n, groups)
        change = torch.einsum("kng,ngh,knh->kn", both, m64, both) / 2 - (b64 * both).sum(2)
        take = torch.isfinite(new).all(0) & (change[1] < change[0])  # sᵀMs/2 - bᵀs: the loss
        scale_t[:, r0:r1] = torch.where(take, new, old)
        r = rt[:, r0:r1]
        r.copy_(torch.where(take, target - a * new[groups], r))
        loss[r0:r1] = (h @ r).mul_(r).sum(0).mul_(0.5)
    return loss


def _fixed_grid(wt: Tensor, perm: Tensor | None, gs: int, g: Grid, hd: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """Scales and zero points ``(groups, rows)`` fitted on the original weights (dead columns
    zeroed) before the sweep; ``wt`` holds them transposed, in the sweep's column order;
    ``hd`` is ``diag H`` in the original order (``mse="hessian"``)."""
    cols = wt.shape[0]
    where = torch.argsort(perm) if perm is not None else None  # sweep position of column k
    scale, zero = [], []
    for g0 in range(0, cols, gs):
        part = wt[g0:g0 + gs] if where is None else wt[where[g0:g0 + gs]]
        s, z = grid.fit(part.t(), g.bits, g.sym, g.mse,
                        weight=grid.group_weight(hd, g0, gs))
        scale.append(s)
        zero.append(z)
    return torch.stack(scale), torch.stack(zero)


def _unpermute(codes_t: Tensor, perm: Tensor | None) -> Tensor:
    """Codes ``(cols, rows)`` in sweep order back to ``(rows, cols)`` in the original order."""
    if perm is None:
        return codes_t.t().contiguous()
    codes = torch.empty(codes_t.shape[1], codes_t.shape[0], dtype=codes_t.dtype,
                        device=codes_t.device)
    codes[:, perm] = codes_t.t()
    return codes
