"""The ``torch.ops.fxcompress.*`` operators compressed modules call: one per in-memory format.

Each operator is a ``torch.library.triton_op`` whose body branches on the device: on CPU it is
plain aten (so ``torch.compile`` inlines it and an AOTInductor package runs without
fxcompress installed), on CUDA it launches Triton kernels through ``wrap_triton`` where one
exists. Fake (meta) implementations come from tracing the body; every op has an autograd
formula with respect to its input (and, for ``masked_linear``, its weight) so that compressed
models train.

========================  =================================================================
op                        weight format
========================  =================================================================
``quant_linear``          canonical packed codes (``pack.pack``), scale, zero, optional
                          ``g_idx``: every bit width and group size; CPU dequantizes per call
``int4pack_linear``       aten's CPU int4 layout (2/3/4-bit codes, groups of 32..256),
                          bf16 activations: the fast CPU path
``int8pack_linear``       int8 codes, per-channel scale (+ zero-point term): CPU 8-bit
``prepared_quant_linear`` the Triton kernels' layout (3-bit bit planes, act-order columns
                          sorted by group with ``perm``): the CUDA path of any grid
``sparse24_quant_linear`` 2:4 kept half of the codes + 2-bit positions: CUDA 2:4 + int
``masked_linear``         dense weight and a keep-mask (pruned, not quantized; trainable)
``moe_quant``             a mixture-of-experts block, every expert's two weights in the
                          canonical layout stacked (E, ...): CPU dequantizes per expert, CUDA
                          runs the grouped Triton kernel over the routed tokens
``moe_int4pack``          the same in aten's CPU int4 layout per expert: the fast CPU path
``moe_pruned``            the same, pruned (not quantized) experts stored dense with zeros
========================  =================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from . import pack
from .dense import dequantize, experts_loop


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


# --- canonical layout --------------------------------------------------------------------


@triton_op("fxcompress::quant_linear", mutates_args=())
def quant_linear(x: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor,
                 g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int,
                 in_features: int) -> Tensor:
    """``x @ dequant(W)ᵀ + bias`` for codes packed by ``pack.pack``."""
    if x.device.type == "cuda":
        from . import cuda

        return cuda.quant_linear(x, w_packed, scale, zero, g_idx, bias, bits, group_size,
                                 in_features)
    w = dequantize(w_packed, scale, zero, g_idx, bits, group_size, in_features)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _quant_linear_backward(ctx, grad: Tensor):
    w_packed, scale, zero, g_idx, bias = ctx.saved_tensors
    w = dequantize(w_packed, scale, zero, g_idx, ctx.bits, ctx.group_size, ctx.in_features)
    grad_x = (grad @ w.to(grad.dtype)) if ctx.needs_input_grad[0] else None
    grad_b = _bias_grad(ctx, grad, 5)
    return grad_x, None, None, None, None, grad_b, None, None, None


def _quant_linear_setup(ctx, inputs, output):
    x, w_packed, scale, zero, g_idx, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(w_packed, scale, zero, g_idx, bias)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, in_features


def _bias_grad(ctx, grad: Tensor, index: int) -> Tensor | None:
    if not ctx.needs_input_grad[index]:
        return None
    return _flat(grad).sum(0)


quant_linear.register_autograd(_quant_linear_backward, setup_context=_quant_linear_setup)


# --- aten's CPU int4 layout --------------------------------------------------------------


@triton_op("fxcompress::int4pack_linear", mutates_args=())
def int4pack_linear(x: Tensor, w_int4: Tensor, scale_zeros: Tensor, perm: Tensor | None,
                    bias: Tensor | None, group_size: int) -> Tensor:
    """``x[..., perm] @ Wᵀ + bias`` with W in ``_convert_weight_to_int4pack_for_cpu`` layout and
    ``scale_zeros`` ``(groups, N, 2)`` bf16 holding ``(scale, (8 - zero) * scale)``."""
    if x.device.type != "cpu":
        raise RuntimeError("int4pack_linear holds a CPU weight layout; move the module with "
                           ".to(device) so that it repacks for that device")
    xf = _flat(x)
    if perm is not None:
        xf = xf.index_select(1, perm)
    y = torch._weight_int4pack_mm_for_cpu(xf.to(torch.bfloat16), w_int4, group_size,
                                          scale_zeros)
    y = _add_bias(y.to(x.dtype), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int4pack_dense(w_int4: Tensor, scale_zeros: Tensor, group_size: int, in_features: int
                   ) -> Tensor:
    """The weight an int4pack layout holds, ``(N, K)`` bf16, read back through the kernel
    itself (``I @ Wᵀ``): exact in the kernel's arithmetic and independent of its bit order."""
    eye = torch.eye(in_features, dtype=torch.bfloat16, device=w_int4.device)
    return torch._weight_int4pack_mm_for_cpu(eye, w_int4, group_size, scale_zeros).t()


def _int4pack_setup(ctx, inputs, output):
    x, w_int4, scale_zeros, perm, bias, group_size = inputs
    ctx.save_for_backward(w_int4, scale_zeros, perm, bias)
    ctx.group_size, ctx.in_features = group_size, x.shape[-1]


def _int4pack_backward(ctx, grad: Tensor):
    w_int4, scale_zeros, perm, bias = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = int4pack_dense(w_int4, scale_zeros, ctx.group_size, ctx.in_features)
        gx = grad @ w.to(grad.dtype)
        if perm is not None:
            gx = torch.empty_like(gx).index_copy_(-1, perm, gx)
        grad_x = gx
    return grad_x, None, None, None, _bias_grad(ctx, grad, 4), None


int4pack_linear.register_autograd(_int4pack_backward, setup_context=_int4pack_setup)


# --- int8, per channel -------------------------------------------------------------------


@triton_op("fxcompress::int8pack_linear", mutates_args=())
def int8pack_linear(x: Tensor, w_int8: Tensor, scale: Tensor, offset: Tensor | None,
                    bias: Tensor | None) -> Tensor:
    """``x @ (w_int8 · scale + offset)ᵀ + bias`` with per-output-channel ``scale`` and
    ``offset = (128 - zero) · scale`` (None for symmetric grids)."""
    xf = _flat(x)
    if x.device.type == "cpu":
        y = torch._weight_int8pack_mm(xf, w_int8, scale.to(x.dtype))
    else:
        y = F.linear(xf, w_int8.to(x.dtype) * scale.to(x.dtype)[:, None])
    if offset is not None:
        y = y + xf.sum(-1, keepdim=True) * offset.to(x.dtype)
    y = _add_bias(y, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _int8pack_setup(ctx, inputs, output):
    x, w_int8, scale, offset, bias = inputs
    ctx.save_for_backward(w_int8, scale, offset, bias)


def _int8pack_backward(ctx, grad: Tensor):
    w_int8, scale, offset, bias = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = w_int8.float() * scale.float()[:, None]
        if offset is not None:
            w = w + offset.float()[:, None]
        grad_x = grad @ w.to(grad.dtype)
    return grad_x, None, None, None, _bias_grad(ctx, grad, 4)


int8pack_linear.register_autograd(_int8pack_backward, setup_context=_int8pack_setup)


# --- the Triton kernels' layouts (CUDA; the CPU branch is the reference) -----------------


def prepared_dense(weight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                   in_features: int) -> Tensor:
    """Dense float32 weight of a ``prepare_quant_weight`` layout, columns in ``perm`` order."""
    if bits == 3:
        codes = pack.unpack_3bit_planes(weight, in_features).float()
    else:
        codes = pack.unpack(weight, bits, in_features).float()
    g = torch.arange(in_features, device=weight.device) // min(group_size, in_features)
    return (codes - zero[:, g].float()) * scale[:, g].float()


@triton_op("fxcompress::prepared_quant_linear", mutates_args=())
def prepared_quant_linear(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor,
                          perm: Tensor | None, bias: Tensor | None, bits: int,
                          group_size: int) -> Tensor:
    """``x[..., perm] @ Wᵀ + bias`` for a weight prepared by ``prepare_quant_weight``."""
    if x.device.type == "cuda":
        from . import cuda

        return cuda.prepared_quant_linear(x, weight, scale, zero, perm, bias, bits, group_size)
    xp = x if perm is None else x.index_select(-1, perm)
    w = prepared_dense(weight, scale, zero, bits, group_size, x.shape[-1])
    return F.linear(xp, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _prepared_setup(ctx, inputs, output):
    x, weight, scale, zero, perm, bias, bits, group_size = inputs
    ctx.save_for_backward(weight, scale, zero, perm)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, x.shape[-1]


def _prepared_backward(ctx, grad: Tensor):
    weight, scale, zero, perm = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = prepared_dense(weight, scale, zero, ctx.bits, ctx.group_size, ctx.in_features)
        gx = grad @ w.to(grad.dtype)
        grad_x = gx if perm is None else torch.empty_like(gx).index_copy_(-1, perm, gx)
    return grad_x, None, None, None, None, _bias_grad(ctx, grad, 5), None, None


prepared_quant_linear.register_autograd(_prepared_backward, setup_context=_prepared_setup)


@triton_op("fxcompress::sparse24_quant_linear", mutates_args=())
def sparse24_quant_linear(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, zero: Tensor,
                          bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """``x @ Wᵀ + bias`` for 2:4-sparse codes stored as their kept half (``pack.pack_24``)."""
    if x.device.type == "cuda":
        from . import cuda

        return cuda.sparse24_quant_linear(x, values, meta, scale, zero, bias, bits, group_size)
    w = _sparse24_dense(values, meta, scale, zero, bits, group_size, x.shape[-1])
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _sparse24_dense(values: Tensor, meta: Tensor, scale: Tensor, zero: Tensor, bits: int,
                    group_size: int, in_features: int) -> Tensor:
    """Dense float32 ``(N, K)`` weight of a ``pack.pack_24`` layout (zeros where pruned)."""
    half = in_features // 2
    codes = pack.unpack(values, bits, half).float()
    cols = 4 * (torch.arange(half, device=values.device) // 2) + pack.unpack(meta, 2, half).long()
    g = cols // min(group_size, in_features)
    kept = (codes - zero.float().gather(1, g)) * scale.float().gather(1, g)
    return torch.zeros(values.shape[0], in_features, device=values.device).scatter_(1, cols, kept)


def _sparse24_setup(ctx, inputs, output):
    x, values, meta, scale, zero, bias, bits, group_size = inputs
    ctx.save_for_backward(values, meta, scale, zero)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, x.shape[-1]


def _sparse24_backward(ctx, grad: Tensor):
    values, meta, scale, zero = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = _sparse24_dense(values, meta, scale, zero, ctx.bits, ctx.group_size,
                            ctx.in_features)
        grad_x = grad @ w.to(grad.dtype)
    return grad_x, None, None, None, None, _bias_grad(ctx, grad, 5), None, None


sparse24_quant_linear.register_autograd(_sparse24_backward, setup_context=_sparse24_setup)


# --- pruned, not quantized ---------------------------------------------------------------


@triton_op("fxcompress::masked_linear", mutates_args=())
def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (weight ⊙ mask)ᵀ + bias``: pruned weights are zero whatever the stored values."""
    return F.linear(x, torch.where(mask, weight, 0), bias)


def _masked_setup(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)


def _masked_backward(ctx, grad: Tensor):
    x, weight, mask = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ torch.where(mask, weight, 0).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = torch.where(mask, _flat(grad).t() @ _flat(x).to(grad.dtype), 0)
    return grad_x, grad_w, None, _bias_grad(ctx, grad, 3)


masked_linear.register_autograd(_masked_backward, setup_context=_masked_setup)


# --- mixture-of-experts blocks -----------------------------------------------------------
#
# One op computes a whole experts block, ``y_t = Σ_j p_tj · down_e(act(gate_e(x_t)) · up_e(x_t))``
# with ``e = ids[t, j]``, from ``x`` (T, H), the router's ``ids``/``p`` (T, k) and every expert's
# two weights: ``gate_up`` (E, 2I, H) (gate rows first) and ``down`` (E, H, I). The CPU body
# loops over the experts and multiplies each one's routed rows only; on CUDA one grouped Triton
# kernel per projection reads the packed codes of the experts the rows are routed to.

@triton_op("fxcompress::moe_quant", mutates_args=())
def moe_quant(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, s1: Tensor, z1: Tensor,
              w2: Tensor, s2: Tensor, z2: Tensor, bits: int, group1: int, group2: int,
              act: str) -> Tensor:
    """An experts block whose weights are in the canonical layout, stacked per expert:
    ``w1`` (E, 2I, ⌈H·bits/32⌉), ``s1``/``z1`` (E, 2I, H/group1), ``w2`` and ``s2``/``z2``
    likewise for ``down`` (E, H, I). Any bit width; the CPU body dequantizes each expert."""
    if x.device.type == "cuda":
        from . import cuda

        return cuda.moe_quant(x, ids, weights, w1, s1, z1, w2, s2, z2, bits, group1, group2, act)
    hidden, inter = x.shape[-1], s2.shape[-1] * group2

    def up(e: int, rows: Tensor) -> Tensor:
        w = dequantize(w1[e], s1[e], z1[e], None, bits, group1, hidden)
        return F.linear(rows, w.to(rows.dtype))

    def down(e: int, h: Tensor) -> Tensor:
        w = dequantize(w2[e], s2[e], z2[e], None, bits, group2, inter)
        return F.linear(h, w.to(h.dtype))

    return experts_loop(x, ids, weights, w1.shape[0], up, down, act)


@triton_op("fxcompress::moe_int4pack", mutates_args=())
def moe_int4pack(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, sz1: Tensor, w2: Tensor,
                 sz2: Tensor, group1: int, group2: int, act: str) -> Tensor:
    """An experts block in aten's CPU int4 layout, stacked per expert (``w1[e]`` is what
    ``_convert_weight_to_int4pack_for_cpu`` makes of expert e's gate_up codes, ``sz1[e]`` its
    ``(groups, N, 2)`` scale and offset): the fast CPU path, bf16 activations."""
    if x.device.type != "cpu":
        raise RuntimeError("moe_int4pack holds a CPU weight layout; move the module with "
                           ".to(device) so that it repacks for that device")

    def up(e: int, rows: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), w1[e], group1, sz1[e])

    def down(e: int, h: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), w2[e], group2, sz2[e])

    return experts_loop(x, ids, weights, w1.shape[0], up, down, act)


@triton_op("fxcompress::moe_pruned", mutates_args=())
def moe_pruned(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, act: str
               ) -> Tensor:
    """An experts block of pruned (not quantized) experts: dense ``w1`` (E, 2I, H) and ``w2``
    (E, H, I) whose pruned weights are exactly 0 (``SparseExperts`` keeps that invariant and
    records the pattern in its masks; re-masking every expert on every call cost 30× the
    dense block at decode)."""
    return experts_loop(x, ids, weights, w1.shape[0],
                        lambda e, rows: F.linear(rows, w1[e].to(rows.dtype)),
                        lambda e, h: F.linear(h, w2[e].to(h.dtype)), act)


def _moe_fake(x: Tensor, *args, **kwargs) -> Tensor:
    """The output of an experts op has the input's shape and dtype; registered explicitly
    because the CPU bodies' routing (``nonzero``) has data-dependent sizes that must stay
    inside the op."""
    return torch.empty_like(x)


for _op in (moe_quant, moe_int4pack, moe_pruned):
    _op.register_fake(_moe_fake)
