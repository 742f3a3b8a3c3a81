import pytest
import torch

from fxcompress.algorithms import Grid, grid, magnitude, sparsegpt
from fxcompress.errors import RecipeError
from fxcompress.methods import SparseGPT

from . import reference
from .conftest import correlated_problem
from .conftest import output_error as measured_error

SETTINGS = [
    dict(sparsity=0.5),
    dict(sparsity=0.7),
    dict(n_m=(2, 4)),
    dict(n_m=(4, 8)),
    dict(n_m=(2, 4), quant=Grid(bits=4, group_size=-1)),
    dict(sparsity=0.5, quant=Grid(bits=4, group_size=-1)),
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_reported_loss_equals_measured_output_error(problem, kw):
    w, x, h = problem
    c = sparsegpt(w, h, damp=1e-7, **kw)
    assert c.loss == pytest.approx(measured_error(w, c.dense(), x), rel=2e-3)


@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_the_right_looking_reference(problem, kw):
    w, x, h = problem
    c = sparsegpt(w, h, block_size=64, solver="sweep", **kw)
    quant = kw.pop("quant", None)
    q_ref, loss_ref = reference.sparsegpt(w, h, block_size=64, bits=quant and quant.bits, **kw)
    assert c.loss == pytest.approx(loss_ref, rel=1e-3)
    assert torch.equal(c.mask, q_ref != 0) or (c.mask != (q_ref != 0)).float().mean() < 0.01


@pytest.mark.parametrize("solver", ["sweep", "admm"])
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n_m=(2, 4))])
def test_beats_magnitude_pruning(kw, solver):
    w, x, h = correlated_problem(64, 256, seed=3)
    ours = measured_error(w, sparsegpt(w, h, **kw, solver=solver).dense(), x)
    baseline = measured_error(w, magnitude(w, **kw).dense(), x)
    assert ours < baseline


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.99])
def test_unstructured_sparsity_is_exact(problem, sparsity):
    w, x, h = problem
    c = sparsegpt(w, h, sparsity, block_size=48)
    assert int((~c.mask).sum()) == round(sparsity * w.numel())
    assert torch.equal(c.dense() == 0, ~c.mask)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_every_group_of_m_keeps_exactly_n(problem, n, m):
    w, x, h = problem
    c = sparsegpt(w, h, n_m=(n, m))
    assert (c.mask.reshape(48, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("group_size", [-1, 64])
def test_joint_mode_keeps_weights_on_the_grid(problem, group_size):
    w, x, h = problem
    c = sparsegpt(w, h, n_m=(2, 4), quant=Grid(bits=4, group_size=group_size))
    g = c.g_idx.long()
    s, z = grid.expand(c.scale, g), grid.expand(c.zero.float(), g)
    wq = c.dense()
    codes = torch.round(wq / s) + z
    assert torch.allclose(grid.dequantize(codes, s, z), wq, atol=1e-6)
    assert (c.codes[~c.mask] == z[~c.mask]).all()  # pruned weights sit on the zero point
    assert (wq[~c.mask] == 0).all()


def test_bad_settings_are_clear_errors(problem):
    w, x, h = problem
    with pytest.raises(RecipeError, match="sparsity must be in"):
        SparseGPT(sparsity=1.0)
    with pytest.raises(RecipeError, match="0 < N < M"):
        SparseGPT(n_m=(4, 4))
    with pytest.raises(RecipeError, match="0 < N < M"):
        SparseGPT(n_m=(5, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        sparsegpt(w[:, :252], h[:252, :252], n_m=(4, 8), block_size=128)
    with pytest.raises(RecipeError, match="divisible by 8"):  # found at plan time
        SparseGPT(n_m=(4, 8)).check((48, 252), "fc")


@pytest.mark.parametrize("quant", [None, Grid(bits=4, group_size=32)])
def test_n_m_rows_are_independent_so_stacked_layers_split_exactly(problem, quant):
    w, x, h = problem
    parts = [w[:16], w[16:]]
    # the sweep's N:M masks are per row; ADMM's re-selection ramps the pruned fraction over
    # all rows together, so a stacked ADMM solve is one problem, not the parts' solves
    cfg = dict(n_m=(2, 4), quant=quant, solver="sweep")
    for s, part in zip(sparsegpt(parts, h, **cfg).split([16, 32]), parts, strict=True):
        alone = sparsegpt(part, h, **cfg)
        assert torch.equal(s.mask, alone.mask)
        assert torch.equal(s.dense(), alone.dense())
        assert s.loss == pytest.approx(alone.loss, rel=1e-4)
