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
far, then in sub-blocks of 16 with a small product; inside a sub-block each committed column
updates the (at most 15) later ones eagerly, one rank-1 update. The total work equals the
reference's right-looking updates, but the per-column Python work is a handful of vector ops
and the Cholesky inverse of the reference (two extra cubic steps) disappears.

Everything is stored transposed (``(cols, rows)``) so that a column is a contiguous row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hessian import Factor

SUB_BLOCK = 16


class Sweep:
    """Current columns and residuals of one left-looking sweep over a :class:`Factor`.

    One weight-sized buffer: ``rt`` starts as ``Wᵀ`` and row j becomes the residual
    ``W_j - q_j`` when column j is committed (rows ``>= next`` still hold the original
    columns). The loss is accumulated block by block, so no error matrix is kept.
    """

    def __init__(self, f: Factor, block: int) -> None:
        self.rt, self.vn, self.vd = f.wt, f.vn, f.vd
        self.cols, rows = self.rt.shape
        self.block = max(1, block)
        self.next = 0  # all columns < next are done
        self._b = (0, 0, None)  # block cache: (start, end, own-turn values at block start)
        self._s = (0, 0, None)  # sub-block cache: (start, end, current values), kept eager
        self._rows = self.rt.unbind(0)  # per-column views, made once
        self._s_rows: tuple[Tensor, ...] = ()
        self._s_vn: tuple[Tensor, ...] = ()
        self._et = torch.empty(min(self.block, self.cols), rows, dtype=self.rt.dtype,
                               device=self.rt.device)
        self._et_rows = self._et.unbind(0)
        self._loss = torch.zeros(rows, dtype=self.rt.dtype, device=self.rt.device)
        self._et_start = 0  # column of _et[0]

    def d(self, j0: int, j1: int) -> Tensor:
        """The papers' ``d_j = [U]_jj = sqrt([H⁻¹]_jj | later columns)`` for ``j0 <= j < j1``."""
        return 1.0 / self.vd[j0:j1]

    def _refresh(self) -> None:
        j = self.next
        b0, b1, _ = self._b
        if not b0 <= j < b1:
            self._flush_loss()
            b0, b1 = j, min(j + self.block, self.cols)
            bt = torch.addmm(self.rt[b0:b1], self.vn[:j, b0:b1].t(), self.rt[:j])
            self._b = (b0, b1, bt)
        s0, s1, _ = self._s
        if not s0 <= j < s1:
            b0, b1, bt = self._b
            s0, s1 = j, min(j + SUB_BLOCK, b1)
            st = torch.addmm(bt[s0 - b0:s1 - b0], self.vn[b0:j, s0:s1].t(), self.rt[b0:j])
            self._s = (s0, s1, st)
            self._s_rows = st.unbind(0)
            self._s_vn = self.vn[s0:s1, s0:s1].unbind(0)

    def _flush_loss(self) -> None:
        n = self.next - self._et_start
        if n > 0:
            e = self._et[:n].mul_(self.vd[self._et_start:self.next, None])
            self._loss.add_(e.square_().sum(0), alpha=0.5)
        self._et_start = self.next

    def _own_turn(self, j0: int, j1: int) -> Tensor:
        """``W_j + Σ_{k<next} R_k V_kj / V_jj`` for ``j0 <= j < j1`` (a new tensor): column
        j's value when its turn comes, if the columns from ``next`` to j-1 then add nothing."""
        j = self.next
        self._refresh()
        s0, s1, st = self._s
        if s0 <= j0 and j1 <= s1:
            return st[j0 - s0:j1 - s0].clone()
        b0, b1, bt = self._b
        if b0 <= j0 and j1 <= b1:
            return torch.addmm(bt[j0 - b0:j1 - b0], self.vn[b0:j, j0:j1].t(), self.rt[b0:j])
        return torch.addmm(self.rt[j0:j1], self.vn[:j, j0:j1].t(), self.rt[:j])

    def current(self, j0: int, j1: int) -> Tensor:
        """Current (corrected) values of the next columns ``j0 = next .. j1-1``, transposed
        ``(n, rows)``: what the reference's eager updates would hold now. Used to choose masks
        and group grids ahead of the columns' turns.

        With ``S = R_{<j0} V_{<j0, j0:j1}``, the eager state is ``W + S · V[j0:j1, j0:j1]⁻¹``
        (``U = V⁻¹`` and ``V U = I`` give ``E_{<j0} U_{<j0, b} = -R_{<j0} V_{<j0, b} U_bb``);
        only column j0 of it equals ``W + S / V_jj``. With the normalised ``Vn`` (``V = Vn ·
        diag(V)``) that is ``W + Vn_bb⁻ᵀ (own turn - W)``: a unit triangular solve.
        """
        if j0 != self.next:
            raise ValueError(f"current() starts at the next column {self.next}, not {j0}")
        j1 = min(j1, self.cols)
        w = self.rt[j0:j1]
        s = self._own_turn(j0, j1).sub_(w)
        vn = self.vn[j0:j1, j0:j1].contiguous()  # solved as Xᵀ Vn = Sᵀ: no transposed copies
        x = torch.linalg.solve_triangular(vn, s.t(), upper=True, left=False, unitriangular=True)
        return x.t().add_(w)

    def column(self) -> Tensor:
        """The current value of the next column, ``(rows,)`` (a view: do not modify it)."""
        self._refresh()
        return self._s_rows[self.next - self._s[0]]

    def commit(self, w: Tensor, q: Tensor) -> None:
        """Fix the next column to ``q`` (its current value was ``w``); the later columns of
        the sub-block take its residual now."""
        j = self.next
        r = self._rows[j].sub_(q)
        torch.sub(w, q, out=self._et_rows[j - self._et_start])
        i = j - self._s[0]
        if i + 1 < len(self._s_rows):
            self._s[2][i + 1:].addr_(self._s_vn[i][i + 1:], r)
        self.next += 1

    def row_loss(self) -> Tensor:
        """Per output row, ``½ Σ_j err_j²`` with ``err_j = (w_j - q_j) / d_j``: the
        ‖(W - Q) Xᵀ‖² / n that the sweep incurred, in units of the damped Hessian."""
        self._flush_loss()
        return self._loss
