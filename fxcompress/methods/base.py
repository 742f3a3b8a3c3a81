"""What every method tells the rest of fxcompress, and the checks methods share.

A method is a frozen dataclass validated on construction, so a bad setting fails where it is
written and not halfway through a long calibration. The settings that depend on a layer (a
group size dividing its inputs, an N:M pattern fitting them) are checked by
:meth:`Method.check` per site while the recipe is planned, before any data is read.

The statistics a method asks calibration for are named here (:data:`HESSIAN`,
:data:`CROSS`); calibration gathers the union of what its sites' methods need and hands each
solve a :class:`~fxcompress.algorithms.Statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..algorithms.grid import BITS, Grid, check
from ..errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import fx

    from ..algorithms import Compressed, Statistics
    from ..passes.sites import Site

HESSIAN = "hessian"  # H = 2 X̃ᵀX̃ / n over the compressed model's inputs X̃
CROSS = "cross"  # C = 2 (X - X̃)ᵀ X̃ / n, X the dense model's inputs (dense-output calibration)
SMALL = 8 << 20  # small buffers of a solve (group grids, block caches, allocator slack)


class Method:
    """What calibration needs to know of a method, in one place.

    * :meth:`needs`: the statistics of a layer's inputs to gather (:data:`HESSIAN`,
      :data:`CROSS`); a method needing none is data-free (no forward pass is run for it);
    * :meth:`model_needs`: statistics of the dense model gathered once before calibration,
      from which a planner (``methods/owl.py``) re-plans the method per layer;
    * :meth:`check`: the settings that depend on a layer's shape, before any work;
    * :meth:`solve`: one ``(out, in)`` weight and those statistics to a ``Compressed``;
    * :meth:`cost` and :meth:`workspace`: relative time (to share solves between processes)
      and peak extra bytes of a solve (for the memory estimate of streamed runs).
    """

    def needs(self) -> frozenset[str]:
        return frozenset()

    def model_needs(self) -> frozenset[str]:
        return frozenset()

    def check(self, shape: tuple[int, int], name: str | None = None) -> None:
        """Raise a :class:`RecipeError` if this method cannot compress a linear of ``shape``
        (out, in) (``name`` only words the message). Needs no data: a plan calls it for every
        site before capture's forward passes and the calibration run."""

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        raise NotImplementedError

    def cost(self, shape: tuple[int, int]) -> float:
        """Relative time of one solve: ``out·in`` for data-free methods."""
        return float(shape[0]) * shape[1]

    def for_layer(self, name: str, shape: tuple[int, int], layers: int) -> Method:
        """The method as it applies to the linear ``name`` of ``shape`` (out, in) in a model of
        ``layers`` blocks: itself, unless the method chooses per layer (a llama.cpp mix)."""
        return self

    def workspace(self, shape: tuple[int, int]) -> int:
        """Peak bytes a solve allocates besides the statistics, its result included (from
        ``benchmarks/solver_memory.py``): bytes a weight for rounding, and small buffers."""
        return 17 * shape[0] * shape[1] + SMALL

    @property
    def prunes_in_place(self) -> bool:
        """Whether results hold kept fp32 values (pruning without quantization), which an
        in-memory run writes into the layer's own weight rather than hold beside it."""
        return False

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        """Bytes of a solve's result while it is held (until it is written or swapped in):
        one byte a weight for integer codes or a keep-mask, four for kept fp32 values; packed
        codes and mask when ``compact`` (an in-memory run's results but experts'); nothing
        for pruned values ``folded`` into the layer's own weight."""
        return codes_bytes(shape, getattr(self, "bits", 8), compact)


class Planner(Protocol):
    """A step that re-plans sites from a statistic of the dense model, before calibration
    (``methods/owl.py``). Calibration knows no method: for each planner in
    :data:`~fxcompress.methods.PLANNERS` with an :meth:`eligible` site it measures
    :data:`STATISTIC` with :meth:`column_norms` over the first chunk, and replaces the plan's
    methods by what :meth:`apply` returns (rank 0 decides, the team shares it)."""

    STATISTIC: str

    def eligible(self, s: Site, method: Method | None) -> bool: ...

    def column_norms(self, gm: fx.GraphModule, inputs: Sequence[Any], params: Any, interp: Any,
                     targets: set[fx.Node]) -> dict[fx.Node, torch.Tensor]: ...

    def apply(self, plan: Mapping[str, Method], sites: Sequence[Site],
              norms: Callable[[set[fx.Node]], dict[fx.Node, torch.Tensor]],
              weight: Callable[[Site], torch.Tensor]) -> dict[str, Method]: ...


def codes_bytes(shape: tuple[int, int], bits: int, packed: bool) -> int:
    """Bytes of ``bits``-bit codes (a mask: 1 bit), one a byte or packed."""
    return shape[0] * (math.ceil(shape[1] * bits / 32) * 4 if packed else shape[1])


class Pruning:
    """What SparseGPT and magnitude pruning hold of a result: a keep-mask, and the codes of
    ``quant`` or the kept fp32 values; and the checks of their sparsity settings."""

    quant: Method | None
    n_m: tuple[int, int] | None

    @property
    def prunes_in_place(self) -> bool:
        return self.quant is None

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        """The keep-mask, and codes or the kept fp32 values (nothing when folded: the values
        are in the layer's weight, and the mask is their support)."""
        if self.quant is None and folded:
            return 0
        mask = codes_bytes(shape, 1, compact)
        return mask + (self.quant.held(shape, compact) if self.quant else 4 * shape[0] * shape[1])

    def check(self, shape: tuple[int, int], name: str | None = None) -> None:
        """An N:M pattern must tile the inputs, and ``quant``'s grid must fit them."""
        if self.n_m is not None and shape[1] % self.n_m[1]:
            n, m = self.n_m
            raise RecipeError(f"{n}:{m} sparsity needs in_features divisible by {m}, got "
                              f"{shape[1]}" + (f" (layer {name!r})" if name else ""))
        if self.quant is not None:
            self.quant.check(shape, name)


class HessianMethod(Method):
    """GPTQ, SparseGPT and GGUFQuant: a sweep over the columns with the layer Hessian (and,
    with ``dense_output``, the cross moment)."""

    dense_output: bool

    def needs(self) -> frozenset[str]:
        return frozenset({HESSIAN, CROSS} if self.dense_output else {HESSIAN})

    def cost(self, shape: tuple[int, int]) -> float:
        return float(shape[0]) * shape[1] * shape[1]

    def workspace(self, shape: tuple[int, int]) -> int:
        """One fp32 copy of H, factored in place, and bytes a weight for the sweep's buffers
        and the result (more for the dense-output target and SparseGPT's kept fp32 values;
        ``benchmarks/solver_memory.py`` measures them). ADMM holds three more d×d matrices
        and four weight-sized iterates."""
        out, inp = shape
        per_weight = 13 + (8 if self.dense_output else 0) + self._extra_per_weight()
        admm = getattr(self, "solver", "sweep") == "admm"
        return (4 * inp * inp + per_weight * out * inp + SMALL
                + (4 * (3 * inp * inp + 4 * out * inp) if admm else 0))

    def _extra_per_weight(self) -> int:
        return 0


def check_grid(bits: int, group_size: int) -> None:
    """The grid settings that need no layer: ``bits`` stored, ``group_size`` positive or -1."""
    if bits not in BITS:
        raise RecipeError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise RecipeError(f"group_size must be a positive divisor of in_features or -1, "
                          f"got {group_size}")


def check_grid_fits(g: Grid, shape: tuple[int, int], name: str | None) -> None:
    """The grid's group size divides the layer's inputs (the solver's own check, early)."""
    try:
        check(g.bits, g.group_size, shape[1])
    except RecipeError as e:
        raise RecipeError(f"{e} (layer {name!r})" if name else str(e)) from None


def check_sweep(damp: float, block_size: int) -> None:
    """The settings of a Hessian sweep."""
    if not 0 <= damp < 1:
        raise RecipeError(f"damp must be in [0, 1), got {damp}")
    if block_size < 1:
        raise RecipeError(f"block_size must be positive, got {block_size}")


def check_sparsity(sparsity: float, n_m: tuple[int, int] | None) -> None:
    """A sparsity in range, or an N:M pattern that keeps some but not all of every M."""
    if n_m is not None:
        if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m):
            raise RecipeError(f"n_m must be a pair of integers (N, M), got {n_m!r}")
        n, m = n_m
        if not 0 < n < m:
            raise RecipeError(f"N:M sparsity needs 0 < N < M (N weights kept of every M), "
                              f"got {n}:{m}")
    elif not 0 <= sparsity <= 0.99:
        raise RecipeError(f"sparsity must be in [0, 0.99], got {sparsity}")
