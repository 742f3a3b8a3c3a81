"""fxcompress: one-shot SparseGPT and GPTQ compression of PyTorch models, as a compiler pass.

    model = fxcompress.compile(model, calibration, GPTQ(bits=4, group_size=128))
"""

import os

# Tensors of 2 MiB and more on transparent huge pages (PyTorch reads THP_MEM_ALLOC_ENABLE at
# the process's first tensor allocation, so this acts when fxcompress is imported before any
# tensor is made; set it to 0 to opt out). Calibration allocates and frees gigabytes of
# activations per layer, and the heap is trimmed between chunks: on 4 KiB pages each is faulted
# in again, 13 M faults in a 32-sample SparseGPT run on SmolLM2, 3 M on huge pages (and 10 %
# less wall time).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .algorithms import HessianNotPositiveDefinite
from .api import compile
from .checkpoint import load, save
from .errors import RecipeError
from .export import export
from .gguf.writer import write_gguf as export_gguf
from .methods import GPTQ, RTN, Magnitude, SparseGPT
from .modules import QuantExperts, QuantLinear, SparseExperts, SparseLinear, set_precision
from .passes import CaptureError
from .pipeline import Report
from .recipe import Recipe
from .training import LoRALinear, add_lora, densify, enforce_masks, keep_masks
from .version import __version__  # noqa: F401  (re-exported)

__all__ = [
    "GPTQ", "RTN", "CaptureError", "HessianNotPositiveDefinite", "Magnitude", "QuantExperts",
    "QuantLinear", "SparseExperts",
    "Recipe", "RecipeError", "Report", "SparseGPT", "SparseLinear", "compile", "export",
    "export_gguf",
    "load",
    "save", "set_precision",
    "LoRALinear", "add_lora", "densify", "enforce_masks", "keep_masks",
]
