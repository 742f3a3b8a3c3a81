"""The layer Hessian ``H = 2 XᵀX / n`` and the factor the solvers sweep with.

``Hessian`` keeps an fp32 *sum* and a sample count, so partial sums from several batches or
processes add up exactly before the single division at the end.

``factor`` prepares ``H`` for GPTQ/SparseGPT: dead inputs (zero diagonal) get their weight
column zeroed and their diagonal set to 1; ``damp * mean(diag H)`` is added to the diagonal
and retried once with 10x the damping if the Cholesky factorisation fails; after that the
layer is reported with :class:`HessianNotPositiveDefinite` rather than silently falling back
to plain rounding.

The solvers need, for every column j, the "conditional" rows of H⁻¹ (the paper's upper
Cholesky factor U of H⁻¹). Instead of the reference's three cubic steps (Cholesky, inverse,
Cholesky) we factor H once as ``H = V Vᵀ`` with V *upper* triangular (the Cholesky factor of
the row/column-reversed H, reversed back), and ``U = V⁻¹``. The sweep (see ``sweep.py``) works
with V directly, so no inverse is ever formed. The factorisation runs in place on the one copy
of H the solve makes (permuted for act-order), block column by block column, so the solver's
workspace is that copy and weight-sized buffers — none of the reference's further d×d copies
(inverse, identity, flips).

Dense-output calibration ("asymmetric": fit each layer to what the *dense* model computes on
its dense inputs X, given the compressed model's inputs X̃) needs one more statistic, the cross
moment ``C = 2 (X - X̃)ᵀ X̃ / n`` (:class:`Cross`). With ``H = 2 X̃ᵀX̃ / n``::

    ‖X̃ Qᵀ - X Wᵀ‖² = ‖X̃ (Q - W*)ᵀ‖² + const,   W* = W Xᵀ X̃ (X̃ᵀX̃)⁻¹ = W + W C H⁻¹

so the usual sweep runs unchanged on the corrected weight W* with the usual H. ``factor``
computes W* with the same damped factor it returns, ``W* = W + W C (H + λI)⁻¹``: the damping
regularises the *correction* towards W (a ridge regression of the drift), so a layer whose
inputs did not drift keeps exactly its weight.

Only ``W C`` enters W*, and for a layer with fewer than half as many outputs as inputs (an
MLP's down projection) it is cheaper to gather in that form, ``W C = 2 ((X − X̃)Wᵀ)ᵀX̃ / n``
(:class:`OutputCross`): ``2 · out · in`` multiply-adds a token instead of ``in²``. (Not as
``2 YᵀX̃ / n − W H`` from the dense output Y, which would be cheaper still: that difference of
two large sums loses the drift's low digits, and the solve amplifies them in the directions
the calibration data barely spans: a 2-rank run then disagreed with a one-process run on
many of a small test model's codes; benchmarks/RESULTS.md.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky failed even with 10x damping: the calibration data cannot support the solve."""


@dataclass
class Hessian:
    """Running ``Σ 2·xᵀx`` over calibration activations, with the number of rows seen.

    Only the lower triangle of ``sum`` is maintained (layers wider than two panels accumulate
    it in column panels, skipping the blocks above the diagonal, which saves time on wide
    layers: benchmarks/RESULTS.md); ``value()`` symmetrises it.
    Partial sums of several batches or processes add up as they are.
    """

    sum: Tensor
    count: int = 0
    panel: int = 128  # column panel width of the triangular accumulation

    @classmethod
    def zeros(cls, features: int, device: torch.device | str = "cpu") -> Hessian:
        return cls(torch.zeros(features, features, dtype=torch.float32, device=device))

    def add(self, x: Tensor) -> None:
        """Accumulate activations of any leading shape ``(..., features)``."""
        n = self.sum.shape[0]
        if x.shape[-1] != n:
            raise ValueError(f"activations have {x.shape[-1]} features, "
                             f"the Hessian expects {n}")
        x = x.reshape(-1, n).to(self.sum.device, torch.float32)
        if n <= 2 * self.panel:
            self.sum.addmm_(x.t(), x, alpha=2.0)
        else:
            for j0 in range(0, n, self.panel):
                j1 = min(j0 + self.panel, n)
                self.sum[j0:, j0:j1].addmm_(x[:, j0:].t(), x[:, j0:j1], alpha=2.0)
        self.count += x.shape[0]

    def merge(self, other: Hessian) -> None:
        """Add another partial sum (e.g. from another process)."""
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count

    def value(self) -> Tensor:
        """``H = 2 XᵀX / n`` (a new tensor; the running sum stays as it is)."""
        if self.count == 0:
            raise ValueError("the Hessian has seen no samples")
        lower = torch.tril(self.sum)
        return (lower + torch.tril(self.sum, -1).t()) / self.count

    def take(self) -> Tensor:
        """:meth:`value`, made in place from the running sum (which it consumes): the lower
        triangle is mirrored panel by panel, so no second ``features²`` matrix is needed."""
        if self.count == 0:
            raise ValueError("the Hessian has seen no samples")
        s, n = self.sum, self.sum.shape[0]
        for j0 in range(0, n, self.panel):
            j1 = min(j0 + self.panel, n)
            block = s[j0:j1, j0:j1]
            block.copy_(torch.tril(block) + torch.tril(block, -1).t())
            s[j0:j1, j1:] = s[j1:, j0:j1].t()
        self.sum = torch.empty(0, device=s.device)
        return s.div_(self.count)


class Cross(Hessian):
    """Running ``Σ 2·(x - x̃)ᵀx̃`` over the dense (x) and compressed (x̃) activations of the same
    calibration rows: the cross moment of dense-output calibration. Not symmetric; same
    sum-and-count bookkeeping as :class:`Hessian`, so partial sums merge and reduce alike."""

    def add(self, x_tilde: Tensor, x: Tensor) -> None:  # type: ignore[override]
        xt, drift = self._drift(x_tilde, x)
        self.sum.addmm_(drift.t(), xt, alpha=2.0)
        self.count += xt.shape[0]

    def _drift(self, x_tilde: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of ``x̃`` and of ``x - x̃``, float32 on the sum's device."""
        n = self.sum.shape[1]
        if x_tilde.shape != x.shape or x.shape[-1] != n:
            raise ValueError(f"dense activations {tuple(x.shape)} and compressed activations "
                             f"{tuple(x_tilde.shape)} must both have {n} features")
        xt = x_tilde.reshape(-1, n).to(self.sum.device, torch.float32)
        return xt, x.reshape(-1, n).to(self.sum.device, torch.float32) - xt

    def value(self) -> Tensor:
        """``C = 2 (X - X̃)ᵀ X̃ / n``."""
        if self.count == 0:
            raise ValueError("the cross moment has seen no samples")
        return self.sum / self.count

    def take(self) -> Tensor:
        """:meth:`value`, made in place from the running sum (which it consumes)."""
        if self.count == 0:
            raise ValueError("the cross moment has seen no samples")
        s, self.sum = self.sum, torch.empty(0, device=self.sum.device)
        return s.div_(self.count)


class OutputCross(Cross):
    """Running ``Σ 2·((x - x̃)Wᵀ)ᵀx̃`` for one weight ``w`` (out, in): ``W C`` gathered directly,
    the cross moment already multiplied by the weight it corrects (see the module
    docstring), ``out x in``; same bookkeeping as :class:`Cross`."""

    def __init__(self, w: Tensor):
        super().__init__(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        self.w = w  # (out, in) float32

    def add(self, x_tilde: Tensor, x: Tensor) -> None:
        xt, drift = self._drift(x_tilde, x)
        self.sum.addmm_((drift @ self.w.t()).t(), xt, alpha=2.0)
        self.count += xt.shape[0]

    def take(self) -> Tensor:
        """``W C = 2 ((X - X̃)Wᵀ)ᵀ X̃ / n``, made in place from the running sum (which it
        consumes); the weight is let go."""
        self.w = None
        return super().take()


@dataclass(frozen=True)
class WeightedCross:
    """The cross moment in the form :class:`OutputCross` gathers it: ``W C`` (out x in) for
    one weight W (or the rows of stacked weights, in order)."""

    wc: Tensor


@dataclass
class Statistics:
    """What calibration measured at one layer input, in the form the solvers take."""

    hessian: Tensor  # H = 2 X̃ᵀX̃ / n over the compressed model's inputs X̃
    count: int  # rows of X̃ (tokens)
    cross: Tensor | WeightedCross | None = None  # C = 2 (X - X̃)ᵀ X̃ / n, or W C


@dataclass
class Factor:
    """What the sweep needs, in the (possibly permuted) column order it visits.

    ``wt`` is the weight transposed, ``(cols, rows)`` float32, dead columns zeroed: the sweep's
    only weight-sized buffer. ``vn`` holds ``V_kj / V_jj`` above its diagonal, where
    ``H + λI = V Vᵀ`` with V upper triangular; below the diagonal it is zero and its diagonal
    is 1. ``vd`` is ``diag(V)``.
    """

    wt: Tensor  # (cols, rows) float32 (float64 for a float64 H); W* with a cross moment
    vn: Tensor  # (cols, cols) unit upper triangular
    vd: Tensor  # (cols,)
    dead: Tensor  # (cols,) bool, in the sweep's column order
    damp: float  # the relative damping that succeeded

    @property
    def w(self) -> Tensor:
        """The weight the sweep starts from, ``(rows, cols)`` in sweep order (a view)."""
        return self.wt.t()

    @property
    def v(self) -> Tensor:
        """``V`` itself (a new tensor; the sweep never needs it)."""
        return self.vn * self.vd


def factor(w: Tensor | Sequence[Tensor], h: Tensor, damp: float = 0.01,
           name: str | None = None, cross: Tensor | WeightedCross | None = None,
           order: Tensor | None = None, shrink: float = 0.0) -> Factor:
    """Fix dead columns, damp, and factor ``H`` (columns visited in ``order`` when given, e.g.
    act-order's decreasing ``diag H``); with the cross moment ``cross`` of dense-output
    calibration, also replace ``w`` by the target ``W*``; see the module docstring. Several
    weights that share ``H`` (q/k/v, gate/up) may be given as a sequence: their rows are
    stacked.

    ``shrink`` (in [0, 1]) scales the off-diagonal of ``H`` by ``1 - shrink`` before damping:
    a shrinkage estimate toward the diagonal. The correlations between inputs are what let
    one column's error be pushed onto the others, and they are fitted to the calibration
    text; shrinking them made GPTQ better on text of other domains (benchmarks/RESULTS.md,
    domain suite). At 1 the sweep corrects nothing and rounds each column to nearest. The
    dense-output target uses the same shrunk ``H``.

    The workspace is one ``cols x cols`` matrix — the permuted copy of ``H``, overwritten by
    its factor — and one weight-sized matrix; ``w`` and ``h`` are left untouched."""
    layer = f" for layer {name!r}" if name else ""
    parts = [w] if isinstance(w, Tensor) else list(w)
    cols = h.shape[0]
    for part in parts:
        if h.shape != (cols, cols) or part.dim() != 2 or part.shape[1] != cols:
            raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of "
                             f"shape {tuple(part.shape)}{layer}")
    if isinstance(cross, WeightedCross):
        rows = sum(p.shape[0] for p in parts)
        if cross.wc.shape != (rows, cols):
            raise ValueError(f"W C of shape {tuple(cross.wc.shape)} does not fit a weight of "
                             f"{rows} rows and {cols} columns{layer}")
    elif cross is not None and cross.shape != h.shape:
        raise ValueError(f"cross moment of shape {tuple(cross.shape)} does not fit a Hessian "
                         f"of shape {tuple(h.shape)}{layer}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be in [0, 1], got {shrink}")
    for d in (damp, damp * 10):
        a, dead = conditioned(h, d, order, shrink)
        if _factor_upper_(a) and torch.isfinite(a.diagonal()).all():
            vd = a.diagonal().clone()
            a.triu_().div_(vd)
            wt = _transposed(parts, order, a.dtype)
            if cross is not None:
                wt += _dense_correction_t(wt, cross, a, vd, order)
            wt[dead] = 0.0
            return Factor(wt, a, vd, dead, d)
        del a
        if not torch.isfinite(h).all():  # checked only here: a full pass over H
            raise HessianNotPositiveDefinite(f"the Hessian{layer} contains NaN or Inf")
    raise HessianNotPositiveDefinite(
        f"the Hessian{layer} is not positive definite even with damping {damp * 10:g} x "
        f"mean(diag H): its Cholesky factorisation failed. Use more (or more varied) "
        f"calibration samples, or a larger damp."
    )


_PANEL = 256  # row/column block of the copies and of the factorisation


def conditioned(h: Tensor, damp: float, order: Tensor | None = None, shrink: float = 0.0
                ) -> tuple[Tensor, Tensor]:
    """The matrix ``factor`` factors, and the dead columns (both in ``order``): ``H`` permuted
    (a new ``cols x cols`` tensor, float32 unless ``h`` is float64), its off-diagonal scaled
    by ``1 - shrink``, dead diagonals set to 1, then ``damp · mean(diag H)`` added. GPTQ's
    refinement reads it again after the sweep, which overwrote the first copy with V."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32  # fp64 on request
    diag = torch.diagonal(h).to(dtype)
    if order is not None:
        diag = diag[order]
    dead = diag == 0
    mean_diag = float(torch.where(dead, 1.0, diag).mean())
    a = _permuted(h, order, dtype)
    if shrink:
        kept = a.diagonal().clone()
        a.mul_(1.0 - shrink).diagonal().copy_(kept)
        del kept
    a.diagonal()[dead] = 1.0
    a.diagonal().add_(damp * mean_diag)
    return a, dead


def _permuted(h: Tensor, order: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``h[order][:, order]`` in ``dtype``, built in row panels: one ``cols x cols`` copy."""
    if order is None:
        return h.to(dtype, copy=True)
    cols = h.shape[0]
    out = torch.empty(cols, cols, dtype=dtype, device=h.device)
    for r0 in range(0, cols, _PANEL):
        rows = h.index_select(0, order[r0:r0 + _PANEL])
        torch.index_select(rows.to(dtype), 1, order, out=out[r0:r0 + _PANEL])
    return out


def _transposed(parts: list[Tensor], order: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The stacked ``w[:, order]ᵀ`` as a contiguous ``(cols, rows)`` in ``dtype``, written in
    place from each part (in any dtype)."""
    cols, rows = parts[0].shape[1], sum(p.shape[0] for p in parts)
    wt = torch.empty(cols, rows, dtype=dtype, device=parts[0].device)
    r0 = 0
    for p in parts:
        wt[:, r0:r0 + p.shape[0]] = p.t() if order is None else p.t().index_select(0, order)
        r0 += p.shape[0]
    return wt


def _dense_correction_t(wt: Tensor, cross: Tensor | WeightedCross, vn: Tensor, vd: Tensor,
                        order: Tensor | None) -> Tensor:
    """``(W C (V Vᵀ)⁻¹)ᵀ = V⁻ᵀ V⁻¹ Cᵀ Wᵀ`` in sweep order: what dense-output calibration adds
    to ``Wᵀ`` (two unit triangular solves with ``V = Vn · diag(vd)``; ``C`` is read in
    permuted column panels, never copied whole)."""
    if isinstance(cross, WeightedCross):
        wc_t = cross.wc.t()
        m_t = (wc_t if order is None else wc_t.index_select(0, order)).to(wt.dtype, copy=True)
    elif order is None:
        m_t = cross.to(wt.dtype).t() @ wt
    else:
        m_t = torch.empty_like(wt)
        for r0 in range(0, wt.shape[0], _PANEL):
            panel = cross.index_select(1, order[r0:r0 + _PANEL]).index_select(0, order)
            torch.mm(panel.to(wt.dtype).t(), wt, out=m_t[r0:r0 + _PANEL])
    z = torch.linalg.solve_triangular(vn, m_t, upper=True, unitriangular=True)
    z /= vd[:, None].square()
    # Vnᵀ X = Z as Xᵀ Vn = Zᵀ: the factor is read as stored, not transposed and copied
    return torch.linalg.solve_triangular(vn, z.t(), upper=True, left=False,
                                         unitriangular=True).t()


def _factor_upper_(a: Tensor, block: int = 2 * _PANEL) -> bool:
    """Overwrite the upper triangle of the symmetric ``a`` with the upper triangular V of
    ``a = V Vᵀ`` (the Cholesky factor of the row/column-reversed matrix, reversed back), in
    place, block column by block column from the last; False if ``a`` is not positive
    definite. With ``A = [[A11, A12], [A12ᵀ, A22]]``: ``A22 = V22 V22ᵀ``, ``V12 = A12 V22⁻ᵀ``,
    then the same for ``A11 - V12 V12ᵀ``. Only the upper triangle (and the diagonal blocks)
    are read and written, in ``block``-wide panels, so nothing of the size of ``a`` is
    allocated."""
    n = a.shape[0]
    for k1 in range(n, 0, -block):
        k0 = max(k1 - block, 0)
        lower, info = torch.linalg.cholesky_ex(a[k0:k1, k0:k1].flip(0, 1))
        if int(info) != 0:
            return False
        vkk = lower.flip(0, 1)
        a[k0:k1, k0:k1] = vkk
        if k0 == 0:
            break
        v12 = a[:k0, k0:k1]
        v12.copy_(torch.linalg.solve_triangular(vkk.t(), v12, upper=False, left=False))
        for c1 in range(k0, 0, -block):  # A11 -= V12 V12ᵀ, upper triangle, panel by panel
            c0 = max(c1 - block, 0)
            a[:c1, c0:c1].addmm_(v12[:c1], v12[c0:c1].t(), alpha=-1.0)
    return True


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """``½ tr((W - Ŵ) H (W - Ŵ)ᵀ) = ‖(W - Ŵ) Xᵀ‖² / n`` for ``H = 2XᵀX / n``."""
    delta = (w.float() - w_hat.float()).to(h.device)
    return 0.5 * float(((delta @ h.float()) * delta).sum())
