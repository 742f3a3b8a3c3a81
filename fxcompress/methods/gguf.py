"""GGUFQuant: GPTQ onto llama.cpp's own grids, chosen per layer as llama-quantize would."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RecipeError
from .base import HessianMethod, check_sweep

if TYPE_CHECKING:
    import torch

    from ..algorithms import Compressed, Statistics


@dataclass(frozen=True)
class GGUFQuant(HessianMethod):
    """GPTQ on llama.cpp's own grids, so that the GGUF file holds GPTQ's weights.

    ``ftype`` names a llama-quantize mix (``"q4_k_m"``, ``"q3_k_m"``): each linear gets the
    ggml type llama-quantize would give it, from its name, shape and the model's block count
    (:mod:`fxcompress.gguf.mix`), resolved into ``type`` when the recipe is planned; ``type``
    (``"Q4_K"``, ``"Q6_K"``, ``"Q5_0"``, ...) may also be set directly. The grid is fitted as
    llama-quantize fits it with an importance matrix (``imatrix``: weighted by ``diag H``,
    the statistic llama-imatrix collects), then GPTQ rounds onto it
    (:func:`fxcompress.gguf.gptq.gptq_ggml`); ``act_order``, ``damp``, ``block_size`` and
    ``dense_output`` are GPTQ's.
    """

    ftype: str = "q4_k_m"
    type: str | None = None
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    dense_output: bool = True
    imatrix: bool = True

    def __post_init__(self) -> None:
        from ..gguf.grids import TYPES
        from ..gguf.mix import FTYPES

        if self.ftype not in FTYPES:
            raise RecipeError(f"ftype must be one of {FTYPES}, got {self.ftype!r}")
        if self.type is not None and self.type not in TYPES:
            raise RecipeError(f"type must be one of {sorted(TYPES)} or None, got {self.type!r}")
        check_sweep(self.damp, self.block_size)

    def for_layer(self, name: str, shape: tuple[int, int], layers: int) -> GGUFQuant:
        from ..gguf.mix import tensor_type

        return dataclasses.replace(self, type=tensor_type(self.ftype, name, shape[1], layers))

    def check(self, shape: tuple[int, int], name: str | None = None) -> None:
        """The ggml type's blocks must tile the inputs (a mix resolves only types that do)."""
        from ..gguf.grids import block_type

        if self.type is not None and shape[1] % block_type(self.type).block:
            raise RecipeError(f"{self.type} needs in_features that are a multiple of "
                              f"{block_type(self.type).block}, got {shape[1]}"
                              + (f" for layer {name!r}" if name else ""))

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        return shape[0] * -(-shape[1] // 32) * 34  # the largest blocks: Q8_0, 34 bytes a 32

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        from ..gguf.gptq import gptq_ggml
        from ..gguf.grids import block_type

        if self.type is None:
            raise RecipeError(f"GGUFQuant(ftype={self.ftype!r}) has no type for "
                              f"{name or 'this weight'}: a recipe resolves it per layer "
                              f"(Method.for_layer), or set type=")
        return gptq_ggml(w, stats.hessian, block_type(self.type), act_order=self.act_order,
                         damp=self.damp, block_size=self.block_size, imatrix=self.imatrix,
                         name=name, cross=stats.cross)
