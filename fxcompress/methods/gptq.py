"""GPTQ: its configuration, the statistics it asks for, and its solve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..algorithms.gptq import gptq, rescale_workspace
from ..algorithms.grid import MSE, Grid
from ..errors import RecipeError
from .base import HessianMethod, check_grid, check_grid_fits, check_sweep

if TYPE_CHECKING:
    import torch

    from ..algorithms import Compressed, Statistics


REFINE = 4  # coordinate-descent passes after the sweep at 3 bits or fewer (``refine=None``)


@dataclass(frozen=True)
class GPTQ(HessianMethod):
    """OPTQ/GPTQ quantization (Frantar et al., 2023).

    ``act_order`` (default) processes columns by decreasing Hessian diagonal. With
    ``static_groups`` (default) the group parameters are fitted on the original column order
    before the sweep, so the checkpoint needs no group index and act-order costs nothing at
    inference; without it groups are fitted as the sweep reaches them in permuted order (the
    reference's dynamic variant, which stores an unsorted ``g_idx``). Act-order is the default
    because it is free at inference and better on every measured row (benchmarks/RESULTS.md,
    ablation); ``act_order=False`` is the paper's plain column order.

    ``dense_output`` (default) fits each layer to the dense model's output on the dense model's
    inputs instead of to the layer's own output on the compressed model's inputs (the errors of
    the layers before are compensated too; see ``algorithms/hessian.py``), so it asks for the
    cross moment besides H. It runs the dense model alongside (about twice the calibration
    time) and is the default because it narrows the perplexity gap of low-bit GPTQ, on the
    calibration domain and on another one (benchmarks/RESULTS.md, ablation);
    ``dense_output=False`` is the paper's objective.

    ``shrink`` (default 0.25) scales the off-diagonal of H by ``1 - shrink`` before the sweep
    (``hessian.factor``): 0 is GPTQ as published, 1 is round-to-nearest. The correlations
    between a layer's inputs are what let GPTQ push one column's rounding error onto the
    others, and they are fitted to the calibration text: calibrated on speeches, plain GPTQ
    lost to round-to-nearest on text of other domains (source code, technical documentation).
    The default was chosen on the domain suite's validation domains, calibrated on speeches,
    among 0, 0.1, 0.25 and 0.5; at calibration seed 0 it was also the best of them on the
    calibration domain (benchmarks/RESULTS.md, domain suite).

    ``mse`` chooses each group's clipping range (fitted before the sweep with static groups,
    when the sweep reaches the group otherwise): ``False`` their min-max range; ``True`` the
    GPTQ reference's search of shrunken ranges for the least ``Σ |w - q|^2.4``; ``"hessian"``
    (default) a search that shrinks the minimum and the maximum apart for the least
    ``Σ_j H_jj (w_j - q_j)²``, the group's share of the output error if the inputs were
    uncorrelated (the weighting of llama.cpp's importance matrix; ``grid.fit``). It costs
    nothing at inference; the w4 g64 row's solve took 814 s against 704 s, on a busier
    machine. On the domain suite's validation
    domains, calibrated on speeches at seed 0, at w3 g64 it was better than the min-max range
    on all three (mean 44.54 against 48.85; one shared factor for both ends gave 46.33) and at
    w4 g64 level (29.14 against 29.21), while ``True`` was worse than the min-max range at
    w3 g64 on all three (benchmarks/RESULTS.md, domain suite).

    ``refine`` runs that many passes of coordinate descent after the sweep, on the sweep's own
    objective with every grid held fixed (``algorithms/gptq.py``): each code moves to the grid
    point nearest its optimum given all the others, so the layer's loss never grows. It costs
    nothing at inference and a few seconds a layer. The default (None) is ``REFINE`` = 4
    passes at 3 bits or fewer and none above, chosen on the domain suite's validation
    domains calibrated on speeches at seed 0: at w3 g64 the validation mean went 56.35 ->
    54.16 on Gemma 3 270M (better on all three) and 48.73 -> 48.39 on SmolLM2-135M; at w4 g64
    it was worse, 35.01 -> 35.06 and 34.15 -> 34.31 (on SmolLM2 on all three), while the
    calibration domain improved: at 4 bits the extra fit to the calibration text's
    correlations does not carry to other text (benchmarks/RESULTS.md, domain suite).

    ``rescale`` (default) refits every group's scale once the codes are chosen: the
    least-squares scales of the same objective, codes and zero points held
    (``algorithms/gptq.py``). The grids were fitted before the sweep on the weights alone, as
    if the inputs were uncorrelated; the refit sees the correlations and the codes. It costs
    nothing at inference; the solve takes up to twice as long (random problems, one thread:
    1024 x 4096 2.18 s -> 4.11 s, 4096 x 1024 1.11 s -> 1.56 s; benchmarks/rescale_speed.py).
    Chosen on the validation domains calibrated on speeches at seed 0, pooled over both
    models: the geometric validation mean
    went -0.52 % on Gemma 3 270M (better on all three domains and on the calibration domain)
    and +0.08 % on SmolLM2-135M at w4 g64; at w3 g64, after the coordinate descent, +0.22 %
    and -3.84 % (benchmarks/RESULTS.md, domain suite). Refitting the zero points as well was
    tried on real layers: the rounded optimum never moved one.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    mse: bool | str = "hessian"
    damp: float = 0.01
    block_size: int = 128
    dense_output: bool = True
    shrink: float = 0.25
    refine: int | None = None
    rescale: bool = True

    def __post_init__(self) -> None:
        check_grid(self.bits, self.group_size)
        check_sweep(self.damp, self.block_size)
        if not 0.0 <= self.shrink <= 1.0:
            raise RecipeError(f"shrink must be in [0, 1], got {self.shrink}")
        if self.refine is not None and (isinstance(self.refine, bool)
                                        or not isinstance(self.refine, int) or self.refine < 0):
            raise RecipeError(f"refine must be a whole number of passes >= 0 (or None: "
                              f"{REFINE} at 3 bits or fewer, 0 above), got {self.refine!r}")
        if not isinstance(self.rescale, bool):
            raise RecipeError(f"rescale must be true or false, got {self.rescale!r}")
        if self.mse not in MSE:
            raise RecipeError(f"mse must be one of {MSE}, got {self.mse!r}")

    @property
    def passes(self) -> int:
        """The coordinate-descent passes the solve runs: ``refine``, or when it is None
        ``REFINE`` at 3 bits or fewer and none above (see the class docstring)."""
        if self.refine is not None:
            return self.refine
        return REFINE if self.bits <= 3 else 0

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym, self.mse)

    def check(self, shape: tuple[int, int], name: str | None = None) -> None:
        check_grid_fits(self.grid, shape, name)

    def workspace(self, shape: tuple[int, int]) -> int:
        """The sweep's workspace, plus the scale refit's buffers with ``rescale``."""
        out, inp = shape
        refit = rescale_workspace(out, inp, self.group_size) if self.rescale else 0
        return super().workspace(shape) + refit

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        return gptq(w, stats.hessian, self.grid, act_order=self.act_order,
                    static_groups=self.static_groups, damp=self.damp,
                    block_size=self.block_size, name=name, cross=stats.cross,
                    shrink=self.shrink, refine=self.passes, rescale=self.rescale)
