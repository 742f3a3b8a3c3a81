"""Magnitude pruning: the data-free baseline every SparseGPT row is compared to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..algorithms.baselines import magnitude
from .base import SMALL, Method, Pruning, check_sparsity
from .rtn import RTN

if TYPE_CHECKING:
    import torch

    from ..algorithms import Compressed, Statistics


@dataclass(frozen=True)
class Magnitude(Pruning, Method):
    """Magnitude pruning: the smallest ``|w|`` removed, per layer or per N of every M inputs.
    ``quant`` rounds the kept weights to nearest (the joint baseline)."""

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    quant: RTN | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, self.n_m)
        if self.n_m is not None:
            object.__setattr__(self, "n_m", tuple(self.n_m))

    def solve(self, w: torch.Tensor, stats: Statistics | None = None, name: str | None = None
              ) -> Compressed:
        quant = self.quant.grid if self.quant is not None else None
        return magnitude(w, self.sparsity, self.n_m, quant)

    def workspace(self, shape: tuple[int, int]) -> int:
        """The scores and top-k of the selection besides the result."""
        return 26 * shape[0] * shape[1] + SMALL
