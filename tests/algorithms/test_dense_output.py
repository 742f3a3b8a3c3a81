"""Dense-output calibration: the reduction to the usual sweep on W* = W + W C (H + λI)⁻¹.

The compressed model's inputs X̃ and the dense model's inputs X of a layer are simulated as
X and X plus a structured drift (what the errors of earlier compressed layers look like: a
low-rank distortion plus noise), so that the dense-output target differs measurably from W.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress import GPTQ, SparseGPT
from fxcompress.algorithms import Cross, OutputCross, Statistics, WeightedCross, factor

DT = torch.float64


def _inputs(n: int, cols: int, drift: float, seed: int, dtype=DT) -> tuple:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(cols, generator=g, dtype=DT) * 2 + 0.1
    x = torch.randn(n, cols, generator=g, dtype=DT) @ torch.randn(cols, cols, generator=g,
                                                                   dtype=DT) / cols ** 0.5
    x = x * scales
    distort = torch.randn(cols, 4, generator=g, dtype=DT) @ torch.randn(4, cols, generator=g,
                                                                          dtype=DT)
    noise = torch.randn(n, cols, generator=g, dtype=DT)
    x_tilde = x + drift * (x @ distort / cols ** 0.5 + noise * x.std())
    return x_tilde.to(dtype), x.to(dtype)


def _stats(x_tilde: torch.Tensor, x: torch.Tensor) -> Statistics:
    """H = 2X̃ᵀX̃/n and C = 2(X − X̃)ᵀX̃/n, computed directly (in the inputs' precision)."""
    n = x.shape[0]
    return Statistics(2 * x_tilde.t() @ x_tilde / n, n, 2 * (x - x_tilde).t() @ x_tilde / n)


def _objective(q: torch.Tensor, w: torch.Tensor, x_tilde: torch.Tensor, x: torch.Tensor) -> float:
    """The dense-output objective ‖X̃Qᵀ − XWᵀ‖² / n."""
    return float((x_tilde @ q.t().to(x.dtype) - x @ w.t().to(x.dtype)).square().sum()) / len(x)


def test_target_is_the_least_squares_fit_of_the_dense_output():
    """Without damping, W* solves min_Q ‖X̃Qᵀ − XWᵀ‖² exactly (fp64, against lstsq)."""
    x_tilde, x = _inputs(400, 24, drift=0.3, seed=0)
    w = torch.randn(10, 24, dtype=DT, generator=torch.Generator().manual_seed(1))
    stats = _stats(x_tilde, x)
    target = factor(w, stats.hessian, damp=0.0, cross=stats.cross).w
    expected = torch.linalg.lstsq(x_tilde, x @ w.t()).solution.t()
    torch.testing.assert_close(target, expected, rtol=1e-9, atol=1e-9)
    assert (target - w).norm() > 0.05 * w.norm()  # the drift really moves the target


def test_damping_regularises_the_correction_towards_w():
    """With damping λ·mean(diag H), W* − W is the ridge regression of the drift with
    μ = n·λ·mean(diag H)/2 (H = 2X̃ᵀX̃/n), so W* → W as λ grows, never towards zero."""
    n, cols = 300, 16
    x_tilde, x = _inputs(n, cols, drift=0.2, seed=2)
    w = torch.randn(6, cols, dtype=DT, generator=torch.Generator().manual_seed(3))
    stats = _stats(x_tilde, x)
    damp = 0.05
    target = factor(w, stats.hessian, damp=damp, cross=stats.cross).w
    mu = n * damp * float(torch.diag(stats.hessian).mean()) / 2
    rhs = x_tilde.t() @ ((x - x_tilde) @ w.t())
    delta = torch.linalg.solve(x_tilde.t() @ x_tilde + mu * torch.eye(cols, dtype=DT), rhs).t()
    torch.testing.assert_close(target, w + delta, rtol=1e-9, atol=1e-9)
    far = factor(w, stats.hessian, damp=0.99, cross=stats.cross).w
    assert (far - w).norm() < (target - w).norm()


def test_no_drift_keeps_the_weight():
    x, _ = _inputs(200, 16, drift=0.0, seed=4, dtype=torch.float32)
    w = torch.randn(8, 16)
    stats = _stats(x, x)
    assert torch.count_nonzero(stats.cross) == 0
    torch.testing.assert_close(factor(w, stats.hessian, cross=stats.cross).w, w)


def test_dead_inputs_stay_zero_in_the_target():
    x_tilde, x = _inputs(200, 16, drift=0.2, seed=5, dtype=torch.float32)
    x_tilde[:, 3] = 0.0  # an input the compressed model never fires
    w = torch.randn(8, 16)
    stats = _stats(x_tilde, x)
    f = factor(w, stats.hessian, cross=stats.cross)
    assert f.dead[3] and torch.all(f.w[:, 3] == 0)


def test_cross_moment_accumulates_in_batches():
    x_tilde, x = _inputs(256, 12, drift=0.2, seed=6, dtype=torch.float32)
    c = Cross.zeros(12)
    for a, b in zip(x_tilde.split(100), x.split(100), strict=True):
        c.add(a, b)
    expected = 2 * (x - x_tilde).t() @ x_tilde / 256
    torch.testing.assert_close(c.value(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    with pytest.raises(ValueError, match="features"):
        c.add(x_tilde[:, :5], x[:, :5])


def test_output_form_gathers_w_c():
    """``OutputCross`` gathers ``W C = 2 ((X − X̃)Wᵀ)ᵀX̃ / n`` in batches: the direct formula
    (fp64) on a down-projection shape, in float32, with no loss of the drift's digits even
    where the drift is 1 % of the activations."""
    for drift in (0.15, 0.01):
        x_tilde, x = _inputs(2048, 96, drift=drift, seed=11, dtype=torch.float32)
        w = torch.randn(40, 96, generator=torch.Generator().manual_seed(12))
        out = OutputCross(w)
        for a, xb in zip(x_tilde.split(500), x.split(500), strict=True):
            out.add(a, xb)
        xd, xtd = x.double(), x_tilde.double()
        expected = w.double() @ (2 * (xd - xtd).t() @ xtd / 2048)
        got = out.take().double()
        assert (got - expected).norm() < 1e-5 * expected.norm()
    with pytest.raises(ValueError, match="features"):
        OutputCross(w).add(x_tilde[:, :5], x[:, :5])


@pytest.mark.parametrize("order", [False, True], ids=["natural", "act-order"])
def test_factor_takes_w_c_as_it_takes_c(order):
    """The target W* from ``W C`` equals the one from ``C``, in natural and permuted order,
    for stacked weights too (fp64)."""
    x_tilde, x = _inputs(400, 24, drift=0.3, seed=13)
    g = torch.Generator().manual_seed(14)
    parts = [torch.randn(5, 24, dtype=DT, generator=g), torch.randn(3, 24, dtype=DT, generator=g)]
    stats = _stats(x_tilde, x)
    perm = torch.randperm(24, generator=g) if order else None
    wc = WeightedCross(torch.cat(parts) @ stats.cross)
    got = factor(parts, stats.hessian, cross=wc, order=perm)
    want = factor(parts, stats.hessian, cross=stats.cross, order=perm)
    torch.testing.assert_close(got.w, want.w, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="does not fit"):
        factor(parts[0], stats.hessian, cross=wc)


METHODS = [GPTQ(4, 16), GPTQ(3, 16, act_order=True), GPTQ(4, -1), SparseGPT(0.5),
           SparseGPT(n_m=(2, 4)), SparseGPT(n_m=(2, 4), quant=GPTQ(4, 16))]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_dense_output_wins_on_its_objective(method):
    """On a 64-wide layer with drifted inputs, the dense-output solve has a lower dense-output
    objective than the plain solve, and it is also below the objective of the uncompressed W
    applied to X̃ (the plain solve cannot undo the drift)."""
    x_tilde, x = _inputs(1024, 64, drift=0.15, seed=7, dtype=torch.float32)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(8))
    stats = _stats(x_tilde, x)
    plain = method.solve(w, Statistics(stats.hessian, stats.count), "plain").dense()
    dense = type(method)(**{**vars(method), "dense_output": True}).solve(w, stats, "dense")
    ours, theirs = _objective(dense.dense(), w, x_tilde, x), _objective(plain, w, x_tilde, x)
    assert ours < 0.97 * theirs
    if isinstance(method, GPTQ) and method.bits == 4:
        assert ours < _objective(w, w, x_tilde, x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), drift=st.floats(0.05, 0.5), bits=st.sampled_from([2, 3, 4]),
       sparse=st.booleans())
def test_dense_output_is_never_worse_on_its_own_objective(seed, drift, bits, sparse):
    x_tilde, x = _inputs(512, 32, drift=drift, seed=seed, dtype=torch.float32)
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(seed + 1))
    stats = _stats(x_tilde, x)
    method = SparseGPT(0.5, block_size=32) if sparse else GPTQ(bits, 16)
    plain = method.solve(w, Statistics(stats.hessian, stats.count)).dense()
    dense = type(method)(**{**vars(method), "dense_output": True}).solve(w, stats).dense()
    assert _objective(dense, w, x_tilde, x) <= _objective(plain, w, x_tilde, x) * (1 + 1e-6)
