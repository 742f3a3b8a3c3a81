import pytest
import torch

from fxcompress.algorithms import grid
from fxcompress.errors import RecipeError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16, 64])
def test_codes_in_range_and_rtn_within_half_step(bits, sym, group_size):
    w = torch.randn(12, 128) * torch.rand(12, 1) * 3
    scale, zero = grid.fit_groups(w, bits, group_size, sym)
    gs = 128 if group_size == -1 else group_size
    assert scale.shape == zero.shape == (12, 128 // gs)
    g = torch.arange(128) // gs
    s, z = grid.expand(scale, g), grid.expand(zero, g)
    codes = grid.quantize(w, s, z, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes, codes.round())
    err = (grid.dequantize(codes, s, z) - w).abs()
    # asymmetric grids cover [min, max]; symmetric ones clip the top code (2**(b-1) - 1 steps)
    bound = 0.5 * s + 1e-6 if not sym else torch.maximum(0.5 * s, w.abs() - (2**(bits - 1) - 1) * s)
    assert (err <= bound + 1e-6).all()


def test_scales_are_float16_exact_and_zero_is_integer():
    w = torch.randn(7, 64)
    scale, zero = grid.fit(w, 4, sym=False)
    assert torch.equal(scale, scale.half().float())
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15


def test_symmetric_zero_point_is_midpoint():
    scale, zero = grid.fit(torch.randn(5, 32), 3, sym=True)
    assert (zero == 4).all()


def test_all_zero_rows_get_a_valid_grid():
    scale, zero = grid.fit(torch.zeros(3, 8), 4, sym=False)
    codes = grid.quantize(torch.zeros(3, 8), scale[:, None], zero[:, None], 4)
    assert torch.equal(grid.dequantize(codes, scale[:, None], zero[:, None]), torch.zeros(3, 8))


def test_mse_search_never_increases_the_error():
    w = torch.randn(32, 128)
    w[:, 0] *= 20  # outliers make shrinking the range worthwhile
    for sym in (False, True):
        errs = []
        for mse in (False, True):
            s, z = grid.fit(w, 3, sym, mse)
            q = grid.dequantize(grid.quantize(w, s[:, None], z[:, None], 3), s[:, None], z[:, None])
            errs.append((q - w).abs().pow(2.4).sum(1))
        assert (errs[1] <= errs[0] + 1e-4).all()
        assert errs[1].sum() < errs[0].sum()


def _weighted_error(w, s, z, bits, weight):
    q = grid.dequantize(grid.quantize(w, s[:, None], z[:, None], bits), s[:, None], z[:, None])
    return ((q - w).square() * weight).sum(1)


@pytest.mark.parametrize("sym", [False, True])
def test_hessian_search_minimises_the_weighted_error(sym):
    """``mse="hessian"`` returns, per row, the candidate range of least
    ``Σ_j H_jj (w_j - q_j)²`` (checked against every candidate), which is below the min-max
    range's on that objective where heavy inputs and large weights differ."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    weight = torch.exp(2 * torch.randn(64, generator=g))  # uneven diag H
    best = _weighted_error(w, *grid.fit(w, 3, sym, "hessian", weight=weight), 3, weight)
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    pairs = [(a, a) for a in grid.HESSIAN_SHRINKS] if sym else \
        [(a, b) for a in grid.HESSIAN_SHRINKS for b in grid.HESSIAN_SHRINKS]
    every = torch.stack([_weighted_error(w, *grid._params(a * lo, b * hi, 7, sym), 3, weight)
                         for a, b in pairs])
    torch.testing.assert_close(best, every.min(0).values, rtol=1e-6, atol=0)
    minmax = _weighted_error(w, *grid.fit(w, 3, sym), 3, weight)
    assert best.sum() < 0.9 * minmax.sum()


def test_hessian_search_clips_an_outlier_only_where_its_input_is_light():
    """One large weight per row in column 0: when input 0 carries little signal the range is
    clipped below it (a finer step for the rest), when it carries much the outlier is kept."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    w[:, 0] = 8.0
    light, heavy = torch.ones(64), torch.ones(64)
    light[0], heavy[0] = 1e-4, 1e4

    def outlier(weight):
        s, z = grid.fit(w, 3, False, "hessian", weight=weight)
        return grid.dequantize(grid.quantize(w[:, 0], s, z, 3), s, z)

    assert (outlier(light) < 0.8 * 8.0).all()
    assert ((outlier(heavy) - 8.0).abs() < 0.05 * 8.0).all()


def test_bad_clipping_settings_are_refused():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="mse must be one of"):
        grid.fit(w, 4, False, "l1")
    with pytest.raises(ValueError, match="go together"):
        grid.fit(w, 4, False, "hessian")
    with pytest.raises(ValueError, match="go together"):
        grid.fit(w, 4, False, True, weight=torch.ones(16))


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits_are_rejected(bits):
    with pytest.raises(RecipeError, match="bits must be one of"):
        grid.fit_groups(torch.randn(4, 32), bits, -1, False)


def test_group_size_must_divide_in_features():
    with pytest.raises(RecipeError, match="does not divide in_features 100"):
        grid.fit_groups(torch.randn(4, 100), 4, 64, False)


def _rows_of_every_kind(seed: int) -> torch.Tensor:
    """Random rows over five orders of magnitude, plus the edge rows: all zero, no negatives,
    no positives, values below float16's smallest normal step."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 96, generator=g) * torch.exp(3 * torch.randn(64, 1, generator=g))
    w[0] = 0
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    w[3] *= 1e-6
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_fit_and_quantize_equal_the_reference_grid(bits, sym):
    """The grid against the one ``reference`` writes from the GPTQ paper's code: the same
    scales (float16, rounded up), zero points and dequantized values, exactly."""
    from . import reference

    for seed in range(3):
        w = _rows_of_every_kind(seed)
        scale, zero = grid.fit(w, bits, sym)
        ref_scale, ref_zero = reference.find_params(w, bits, sym)
        assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero), (seed, bits, sym)
        s, z = scale[:, None], zero[:, None]
        q = grid.dequantize(grid.quantize(w, s, z, bits), s, z)
        assert torch.equal(q, reference.quantize(w, s, z, bits))
        assert (q != w).any()  # the inputs do not sit on the grid already
