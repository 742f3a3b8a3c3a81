"""GPTQ on a llama.cpp grid: the weight llama-quantize would store, with GPTQ's error feedback.

The grid (every block's scales, mins and sub-block codes) is fitted once, before the sweep,
on the weights the sweep starts from (dead columns zeroed; the dense-output target ``W*`` with
a cross moment), by llama.cpp's own search weighted by ``diag H`` — what llama-quantize does
with an importance matrix. Then the columns are rounded onto that fixed grid one at a time in
act-order, each error spread over the later columns (``algorithms.sweep.Sweep``), exactly as
:func:`fxcompress.algorithms.gptq` does for its static groups. The result is the ggml blocks
themselves, so the file llama.cpp reads holds the very weight GPTQ solved for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..algorithms import Compressed, WeightedCross, factor
from ..algorithms.sweep import Sweep
from . import grids
from .grids import BlockType


def gptq_ggml(w: Tensor, h: Tensor, t: BlockType, *, act_order: bool = True,
              damp: float = 0.01, block_size: int = 128, imatrix: bool = True,
              name: str | None = None, cross: Tensor | WeightedCross | None = None
              ) -> Compressed:
    """Quantize ``w`` (out, in) onto ggml type ``t`` given its input Hessian ``h`` (in, in);
    ``imatrix`` weighs the grid's fit by ``diag H`` (llama-imatrix's statistic)."""
    cols = h.shape[0]
    if cols % t.block:
        raise ValueError(f"{t.name} needs in_features that are a multiple of {t.block}, got "
                         f"{cols}" + (f" for layer {name!r}" if name else ""))
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else None
    f = factor(w, h, damp, name, cross, perm)
    rows, dev = f.wt.shape[1], f.wt.device
    start = f.w if perm is None else f.w[:, torch.argsort(perm)]  # original column order
    g = grids.fit(start, t, torch.diagonal(h) if imatrix else None)
    scale, offset = (p.t()[perm] if perm is not None else p.t() for p in grids.expand(g, cols))
    scale, offset = scale.to(f.wt.dtype).contiguous(), offset.to(f.wt.dtype).contiguous()

    sweep = Sweep(f, block_size)
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=dev)
    for j in range(cols):
        wj = sweep.column()
        q = grids.quantize(wj, scale[j], offset[j], t)
        sweep.commit(wj, grids.dequantize(q, scale[j], offset[j], t).to(wj.dtype))
        codes_t[j] = q.to(torch.uint8)
    row_loss, used = sweep.row_loss(), f.damp
    del sweep, f

    codes = torch.empty_like(codes_t.t())
    codes[:, perm if perm is not None else slice(None)] = codes_t.t()
    blocks = torch.from_numpy(grids.encode(codes, g)).to(dev)
    return Compressed(shape=(rows, cols), loss=float(row_loss.sum()), row_loss=row_loss,
                      damp=used, ggml_type=t.value, blocks=blocks)


def rtn_ggml(w: Tensor, t: BlockType, importance: Tensor | None = None) -> Compressed:
    """Round ``w`` to nearest on the grid llama.cpp fits (with ``importance``: as
    llama-quantize with an importance matrix does) — the baseline of :func:`gptq_ggml`."""
    g = grids.fit(w, t, importance)
    codes = grids.quantize_weight(w, g)
    return Compressed(shape=tuple(w.shape), loss=float("nan"), ggml_type=t.value,
                      blocks=torch.from_numpy(grids.encode(codes, g)))
