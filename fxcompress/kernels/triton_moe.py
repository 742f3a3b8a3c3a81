"""A grouped Triton kernel for the experts of a mixture-of-experts block (CUDA).

Tokens are routed to k of E experts. The host sorts the (token, slot) pairs by expert and pads
each expert's run to a multiple of ``BLOCK_M`` (static sizes: at most ``T·k + E·(BLOCK_M−1)``
rows), so every row block belongs to one expert; one launch per projection then runs a tile
program per (row block, N block) that gathers its rows of the activation, reads only that
expert's packed codes and dequantizes them in registers (the K loop of
:mod:`~fxcompress.kernels.triton_kernels`), and stores to the rows' slots. Blocks past the
last expert's run exit at once. This is vLLM's fused-MoE structure (``moe_align_block_size``
+ a grouped GEMM) on the canonical compressed-tensors layout, 2/4/8 bits, groups that are a
multiple of 16 columns.

``experts_quant_matmul`` is the building block; ``moe_quant`` in ``kernels/cuda.py`` chains two
of them around the gated activation. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pack
from .triton_kernels import k_loop, pick_block_k, store_tile

_BLOCK_M = 16


class Routing:
    """The padded, expert-sorted order of the ``T·k`` routed slots (see the module doc)."""

    def __init__(self, ids: Tensor, experts: int, block_m: int = _BLOCK_M) -> None:
        flat = ids.reshape(-1).long()
        slots = flat.numel()
        counts = torch.zeros(experts, dtype=torch.long, device=ids.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + block_m - 1) // block_m * block_m
        ends = torch.cumsum(padded, 0)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
        rank = torch.arange(slots, device=ids.device) - first[expert]
        capacity = triton.cdiv(slots + experts * (block_m - 1), block_m) * block_m
        self.slots = torch.full((capacity,), slots, dtype=torch.int32, device=ids.device)
        self.slots[(ends - padded)[expert] + rank] = order.to(torch.int32)
        starts = torch.arange(0, capacity, block_m, device=ids.device)
        block_expert = torch.searchsorted(ends, starts, right=True)
        self.block_expert = torch.where(block_expert < experts, block_expert, -1).to(torch.int32)
        self.count, self.block_m = slots, block_m


@triton.jit
def _experts_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, slots_ptr, block_expert_ptr,
                    S, N, K, ROW_DIV, W_VALID, GROUP_SIZE,
                    stride_xm, stride_ym, stride_we, stride_wn, stride_se, stride_sn,
                    stride_ze, stride_zn,
                    BITS: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[slot, n] = x[slot // ROW_DIV] · W_e[n]ᵀ for the slots of one row block (expert e)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = slots < S
        rows = slots // ROW_DIV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_e, s_e, z_e = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
        acc = k_loop(acc, x_ptr, w_e, w_e, w_e, s_e, z_e, rows, m_mask, offs_n, n_mask,
                     0, tl.cdiv(K, BLOCK_K), K, stride_xm, 1, stride_wn, 0, stride_sn,
                     stride_zn, W_VALID, 0, GROUP_SIZE, BITS, False, DOT_F32, BLOCK_M,
                     BLOCK_K, EVEN_K)
        store_tile(y_ptr, acc, y_ptr, slots, m_mask, offs_n, n_mask, stride_ym, False)


def supported(bits: int, group_size: int, k: int) -> bool:
    """Whether the kernel serves this grid (else the op dequantizes per expert)."""
    return bits in (2, 4, 8) and (group_size >= k or group_size % 16 == 0)


def experts_quant_matmul(x: Tensor, route: Routing, row_div: int, w: Tensor, scale: Tensor,
                         zero: Tensor, bits: int, group_size: int) -> Tensor:
    """``y[s] = x[s // row_div] · W_{e(s)}ᵀ`` for every routed slot ``s`` (T·k, N), with
    ``W`` (E, N, K) in the canonical packed layout, ``scale``/``zero`` (E, N, groups)."""
    k = x.shape[-1]
    n = w.shape[1]
    block_k = pick_block_k(k, group_size, False, 64)
    y = torch.empty((route.count, n), dtype=x.dtype, device=x.device)
    block_n = 64 if x.device.type == "cuda" else 16
    dot_f32 = x.dtype == torch.float32 or (x.device.type != "cuda" and x.dtype == torch.bfloat16)
    grid = (route.block_expert.numel(), triton.cdiv(n, block_n))
    torch.library.wrap_triton(_experts_kernel)[grid](
        x, y, w, scale, zero, route.slots, route.block_expert, route.count, n, k, row_div,
        pack.packed_width(k, bits), min(group_size, k), x.stride(0), y.stride(0),
        w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), zero.stride(0),
        zero.stride(1), BITS=bits, DOT_F32=dot_f32, EVEN_K=k % block_k == 0,
        BLOCK_M=route.block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
