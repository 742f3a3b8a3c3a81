"""``GGMLLinear``: a linear layer whose weight is stored as llama.cpp's ggml blocks.

The blocks (``weight_blocks``, uint8 ``(out, bytes per row)``) are the checkpoint's tensor and
what the GGUF writer copies unchanged; the module computes with the weight they dequantize to
(a non-persistent buffer made once, rebuilt after a state dict is loaded). fxcompress runs it
to evaluate and to calibrate later layers; llama.cpp is the engine that serves it, so no
kernel is spent on the blocks here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..algorithms import Compressed
from . import Encoded, encoder
from .grids import BY_VALUE, BlockType, dequantize_blocks


def _prepare_after_load(module: nn.Module, incompatible_keys: object) -> None:
    module.prepare()


class GGMLLinear(nn.Module):
    """A linear layer with its weight in one ggml type (Q4_K, Q6_K, Q5_0, ...)."""

    def __init__(self, in_features: int, out_features: int, ggml_type: int,
                 bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if ggml_type not in BY_VALUE:
            raise ValueError(f"unsupported ggml type {ggml_type}")
        t = BY_VALUE[ggml_type]
        if in_features % t.block:
            raise ValueError(f"{t.name} needs in_features that are a multiple of {t.block}, "
                             f"got {in_features}")
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        self.dtype = dtype
        self.register_buffer("weight_blocks", torch.zeros(
            out_features, t.row_bytes(in_features), dtype=torch.uint8, device=device))
        self.register_buffer("_weight", None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_load_state_dict_post_hook(_prepare_after_load)

    @property
    def type(self) -> BlockType:
        return BY_VALUE[self.ggml_type]

    @classmethod
    def from_compressed(cls, c: Compressed, bias: Tensor | None = None,
                        dtype: torch.dtype = torch.float32, prepare: bool = True
                        ) -> GGMLLinear:
        out_features, in_features = c.shape
        m = cls(in_features, out_features, c.ggml_type, bias is not None, device="meta",
                dtype=dtype)
        m.weight_blocks = c.blocks
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(c.blocks.device, dtype), requires_grad=False)
        if prepare:
            m.prepare()
        return m

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)``, bit for bit what llama.cpp computes."""
        w = dequantize_blocks(self.weight_blocks.cpu().numpy(), self.type, self.in_features)
        return w.to(self.weight_blocks.device)

    def prepare(self) -> None:
        """Make the weight the module computes with (after construction or a load)."""
        if self.weight_blocks.is_meta:
            return
        self._weight = self.dequantize().to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GGMLLinear expects {self.in_features} input features, got "
                             f"input of shape {tuple(x.shape)}")
        if self._weight is None:
            raise RuntimeError("GGMLLinear holds no weight yet: call prepare() after filling "
                               "weight_blocks")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={self.type.name}")


@encoder(GGMLLinear)
def _encode(m: GGMLLinear) -> Encoded:
    """The stored blocks as they are: the GGUF tensor is the checkpoint's."""
    return m.ggml_type, np.ascontiguousarray(m.weight_blocks.cpu().numpy())
