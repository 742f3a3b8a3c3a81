"""llama.cpp's quantization grids (ggml block types) as plain tensors: fit, round, pack.

A ggml type stores a row in blocks (32 weights, or super-blocks of ``QK_K = 256``), each cut
into groups of 16 or 32 weights that share one step. Every type used by the ``_K_M`` mixes is
an integer grid per group, which is what GPTQ needs: with the group's step ``s`` and offset
``o`` (per group, ``(rows, groups)``), a code ``q`` in ``0 .. 2**bits - 1`` means

* symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K): ``(q - o) * s``, ``o = 2**(bits-1)``;
* affine types (Q5_1, Q4_K, Q5_K): ``q * s + o`` (``o = -dmin * m`` or Q5_1's ``m``),

evaluated in float32 exactly as ggml (and gguf-py) dequantize them, so a weight computed here
is bit for bit the one llama.cpp computes. In the K-quants the step is itself quantized:
``s = d * sc`` with ``d`` a float16 per super-block and ``sc`` a small integer per group (and
the same for the mins), so a :class:`Grid` keeps those integers and :func:`encode` writes the
exact block bytes.

:func:`fit` chooses a grid the way llama-quantize does when it is given an importance matrix
(``quantize_row_q4_K_impl`` and friends in ggml-quants.c: ``make_qkx3_quants`` for the
sub-block steps and mins, ``make_qp_quants`` for their 6-bit codes, ``make_qx_quants`` for the
symmetric types), vectorized over all groups of a weight; the importance of a column is what
``llama-imatrix`` collects, the mean square of that input feature (GPTQ's ``diag H``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

QK_K = 256
_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a group below it is all zero


@dataclass(frozen=True)
class BlockType:
    """One ggml type: ``block`` weights in ``nbytes`` bytes, a step per ``group`` weights."""

    name: str
    value: int  # ggml_type (gguf.GGMLQuantizationType)
    block: int
    group: int
    bits: int
    sym: bool
    nbytes: int

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero(self) -> int:
        """The code of 0 on a symmetric grid."""
        return 2 ** (self.bits - 1)

    @property
    def k_quant(self) -> bool:
        return self.block == QK_K

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.nbytes


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 32, 4, True, 18),
    BlockType("Q5_0", 6, 32, 32, 5, True, 22),
    BlockType("Q5_1", 7, 32, 32, 5, False, 24),
    BlockType("Q8_0", 8, 32, 32, 8, True, 34),
    BlockType("Q3_K", 11, QK_K, 16, 3, True, 110),
    BlockType("Q4_K", 12, QK_K, 32, 4, False, 144),
    BlockType("Q5_K", 13, QK_K, 32, 5, False, 176),
    BlockType("Q6_K", 14, QK_K, 16, 6, True, 210),
)}
BY_VALUE: dict[int, BlockType] = {t.value: t for t in TYPES.values()}


def block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name`` (``"Q4_K"``, case-insensitive)."""
    t = TYPES.get(name.upper())
    if t is None:
        raise ValueError(f"unsupported ggml type {name!r}; supported: {', '.join(TYPES)}")
    return t


@dataclass
class Grid:
    """The parameters of one weight on a ggml type, ``(rows, blocks)`` or ``(rows, groups)``.

    ``d`` is the block's float16 scale (a K-quant's super-block scale); ``m`` the second
    float16 of the affine types (Q5_1's offset, a K-quant's ``dmin``), None otherwise; ``sc``
    and ``mn`` a K-quant's integer step and min per group (Q3_K's step signed, -32..31; Q6_K's
    -128..127), None for 32-blocks."""

    type: BlockType
    d: Tensor
    m: Tensor | None = None
    sc: Tensor | None = None
    mn: Tensor | None = None

    def _per_group(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.type.block // self.type.group, dim=1)

    @property
    def scale(self) -> Tensor:
        """The step of each group, ``(rows, groups)`` float32 (``d * sc`` as ggml computes)."""
        if self.sc is None:
            return self.d
        return self._per_group(self.d) * self.sc.float()

    @property
    def offset(self) -> Tensor:
        """Symmetric types: the code of zero; affine types: the value of code 0."""
        if self.type.sym:
            return torch.full_like(self.d if self.sc is None else self.sc, self.type.zero,
                                   dtype=torch.float32)
        if self.mn is None:
            return self.m  # Q5_1
        return -(self._per_group(self.m) * self.mn.float())


# ============================================================================ rounding


def quantize(x: Tensor, scale: Tensor, offset: Tensor, t: BlockType) -> Tensor:
    """Nearest codes of ``x`` on the grid (any matching shapes; float tensor of integers). A
    group with a zero step takes code 0 (its weights are ``offset``, or 0, whatever the code)."""
    zero_step = scale == 0
    s = torch.where(zero_step, 1.0, scale)
    if t.sym:
        q = torch.round(x / s) + offset
    else:
        q = torch.round((x - offset) / s)
    return torch.where(zero_step, 0.0, q.clamp_(0, t.maxq))


def dequantize(q: Tensor, scale: Tensor, offset: Tensor, t: BlockType) -> Tensor:
    """The weights of codes ``q``, float32, with ggml's own operations and their order."""
    if t.sym:
        return scale * (q.float() - offset)
    return scale * q.float() + offset


def expand(g: Grid, cols: int) -> tuple[Tensor, Tensor]:
    """Step and offset per weight column, ``(rows, cols)`` each."""
    size = g.type.group
    return (g.scale.repeat_interleave(size, dim=1), g.offset.repeat_interleave(size, dim=1))


def quantize_weight(w: Tensor, g: Grid) -> Tensor:
    """Codes ``(rows, cols)`` uint8 of ``w`` rounded to nearest on ``g``."""
    scale, offset = expand(g, w.shape[1])
    return quantize(w.float(), scale, offset, g.type).to(torch.uint8)


def dequantize_weight(codes: Tensor, g: Grid) -> Tensor:
    """The float32 weight ``(rows, cols)`` of ``codes`` on ``g``."""
    scale, offset = expand(g, codes.shape[1])
    return dequantize(codes, scale, offset, g.type)


# ============================================================================ fitting


def _fp16(x: Tensor) -> Tensor:
    """Round to float16 (ggml's GGML_FP32_TO_FP16, round to nearest even); an overflow is an
    error rather than an inf in the file."""
    h = x.half().float()
    if not torch.isfinite(h).all():
        raise ValueError("a ggml block scale overflows float16 (weights beyond ~1e5?)")
    return h


def _make_qx(x: Tensor, nmax: int, qw: Tensor | None) -> tuple[Tensor, Tensor]:
    """ggml's ``make_qx_quants`` (rmse_type 1) per row of ``x``: the symmetric step with the
    least weighted error among 19 trial ranges, and the codes ``l`` in ``-nmax .. nmax-1``."""
    amax, idx = x.abs().max(1)
    zero = amax < _EPS
    mx = torch.where(zero, 1.0, x.gather(1, idx[:, None])[:, 0])
    w = x * x if qw is None else qw

    def trial(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ll = torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return ll, (w * x * ll).sum(1), (w * ll * ll).sum(1)

    ll, sumlx, suml2 = trial(-nmax / mx)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lt, slx, sl2 = trial(-(nmax + 0.1 * step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, slx / torch.where(sl2 > 0, sl2, 1.0), scale)
        best = torch.where(better, scale * slx, best)
        ll = torch.where(better[:, None], lt, ll)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, ll)


def _make_qkx3(x: Tensor, w: Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
               nstep: int = 36) -> tuple[Tensor, Tensor]:
    """ggml's ``make_qkx3_quants`` per row of ``x``: an affine step and min (returned as
    ``-min >= 0``) minimising the ``w``-weighted squared error, searched over ``nstep + 1``
    trial ranges, each refined by a weighted least-squares fit of step and min."""
    mn = x.min(1).values.clamp(max=0)
    mx = x.max(1).values
    flat = mx <= mn
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    iscale = nmax / torch.where(flat, 1.0, mx - mn)
    scale = 1 / iscale
    ll = torch.round(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
    best = (w * (scale[:, None] * ll + mn[:, None] - x).square()).sum(1)
    for step in range(nstep + 1):
        v = (rmin + rdelta * step + nmax) / (mx - mn)
        v = v[:, None] * (x - mn[:, None])
        ll = torch.where(v > 0, torch.round(torch.clamp(v, max=nmax)), 0.0)
        sum_l, sum_l2, sum_xl = (w * ll).sum(1), (w * ll * ll).sum(1), (w * ll * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, 0.0, this_min)
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0),
                                 this_scale)
        mad = (w * (this_scale[:, None] * ll + this_min[:, None] - x).square()).sum(1)
        better = ok & (mad < best)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0.0, scale), -mn


def _make_qp(x: Tensor, nmax: int, qw: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's ``make_qp_quants`` per row of ``x >= 0``: one step for the row and codes
    ``0 .. nmax`` (the 6-bit sub-block steps and mins of Q4_K/Q5_K), by a search of 9 ranges
    then coordinate descent on the codes."""
    mx = x.max(1).values.clamp(min=0)
    zero = mx < _EPS
    mx = torch.where(zero, 1.0, mx)
    iscale = nmax / mx
    ll = torch.round(iscale[:, None] * x)
    best = (qw * (x - (1 / iscale)[:, None] * ll).square()).sum(1)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = (0.1 * step + nmax) / mx
        lt = torch.round(trial[:, None] * x).clamp_(max=nmax)
        mse = (qw * (x - (1 / trial)[:, None] * lt).square()).sum(1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, trial, iscale)
    ll = torch.round(iscale[:, None] * x).clamp_(max=nmax)
    sumlx, suml2 = (qw * x * ll).sum(1), (qw * ll * ll).sum(1)
    for _ in range(5):
        for i in range(x.shape[1]):
            w, xi, li = qw[:, i], x[:, i], ll[:, i]
            slx, sl2 = sumlx - w * xi * li, suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(ok, slx, 1.0)).clamp_(max=nmax)
            slx, sl2 = slx + w * xi * new, sl2 + w * new * new
            accept = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            ll[:, i] = torch.where(accept, new, li)
            sumlx, suml2 = torch.where(accept, slx, sumlx), torch.where(accept, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, ll).clamp_(0, nmax)


def fit(w: Tensor, t: BlockType | str, importance: Tensor | None = None) -> Grid:
    """The grid llama-quantize would choose for ``w`` (rows, cols) on type ``t``, given the
    importance of each input column (``(cols,)``, llama-imatrix's mean square activation;
    None weighs all columns alike)."""
    t = block_type(t) if isinstance(t, str) else t
    w = w.float()
    rows, cols = w.shape
    if cols % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} weights, "
                         f"got {cols}")
    qw = torch.ones_like(w) if importance is None else \
        importance.float().to(w.device).expand(rows, cols)
    if importance is not None and importance.shape != (cols,):
        raise ValueError(f"importance of shape {tuple(importance.shape)} does not fit "
                         f"{cols} columns")
    nb = cols // t.block
    x, q = w.reshape(rows * nb, t.block), qw.reshape(rows * nb, t.block)
    if t.name == "Q8_0":
        return Grid(t, _fp16(x.abs().max(1).values / 127).view(rows, nb))
    if t.name in ("Q4_0", "Q5_0", "Q5_1"):
        sigma2 = (w * w).sum(1, keepdim=True) / cols  # over the whole row, as ggml does
        weight = (qw * torch.sqrt(sigma2 + w * w)).reshape(rows * nb, t.block)
        if t.sym:
            d, _ = _make_qx(x, t.zero, weight)
            return Grid(t, _fp16(d).view(rows, nb))
        d, neg_min = _make_qkx3(x, weight, t.maxq)
        return Grid(t, _fp16(d).view(rows, nb), _fp16(-neg_min).view(rows, nb))
    groups = t.block // t.group
    if t.name == "Q6_K":
        steps, _ = _make_qx(x.reshape(-1, 16), 32, None if importance is None
                            else q.reshape(-1, 16))
        steps = steps.view(-1, groups)
        idx = steps.abs().argmax(1, keepdim=True)
        top = steps.gather(1, idx)[:, 0]
        zero = top.abs() < _EPS
        iscale = -128 / torch.where(zero, 1.0, top)
        d = torch.where(zero, 0.0, _fp16(1 / iscale))
        sc = torch.round(iscale[:, None] * steps).clamp_(-128, 127)
        sc = torch.where(zero[:, None], 0.0, sc)
        return Grid(t, d.view(rows, nb), sc=sc.to(torch.int16).view(rows, nb * groups))
    sigma2 = 2 * (x * x).sum(1, keepdim=True) / QK_K
    if t.name == "Q3_K":
        weight = x * x if importance is None else q * torch.sqrt(sigma2 + x * x)
        weight = weight.reshape(-1, 16)
        steps, _ = _make_qx(x.reshape(-1, 16), 4, weight)
        d, ls = _make_qx(steps.view(-1, groups), 32, weight.sum(1).view(-1, groups))
        return Grid(t, _fp16(d).view(rows, nb), sc=ls.to(torch.int16).view(rows, -1))
    # Q4_K, Q5_K
    weight = (q * torch.sqrt(sigma2 + x * x)).reshape(-1, 32)
    steps, mins = _make_qkx3(x.reshape(-1, 32), weight, t.maxq)
    sw = weight.sum(1).view(-1, groups)
    d, ls = _make_qp(steps.view(-1, groups), 63, sw)
    dmin, lm = _make_qp(mins.view(-1, groups), 63, sw)
    return Grid(t, _fp16(d).view(rows, nb), _fp16(dmin).view(rows, nb),
                ls.to(torch.int16).view(rows, -1), lm.to(torch.int16).view(rows, -1))


# ============================================================================ bytes


def _f16_bytes(x: Tensor) -> np.ndarray:
    return x.reshape(-1, 1).cpu().numpy().astype(np.float16).view(np.uint8)


def _f16(b: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32))[:, 0]


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding eight 6-bit steps and mins (``get_scale_min_k4``)."""
    return np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                           lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                           _nibbles(ls[:, 4:], lm[:, 4:])], axis=1).astype(np.uint8)


def _unpack_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _bits(q: np.ndarray, shift: int) -> np.ndarray:
    """The bit ``shift`` of 32 codes per row, as ggml's 4-byte ``qh`` (little-endian)."""
    return np.packbits((q >> shift) & 1, axis=1, bitorder="little")


def encode(codes: Tensor, g: Grid) -> np.ndarray:
    """The ggml blocks of ``codes`` (rows, cols) on ``g``: uint8 ``(rows, row bytes)``."""
    t = g.type
    rows, cols = codes.shape
    nb = rows * (cols // t.block)
    q = codes.cpu().numpy().astype(np.uint8).reshape(nb, t.block)
    d = _f16_bytes(g.d)
    if t.block == 32:
        if t.name == "Q8_0":
            parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        else:
            qs = _nibbles(q[:, :16], q[:, 16:])
            parts = [d, *([_f16_bytes(g.m)] if t.name == "Q5_1" else []),
                     *([_bits(q, 4)] if t.bits == 5 else []), qs]
        return np.concatenate(parts, axis=1).reshape(rows, -1)
    ngroups = t.block // t.group
    sc = g.sc.reshape(nb, ngroups).cpu().numpy().astype(np.int16)
    if t.name in ("Q4_K", "Q5_K"):
        scales = _pack_k_scales(sc.astype(np.uint8),
                                g.mn.reshape(nb, ngroups).cpu().numpy().astype(np.uint8))
        q4 = q.reshape(nb, 4, 2, 32)
        qs = _nibbles(q4[:, :, 0], q4[:, :, 1]).reshape(nb, 128)
        parts = [d, _f16_bytes(g.m), scales]
        if t.name == "Q5_K":
            hb = (q4 >> 4).reshape(nb, 8, 32)  # bit 2c+h of qh[j]: code 64c + 32h + j
            parts.append(sum(hb[:, i] << i for i in range(8)).astype(np.uint8))
        return np.concatenate([*parts, qs], axis=1).reshape(rows, -1)
    if t.name == "Q6_K":
        q6 = q.reshape(nb, 2, 4, 32)
        ql = np.concatenate([_nibbles(q6[:, :, 0], q6[:, :, 2]),
                             _nibbles(q6[:, :, 1], q6[:, :, 3])], axis=2).reshape(nb, 128)
        qh = sum((q6[:, :, k] >> 4) << (2 * k) for k in range(4)).reshape(nb, 64)
        scales = sc.astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh.astype(np.uint8), scales, d], axis=1).reshape(rows, -1)
    # Q3_K
    q3 = q.reshape(nb, 8, 32)
    hmask = sum(((q3[:, b] >> 2) & 1) << b for b in range(8)).astype(np.uint8)
    low = (q & 3).reshape(nb, 2, 4, 32)
    qs = sum(low[:, :, k] << (2 * k) for k in range(4)).reshape(nb, 64).astype(np.uint8)
    ls = (sc + 32).astype(np.uint8)
    high = sum((ls[:, 4 * k:4 * k + 4] >> 4) << (2 * k) for k in range(4))
    scales = np.concatenate([_nibbles(ls[:, :8], ls[:, 8:]), high], axis=1).astype(np.uint8)
    return np.concatenate([hmask, qs, scales, d], axis=1).reshape(rows, -1)


def decode(raw: np.ndarray, t: BlockType | str, cols: int) -> tuple[Tensor, Grid]:
    """Codes ``(rows, cols)`` uint8 and grid of ggml blocks ``raw`` (rows, row bytes)."""
    t = block_type(t) if isinstance(t, str) else t
    if cols % t.block or raw.ndim != 2 or raw.shape[1] != t.row_bytes(cols):
        raise ValueError(f"{t.name} blocks of shape {raw.shape} do not hold rows of {cols}")
    rows = raw.shape[0]
    per_row = cols // t.block
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows * per_row, t.nbytes)
    nb = b.shape[0]

    def out(q: np.ndarray, grid: Grid) -> tuple[Tensor, Grid]:
        return torch.from_numpy(q.astype(np.uint8).reshape(rows, cols)), grid

    def shaped(x: Tensor) -> Tensor:
        return x.reshape(rows, -1)

    if t.block == 32:
        d = shaped(_f16(b[:, :2]))
        if t.name == "Q8_0":
            return out(b[:, 2:].view(np.int8).astype(np.int16) + 128, Grid(t, d))
        m = shaped(_f16(b[:, 2:4])) if t.name == "Q5_1" else None
        at = 4 if m is not None else 2
        qs = b[:, at + (4 if t.bits == 5 else 0):]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1)
        if t.bits == 5:
            q |= np.unpackbits(b[:, at:at + 4], axis=1, bitorder="little") << 4
        return out(q, Grid(t, d, m))
    if t.name in ("Q4_K", "Q5_K"):
        d, dmin = shaped(_f16(b[:, :2])), shaped(_f16(b[:, 2:4]))
        ls, lm = _unpack_k_scales(b[:, 4:16])
        qs = b[:, -128:].reshape(nb, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # (nb, 4, 2, 32)
        if t.name == "Q5_K":
            qh = b[:, 16:48]
            q |= np.stack([(qh >> i) & 1 for i in range(8)], axis=1).reshape(nb, 4, 2, 32) << 4
        grid = Grid(t, d, dmin, shaped(torch.from_numpy(ls.astype(np.int16))),
                    shaped(torch.from_numpy(lm.astype(np.int16))))
        return out(q, grid)
    if t.name == "Q6_K":
        ql, qh = b[:, :128].reshape(nb, 2, 2, 32), b[:, 128:192].reshape(nb, 2, 32)
        low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4,
                        ql[:, :, 1] >> 4], axis=2)  # (nb, 2, 4, 32)
        high = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=2)
        sc = torch.from_numpy(b[:, 192:208].view(np.int8).astype(np.int16))
        return out(low | (high << 4), Grid(t, shaped(_f16(b[:, 208:])), sc=shaped(sc)))
    # Q3_K
    hmask, qs, s = b[:, :32], b[:, 32:96].reshape(nb, 2, 1, 32), b[:, 96:108]
    low = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    high = np.stack([(hmask >> i) & 1 for i in range(8)], axis=1).reshape(nb, 2, 4, 32)
    ls = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    ls |= np.concatenate([((s[:, 8:] >> (2 * k)) & 3) for k in range(4)], axis=1) << 4
    sc = torch.from_numpy(ls.astype(np.int16) - 32)
    return out(low | (high << 2), Grid(t, shaped(_f16(b[:, 108:])), sc=shaped(sc)))


def dequantize_blocks(raw: np.ndarray, t: BlockType | str, cols: int) -> Tensor:
    """The float32 weight ``(rows, cols)`` that llama.cpp computes from blocks ``raw``."""
    codes, g = decode(raw, t, cols)
    return dequantize_weight(codes, g)
