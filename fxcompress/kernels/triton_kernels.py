"""Triton kernels for quantized and 2:4-sparse linear layers on CUDA.

Why Triton: weight-only quantization pays off only if the weight is never materialized in
full precision. These kernels read the packed weight straight from global memory, unpack and
dequantize one tile in registers and multiply it with the activations, accumulating in fp32.
At decode (few rows) the layer is bound by how many weight bytes are read, so 4-bit weights are
up to 4x faster than fp16; at prefill the dequantization hides behind the tensor cores.

One kernel body serves three storage formats, chosen by constexpr switches:

* dense quantized (``BITS`` in 2/3/4/8): y = x · ((c − z) · s)ᵀ with per-group scale/zero;
* 2:4 sparse quantized: only the kept half of the codes is stored, with 2-bit positions;
* 2:4 sparse float (``BITS == 16``): the kept half stored as fp16/bf16/fp32 values.

Two launch shapes, picked by the number of activation rows M:

* decode (M <= 16): a split-K kernel, configured by a small heuristic (:func:`_decode_config`).
  Each program owns a slice of N and a slice of K, so that ~8 programs per SM stream the weight
  even when N/BLOCK_N is small; fp32 partial sums (kept under 1/8 of the weight's bytes) are
  summed, biased and cast by one small reduce kernel. M == 1 is a GEMV on CUDA cores with the
  scale factored out of the inner product; 2 <= M <= 16 uses ``tl.dot`` with a 16-row tile.
* prefill (M > 16): a tiled ``tl.dot`` kernel with grouped program order for L2 reuse,
  ``triton.autotune``-d over five Hopper/Ampere tilings keyed on (M bucket, N, K, bits).
  Autotuning works through ``wrap_triton``: Inductor supports ``configs`` and ``key`` (not
  pre/post hooks, so no split-K with atomics here); it tunes once per compiled graph.

Layouts (see :mod:`fxcompress.kernels.pack`, the only module that knows bit layouts): the
canonical compressed-tensors bit stream for 2/4/8 bits; for 3 bits the two-plane layout of
:func:`~fxcompress.kernels.pack.pack_3bit_planes`; for 2:4 the layout of
:func:`~fxcompress.kernels.pack.pack_24`. Unpacking splits each int32 word in halves with
``tl.join`` until single codes remain, then one ``tl.reshape`` restores column order: no
redundant loads and no data movement between threads. Every K block lies inside one
quantization group, so scales and zero points are loaded as one vector per block.

Launchers are plain functions over tensors and ints that launch through
``torch.library.wrap_triton``, so they can be called from a ``torch.library.triton_op`` body
and traced by ``torch.compile`` / ``torch.export``. Weight preparation (3-bit planes,
act-order column permutation) is a separate, load-time step: :func:`prepare_quant_weight`.

On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by the caller
before triton is first imported) on CPU tensors; the launchers then pick tiny blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pack as _pack

__all__ = [
    "DECODE_MAX_M",
    "PreparedQuantWeight",
    "prepare_quant_weight",
    "quant_matmul",
    "sparse24_quant_matmul",
    "sparse24_matmul",
]

DECODE_MAX_M = 16
"""Largest number of activation rows served by the split-K decode kernel."""

_FLOAT_VALUES = 16  # BITS value meaning "2:4 values stored as floats, no quantization"
# K block (unless the group size is smaller): long blocks for the bandwidth-bound decode, and
# 64 for prefill, where a 128-wide dequantized tile next to the accumulator spills registers
_DECODE_BLOCK_K, _PREFILL_BLOCK_K = 128, 64

# ---------------------------------------------------------------------------------------------
# jit helpers: unpacking, dequantization, 2:4 decompression


@triton.jit
def _halve(v, HALF: tl.constexpr):
    """Split every integer of ``v`` into its low and high ``HALF`` bits: shape (..., 2)."""
    mask: tl.constexpr = (1 << HALF) - 1
    return tl.join(v & mask, (v >> HALF) & mask)


@triton.jit
def _unpack_codes(words, BITS: tl.constexpr, WORD_BITS: tl.constexpr):
    """Unpack int32 ``words`` (R, C), each holding ``WORD_BITS`` bits of ``BITS``-bit codes in
    little-endian stream order, into int32 codes (R, C * WORD_BITS // BITS)."""
    R: tl.constexpr = words.shape[0]
    C: tl.constexpr = words.shape[1]
    v = words
    if WORD_BITS == 32:
        v = _halve(v, 16)
    if BITS <= 8:
        v = _halve(v, 8)
    if BITS <= 4:
        v = _halve(v, 4)
    if BITS <= 2:
        v = _halve(v, 2)
    if BITS <= 1:
        v = _halve(v, 1)
    return tl.reshape(v, (R, C * (WORD_BITS // BITS)))


@triton.jit
def _codes_to_f32(codes):
    """Exact int -> fp32 for 0 <= codes < 2**23 with integer ops only (no slow I2F):
    the bits of 2**23 + c, read as a float, are 2**23 + c."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_words(ptr, offs_n, n_mask, row_stride, offs_w, n_valid, EVEN_K: tl.constexpr):
    """Load a (BLOCK_N, len(offs_w)) tile of a row-major array; out-of-range entries read 0.
    With EVEN_K the column mask is dropped, so that loads can be vectorized."""
    ptrs = ptr + offs_n[:, None] * row_stride + offs_w[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=n_mask[:, None], other=0)
    return tl.load(ptrs, mask=n_mask[:, None] & (offs_w < n_valid)[None, :], other=0)


@triton.jit
def _dense_codes(w_ptr, wh_ptr, offs_n, n_mask, kb, stride_wn, W_VALID,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Codes (BLOCK_N, BLOCK_K) of K block ``kb`` of a dense quantized weight, int32."""
    if BITS == 3:
        # two planes per row: W_VALID low words (16 codes of 2 bits each), then the high
        # plane read as int16, one half-word (16 codes of 1 bit) per low word
        UNITS: tl.constexpr = BLOCK_K // 16
        offs_u = kb * UNITS + tl.arange(0, UNITS)
        low = _load_words(w_ptr, offs_n, n_mask, stride_wn, offs_u, W_VALID, EVEN_K)
        high = _load_words(wh_ptr + 2 * W_VALID, offs_n, n_mask, 2 * stride_wn, offs_u, W_VALID,
                           EVEN_K)
        high = high.to(tl.int32) & 0xFFFF
        codes = _unpack_codes(low, 2, 32) | (_unpack_codes(high, 1, 16) << 2)
    else:
        WORDS: tl.constexpr = BLOCK_K * BITS // 32
        offs_w = kb * WORDS + tl.arange(0, WORDS)
        words = _load_words(w_ptr, offs_n, n_mask, stride_wn, offs_w, W_VALID, EVEN_K)
        codes = _unpack_codes(words, BITS, 32)
    return codes


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, n_mask, kb, stride_sn, stride_zn, GROUP_SIZE,
                  BLOCK_K: tl.constexpr):
    """Scale and zero point (fp32, (BLOCK_N,)) of the group holding K block ``kb``."""
    g = (kb * BLOCK_K) // GROUP_SIZE
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32)
    return s, z


@triton.jit
def _decompress_24(kept, positions):
    """Scatter the kept values (R, H) of 2:4 groups back to a dense (R, 2H) tile.

    Kept value ``2g + t`` of a row sits at column ``4g + positions[2g + t]``."""
    R: tl.constexpr = kept.shape[0]
    H: tl.constexpr = kept.shape[1]
    v0, v1 = tl.split(tl.reshape(kept, (R, H // 2, 2)))
    p0, p1 = tl.split(tl.reshape(positions, (R, H // 2, 2)))
    d0 = tl.where(p0 == 0, v0, tl.where(p1 == 0, v1, 0.0))
    d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, 0.0))
    d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, 0.0))
    d3 = tl.where(p0 == 3, v0, tl.where(p1 == 3, v1, 0.0))
    # join appends the new axis last: join(join(d0, d2), join(d1, d3))[g, j, i] = d[2j + i]
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (R, 2 * H))


@triton.jit
def _weight_tile(w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, kb,
                 stride_wn, stride_mn, stride_sn, stride_zn, W_VALID, META_VALID, GROUP_SIZE,
                 BITS: tl.constexpr, SPARSE: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """The dequantized weight tile (BLOCK_N, BLOCK_K) of K block ``kb``, fp32."""
    if SPARSE:
        KEPT: tl.constexpr = BLOCK_K // 2
        if BITS == 16:
            offs_v = kb * KEPT + tl.arange(0, KEPT)
            kept = _load_words(w_ptr, offs_n, n_mask, stride_wn, offs_v, W_VALID, EVEN_K)
            kept = kept.to(tl.float32)
        else:
            WORDS: tl.constexpr = KEPT * BITS // 32
            offs_w = kb * WORDS + tl.arange(0, WORDS)
            words = _load_words(w_ptr, offs_n, n_mask, stride_wn, offs_w, W_VALID, EVEN_K)
            codes = _unpack_codes(words, BITS, 32)
            s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb, stride_sn, stride_zn,
                                 GROUP_SIZE, BLOCK_K)
            kept = (_codes_to_f32(codes) - z[:, None]) * s[:, None]
        META_WORDS: tl.constexpr = KEPT // 16
        offs_meta = kb * META_WORDS + tl.arange(0, META_WORDS)
        positions = _unpack_codes(
            _load_words(meta_ptr, offs_n, n_mask, stride_mn, offs_meta, META_VALID, EVEN_K), 2, 32)
        w = _decompress_24(kept, positions)
    else:
        codes = _dense_codes(w_ptr, wh_ptr, offs_n, n_mask, kb, stride_wn, W_VALID, BITS, BLOCK_K,
                             EVEN_K)
        s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb, stride_sn, stride_zn,
                             GROUP_SIZE, BLOCK_K)
        w = (_codes_to_f32(codes) - z[:, None]) * s[:, None]
    return w


@triton.jit
def k_loop(acc, x_ptr, w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, offs_m, m_mask, offs_n, n_mask,
           kb_start, kb_end, K, stride_xm, stride_xk, stride_wn, stride_mn, stride_sn, stride_zn,
           W_VALID, META_VALID, GROUP_SIZE,
           BITS: tl.constexpr, SPARSE: tl.constexpr, DOT_F32: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += x[offs_m, K blocks kb_start..kb_end) · W[offs_n, same]ᵀ."""
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        if BLOCK_M == 1 and not SPARSE:
            # GEMV: sum_k (c - z) s x = s (sum_k c x - z sum_k x), one group per K block
            codes = _dense_codes(w_ptr, wh_ptr, offs_n, n_mask, kb, stride_wn, W_VALID,
                                 BITS, BLOCK_K, EVEN_K)
            s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb, stride_sn, stride_zn,
                                 GROUP_SIZE, BLOCK_K)
            xf = x.to(tl.float32)
            cx = tl.sum(_codes_to_f32(codes) * xf, axis=1)
            acc += (s * (cx - z * tl.sum(xf)))[None, :]
        else:
            w = _weight_tile(w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, kb,
                             stride_wn, stride_mn, stride_sn, stride_zn, W_VALID, META_VALID,
                             GROUP_SIZE, BITS, SPARSE, BLOCK_K, EVEN_K)
            if BLOCK_M == 1:
                acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
            elif DOT_F32:  # x-dtype-rounded operands, multiplied in full fp32 precision
                w_t = tl.trans(w.to(x.dtype).to(tl.float32))
                acc = tl.dot(x.to(tl.float32), w_t, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    return acc


@triton.jit
def store_tile(y_ptr, acc, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym,
               HAS_BIAS: tl.constexpr):
    """Store acc (+ bias) to y[offs_m, offs_n] in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, W_VALID, META_VALID,
    stride_xm, stride_xk, stride_wn, stride_mn, stride_sn, stride_zn, stride_ym, stride_ys,
    GROUP_SIZE, BLOCKS_PER_SPLIT,
    BITS: tl.constexpr, SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Split-K matmul for M <= BLOCK_M rows: program (n, s) computes y[:, n-slice] over the
    s-th run of BLOCKS_PER_SPLIT K blocks; with SPLIT_K > 1 it writes an fp32 partial
    y[s, :, n-slice], summed (and biased) by ``_splitk_reduce_kernel``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    kb_start = pid_k * BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = k_loop(acc, x_ptr, w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, offs_m, m_mask, offs_n,
                 n_mask, kb_start, kb_end, K, stride_xm, stride_xk, stride_wn, stride_mn,
                 stride_sn, stride_zn, W_VALID, META_VALID, GROUP_SIZE,
                 BITS, SPARSE, DOT_F32, BLOCK_M, BLOCK_K, EVEN_K)
    if SPLIT_K == 1:
        store_tile(y_ptr, acc, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, HAS_BIAS)
    else:
        store_tile(y_ptr + pid_k * stride_ys, acc, b_ptr, offs_m, m_mask, offs_n, n_mask,
                   stride_ym, False)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum_s partial[s] (+ bias), cast to y's dtype: one launch after a split-K decode."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_kernel_body(
    x_ptr, w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, W_VALID, META_VALID,
    stride_xm, stride_xk, stride_wn, stride_mn, stride_sn, stride_zn, stride_ym,
    GROUP_SIZE, M_BUCKET,
    BITS: tl.constexpr, SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tiled matmul: one (BLOCK_M, BLOCK_N) output tile a program, over all of K. Programs
    are ordered in bands of GROUP_M row-tiles so that consecutive programs share weight tiles
    in L2. ``M_BUCKET`` only keys the autotuner."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = k_loop(acc, x_ptr, w_ptr, wh_ptr, meta_ptr, s_ptr, z_ptr, offs_m, m_mask, offs_n,
                 n_mask, 0, tl.cdiv(K, BLOCK_K), K, stride_xm, stride_xk, stride_wn, stride_mn,
                 stride_sn, stride_zn, W_VALID, META_VALID, GROUP_SIZE,
                 BITS, SPARSE, DOT_F32, BLOCK_M, BLOCK_K, EVEN_K)
    store_tile(y_ptr, acc, b_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, HAS_BIAS)


def _prefill_configs() -> list[triton.Config]:
    """Few tilings for Hopper/Ampere (none spills registers on sm_90 with BLOCK_K=64);
    BLOCK_K is fixed by the launcher (group size)."""
    def cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    return [cfg(32, 128, 4, 4), cfg(64, 64, 4, 4), cfg(64, 128, 4, 4), cfg(128, 64, 4, 4),
            cfg(128, 128, 8, 3)]


_prefill_kernel = triton.autotune(
    configs=_prefill_configs(), key=["M_BUCKET", "N", "K", "BITS", "SPARSE", "BLOCK_K"]
)(_prefill_kernel_body)

# ---------------------------------------------------------------------------------------------
# launch configuration


class _DecodeConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    blocks_per_split: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: a small stand-in off CUDA (interpreter), an
    H100's 132 when tracing fake CUDA tensors on a machine without a GPU."""
    if device.type != "cuda":
        return 2
    if not torch.cuda.is_available():
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _min_block_k(sparse: bool) -> int:
    """Smallest K block the unpacking supports: a whole number of words (and of meta words)."""
    return 32 if sparse else 16


def pick_block_k(k: int, group_size: int, sparse: bool, preferred: int) -> int:
    """Largest power of two <= ``preferred`` that keeps every K block inside one group
    (``group_size >= k``: a single group)."""
    lo = _min_block_k(sparse)
    if group_size >= k:
        return max(lo, min(preferred, triton.next_power_of_2(k)))
    bk = preferred
    while bk > lo and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"group_size {group_size} must be a multiple of {lo} for the kernels")
    return bk


def _decode_config(m: int, n: int, k: int, block_k: int, weight_bits: float,
                   device: torch.device) -> _DecodeConfig:
    """Tiles for M <= DECODE_MAX_M: enough (N-slice, K-slice) programs to fill the GPU.

    Splitting K costs an fp32 partial (M, N) per split, written and read back; it is kept
    under 1/8 of the weight's bytes (``weight_bits`` per weight element)."""
    on_gpu = device.type == "cuda"
    block_m = 1 if m == 1 else 16
    block_n = (64 if m == 1 else 32) if on_gpu else 16
    target = 8 * _sm_count(device)  # enough resident programs to keep loads in flight
    n_blocks = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    # 8·split·M·N <= N·K·bits/64, with M bounded by the tile (no arithmetic on a symbolic M)
    max_split = max(1, int(k * weight_bits / (8 * 8 * 8 * block_m)))
    split = 1  # the largest power of two within budget, each split >= 2 K blocks
    while (n_blocks * split * 2 <= target and k_blocks // (split * 2) >= 2
           and split * 2 <= max_split):
        split *= 2
    per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, per_split)  # no empty splits
    return _DecodeConfig(block_m, block_n, block_k, split, per_split,
                         num_warps=4 if on_gpu else 1, num_stages=3 if on_gpu else 1)


def _m_bucket(m: int | torch.SymInt) -> int | torch.SymInt:
    """Autotuner key for M: the next power of two (capped); symbolic M passes through, as
    Inductor tunes a user kernel once per compiled graph anyway."""
    if not isinstance(m, int):
        return m
    return min(triton.next_power_of_2(m), 4096)


# ---------------------------------------------------------------------------------------------
# launchers


class _Operands(NamedTuple):
    """Everything the kernels read besides x, in kernel argument order."""
    w: Tensor
    wh: Tensor
    meta: Tensor
    scale: Tensor
    zero: Tensor
    w_valid: int
    meta_valid: int
    group_size: int
    bits: int
    sparse: bool
    weight_bits: float  # memory per dense weight element, for the split-K budget


def _launch(x2d: Tensor, ops: _Operands, n: int, bias: Tensor | None) -> Tensor:
    """Run the decode or prefill kernel on prepared operands; y has x's dtype."""
    m, k = x2d.shape
    if m == 0:
        return x2d.new_empty((0, n))
    decode = m <= DECODE_MAX_M
    block_k = pick_block_k(k, ops.group_size, ops.sparse,
                           _DECODE_BLOCK_K if decode else _PREFILL_BLOCK_K)
    has_bias = bias is not None
    bias_arg = bias.to(x2d.dtype).contiguous() if has_bias else x2d
    # fp32 activations get an fp32 (not tf32) dot; so does bf16 under the Triton interpreter,
    # which multiplies the raw bits of bf16 dot operands (triton-lang/triton#11584)
    dot_f32 = x2d.dtype == torch.float32 or (
        x2d.device.type != "cuda" and x2d.dtype == torch.bfloat16)
    even_k = k % block_k == 0
    common = (ops.w, ops.wh, ops.meta, ops.scale, ops.zero)
    strides = (x2d.stride(0), x2d.stride(1), ops.w.stride(0), ops.meta.stride(0),
               ops.scale.stride(0), ops.zero.stride(0))
    if decode:
        cfg = _decode_config(m, n, k, block_k, ops.weight_bits, x2d.device)
        if cfg.split_k == 1:
            y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        else:
            y = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x2d.device)
        grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
        torch.library.wrap_triton(_decode_kernel)[grid](
            x2d, *common, bias_arg, y, m, n, k, ops.w_valid, ops.meta_valid, *strides,
            n, m * n, ops.group_size, cfg.blocks_per_split,
            BITS=ops.bits, SPARSE=ops.sparse, HAS_BIAS=has_bias,
            DOT_F32=dot_f32, EVEN_K=even_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if cfg.split_k == 1:
            return y
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        block = 1024 if x2d.device.type == "cuda" else 64
        torch.library.wrap_triton(_splitk_reduce_kernel)[(triton.cdiv(m * n, block),)](
            y, bias_arg, out, m * n, n, SPLIT_K=cfg.split_k, HAS_BIAS=has_bias, BLOCK=block)
        return out

    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    args = (x2d, *common, bias_arg, y, m, n, k, ops.w_valid, ops.meta_valid, *strides, n,
            ops.group_size, _m_bucket(m))
    meta = dict(BITS=ops.bits, SPARSE=ops.sparse, HAS_BIAS=has_bias,
                DOT_F32=dot_f32, EVEN_K=even_k, BLOCK_K=block_k)
    if x2d.device.type == "cuda":
        def grid(c: dict) -> tuple[int]:
            return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

        torch.library.wrap_triton(_prefill_kernel)[grid](*args, **meta)
    else:  # interpreter: one small tiling, no benchmarking
        grid_cpu = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        torch.library.wrap_triton(_prefill_kernel_body)[grid_cpu](
            *args, **meta, BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=1, num_stages=1)
    return y


def _check_x(x2d: Tensor) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"expected a 2-d activation (M, K), got shape {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x2d.dtype}")


def _check_groups(scale: Tensor, zero: Tensor, n: int, k: int, group_size: int) -> int:
    """Validate (N, G) scale/zero against K and the group size; return the kernel group size."""
    groups = math.ceil(k / group_size) if 0 < group_size < k else 1
    if scale.shape != (n, groups) or zero.shape != (n, groups):
        raise ValueError(
            f"scale/zero must be ({n}, {groups}) for K={k}, group_size={group_size}; got "
            f"{tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    return group_size if groups > 1 else max(k, 1)


def _weight_width(k: int, bits: int) -> int:
    """int32 words per row of a prepared dense weight."""
    return 3 * math.ceil(k / 32) if bits == 3 else _pack.packed_width(k, bits)


def quant_matmul(x2d: Tensor, w_packed: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 group_size: int, bias: Tensor | None = None, perm: Tensor | None = None) -> Tensor:
    """y = x2d · dequant(W)ᵀ (+ bias) with W[n, k] = (c[n, k] − zero[n, g]) · scale[n, g].

    Args:
        x2d: activations (M, K), fp16/bf16/fp32 (fp32 runs ``tl.dot`` in full precision).
        w_packed: int32 (N, words), as :func:`prepare_quant_weight` returns it: the canonical
            pack for 2/4/8 bits, :func:`~fxcompress.kernels.pack.pack_3bit_planes` for 3 bits.
        scale: (N, G) fp16/bf16/fp32; zero: (N, G) uint8 zero-point codes (sym: 2**(bits-1)).
        bits: 2, 3, 4 or 8.
        group_size: columns per group, a multiple of 16; >= K (or <= 0): one group per row.
        bias: optional (N,).
        perm: optional int64 (K,) act-order column order from :func:`prepare_quant_weight`;
            x2d[:, perm] is gathered once per call.

    Returns: (M, N) in x2d's dtype.
    """
    _check_x(x2d)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"quant_matmul: bits must be 2, 3, 4 or 8, got {bits}")
    if perm is not None:
        x2d = x2d.index_select(1, perm)
    k = x2d.shape[1]
    n = w_packed.shape[0]
    if w_packed.dtype != torch.int32 or w_packed.shape[1] != _weight_width(k, bits):
        raise ValueError(
            f"quant_matmul: weight must be int32 ({n}, {_weight_width(k, bits)}) for K={k}, "
            f"bits={bits}; got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    kernel_gs = _check_groups(scale, zero, n, k, group_size)
    w = w_packed.contiguous()
    w_valid = 2 * math.ceil(k / 32) if bits == 3 else w.shape[1]
    ops = _Operands(w, w.view(torch.int16), w, scale.contiguous(), zero.contiguous(),
                    w_valid, 0, kernel_gs, bits, False, bits)
    return _launch(x2d, ops, n, bias)


def sparse24_quant_matmul(x2d: Tensor, values_packed: Tensor, meta: Tensor, scale: Tensor,
                          zero: Tensor, bits: int, group_size: int,
                          bias: Tensor | None = None) -> Tensor:
    """y = x2d · Wᵀ (+ bias) for a 2:4-sparse quantized W in the :func:`pack_24` layout.

    Args:
        values_packed: int32 (N, ceil(K/2 * bits/32)), kept codes (canonical pack).
        meta: int32 (N, ceil(K/32)), 2-bit positions of the kept values.
        scale, zero: (N, G) over the original K columns, as in :func:`quant_matmul`.
        bits: 2, 4 or 8. K (x2d's columns) must be a multiple of 4.
    """
    _check_x(x2d)
    if bits not in (2, 4, 8):
        raise ValueError(f"sparse24_quant_matmul: bits must be 2, 4 or 8, got {bits}")
    k = x2d.shape[1]
    n = values_packed.shape[0]
    _check_24_shapes(k, n, meta)
    words = _pack.packed_width(k // 2, bits)
    if values_packed.dtype != torch.int32 or values_packed.shape != (n, words):
        raise ValueError(f"sparse24_quant_matmul: values must be int32 ({n}, {words}), got "
                         f"{values_packed.dtype} {tuple(values_packed.shape)}")
    kernel_gs = _check_groups(scale, zero, n, k, group_size)
    v = values_packed.contiguous()
    ops = _Operands(v, v, meta.contiguous(), scale.contiguous(), zero.contiguous(),
                    words, meta.shape[1], kernel_gs, bits, True, bits / 2 + 1)
    return _launch(x2d, ops, n, bias)


def sparse24_matmul(x2d: Tensor, values: Tensor, meta: Tensor,
                    bias: Tensor | None = None) -> Tensor:
    """y = x2d · Wᵀ (+ bias) for a 2:4-sparse float W in the :func:`pack_24` layout.

    Args:
        values: (N, K/2) fp16/bf16/fp32 kept values; meta: int32 (N, ceil(K/32)).
    """
    _check_x(x2d)
    k = x2d.shape[1]
    n = values.shape[0]
    _check_24_shapes(k, n, meta)
    if not values.is_floating_point() or values.shape != (n, k // 2):
        raise ValueError(f"sparse24_matmul: values must be float ({n}, {k // 2}), got "
                         f"{values.dtype} {tuple(values.shape)}")
    v = values.contiguous()
    ops = _Operands(v, v, meta.contiguous(), v, v, k // 2, meta.shape[1], max(k, 1),
                    _FLOAT_VALUES, True, 4 * values.element_size() + 1)
    return _launch(x2d, ops, n, bias)


def _check_24_shapes(k: int, n: int, meta: Tensor) -> None:
    if k % 4:
        raise ValueError(f"2:4 sparsity needs K % 4 == 0, got K={k}")
    words = _pack.packed_width(k // 2, 2)
    if meta.dtype != torch.int32 or meta.shape != (n, words):
        raise ValueError(f"2:4 meta must be int32 ({n}, {words}), got {meta.dtype} "
                         f"{tuple(meta.shape)}")


# ---------------------------------------------------------------------------------------------
# load-time preparation


class PreparedQuantWeight(NamedTuple):
    """A dense quantized weight in the layout :func:`quant_matmul` reads.

    Attributes:
        weight: int32 (N, W). 2/4/8 bits: canonical pack (W = ceil(K*bits/32)); 3 bits:
            :func:`~fxcompress.kernels.pack.pack_3bit_planes` (W = 3*ceil(K/32)). With act-order
            the columns are in ``perm`` order.
        scale: (N, G') scales of the kernel's groups (columns of ``perm`` order).
        zero: (N, G') uint8 zero points of the same groups.
        group_size: the kernel's group size (columns, in ``perm`` order, per group).
        perm: int64 (K,) column order (x2d[:, perm] is the kernel's input), or None.
    """

    weight: Tensor
    scale: Tensor
    zero: Tensor
    group_size: int
    perm: Tensor | None


def _regular_group_size(sorted_groups: Tensor) -> int:
    """Largest block size B such that every run of equal group ids starts at a multiple of B."""
    k = sorted_groups.numel()
    starts = (torch.nonzero(sorted_groups[1:] != sorted_groups[:-1]).flatten() + 1).tolist()
    size = 0
    for s in starts:
        size = math.gcd(size, s)
    return size or k


def prepare_quant_weight(w_packed: Tensor, scale: Tensor, zero: Tensor, bits: int,
                         in_features: int, group_size: int,
                         g_idx: Tensor | None = None) -> PreparedQuantWeight:
    """Turn a canonical checkpoint weight into the layout the kernels read (once, at load).

    * 3 bits: repack the straddling stream into two bit planes.
    * ``g_idx`` (group of each column): sort the columns by group (stable), repack the weight in
      that order and return ``perm`` for the run-time gather of x. If the sorted groups are not
      runs of one fixed size, scales are re-expanded to the largest block size B that aligns
      with every run (B must be a multiple of 16).

    Args:
        w_packed: int32 (N, ceil(K*bits/32)) canonical codes; scale/zero: (N, G).
        in_features: K. group_size: as in the checkpoint (>= K: per channel).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"prepare_quant_weight: bits must be 2, 3, 4 or 8, got {bits}")
    k = in_features
    perm = None
    if g_idx is not None:
        groups = g_idx.to(device=w_packed.device, dtype=torch.int64)
        if groups.shape != (k,):
            raise ValueError(f"g_idx must have shape ({k},), got {tuple(groups.shape)}")
        order = torch.argsort(groups, stable=True)
        sorted_groups = groups[order]
        block = _regular_group_size(sorted_groups)
        first = sorted_groups[::block]
        if first.numel() > 1 and block % 16:
            raise ValueError(
                f"act-order groups must start at multiples of 16 columns once sorted; the "
                f"largest common block is {block}"
            )
        scale, zero = scale[:, first], zero[:, first]
        group_size = block if first.numel() > 1 else max(k, 1)
        if not torch.equal(order, torch.arange(k, device=order.device)):
            perm = order
    if bits != 3 and perm is None:
        weight = w_packed.contiguous()  # the canonical layout is the kernel's
    else:
        codes = _pack.unpack(w_packed, bits, k)
        if perm is not None:
            codes = codes[:, perm]
        weight = _pack.pack_3bit_planes(codes) if bits == 3 else _pack.pack(codes, bits)
    return PreparedQuantWeight(weight, scale.contiguous(), zero.contiguous(), group_size, perm)
