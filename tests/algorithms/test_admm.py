"""ADMM pruning against a slow reference: the exact least-squares weights for its mask."""

import dataclasses

import pytest
import torch

from fxcompress import GPTQ, SparseGPT
from fxcompress.algorithms import Statistics, output_error
from fxcompress.algorithms.admm import _keep_largest, _n_m_keep, admm_prune, select_mask


def _problem(rows=24, cols=32, n=512, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=dtype) @ torch.randn(cols, cols, generator=g,
                                                                    dtype=dtype)
    x = x * (torch.rand(cols, generator=g, dtype=dtype) * 3 + 0.2)
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    return w, 2 * x.t() @ x / n


def _masked_least_squares(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row by row, min (v - w) H (v - w)ᵀ with v zero off the mask: v_K = w_K + H_KK⁻¹ H_KD w_D."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k, d = keep[r], ~keep[r]
        out[r, k] = w[r, k] + torch.linalg.solve(h[k][:, k], h[k][:, d] @ w[r, d])
    return out


def _admm_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The damped objective ADMM minimises: H + damp · diag(H) (damping in the coordinates
    where every input has unit scale)."""
    return h + damp * torch.diag(torch.diag(h))


def _ties(shape, dtype, seed):
    """Non-negative scores with many exact ties, zeros and infinities (as N:M candidates
    carry), on a layer-sized matrix."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=dtype).abs()
    s = torch.where(torch.rand(shape, generator=g) < 0.3, (s * 8).round() / 8, s)
    return torch.where(torch.rand(shape, generator=g) < 0.1, torch.inf, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", [0, 1, 777, 0.5, 0.9, 1.0])
def test_keep_largest_drops_exactly_the_smallest(dtype, drop):
    """The radix select drops exactly ``drop`` entries, none larger than a kept one: the
    same kept values (as a multiset) as ``topk``."""
    s = _ties((384, 256), dtype, seed=5)
    drop = drop if isinstance(drop, int) else round(drop * s.numel())
    keep = _keep_largest(s, drop)
    assert int((~keep).sum()) == drop
    expected = torch.sort(s.flatten()).values[drop:]
    assert torch.equal(torch.sort(s[keep]).values, expected)


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (3, 8), (4, 8)])
def test_n_m_keep_matches_a_stable_sort(n_m):
    """The pairwise-compare N:M mask against the n first of a stable descending sort of every
    group (so ties go to the first input), with many ties."""
    n, m = n_m
    s = _ties((96, 512), torch.float32, seed=6)
    order = torch.sort(s.reshape(-1, m), dim=1, descending=True, stable=True).indices
    expected = torch.zeros(order.shape, dtype=torch.bool).scatter_(1, order[:, :n], True)
    assert torch.equal(_n_m_keep(s, n, m), expected.view_as(s))


def _shrunk(h: torch.Tensor, shrink: float) -> torch.Tensor:
    """H with its off-diagonal scaled by ``1 - shrink`` (``hessian.factor``'s shrinkage)."""
    return h * (1 - shrink) + torch.diag(torch.diag(h)) * shrink


@pytest.mark.parametrize("shrink", [0.0, 0.25])
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_converges_to_the_exact_fit_of_its_mask(n_m, shrink):
    """The fixed point is the least-squares fit of the mask under the (shrunk) damped H."""
    w, h = _problem()
    damp = 0.01
    keep = select_mask(w.abs(), 0.5, n_m)
    c = admm_prune(w, h, 0.5, n_m, damp=damp, iters=400, keep=keep, shrink=shrink)
    assert torch.equal(c.mask, keep)
    expected = _masked_least_squares(w, _admm_hessian(_shrunk(h, shrink), damp), keep)
    torch.testing.assert_close(c.values.double(), expected, rtol=1e-4, atol=1e-4 * w.abs().max())
    if shrink:  # the shrunk fit is another one: not the unshrunk fit of the same mask
        plain = _masked_least_squares(w, _admm_hessian(h, damp), keep)
        assert (c.values.double() - plain).abs().max() > 1e-2 * w.abs().max()


def test_full_shrink_is_activation_weighted_magnitude_pruning():
    """At shrink 1 the inputs are treated as uncorrelated: the kept weights converge to their
    own values (nothing is compensated) and the mask is, up to the weights the gradual
    reselection leaves at the threshold, the smallest ``|w| · sqrt(H_jj)`` dropped (Wanda's
    score over the whole layer). Unshrunk, the kept weights move to compensate."""
    w, h = _problem(rows=48, cols=64, seed=7)
    score = w.abs() * torch.diag(h).sqrt()
    wanda = _keep_largest(score, round(0.5 * w.numel()))
    c = admm_prune(w, h, 0.5, shrink=1.0, iters=60)
    assert (c.mask != wanda).float().mean() < 0.03
    torch.testing.assert_close(c.values.double(), w * c.mask, rtol=0, atol=1e-4 * w.abs().max())
    plain = admm_prune(w, h, 0.5, iters=60)
    assert (plain.values.double() - w * plain.mask).abs().max() > 0.1 * w.abs().max()


def test_masks_have_the_exact_sparsity():
    w, h = _problem(rows=40, cols=64, seed=1, dtype=torch.float32)
    c = admm_prune(w, h, 0.6)
    assert int((~c.mask).sum()) == round(0.6 * w.numel())
    c = admm_prune(w, h, n_m=(2, 4))
    assert (c.mask.reshape(40, 16, 4).sum(-1) == 2).all()
    assert torch.all(c.values[~c.mask] == 0)


def test_loss_is_the_output_error_of_the_result():
    w, h = _problem(rows=16, cols=32, seed=2, dtype=torch.float32)
    c = admm_prune(w, h, 0.5)
    assert c.loss == pytest.approx(output_error(w, c.values, h), rel=1e-4)


@pytest.mark.parametrize("cfg", [SparseGPT(0.5, solver="sweep"),
                                 SparseGPT(n_m=(2, 4), solver="sweep"),
                                 SparseGPT(n_m=(2, 4), quant=GPTQ(4, 16), solver="sweep")],
                         ids=str)
def test_admm_is_no_worse_than_the_sweep_on_correlated_inputs(cfg):
    """On inputs with correlated, unevenly scaled features (where the greedy sweep's
    compensation is furthest from optimal), ADMM's output error is lower."""
    w, h = _problem(rows=64, cols=128, n=2048, seed=3, dtype=torch.float32)
    sweep = cfg.solve(w, Statistics(h, 2048))
    admm = dataclasses.replace(cfg, solver="admm").solve(w, Statistics(h, 2048))
    assert admm.sparsity() == pytest.approx(sweep.sparsity(), abs=1e-3)
    assert output_error(w, admm.dense(), h) < output_error(w, sweep.dense(), h)
    if cfg.quant is not None:  # the quantized result keeps the ADMM mask, on the grid
        assert admm.codes is not None and admm.mask is not None
        assert torch.equal(admm.dense() == 0, ~admm.mask | (admm.dense() == 0))


def test_solver_is_validated_and_in_statistics_free_of_cross():
    with pytest.raises(ValueError, match="solver"):
        SparseGPT(solver="lbfgs")
    w, h = _problem(rows=8, cols=16, seed=4, dtype=torch.float32)
    c = SparseGPT(solver="admm").solve(w, Statistics(h, 512))
    assert c.values is not None and c.sparsity() == pytest.approx(0.5)
