"""CUDA paths of the fxcompress ops: the Triton kernels of ``triton_kernels``, launched with
``wrap_triton`` from inside the ops' bodies so that ``torch.compile`` sees into them and
AOTInductor can package them. Imported only when a CUDA tensor reaches an op."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import triton_kernels as tk
from .dense import activation, dequantize, experts_loop


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _unflat(y: Tensor, x: Tensor) -> Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


def quant_linear(x: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor,
                 g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int,
                 in_features: int) -> Tensor:
    """The canonical layout is the kernels' own for 2/4/8 bits without a group index; other
    cases are prepared once by ``QuantLinear`` (``prepared_quant_linear``), so reaching here
    with them means an unprepared weight: dequantize (correct, slow)."""
    if bits != 3 and g_idx is None and (group_size % 16 == 0 or group_size >= in_features):
        return _unflat(tk.quant_matmul(_flat(x), w_packed, scale, zero, bits, group_size, bias), x)
    w = dequantize(w_packed, scale, zero, g_idx, bits, group_size, in_features)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def prepared_quant_linear(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor,
                          perm: Tensor | None, bias: Tensor | None, bits: int,
                          group_size: int) -> Tensor:
    return _unflat(tk.quant_matmul(_flat(x), weight, scale, zero, bits, group_size, bias, perm), x)


def sparse24_quant_linear(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, zero: Tensor,
                          bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    return _unflat(tk.sparse24_quant_matmul(_flat(x), values, meta, scale, zero, bits,
                                            group_size, bias), x)


def moe_quant(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, s1: Tensor, z1: Tensor,
              w2: Tensor, s2: Tensor, z2: Tensor, bits: int, group1: int, group2: int,
              act: str) -> Tensor:
    """Two grouped launches (gate_up on the tokens, down on the slots) around the gated
    activation; the router's weights and the sum over the k slots in float32. Grids the kernel
    does not serve (3 bits, groups not a multiple of 16) dequantize per expert."""
    from . import triton_moe as tm

    hidden, inter = x.shape[-1], s2.shape[-1] * group2
    if not (tm.supported(bits, group1, hidden) and tm.supported(bits, group2, inter)):
        return experts_loop(
            x, ids, weights, w1.shape[0],
            lambda e, r: F.linear(r, dequantize(w1[e], s1[e], z1[e], None, bits, group1,
                                                hidden).to(r.dtype)),
            lambda e, h: F.linear(h, dequantize(w2[e], s2[e], z2[e], None, bits, group2,
                                                inter).to(h.dtype)), act)
    route = tm.Routing(ids, w1.shape[0])
    k = ids.shape[-1]
    gate, up = tm.experts_quant_matmul(x.contiguous(), route, k, w1, s1, z1, bits,
                                       group1).chunk(2, dim=-1)
    h = (activation(act, gate) * up).contiguous()
    y = tm.experts_quant_matmul(h, route, 1, w2, s2, z2, bits, group2)
    y = y.float().view(-1, k, hidden) * weights.float()[..., None]
    return y.sum(1).to(x.dtype)
