"""Plain PyTorch pieces shared by the ops' CPU bodies and their CUDA paths.

A dense weight from the canonical packed layout, the experts' activation by name and the
per-expert loop: both ``ops`` (the CPU bodies) and ``cuda`` (its fallbacks for grids the
kernels do not serve) use them, so they live below both and neither imports the other back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import pack


def dequantize(w_packed: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor | None,
               bits: int, group_size: int, in_features: int) -> Tensor:
    """Dense float32 ``(N, K)`` weight from the canonical layout."""
    codes = pack.unpack(w_packed, bits, in_features).float()
    if g_idx is None and in_features % group_size == 0:  # broadcast per group: no gather
        n = codes.shape[0]
        w = (codes.view(n, -1, group_size) - zero.float()[..., None]) * scale.float()[..., None]
        return w.view(n, in_features)
    if g_idx is None:
        g = torch.arange(in_features, device=w_packed.device) // group_size
    else:
        g = g_idx.long()
    return (codes - zero[:, g].float()) * scale[:, g].float()


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(name: str, x: Tensor) -> Tensor:
    """The experts' activation by name (an op cannot take a Python callable)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown experts activation {name!r}; supported: {ACTIVATIONS}")


def experts_loop(x: Tensor, ids: Tensor, weights: Tensor, experts: int, up, down,
                  act: str) -> Tensor:
    """Run each expert on the rows routed to it (``up(e, rows)`` → (n, 2I), ``down(e, h)`` →
    (n, H)) and sum the outputs weighted by the router, in float32."""
    k = ids.shape[-1]
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    for e in range(experts):
        slots = (flat_ids == e).nonzero().squeeze(-1)
        tokens = slots // k
        gate, up_ = up(e, x.index_select(0, tokens)).chunk(2, dim=-1)
        y = down(e, activation(act, gate) * up_)
        out.index_add_(0, tokens, y.float() * flat_w.index_select(0, slots).float()[:, None])
    return out.to(x.dtype)
