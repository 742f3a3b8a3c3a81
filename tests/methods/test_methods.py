"""The methods' one door: each registered method checks a layer's shape before any data,
solves through its solver with plain arguments, and declares the statistics it needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fxcompress.algorithms import Grid, Hessian, Statistics, gptq, rtn, sparsegpt
from fxcompress.errors import RecipeError
from fxcompress.methods import (
    CROSS,
    GPTQ,
    HESSIAN,
    INPUT_NORMS,
    METHODS,
    PLANNERS,
    RTN,
    GGUFQuant,
    Magnitude,
    Method,
    SparseGPT,
    owl,
)
from fxcompress.recipe import method_from_dict, method_to_dict


def _problem(rows: int = 24, cols: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=g) * torch.exp(0.5 * torch.randn(cols, generator=g))
    h = Hessian.zeros(cols)
    h.add(x)
    return torch.randn(rows, cols, generator=g), h.value()


def test_the_registry_holds_every_method_by_its_name():
    assert set(METHODS) == {"GPTQ", "SparseGPT", "RTN", "Magnitude", "GGUFQuant"}
    for name, cls in METHODS.items():
        assert cls.__name__ == name and issubclass(cls, Method)
        assert method_from_dict(method_to_dict(cls())) == cls()
    assert owl in PLANNERS


@pytest.mark.parametrize("method, shape, error", [
    (GPTQ(4, 64), (8, 100), "group_size 64 does not divide in_features 100"),
    (RTN(3, 48), (8, 64), "group_size 48 does not divide in_features 64"),
    (SparseGPT(n_m=(2, 8)), (8, 60), "2:8 sparsity needs in_features divisible by 8"),
    (Magnitude(n_m=(2, 4), quant=RTN(4, 32)), (8, 48), "group_size 32 does not divide"),
    (SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)), (8, 48), "group_size 32 does not divide"),
    (GGUFQuant(type="Q4_K"), (8, 576), "Q4_K needs in_features that are a multiple of 256"),
])
def test_check_refuses_a_shape_before_any_data(method, shape, error):
    with pytest.raises(RecipeError, match=error) as e:
        method.check(shape, "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in str(e.value)


@pytest.mark.parametrize("method", [GPTQ(4, 64), GPTQ(4, -1), RTN(8, 32), SparseGPT(0.5),
                                    SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)), Magnitude(0.6),
                                    GGUFQuant(type="Q4_0"), GGUFQuant()])
def test_check_accepts_a_shape_the_solver_takes(method):
    method.check((8, 128))


def test_solve_is_the_solver_on_plain_arguments():
    """A method's solve and its solver given the same settings by hand agree exactly."""
    w, h = _problem()
    stats = Statistics(h, 512)
    cfg = GPTQ(3, 16, sym=True, act_order=False, damp=0.02, block_size=32, shrink=0.3)
    ours, plain = cfg.solve(w, stats), gptq(w, h, Grid(3, 16, sym=True, mse="hessian"),
                                            act_order=False, damp=0.02, block_size=32,
                                            shrink=0.3, refine=4, rescale=True)  # 3 bits: 4 passes
    assert torch.equal(ours.codes, plain.codes) and torch.equal(ours.scale, plain.scale)
    assert ours.loss == plain.loss > 0
    cfg = SparseGPT(n_m=(2, 4), quant=GPTQ(4, 16), solver="sweep")
    ours = cfg.solve(w, stats)
    plain = sparsegpt(w, h, n_m=(2, 4), quant=Grid(4, 16, mse="hessian"), solver="sweep",
                      shrink=0.05)
    assert torch.equal(ours.codes, plain.codes) and torch.equal(ours.mask, plain.mask)
    assert torch.equal(RTN(4, 32).solve(w).codes, rtn(w, Grid(4, 32)).codes)


def test_statistics_are_declared_by_the_method():
    assert GPTQ().needs() == {HESSIAN, CROSS}
    assert GPTQ(dense_output=False).needs() == {HESSIAN}
    assert RTN().needs() == Magnitude().needs() == frozenset()  # data-free
    assert SparseGPT(0.5).model_needs() == {INPUT_NORMS}  # OWL's spread on by default
    assert SparseGPT(0.5, owl_lmbda=0).model_needs() == frozenset()
    assert SparseGPT(n_m=(2, 4)).model_needs() == GPTQ().model_needs() == frozenset()


def test_shrink_is_checked_and_not_carried_into_sparsegpt():
    """GPTQ's shrink is a setting of its own sweep: out of range it is refused, and inside
    SparseGPT (which sweeps with its own shrink) it is stored as what applies, 0."""
    with pytest.raises(RecipeError, match="shrink must be in"):
        GPTQ(4, 64, shrink=-0.1)
    with pytest.raises(RecipeError, match="shrink must be in"):
        SparseGPT(0.5, shrink=1.5)
    assert GPTQ(4, 64).shrink == 0.25
    assert SparseGPT().shrink == 0.05
    assert SparseGPT(quant=GPTQ(4, 64)).quant.shrink == 0.0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_refine_is_checked_and_not_carried_into_sparsegpt(bad):
    """GPTQ's refinement passes are a whole number >= 0; SparseGPT's quantizing sweep does not
    refine (it would move codes of pruned weights), so ``quant`` stores 0, what applies; the
    method hands its passes to the solver."""
    with pytest.raises(RecipeError, match="refine must be"):
        GPTQ(4, 64, refine=bad)
    assert SparseGPT(quant=GPTQ(4, 64, refine=3)).quant.refine == 0
    assert SparseGPT(quant=GPTQ(3, 64)).quant.passes == 0
    assert GPTQ(3, 64).passes == 4 and GPTQ(2, 64).passes == 4
    assert GPTQ(4, 64).passes == GPTQ(8, 64).passes == 0 and GPTQ(4, 64, refine=2).passes == 2
    w, h = _problem()
    ours = GPTQ(3, 16, refine=2).solve(w, Statistics(h, 512))
    plain = gptq(w, h, Grid(3, 16, mse="hessian"), shrink=0.25, refine=2, rescale=True)
    assert torch.equal(ours.codes, plain.codes) and ours.loss == plain.loss
    assert ours.loss < GPTQ(3, 16, refine=0, rescale=True).solve(w, Statistics(h, 512)).loss


@pytest.mark.parametrize("bad", [1, "true", None])
def test_rescale_is_checked_and_not_carried_into_sparsegpt(bad):
    """``rescale`` is a bool, on by default; SparseGPT's quantizing sweep stores False (its
    pruned weights' codes are not the layer's to refit around); the method hands it to the
    solver."""
    with pytest.raises(RecipeError, match="rescale must be"):
        GPTQ(4, 64, rescale=bad)
    assert not SparseGPT(quant=GPTQ(4, 64, rescale=True)).quant.rescale
    w, h = _problem()
    assert GPTQ(4, 64).rescale and GPTQ(3, 64).rescale
    ours = GPTQ(4, 16).solve(w, Statistics(h, 512))
    plain = gptq(w, h, Grid(4, 16, mse="hessian"), shrink=0.25, rescale=True)
    assert torch.equal(ours.scale, plain.scale) and ours.loss == plain.loss
    assert ours.loss < GPTQ(4, 16, rescale=False).solve(w, Statistics(h, 512)).loss


def test_gptq_workspace_covers_the_scale_refit():
    """The memory plan's workspace for GPTQ covers the measured peak of a solve whose scale
    refit dominates it (many groups, few rows: each row's groups x groups system); without the
    refit's share the estimate would fall short of that peak."""
    from fxcompress.osmem import release_freed_memory
    from tests.memory import PeakRSS

    rows, cols = 256, 2048
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * cols, cols, generator=g) @ (torch.randn(cols, cols, generator=g)
                                                    / cols**0.5 + torch.eye(cols))
    h = Hessian.zeros(cols)
    h.add(x)
    w, stats = torch.randn(rows, cols, generator=g), Statistics(h.value(), 2 * cols)
    del x
    method = GPTQ(4, 32)
    release_freed_memory()
    with PeakRSS() as peak:
        result = method.solve(w, stats)
    assert result.loss > 0
    assert peak.growth <= 1.1 * method.workspace((rows, cols))
    assert peak.growth > dataclasses.replace(method, rescale=False).workspace((rows, cols))


@pytest.mark.parametrize("cfg", [SparseGPT(0.5, shrink=0.3), SparseGPT(0.5, solver="sweep",
                                                                       shrink=0.3),
                                 SparseGPT(n_m=(2, 4), quant=GPTQ(4, 16), shrink=0.3)])
def test_sparsegpt_shrink_reaches_its_solver(cfg):
    """SparseGPT's shrink is passed to the solver (both solvers, and the quantizing sweep),
    and it changes the result."""
    w, h = _problem()
    stats = Statistics(h, 512)
    plain = sparsegpt(w, h, cfg.sparsity, cfg.n_m, quant=cfg.quant and cfg.quant.grid,
                      solver=cfg.solver, shrink=0.3)
    ours = cfg.solve(w, stats)
    assert torch.equal(ours.dense(), plain.dense())
    unshrunk = dataclasses.replace(cfg, shrink=0.0).solve(w, stats)
    assert not torch.equal(ours.dense(), unshrunk.dense())


def test_clipping_search_is_checked_and_hessian_needs_a_hessian():
    """GPTQ's default clipping search weighs by H; RTN has none, so it refuses that search."""
    assert GPTQ().mse == "hessian" and GPTQ().grid.mse == "hessian"
    with pytest.raises(RecipeError, match="mse must be one of"):
        GPTQ(4, 64, mse="l1")
    with pytest.raises(RecipeError, match="no Hessian"):
        RTN(4, 64, mse="hessian")
    assert RTN(4, 64, mse=True).grid.mse is True
