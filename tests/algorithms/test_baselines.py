import pytest
import torch

from fxcompress.algorithms import Grid, magnitude, magnitude_mask, rtn
from fxcompress.methods import RTN, Magnitude


def test_rtn_is_round_to_nearest_on_the_fitted_grid():
    w = torch.randn(8, 64)
    c = rtn(w, Grid(bits=4, group_size=16))
    s = c.scale[:, c.g_idx.long()]
    z = c.zero[:, c.g_idx.long()].float()
    assert torch.equal(c.codes.float(), torch.clamp(torch.round(w / s) + z, 0, 15))


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (4, 8)])
def test_magnitude_n_m_keeps_the_largest_n_of_every_m(n_m):
    n, m = n_m
    w = torch.randn(6, 32)
    keep = magnitude_mask(w, n_m=n_m)
    groups, kept = w.abs().reshape(6, -1, m), keep.reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    smallest_kept = torch.where(kept, groups, torch.inf).min(-1).values
    largest_dropped = torch.where(~kept, groups, -torch.inf).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_magnitude_with_rtn_quantizes_the_kept_weights():
    w = torch.randn(8, 64)
    c = magnitude(w, n_m=(2, 4), quant=Grid(bits=4, group_size=32))
    assert (c.dense()[~c.mask] == 0).all()
    assert c.quantized and c.sparsity() == 0.5


@pytest.mark.parametrize("method", [RTN(3, 32), RTN(4, 16), RTN(8, -1),
                                    Magnitude(n_m=(2, 4), quant=RTN(4, 16)), Magnitude(0.6)],
                         ids=["w3", "w4", "w8", "2:4+w4", "60%"])
def test_a_compacted_result_is_the_same_result(method):
    """``Compressed.compact`` (what an in-memory run holds) packs codes and mask without
    changing the weight, its mask, its codes, or how it splits into stacked layers' parts."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(7))
    c = method.solve(w, None)
    dense, keep, codes = c.dense(), c.keep(), c.codes
    parts = c.split([16, 32])
    c.compact()
    assert c.mask is None and c.codes is None
    assert torch.equal(c.dense(), dense)
    assert keep is None and c.keep() is None or torch.equal(c.keep(), keep)
    if codes is not None:
        assert torch.equal(c.integer_codes(), codes)
    for part, packed_part in zip(parts, c.split([16, 32]), strict=True):
        assert torch.equal(part.dense(), packed_part.dense())
