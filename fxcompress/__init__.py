"""fxcompress: one-shot SparseGPT and GPTQ compression of PyTorch models, as a compiler pass.

    model = fxcompress.compile(model, calibration, GPTQ(bits=4, group_size=128))
"""

from .algorithms import HessianNotPositiveDefinite
from .api import Report, compile
from .export import export
from .format import load, save
from .modules import QuantExperts, QuantLinear, SparseExperts, SparseLinear, set_precision
from .passes import CaptureError
from .recipe import GPTQ, RTN, Magnitude, Recipe, RecipeError, SparseGPT
from .training import LoRALinear, add_lora, densify, enforce_masks, keep_masks

__version__ = "0.1.0"

__all__ = [
    "GPTQ", "RTN", "CaptureError", "HessianNotPositiveDefinite", "Magnitude", "QuantExperts",
    "QuantLinear", "SparseExperts",
    "Recipe", "RecipeError", "Report", "SparseGPT", "SparseLinear", "compile", "export", "load",
    "save", "set_precision",
    "LoRALinear", "add_lora", "densify", "enforce_masks", "keep_masks",
]
