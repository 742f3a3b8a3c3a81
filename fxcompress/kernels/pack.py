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
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"pack: codes out of range [0, {2**bits}) for {bits}-bit packing")
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
