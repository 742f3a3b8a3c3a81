"""Pure math on (W, H): tensors in, tensors out. No modules, graphs, printing or flags.

The solvers take plain arguments (a :class:`Grid`, numbers, flags) and import nothing from
``methods`` or ``recipe``: a method's configuration is turned into them in its own file
(``fxcompress/methods/``), so the math can be read, tested and reused without the recipes."""

from .baselines import magnitude, magnitude_mask, rtn
from .compressed import Compressed
from .gptq import gptq
from .grid import BITS, Grid
from .hessian import (
    Cross,
    Hessian,
    HessianNotPositiveDefinite,
    OutputCross,
    Statistics,
    WeightedCross,
    factor,
    output_error,
)
from .sparsegpt import sparsegpt

__all__ = [
    "BITS", "Compressed", "Cross", "Grid", "Hessian", "HessianNotPositiveDefinite", "factor",
    "gptq", "magnitude", "magnitude_mask", "output_error", "OutputCross", "rtn", "sparsegpt",
    "Statistics", "WeightedCross",
]
