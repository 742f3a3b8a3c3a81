"""The column sweep shared by GPTQ and SparseGPT, batched for CPUs and GPUs alike.

Both algorithms visit the columns of ``W`` in order; at column j they choose a compressed
value ``q_j`` for the *current* column ``w_j`` (the original column plus the corrections from
all earlier columns) and record the error. In the papers' notation, with ``U`` the upper
Cholesky factor of ``H⁻¹`` and ``d_j = U_jj``::

    err_j = (w_j - q_j) / d_j                  # Algorithm 1, line "E_{:,j-i}"
    W[:, j+1:] -= err_j ⊗ U[j, j+1:]           # the OBS update of all later columns
    loss += ½ Σ err_j²

Writing ``H = V Vᵀ`` with V upper triangular (so ``U = V⁻¹``), the updates telescope to a
closed form that needs neither ``U`` nor any eager update: the current column is

    w_j = W_j + Σ_{k<j} (W_k - q_k) · V_kj / V_jj

i.e. the original column plus the *residuals* ``R = W - Q`` of the columns already done,
weighted by the normalised column j of V. This is the "left-looking" form of the lazy batch
updates: columns are made current in blocks with one matrix product against all residuals so
far, then in sub-blocks of 16 with a small product, then one matrix-vector product per column
over the at most 15 residuals inside the sub-block. The total work equals the reference's
right-looking updates, but the per-column Python work is a handful of vector ops and the
Cholesky inverse of the reference (two extra cubic steps) disappears.

Everything is stored transposed (``(cols, rows)``) so that a column is a contiguous row.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUB_BLOCK = 16


class Sweep:
    """Current columns and residuals of one left-looking sweep over ``w`` (rows, cols)."""

    def __init__(self, w: Tensor, v: Tensor, block: int) -> None:
        self.wt = w.t().contiguous()
        self.rt = torch.zeros_like(self.wt)  # W_j - q_j for done columns
        self.et = torch.zeros_like(self.wt)  # w_j (current) - q_j, for the loss
        self.v = v
        self.vd = torch.diag(v).clone()
        self.vn = v / self.vd  # vn[k, j] = V_kj / V_jj
        self.cols = self.wt.shape[0]
        self.block = max(1, block)
        self.next = 0  # all columns < next are done
        self._b = (0, 0, None)  # block cache: (start, end, current values at block start)
        self._s = (0, 0, None)  # sub-block cache

    def d(self, j0: int, j1: int) -> Tensor:
        """The papers' ``d_j = [U]_jj = sqrt([H⁻¹]_jj | later columns)`` for ``j0 <= j < j1``."""
        return 1.0 / self.vd[j0:j1]

    def _refresh(self) -> None:
        j = self.next
        b0, b1, _ = self._b
        if not b0 <= j < b1:
            b0, b1 = j, min(j + self.block, self.cols)
            bt = torch.addmm(self.wt[b0:b1], self.vn[:j, b0:b1].t(), self.rt[:j])
            self._b = (b0, b1, bt)
        s0, s1, _ = self._s
        if not s0 <= j < s1:
            b0, b1, bt = self._b
            s0, s1 = j, min(j + SUB_BLOCK, b1)
            st = torch.addmm(bt[s0 - b0:s1 - b0], self.vn[b0:j, s0:s1].t(), self.rt[b0:j])
            self._s = (s0, s1, st)

    def _own_turn(self, j0: int, j1: int) -> Tensor:
        """``W_j + Σ_{k<next} R_k V_kj / V_jj`` for ``j0 <= j < j1``: column j's value when its
        turn comes, if the columns from ``next`` to j-1 then add nothing."""
        j = self.next
        self._refresh()
        for c0, c1, ct in (self._s, self._b):
            if c0 <= j0 and j1 <= c1:
                return torch.addmm(ct[j0 - c0:j1 - c0], self.vn[c0:j, j0:j1].t(), self.rt[c0:j])
        return torch.addmm(self.wt[j0:j1], self.vn[:j, j0:j1].t(), self.rt[:j])

    def current(self, j0: int, j1: int) -> Tensor:
        """Current (corrected) values of the next columns ``j0 = next .. j1-1``, transposed
        ``(n, rows)``: what the reference's eager updates would hold now. Used to choose masks
        and group grids ahead of the columns' turns.

        With ``S = R_{<j0} V_{<j0, j0:j1}``, the eager state is ``W + S · V[j0:j1, j0:j1]⁻¹``
        (``U = V⁻¹`` and ``V U = I`` give ``E_{<j0} U_{<j0, b} = -R_{<j0} V_{<j0, b} U_bb``);
        only column j0 of it equals ``W + S / V_jj``.
        """
        if j0 != self.next:
            raise ValueError(f"current() starts at the next column {self.next}, not {j0}")
        j1 = min(j1, self.cols)
        w = self.wt[j0:j1]
        s = (self._own_turn(j0, j1) - w) * self.vd[j0:j1, None]
        return w + torch.linalg.solve_triangular(self.v[j0:j1, j0:j1].t(), s, upper=False)

    def column(self) -> Tensor:
        """The current value of the next column, ``(rows,)``."""
        self._refresh()
        j = self.next
        s0, _, st = self._s
        if j == s0:
            return st[0]
        return torch.addmv(st[j - s0], self.rt[s0:j].t(), self.vn[s0:j, j])

    def commit(self, w: Tensor, q: Tensor) -> None:
        """Fix the next column to ``q`` (its current value was ``w``)."""
        j = self.next
        torch.sub(self.wt[j], q, out=self.rt[j])
        torch.sub(w, q, out=self.et[j])
        self.next += 1

    def row_loss(self) -> Tensor:
        """Per output row, ``½ Σ_j err_j²`` with ``err_j = (w_j - q_j) / d_j``: the
        ‖(W - Q) Xᵀ‖² / n that the sweep incurred, in units of the damped Hessian."""
        return 0.5 * (self.et * self.vd[:, None]).pow(2).sum(0)

    def result(self) -> Tensor:
        """``Q`` as ``(rows, cols)``."""
        return (self.wt - self.rt).t().contiguous()
