"""ADMM pruning: choose the mask and the exact least-squares weights of a pruned layer together.

SparseGPT fixes each column's mask once and compensates greedily, column by column. The ADMM
update of Boža ("Fast and Effective Weight Update for Pruned Large Language Models", TMLR
2024) instead solves ``min ‖X (Ŵ - W)ᵀ‖²`` subject to ``Ŵ`` being zero off the mask by the
alternating direction method of multipliers, re-selecting the mask from the current iterate
during the first iterations (gradually, towards the target sparsity):

==========  ===========================================================================
paper       here
==========  ===========================================================================
``W``       ``wn``: the weight with each input column scaled by ``s_j = sqrt(H_jj)``, so
            that ``|wn|`` is the activation-aware (Wanda) importance of a weight
``XᵀX``     ``hn = H / (s sᵀ) + λI`` (damped like the sweeps, ``λ = damp · mean diag``)
``ρ``       ``rho``: the penalty of the splitting ``Ŵ = Z`` (``hn`` has unit diagonal)
``Z, U``    ``z`` (the sparse iterate, the result) and ``u`` (the scaled dual)
==========  ===========================================================================

One iteration is ``Z = (W + U) ⊙ M``, ``U += W - Z``, ``W = (Hn W₀ + ρ (Z - U)) (Hn + ρI)⁻¹``:
two matrix products with one inverse computed once, i.e. about ``2·iters`` times the flops of
one sweep; the fixed point is the exact optimum for the final mask. With N:M sparsity the
mask always keeps the N largest of every M inputs among the current candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compressed import Compressed
from .hessian import WeightedCross, factor


def _keep_largest(score: Tensor, drop: int) -> Tensor:
    """Keep-mask of all but the ``drop`` smallest entries of ``score`` (non-negative, no NaN).

    A radix select, faster than ``topk`` on a layer (benchmarks/RESULTS.md, ADMM mask
    selection) and called every reselect iteration: the bits of a non-negative float order
    like the float, so one histogram of their top 16 bits finds the bin that holds the
    threshold, and only that bin's entries are ranked."""
    flat = score.flatten()
    if drop <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    wide = flat.dtype == torch.float64
    bins = flat.view(torch.int64 if wide else torch.int32) >> (48 if wide else 16)
    below = torch.bincount(bins).cumsum(0)  # entries in this bin or a lower one
    b = int(torch.searchsorted(below, drop))  # the threshold's bin
    need = drop - (int(below[b - 1]) if b else 0)
    keep = bins >= b
    ties = (bins == b).nonzero().squeeze(1)
    keep[ties[torch.topk(flat[ties], need, largest=False, sorted=False).indices]] = False
    return keep.view_as(score)


def _n_m_keep(score: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask of the ``n`` largest of every ``m`` consecutive inputs of each row (ties to
    the first): an entry is kept when fewer than ``n`` of its group beat it. One compare per
    pair of positions over all groups at once, faster than ``topk`` on groups of four."""
    g = score.reshape(-1, m).t()  # (m, groups)
    beaten = [torch.zeros(g.shape[1], dtype=torch.uint8, device=score.device) for _ in g]
    for i in range(m):
        for j in range(i + 1, m):
            wins = g[i] >= g[j]
            beaten[j] += wins
            beaten[i] += ~wins
    return (torch.stack(beaten, 1) < n).view_as(score)


def select_mask(score: Tensor, sparsity: float, n_m: tuple[int, int] | None,
                fraction: float = 1.0) -> Tensor:
    """The mask for importance ``score`` at ``fraction`` of the way to the target: exactly
    ``round(fraction · sparsity · numel)`` weights dropped (unstructured), or, with N:M, the
    weights outside the N:M pattern dropped smallest-first up to that count."""
    total = round(fraction * sparsity * score.numel()) if n_m is None else \
        round(fraction * (1 - n_m[0] / n_m[1]) * score.numel())
    if n_m is None:
        return _keep_largest(score, total)
    candidates = score.masked_fill(_n_m_keep(score, *n_m), float("inf"))
    return _keep_largest(candidates, total)


def admm_prune(w: Tensor, h: Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
               *, damp: float = 0.1, rho: float = 1.0, iters: int = 20, reselect: int = 15,
               keep: Tensor | None = None, name: str | None = None,
               cross: Tensor | WeightedCross | None = None, shrink: float = 0.0) -> Compressed:
    """Prune ``w`` (out, in) given ``h`` (in, in) to kept ``values`` and their ``mask``.
    ``reselect`` iterations choose the mask from ``|W + U|`` with the dropped fraction rising
    cubically to the target (unless a ``keep`` mask is given: then it is fixed); the
    remaining iterations refine the weights. The loss is measured on the undamped H."""
    if cross is not None:  # the dense-output target W* (and the dead columns)
        f = factor(w, h, damp, name, cross, shrink=shrink)
        wt, dead, damp = f.w, f.dead, f.damp
        del f
    else:  # inputs that never fire: their weights cannot matter, drop them first
        dead = torch.diag(h) == 0
        wt = w.to(torch.float64 if h.dtype == torch.float64 else torch.float32, copy=True)
        wt[:, dead] = 0.0
    s = torch.diag(h).to(wt.dtype).clamp_min(0).sqrt()
    s = torch.where(dead, torch.ones_like(s), s + 1e-8 * s.max())
    hn = h.to(wt.dtype) / s[:, None] / s[None, :]
    if shrink:  # hn has a unit diagonal (dead columns aside): scale the rest
        hn.mul_(1.0 - shrink).diagonal().add_(shrink)
    hn[dead, dead] = 1.0
    hn.diagonal().add_(damp * hn.diagonal().mean())
    w0 = wt * s
    target = w0 @ hn  # Hn W₀ in row form (hn is symmetric)
    hn.diagonal().add_(rho)  # Hn + ρI: positive definite whatever H is
    inv = torch.cholesky_inverse(torch.linalg.cholesky(hn))
    del hn
    base = target @ inv  # the update is base + ρ (Z - U) (Hn + ρI)⁻¹
    del target
    fixed = keep is not None
    if not fixed and min(iters, reselect) == 0:
        keep = select_mask(w0.abs(), sparsity, n_m)
    v = w0  # W + U (U = 0 at the start)
    for it in range(iters):
        reselecting = it < reselect and not fixed
        if reselecting:
            keep = select_mask(v.abs(), sparsity, n_m, 1 - (1 - (it + 1) / reselect) ** 3)
        if reselecting or it == 0:  # with Z = V ⊙ M and U = V - Z, Z - U = V ⊙ (2M - 1)
            drop = (~keep).to(v.dtype)
            sign = 1 - 2 * drop
        v = torch.addmm(base, v * sign, inv, alpha=rho).addcmul_(v, drop)  # W (next) + U
    values = v * keep / s
    delta = wt - values
    row_loss = 0.5 * ((delta @ h.to(delta.dtype)) * delta).sum(1)
    return Compressed(shape=tuple(w.shape), loss=float(row_loss.sum()), row_loss=row_loss,
                      mask=keep, values=values.float(), damp=damp)
