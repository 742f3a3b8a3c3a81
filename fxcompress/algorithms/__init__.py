"""Pure math on (W, H): tensors in, tensors out. No modules, graphs, printing or flags."""

from .baselines import magnitude, magnitude_mask, rtn
from .compressed import Compressed
from .gptq import gptq
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
    "Compressed", "Cross", "Hessian", "HessianNotPositiveDefinite", "factor", "gptq", "magnitude",
    "magnitude_mask", "output_error", "OutputCross", "rtn", "sparsegpt", "Statistics",
    "WeightedCross",
]
