import pytest
import torch

from fxcompress.algorithms import Grid, Hessian, HessianNotPositiveDefinite, factor, gptq


@pytest.mark.parametrize("features", [16, 300])  # full, and triangular in ragged panels
def test_accumulates_any_leading_shape_and_partial_sums_add_up(features):
    x = torch.randn(3, 5, 7, features, dtype=torch.float64).float()
    whole = Hessian.zeros(features)
    whole.add(x)
    parts = [Hessian.zeros(features) for _ in range(3)]
    for p, xi in zip(parts, x, strict=True):
        p.add(xi)
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    flat = x.reshape(-1, features).double()
    expected = (2 * flat.t() @ flat / flat.shape[0]).float()
    assert whole.count == merged.count == 105
    torch.testing.assert_close(whole.value(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.value(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features", [48, 1100])  # full, and triangular in panels of 128
def test_take_equals_value_and_consumes_the_sum(features):
    h = Hessian.zeros(features)
    h.add(torch.randn(300, features))
    h.add(torch.randn(7, features))
    expected = h.value()
    taken = h.take()
    assert torch.equal(taken, expected) and torch.equal(taken, taken.t())
    assert h.sum.numel() == 0


def test_wrong_feature_count_and_empty_hessian_are_errors():
    h = Hessian.zeros(8)
    with pytest.raises(ValueError, match="8"):
        h.add(torch.randn(4, 9))
    with pytest.raises(ValueError, match="no samples"):
        h.value()


def test_factor_is_a_cholesky_of_the_damped_hessian():
    x = torch.randn(200, 32)
    h = 2 * x.t() @ x / 200
    f = factor(torch.randn(4, 32), h, damp=0.01)
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(32)
    torch.testing.assert_close(f.v @ f.v.t(), damped, rtol=1e-4, atol=1e-4)
    assert torch.equal(f.v, torch.triu(f.v))


@pytest.mark.parametrize("cols", [256, 600])
@pytest.mark.parametrize("permuted", [False, True])
def test_blocked_factor_equals_the_reversed_cholesky(cols, permuted):
    """Several 256-wide blocks (one ragged): the in-place factor is the Cholesky factor of the
    row/column-reversed (and permuted) damped Hessian, reversed back, on fresh inputs."""
    x = torch.randn(2 * cols, cols) @ (torch.randn(cols, cols) / cols**0.5 + torch.eye(cols))
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(3, cols)
    order = torch.randperm(cols) if permuted else None
    f = factor(w, h, damp=0.01, order=order)
    hp = h if order is None else h[order][:, order]
    damped = hp + 0.01 * torch.diag(h).mean() * torch.eye(cols)
    expected = torch.linalg.cholesky(damped.flip(0, 1)).flip(0, 1)
    torch.testing.assert_close(f.v, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(f.vn.diagonal(), torch.ones(cols)) and torch.equal(f.vn, f.vn.triu())
    torch.testing.assert_close(f.wt, w.t() if order is None else w.t()[order])


def test_dead_columns_are_zeroed_and_their_diagonal_set_to_one():
    x = torch.randn(100, 16)
    x[:, [3, 7]] = 0
    h = 2 * x.t() @ x / 100
    w = torch.randn(5, 16)
    f = factor(w, h, damp=0.0)
    assert f.dead.nonzero().flatten().tolist() == [3, 7]
    assert (f.wt[[3, 7]] == 0).all() and torch.equal(f.wt[0], w[:, 0])
    assert torch.allclose((f.v @ f.v.t())[3, 3], torch.tensor(1.0))
    q = gptq(w, h, Grid(bits=4, group_size=-1), damp=0.0)
    assert (q.dense()[:, [3, 7]] == 0).all()


def test_rank_deficient_hessian_is_handled_by_damping():
    x = torch.randn(8, 32)  # 8 samples, 32 features: rank 8
    h = 2 * x.t() @ x / 8
    f = factor(torch.randn(3, 32), h, damp=0.01)
    assert f.damp == 0.01
    with pytest.raises(HessianNotPositiveDefinite):
        factor(torch.randn(3, 32), h, damp=0.0)


def test_retry_with_ten_times_the_damping():
    h = torch.eye(4)
    h[0, 0] = -0.05  # mean diag 0.7375: damp 0.01 is not enough, 0.1 is
    f = factor(torch.randn(2, 4), h, damp=0.01)
    assert f.damp == pytest.approx(0.1)


def test_not_positive_definite_names_the_layer():
    h = -torch.eye(6)
    h[0, 0] = 10.0
    with pytest.raises(HessianNotPositiveDefinite, match="model.layers.3.mlp.up_proj"):
        gptq(torch.randn(4, 6), h, Grid(bits=4, group_size=-1), name="model.layers.3.mlp.up_proj")


def test_nan_hessian_is_an_error():
    h = torch.eye(4)
    h[1, 2] = float("nan")
    with pytest.raises(HessianNotPositiveDefinite, match="NaN"):
        factor(torch.randn(2, 4), h)
