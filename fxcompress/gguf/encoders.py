"""How fxcompress's own layer kinds are written to GGUF: GPTQ grids that are ggml types.

A ``QuantLinear`` whose grid is one of ggml's block formats is written as that format with its
own codes and scales, so llama.cpp computes with exactly the weights fxcompress solved for:

==========================  =======  ===============================================
fxcompress grid             ggml     block of 32 weights
==========================  =======  ===============================================
4-bit, groups of 32, sym    Q4_0     ``d = scale``, ``q = code`` (both offset by 8)
4-bit, groups of 32, asym   Q4_1     ``d = scale``, ``m = fp16(-scale * zero)``
8-bit, groups of 32, sym    Q8_0     ``d = scale``, ``q = code - 128``
==========================  =======  ===============================================

fxcompress dequantizes ``(code - zero) * scale`` with a float16 scale; ggml dequantizes Q4_0 as
``d * (q - 8)`` and Q8_0 as ``d * q`` with a float16 ``d``: the same products of a small integer
and a float16, exact in float32. Q4_1 stores ``x = d * q + m`` with ``m`` in float16, so
``-scale * zero`` (exact in float32) is rounded to the nearest float16 (ties to even): each weight
moves by at most half a float16 ulp of ``scale * zero``. Other grids (3-bit, groups of 64 or
128, per channel, act-order with an unsorted group index) have no ggml type of the same values:
:func:`ggml_type` says why and which named recipes produce a grid that does.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..modules import QuantLinear, SparseLinear
from . import Encoded, encoder

BLOCK = 32
MAPPED_RECIPES = "gptq-q4_0 (Q4_0), gptq-q4_1 (Q4_1), gptq-q8_0 (Q8_0)"


class GGUFExportError(ValueError):
    """A layer, model or tokenizer that cannot be written to GGUF as asked: the message says
    which and what would work."""


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """(rows, groups) float16 values -> (rows, groups, 2) little-endian bytes."""
    return x.detach().cpu().to(torch.float16).numpy().astype("<f2").view(np.uint8) \
        .reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """(rows, groups, 32) 4-bit codes -> (rows, groups, 16) bytes as ggml packs a block: byte
    ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _blocks(codes: torch.Tensor) -> np.ndarray:
    """(rows, in) codes -> (rows, in // 32, 32) uint8."""
    rows, cols = codes.shape
    return codes.cpu().numpy().astype(np.uint8).reshape(rows, cols // BLOCK, BLOCK)


def _rows(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate each block's fields and lay the blocks of a row end to end."""
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(blocks.shape[0], -1))


def q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q4_0 blocks (18 bytes: d, 16 bytes of nibbles) of 4-bit codes with zero point 8."""
    return _rows([_half_bytes(scale), _nibbles(_blocks(codes))])


def q4_1(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks (20 bytes: d, m, 16 bytes of nibbles); ``m = -scale * zero`` rounded to
    float16 to nearest (the one rounding of the conversion)."""
    m = -(scale.float() * zero.float())
    return _rows([_half_bytes(scale), _half_bytes(m), _nibbles(_blocks(codes))])


def q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks (34 bytes: d, 32 signed bytes) of 8-bit codes with zero point 128."""
    q = (_blocks(codes).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return _rows([_half_bytes(scale), q])


def ggml_type(m: QuantLinear) -> T:
    """The ggml type holding ``m``'s grid exactly; :class:`GGUFExportError` saying why not."""
    grid = f"{m.bits}-bit, " + (f"groups of {m.group_size}" if m.group_size < m.in_features
                                else "per channel") + (", sym" if m.sym else ", asym")
    half = 2 ** (m.bits - 1)
    if m.weight_g_idx is not None:
        natural = torch.arange(m.in_features, device=m.weight_g_idx.device) // m.group_size
        if not torch.equal(m.weight_g_idx.long(), natural):
            grid += ", act-order with a group index (groups not contiguous)"
    sym = m.sym and bool((m.weight_zero_point == half).all())
    if m.group_size == BLOCK and m.in_features % BLOCK == 0 and "act-order" not in grid:
        if m.bits == 4:
            return T.Q4_0 if sym else T.Q4_1
        if m.bits == 8 and sym:
            return T.Q8_0
    raise GGUFExportError(f"its grid ({grid}) is no ggml type: quantize with a recipe whose "
                          f"grid is one ({MAPPED_RECIPES}), or write dequantized weights "
                          f"(dtype='f16' or 'f32')")


@encoder(QuantLinear)
def encode_quant_linear(m: QuantLinear) -> Encoded:
    """Q4_0, Q4_1 or Q8_0 blocks of ``m``'s own codes and scales (see :func:`ggml_type`)."""
    kind = ggml_type(m)
    codes, scale = m.codes(), m.weight_scale
    if kind == T.Q4_0:
        return int(kind), q4_0(codes, scale)
    if kind == T.Q4_1:
        return int(kind), q4_1(codes, scale, m.weight_zero_point)
    return int(kind), q8_0(codes, scale)


_DENSE = {torch.float32: (T.F32, np.float32), torch.float16: (T.F16, np.float16)}


@encoder(SparseLinear)
def encode_sparse_linear(m: SparseLinear) -> Encoded:
    """A pruned layer as a dense matrix (zeros stored: ggml has no sparse type) in the layer's
    own dtype (bfloat16 as BF16)."""
    w = torch.where(m.mask, m.weight.detach(), 0).cpu()
    return dense(w)


def dense(w: torch.Tensor) -> Encoded:
    """A float tensor as F32 or F16 (the numpy array itself, any shape) or BF16 (its bits as
    raw bytes, ``(rows, 2 * cols)``), the type of its own dtype."""
    if w.dtype == torch.bfloat16:  # numpy has no bfloat16
        if w.dim() != 2:
            raise GGUFExportError("BF16 tensors are written as matrices")
        return int(T.BF16), np.ascontiguousarray(w.view(torch.int16).numpy().view(np.uint8))
    if w.dtype not in _DENSE:
        raise GGUFExportError(f"weights of dtype {w.dtype} have no GGUF float type")
    kind, np_dtype = _DENSE[w.dtype]
    return int(kind), np.ascontiguousarray(w.numpy().astype(np_dtype))
