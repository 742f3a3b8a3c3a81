"""Round-to-nearest: the data-free baseline every GPTQ row is compared to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..algorithms.baselines import rtn
from ..algorithms.grid import Grid
from ..errors import RecipeError
from .base import Method, check_grid, check_grid_fits

if TYPE_CHECKING:
    import torch

    from ..algorithms import Compressed, Statistics


@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest quantization: each weight to the nearest point of its group's grid.
    Needs no statistics, so a recipe of RTN alone runs no forward pass."""

    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    sym: bool = False
    mse: bool = False  # grid search over shrunken ranges (the GPTQ reference's `mse` option)

    def __post_init__(self) -> None:
        check_grid(self.bits, self.group_size)
        if self.mse not in (False, True):
            raise RecipeError(f"mse must be true or false for RTN (it has no Hessian to weigh "
                              f"the clipping by), got {self.mse!r}")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym, self.mse)

    def check(self, shape: tuple[int, int], name: str | None = None) -> None:
        check_grid_fits(self.grid, shape, name)

    def solve(self, w: torch.Tensor, stats: Statistics | None = None, name: str | None = None
              ) -> Compressed:
        return rtn(w, self.grid)
