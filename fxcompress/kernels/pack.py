"""Bit layouts: the only module that knows how integer codes are laid out in memory.

The canonical layout is compressed-tensors' ``pack-quantized`` format, so that fxcompress
checkpoints load in the ecosystem that reads it (transformers, vLLM):

* codes are unsigned, ``0 <= code < 2**bits`` (compressed-tensors stores the signed value plus
  ``2**(bits-1)``, which is the same bit pattern);
* each row is one bit stream: element ``k`` occupies bits ``[k*bits, (k+1)*bits)``, packed into
  little-endian int32 words, ``ceil(K*bits/32)`` words per row. For 3 bits a code may straddle
  two words;
* zero points are packed the same way along dim 0 (``pack(zeros.T).T``).

``unpack`` is written with plain tensor ops so that it runs on any device and inside traced
graphs (it is the reference dequantization of the CPU fallback path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` codes of ``bits`` bits."""
    return math.ceil(k * bits / 32)


def _bit_positions(bits: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For the 32 codes of one ``bits``-word block: word index, shift, bits in that word."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    low_bits = torch.clamp(32 - shift, max=bits)
    return word, shift, low_bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes ``(..., K)`` into int32 words ``(..., ceil(K*bits/32))``."""
    if bits not in range(1, 9):
        raise ValueError(f"pack: bits must be in 1..8, got {bits}")
    codes = codes.to(torch.int32)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"pack: codes out of range [0, {2**bits}) for {bits}-bit packing")
    if 32 % bits == 0:
        return _pack_aligned(codes, bits)
    codes = codes.to(torch.int64)
    *lead, k = codes.shape
    blocks = math.ceil(k / 32)
    x = torch.nn.functional.pad(codes, (0, blocks * 32 - k)).reshape(-1, blocks, 32)
    word, shift, low_bits = _bit_positions(bits, codes.device)
    out = torch.zeros(x.shape[0], blocks, bits, dtype=torch.int64, device=codes.device)
    out.scatter_add_(2, word.expand_as(x), (x & ((1 << low_bits) - 1)) << shift)
    spill = low_bits < bits  # codes that continue in the next word
    if spill.any():
        high = x[..., spill] >> low_bits[spill]
        out.scatter_add_(2, (word[spill] + 1).expand_as(high), high)
    out = out.reshape(*lead, blocks * bits)[..., : packed_width(k, bits)]
    # reinterpret the unsigned 32-bit words as int32
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _pack_aligned(codes: Tensor, bits: int) -> Tensor:
    """Fast path when codes never straddle words (bits divides 32)."""
    per = 32 // bits
    *lead, k = codes.shape
    x = torch.nn.functional.pad(codes, (0, -k % per))
    x = x.reshape(*lead, -1, per) << (torch.arange(per, device=codes.device, dtype=torch.int32)
                                      * bits)
    return x.sum(-1, dtype=torch.int32)  # disjoint bits: the sum is the bitwise or


def _unpack_aligned(packed: Tensor, bits: int, k: int) -> Tensor:
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)


def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack`: int32 words ``(..., W)`` to uint8 codes ``(..., k)``."""
    if bits not in range(1, 9):
        raise ValueError(f"unpack: bits must be in 1..8, got {bits}")
    *lead, w = packed.shape
    if w != packed_width(k, bits):
        raise ValueError(
            f"unpack: {w} words cannot hold exactly {k} codes of {bits} bits "
            f"(expected {packed_width(k, bits)})"
        )
    if 32 % bits == 0:
        return _unpack_aligned(packed, bits, k)
    blocks = math.ceil(k / 32)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, blocks * bits - w)).reshape(-1, blocks, bits)
    word, shift, low_bits = _bit_positions(bits, packed.device)
    low = (words[..., word] >> shift) & ((1 << low_bits) - 1)
    nxt = torch.clamp(word + 1, max=bits - 1)
    high = (words[..., nxt] & ((1 << (bits - low_bits)) - 1)) << low_bits
    codes = torch.where(low_bits < bits, low | high, low)
    return codes.reshape(*lead, blocks * 32)[..., :k].to(torch.uint8)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack along dim 0 (compressed-tensors packs zero points this way)."""
    return pack(codes.t(), bits).t().contiguous()


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`."""
    return unpack(packed.t(), bits, n).t().contiguous()


def pack_bitmask(mask: Tensor) -> Tensor:
    """Pack a bool matrix ``(N, K)`` into uint8 ``(N, ceil(K/8))``, bit ``k % 8`` of byte ``k // 8``
    (little-endian bit order, as numpy's ``packbits(..., bitorder="little")``)."""
    n, k = mask.shape
    x = torch.nn.functional.pad(mask.to(torch.uint8), (0, -k % 8)).reshape(n, -1, 8)
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.uint8))
    return (x * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_bitmask`."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


# --------------------------------------------------------------------------------------------
# Kernel layouts. The Triton kernels read two layouts besides the canonical one; both are built
# once when a checkpoint is prepared for CUDA and round-trip exactly to the canonical codes.


def _pad_columns(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the last dim of ``x`` up to a multiple of ``multiple``."""
    return torch.nn.functional.pad(x, (0, -x.shape[-1] % multiple))


def pack_3bit_planes(codes: Tensor) -> Tensor:
    """Pack 3-bit codes ``(N, K)`` into int32 ``(N, 3 * ceil(K/32))`` as two bit planes.

    A canonical 3-bit stream straddles words, which a kernel cannot unpack with fixed shifts.
    Here each row is ``[low | high]``: ``low`` holds ``code & 3`` as a canonical 2-bit stream
    (``2 * ceil(K/32)`` words, 16 codes a word) and ``high`` holds ``code >> 2`` as a canonical
    1-bit stream (``ceil(K/32)`` words). Read as int16 (little-endian), ``high`` has one 16-bit
    half-word per ``low`` word, holding the high bits of the same 16 codes. Still 3 bits a code.
    """
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 8):
        raise ValueError("pack_3bit_planes: codes out of range [0, 8)")
    padded = _pad_columns(codes, 32)
    return torch.cat([pack(padded & 3, 2), pack(padded >> 2, 1)], dim=-1)


def unpack_3bit_planes(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_3bit_planes`: int32 ``(N, 3*ceil(k/32))`` to uint8 ``(N, k)``."""
    blocks = math.ceil(k / 32)
    if packed.shape[-1] != 3 * blocks:
        raise ValueError(
            f"unpack_3bit_planes: expected {3 * blocks} words per row for k={k}, "
            f"got {packed.shape[-1]}"
        )
    low = unpack(packed[..., : 2 * blocks], 2, 32 * blocks)
    high = unpack(packed[..., 2 * blocks :], 1, 32 * blocks)
    return (low | (high << 2))[..., :k]


def _check_24_mask(mask: Tensor, shape: torch.Size) -> None:
    """Raise ValueError unless ``mask`` keeps exactly 2 of every 4 consecutive columns."""
    if mask.shape != shape:
        raise ValueError(f"pack_24: mask shape {tuple(mask.shape)} != values shape {tuple(shape)}")
    if mask.dim() != 2 or shape[1] % 4:
        raise ValueError(f"pack_24: expected a 2-d tensor with K % 4 == 0, got {tuple(shape)}")
    kept = mask.to(torch.int64).reshape(shape[0], -1, 4).sum(-1)
    if not bool((kept == 2).all()):
        bad = int((kept != 2).sum())
        raise ValueError(f"pack_24: {bad} groups of 4 do not keep exactly 2 values (2:4 sparsity)")


def pack_24(codes_or_values: Tensor, mask: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """Compact a 2:4-sparse matrix ``(N, K)`` to its kept half.

    ``mask`` (bool, ``(N, K)``) must keep exactly 2 of every 4 consecutive columns. The kept
    values of each row, in column order, form ``(N, K/2)``:

    * floating-point input: returned as is, ``(N, K/2)`` in the input dtype;
    * integer codes: packed with :func:`pack` at ``bits`` bits, int32 ``(N, ceil(K/2*bits/32))``.

    ``meta`` holds, per kept value, its position ``0..3`` inside its group of 4, as a canonical
    2-bit stream: int32 ``(N, ceil(K/32))``. Positions within a group are increasing.
    """
    _check_24_mask(mask, codes_or_values.shape)
    n, k = codes_or_values.shape
    mask = mask.bool()
    kept = codes_or_values[mask].reshape(n, k // 2)
    positions = (torch.arange(k, device=mask.device) % 4).expand(n, k)[mask].reshape(n, k // 2)
    meta = pack(positions, 2)
    if codes_or_values.is_floating_point():
        return kept.contiguous(), meta
    return pack(kept, bits), meta


def unpack_24(values: Tensor, meta: Tensor, k: int, bits: int = 4) -> Tensor:
    """Inverse of :func:`pack_24`: the dense ``(N, k)`` matrix, zero at pruned positions.

    Floating-point ``values`` come back in their dtype; packed codes as uint8 codes.
    """
    if k % 4:
        raise ValueError(f"unpack_24: k must be a multiple of 4, got {k}")
    kept = values if values.is_floating_point() else unpack(values, bits, k // 2)
    if kept.shape[-1] != k // 2:
        raise ValueError(f"unpack_24: expected {k // 2} kept values per row, got {kept.shape[-1]}")
    positions = unpack(meta, 2, k // 2).to(torch.int64)
    groups = torch.arange(k // 2, device=meta.device) // 2
    columns = 4 * groups + positions
    if bool((columns[:, 0::2] == columns[:, 1::2]).any()):
        raise ValueError("unpack_24: two kept values share one position in a group of 4")
    dense = torch.zeros(kept.shape[0], k, dtype=kept.dtype, device=kept.device)
    return dense.scatter_(1, columns, kept)
