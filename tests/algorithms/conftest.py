import pytest
import torch

from fxcompress.algorithms import Grid, Hessian, gptq

GRID = ("bits", "group_size", "sym", "mse")


def gptq_flat(w, h, **kw):
    """:func:`gptq` with the grid's fields given beside the sweep's, as the tests' settings
    list them."""
    g = Grid(**{k: v for k, v in kw.items() if k in GRID})
    return gptq(w, h, g, **{k: v for k, v in kw.items() if k not in GRID})


def correlated_problem(rows: int, cols: int, n: int = 1024, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random weight, correlated activations with uneven feature scales (as in LLMs), and
    their Hessian ``2 XᵀX / n``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.5 * torch.eye(cols)
    scales = torch.exp(0.5 * torch.randn(cols, generator=g))
    x = (torch.randn(n, cols, generator=g) * scales) @ mix
    w = torch.randn(rows, cols, generator=g)
    h = Hessian.zeros(cols)
    h.add(x)
    return w, x, h.value()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W - Ŵ) Xᵀ‖² / n, measured directly on the activations."""
    return float(((w - w_hat) @ x.t()).pow(2).sum()) / x.shape[0]


@pytest.fixture
def problem():
    return correlated_problem(48, 256)
