"""The statistics registry: what a plan's methods ask for, and the sums it gathers for them."""

from types import SimpleNamespace

import torch

from fxcompress import GPTQ, RTN, SparseGPT
from fxcompress.calibration import statistics
from fxcompress.methods import CROSS, HESSIAN


def _site(fqn: str, out: int, inp: int) -> SimpleNamespace:
    return SimpleNamespace(fqn=fqn, kind="linear", index=None, shape=(out, inp))


def test_the_dense_path_is_asked_of_the_methods_statistics():
    assert statistics.Needs({"a": GPTQ(4, 32)}).dense
    assert not statistics.Needs({"a": GPTQ(4, 32, dense_output=False)}).dense
    mixed = statistics.Needs({"a": SparseGPT(0.5, dense_output=False), "b": GPTQ(4, 32)})
    assert mixed.dense and mixed.all == {HESSIAN, CROSS}
    assert statistics.Needs({"a": RTN(4, 32)}).data_free
    assert not statistics.Needs({"a": RTN(4, 32)}).dense


def _sums(group, needs, xt, xd, weights):
    sums = statistics.start(needs, needs.union(group), group, xt[0], lambda s: weights[s.fqn])
    for a, b in zip(xt, xd, strict=True):
        statistics.accumulate(sums, a, b)
    return sums


def test_streamed_sums_are_h_and_the_cross_moment_or_each_weights_w_c():
    g = torch.Generator().manual_seed(0)
    xt = [torch.randn(2, 7, 48, generator=g) for _ in range(3)]
    xd = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xt]
    rows_t, rows_d = (torch.cat(v).reshape(-1, 48).double() for v in (xt, xd))
    n = rows_t.shape[0]
    h_ref = 2 * rows_t.T @ rows_t / n
    c_ref = 2 * (rows_d - rows_t).T @ rows_t / n
    wide = [_site("q", 48, 48), _site("k", 16, 48)]  # 64 rows >= 24: C itself
    narrow = [_site("down", 16, 48)]  # 32 rows < 48 columns: gathered as W C
    weights = {s.fqn: torch.randn(s.shape, generator=g) for s in wide + narrow}
    for group in (wide, narrow):
        needs = statistics.Needs({s.fqn: GPTQ(4, 16) for s in group})
        sums = _sums(group, needs, xt, xd, weights)
        assert sums[HESSIAN].count == n
        torch.testing.assert_close(sums[HESSIAN].take().double(), h_ref, rtol=1e-4, atol=1e-4)
        if group is wide:
            assert set(sums) == {HESSIAN, CROSS}
            got = sums[CROSS].take().double()
            torch.testing.assert_close(got, c_ref, rtol=1e-4, atol=1e-4 * c_ref.abs().max())
        else:
            assert set(sums) == {HESSIAN, f"{CROSS}:down"}
            wc = weights["down"].double() @ c_ref
            got = sums[f"{CROSS}:down"].take().double()
            torch.testing.assert_close(got, wc, rtol=1e-4, atol=1e-4 * wc.abs().max())


def test_the_estimate_counts_each_statistic_once_per_key():
    wide, narrow = [_site("q", 48, 48), _site("k", 16, 48)], [_site("down", 16, 48)]
    dense = statistics.Needs({s.fqn: GPTQ(4, 16) for s in wide + narrow})
    plain = statistics.Needs({s.fqn: GPTQ(4, 16, dense_output=False) for s in wide + narrow})
    assert plain.nbytes(wide, pinned=False) == 4 * 48 * 48
    assert dense.nbytes(wide, pinned=False) == 2 * 4 * 48 * 48  # H and C
    assert dense.nbytes(narrow, pinned=False) == 4 * 48 * (48 + 2 * 16)  # H, W C and W
