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
Cholesky) we factor the row/column-reversed Hessian once: ``flip(chol(flip(H)))`` is the upper
triangular V with ``H = V Vᵀ``, and ``U = V⁻¹``. The sweep (see ``sweep.py``) works with V
directly, so no inverse is ever formed.

Dense-output calibration ("asymmetric": fit each layer to what the *dense* model computes on
its dense inputs X, given the compressed model's inputs X̃) needs one more statistic, the cross
moment ``C = 2 (X - X̃)ᵀ X̃ / n`` (:class:`Cross`). With ``H = 2 X̃ᵀX̃ / n``::

    ‖X̃ Qᵀ - X Wᵀ‖² = ‖X̃ (Q - W*)ᵀ‖² + const,   W* = W Xᵀ X̃ (X̃ᵀX̃)⁻¹ = W + W C H⁻¹

so the usual sweep runs unchanged on the corrected weight W* with the usual H. ``factor``
computes W* with the same damped factor it returns, ``W* = W + W C (H + λI)⁻¹``: the damping
regularises the *correction* towards W (a ridge regression of the drift), so a layer whose
inputs did not drift keeps exactly its weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky failed even with 10x damping: the calibration data cannot support the solve."""


@dataclass
class Hessian:
    """Running ``Σ 2·xᵀx`` over calibration activations, with the number of rows seen.

    Only the lower triangle of ``sum`` is maintained (wide layers accumulate it in column
    panels, skipping the blocks above the diagonal: ~40 % fewer flops); ``value()``
    symmetrises it. Partial sums of several batches or processes add up as they are.
    """

    sum: Tensor
    count: int = 0
    panel: int = 256  # column panel width of the triangular accumulation

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
        if n < 4 * self.panel:
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
        """``H = 2 XᵀX / n``."""
        if self.count == 0:
            raise ValueError("the Hessian has seen no samples")
        lower = torch.tril(self.sum)
        return (lower + torch.tril(self.sum, -1).t()) / self.count


class Cross(Hessian):
    """Running ``Σ 2·(x - x̃)ᵀx̃`` over the dense (x) and compressed (x̃) activations of the same
    calibration rows: the cross moment of dense-output calibration. Not symmetric; same
    sum-and-count bookkeeping as :class:`Hessian`, so partial sums merge and reduce alike."""

    def add(self, x_tilde: Tensor, x: Tensor) -> None:  # type: ignore[override]
        n = self.sum.shape[0]
        if x_tilde.shape != x.shape or x.shape[-1] != n:
            raise ValueError(f"dense activations {tuple(x.shape)} and compressed activations "
                             f"{tuple(x_tilde.shape)} must both have {n} features")
        xt = x_tilde.reshape(-1, n).to(self.sum.device, torch.float32)
        drift = x.reshape(-1, n).to(self.sum.device, torch.float32) - xt
        self.sum.addmm_(drift.t(), xt, alpha=2.0)
        self.count += xt.shape[0]

    def value(self) -> Tensor:
        """``C = 2 (X - X̃)ᵀ X̃ / n``."""
        if self.count == 0:
            raise ValueError("the cross moment has seen no samples")
        return self.sum / self.count


@dataclass
class Statistics:
    """What calibration measured at one layer input, in the form the solvers take."""

    hessian: Tensor  # H = 2 X̃ᵀX̃ / n over the compressed model's inputs X̃
    count: int  # rows of X̃ (tokens)
    cross: Tensor | None = None  # C = 2 (X - X̃)ᵀ X̃ / n, X the dense model's inputs


@dataclass
class Factor:
    """What the sweep needs: the (dead-column fixed) weight and ``H + λI = V Vᵀ``."""

    w: Tensor  # (rows, cols) float32, dead columns zeroed (W* when a cross moment is given)
    v: Tensor  # (cols, cols) upper triangular, H + λI = V Vᵀ
    dead: Tensor  # (cols,) bool
    damp: float  # the relative damping that succeeded


def factor(w: Tensor, h: Tensor, damp: float = 0.01, name: str | None = None,
           cross: Tensor | None = None) -> Factor:
    """Fix dead columns, damp, and factor ``H``; with the cross moment ``cross`` of
    dense-output calibration, also replace ``w`` by the target ``W*`` (module docstring)."""
    layer = f" for layer {name!r}" if name else ""
    cols = h.shape[0]
    if h.shape != (cols, cols) or w.shape[1] != cols:
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape "
                         f"{tuple(w.shape)}{layer}")
    if not torch.isfinite(h).all():
        raise HessianNotPositiveDefinite(f"the Hessian{layer} contains NaN or Inf")
    if cross is not None and cross.shape != h.shape:
        raise ValueError(f"cross moment of shape {tuple(cross.shape)} does not fit a Hessian "
                         f"of shape {tuple(h.shape)}{layer}")
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32  # fp64 on request
    original = w.to(dtype)
    w = original.clone()
    h = h.to(dtype, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = torch.diag(h).mean()
    for d in (damp, damp * 10):
        hd = h + d * mean_diag * torch.eye(cols, device=h.device, dtype=dtype)
        lower, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
        if info == 0:
            v = lower.flip(0, 1)
            if cross is not None:
                w = original + dense_correction(original, cross.to(dtype), v)
                w[:, dead] = 0.0
            return Factor(w, v, dead, d)
    raise HessianNotPositiveDefinite(
        f"the Hessian{layer} is not positive definite even with damping {damp * 10:g} x "
        f"mean(diag H): its Cholesky factorisation failed. Use more (or more varied) "
        f"calibration samples, or a larger damp."
    )


def dense_correction(w: Tensor, cross: Tensor, v: Tensor) -> Tensor:
    """``W C (V Vᵀ)⁻¹``: what dense-output calibration adds to ``w`` (two triangular solves
    with the factor of the damped Hessian, ``H + λI = V Vᵀ``, V upper triangular)."""
    m_t = (w @ cross).t()
    z = torch.linalg.solve_triangular(v, m_t, upper=True)
    return torch.linalg.solve_triangular(v.t(), z, upper=False).t()


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """``½ tr((W - Ŵ) H (W - Ŵ)ᵀ) = ‖(W - Ŵ) Xᵀ‖² / n`` for ``H = 2XᵀX / n``."""
    delta = (w.float() - w_hat.float()).to(h.device)
    return 0.5 * float(((delta @ h.float()) * delta).sum())
