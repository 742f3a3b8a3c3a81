"""``Compressed``: what an algorithm returns for one linear layer.

Everything needed to rebuild the compressed weight exactly, in plain tensors: integer codes
with their grid (scales, zero points, group index) for quantized layers, a keep-mask for
pruned ones, dense kept values for pruned-but-not-quantized ones, and the loss the algorithm
measured. Packing into storage layouts happens elsewhere (``kernels/pack.py``); a result held
until its module is made can be compacted to the packed codes and mask (:meth:`compact`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import pack
from . import grid


@dataclass
class Compressed:
    shape: tuple[int, int]  # (out_features, in_features)
    loss: float  # ‖(W - Ŵ) Xᵀ‖² / n as the algorithm measured it (inf-free)
    codes: Tensor | None = None  # uint8 (out, in), 0 <= code < 2**bits
    scale: Tensor | None = None  # float32 (out, groups), float16-representable
    zero: Tensor | None = None  # uint8 (out, groups)
    g_idx: Tensor | None = None  # int32 (in,): group of each input column
    bits: int | None = None
    group_size: int | None = None  # effective size (in_features for per-channel)
    sym: bool = False
    # bool (out, in): True where the weight is kept; None for pruned ``values`` that are
    # nonzero exactly where kept (``calibrate``'s fold drops it then: see :meth:`keep`)
    mask: Tensor | None = None
    # (out, in) pruned, not quantized weights, zero where ``mask`` is False: float32, or after
    # an in-memory run the layer's own weight in its dtype (``calibrate``'s fold)
    values: Tensor | None = None
    damp: float | None = None  # relative damping that was used (None: no Hessian)
    packed: Tensor | None = None  # ``codes`` packed as QuantLinear stores them (compact)
    bitmask: Tensor | None = None  # ``mask`` packed 8 to a byte (compact)
    row_loss: Tensor | None = None  # (out,) the loss of each output row
    # a weight on one of llama.cpp's grids (fxcompress.gguf): its ggml type's value and the
    # exact ggml blocks, uint8 (out, bytes per row)
    ggml_type: int | None = None
    blocks: Tensor | None = None

    def split(self, sizes: list[int]) -> list[Compressed]:
        """Cut along the output rows, e.g. a q/k/v solved as one stacked weight (rows of
        GPTQ and N:M SparseGPT are independent given H) back into the three layers."""
        parts, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            cut = lambda t, rows=rows: None if t is None else t[rows].contiguous()  # noqa: E731
            row_loss = None if self.row_loss is None else self.row_loss[rows]
            parts.append(Compressed(
                shape=(size, self.shape[1]),
                loss=float("nan") if row_loss is None else float(row_loss.sum()),
                codes=cut(self.codes), scale=cut(self.scale), zero=cut(self.zero),
                g_idx=self.g_idx, bits=self.bits, group_size=self.group_size, sym=self.sym,
                mask=cut(self.mask), values=cut(self.values), damp=self.damp, row_loss=row_loss,
                packed=cut(self.packed), bitmask=cut(self.bitmask),
                ggml_type=self.ggml_type, blocks=cut(self.blocks)))
            start += size
        if start != self.shape[0]:
            raise ValueError(f"split sizes {sizes} do not add up to {self.shape[0]} rows")
        return parts

    def keep(self) -> Tensor | None:
        """The keep-mask (None: not pruned), unpacked, or made from the values' support where
        it was dropped."""
        if self.mask is not None:
            return self.mask
        if self.bitmask is not None:
            return pack.unpack_bitmask(self.bitmask, self.shape[1])
        return self.values != 0 if self.values is not None else None

    @property
    def pruned(self) -> bool:
        return self.mask is not None or self.bitmask is not None or self.values is not None

    def integer_codes(self) -> Tensor:
        """The codes ``(out, in)`` uint8, unpacked if :meth:`compact` packed them."""
        if self.codes is not None:
            return self.codes
        return pack.unpack(self.packed, self.bits, self.shape[1]).to(torch.uint8)

    def compact(self) -> None:
        """Hold the codes and the keep-mask packed, as a compressed module stores them: half
        the bytes of uint8 codes at 4 bits, an eighth of a bool mask. An in-memory run holds
        its results so until it makes their modules."""
        if self.codes is not None:
            self.packed, self.codes = pack.pack(self.codes, self.bits), None
        if self.mask is not None:
            self.bitmask, self.mask = pack.pack_bitmask(self.mask), None

    @property
    def quantized(self) -> bool:
        return self.codes is not None or self.packed is not None

    @property
    def static_groups(self) -> bool:
        """True when column k is in group k // group_size (no index needed at inference)."""
        if self.g_idx is None:
            return True
        natural = torch.arange(self.shape[1], device=self.g_idx.device) // self.group_size
        return bool(torch.equal(self.g_idx.long(), natural))

    def dense(self) -> Tensor:
        """The compressed weight as a dense float32 ``(out, in)`` matrix."""
        if self.blocks is not None:
            from ..gguf.grids import BY_VALUE, dequantize_blocks

            return dequantize_blocks(self.blocks.cpu().numpy(), BY_VALUE[self.ggml_type],
                                     self.shape[1]).to(self.blocks.device)
        if self.quantized:
            codes, keep = self.integer_codes(), self.keep()
            if self.static_groups:  # (codes - zero) * scale group by group, in one buffer
                rows, cols = self.shape
                w = codes.reshape(rows, -1, self.group_size).float()
                w.sub_(self.zero.float()[..., None]).mul_(self.scale[..., None])
                w = w.view(rows, cols)
            else:
                g = self.g_idx.long()
                w = grid.dequantize(codes, grid.expand(self.scale, g),
                                    grid.expand(self.zero.float(), g))
            return w if keep is None else w.mul_(keep)
        if self.values is not None:
            return self.values.float()
        raise ValueError("Compressed holds neither codes nor values")

    def sparsity(self) -> float:
        keep = self.keep()
        return 0.0 if keep is None else 1.0 - keep.float().mean().item()
