"""Methods: one file each, holding its configuration, the statistics it asks calibration
for, its checks, its solve (a call of a solver in ``algorithms``) and its cost.

Adding a method is one new file here and one entry in :data:`METHODS`; adding a statistic
that re-plans methods before calibration (as OWL's input norms do) is one file like
``owl.py`` and one entry in :data:`PLANNERS`. Recipes (``fxcompress.recipe``) name methods
through :data:`METHODS`; calibration asks a method only through :class:`Method`.
"""

from . import owl
from .base import CROSS, HESSIAN, Method, Planner
from .gguf import GGUFQuant
from .gptq import GPTQ
from .magnitude import Magnitude
from .owl import INPUT_NORMS
from .rtn import RTN
from .sparsegpt import SparseGPT

METHODS: dict[str, type[Method]] = {c.__name__: c for c in (
    GPTQ, SparseGPT, RTN, Magnitude, GGUFQuant,
)}

# steps that re-plan methods from a statistic of the dense model, before calibration
PLANNERS: tuple[Planner, ...] = (owl,)

__all__ = [
    "CROSS", "GGUFQuant", "GPTQ", "HESSIAN", "INPUT_NORMS", "METHODS", "Magnitude", "Method",
    "PLANNERS", "Planner", "RTN", "SparseGPT",
]
