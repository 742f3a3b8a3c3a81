"""Compressed replacements for ``nn.Linear`` (and Hugging Face ``Conv1D``).

``QuantLinear`` keeps its weight in the canonical compressed-tensors layout (persistent
buffers, what ``state_dict`` and checkpoints hold) and derives a kernel layout for the device
it lives on (non-persistent buffers, rebuilt whenever the module moves or loads a state dict):
on CPU, aten's int4 layout for 2/3/4-bit codes or int8 for per-channel 8-bit; elsewhere the
canonical layout itself. ``SparseLinear`` keeps a dense weight with a keep-mask, so that it
can be fine-tuned with the pattern intact.

Both call exactly one ``torch.ops.fxcompress`` op in ``forward``, and both pickle like any
``nn.Module`` (``torch.save(model)``): a ``QuantLinear`` pickles its canonical buffers only and
rebuilds its kernel layout when unpickled, for the machine that loads it.

**Precision.** aten's CPU int4 kernel computes with bf16 activations and bf16 scales: a
float32 model's logits then differ from the dequantized float32 model's by up to about 1 %
(relative; 0.8 % on SmolLM2-135M). :func:`set_precision` (``"exact"``) makes the int4 layers
compute in the activations' own dtype instead, from the canonical layout (dequantized per
call: slower, and the dequantized model's arithmetic). The choice is an attribute of each
module, not global state, so ``torch.compile`` and ``torch.export`` capture it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms import Compressed
from ..kernels import ops, pack

CPU_INT4_GROUPS = (256, 128, 64, 32)
PRECISIONS = ("fast", "exact")
# kernel layouts derived from the canonical buffers (non-persistent, rebuilt by ``prepare``)
_DERIVED = ("_w_int4", "_scale_zeros", "_perm", "_w_int8", "_scale8", "_offset8",
            "_tw", "_ts", "_tz", "_tperm", "_v24", "_meta24")


def _prepare_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """A ``load_state_dict`` post-hook: the kernel layout follows the loaded buffers. A
    module-level function, not a lambda, so that the module pickles."""
    module.prepare()


def int4pack(codes: Tensor, scale: Tensor, zero: Tensor, groups: Tensor, bits: int,
             kernel_group: int) -> tuple[Tensor, Tensor]:
    """An (N, K) weight in aten's CPU int4 layout, with ``groups`` the group of each column.

    aten's kernel computes ``(c - 8) * scale + bias``. 2- and 3-bit codes are shifted by
    ``8 - zero`` (still < 16) so that the bias term is exactly 0; 4-bit codes keep
    ``bias = (8 - zero) * scale``, rounded to bf16 like the scale."""
    scale, zero = scale.float(), zero.float()
    if bits <= 3:
        codes = codes.to(torch.int32) + (8 - zero[:, groups]).to(torch.int32)
        zero = torch.full_like(zero, 8)
    g = groups[::kernel_group]  # group of each kernel group
    sz = torch.stack([scale[:, g], (8 - zero[:, g]) * scale[:, g]], -1)  # (N, G', 2)
    return (torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
            sz.transpose(0, 1).contiguous().to(torch.bfloat16))


class QuantLinear(nn.Module):
    """A linear layer with 2/3/4/8-bit weights (optionally also pruned: ``weight_bitmask``)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool = False, bias: bool = False, dynamic_groups: bool = False,
                 sparse: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = in_features if group_size == -1 else group_size
        groups = in_features // self.group_size
        self.register_buffer("weight_packed", torch.zeros(
            out_features, pack.packed_width(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(
            out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("weight_zero_point", torch.full(
            (out_features, groups), 2 ** (bits - 1), dtype=torch.uint8, device=device))
        self.register_buffer("weight_g_idx", torch.zeros(
            in_features, dtype=torch.int32, device=device) if dynamic_groups else None)
        self.register_buffer("weight_bitmask", torch.zeros(
            out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device)
            if sparse else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.kernel, self.kernel_group = "canonical", 0
        self.precision = "fast"
        self.register_load_state_dict_post_hook(_prepare_after_load)
        self.prepare()

    @classmethod
    def from_compressed(cls, c: Compressed, bias: Tensor | None = None,
                        dtype: torch.dtype = torch.float32, prepare: bool = True
                        ) -> QuantLinear:
        """The layer computing with ``c``; ``prepare=False`` leaves out the kernel layout
        (the canonical buffers are all a checkpoint stores)."""
        if not c.quantized:
            raise ValueError("QuantLinear needs a quantized Compressed result")
        out_features, in_features = c.shape
        device = c.scale.device
        m = cls(in_features, out_features, c.bits, c.group_size, c.sym, bias is not None,
                dynamic_groups=not c.static_groups, sparse=c.pruned, device="meta",
                dtype=dtype)
        m.weight_packed = c.packed if c.packed is not None else pack.pack(c.codes, c.bits)
        m.weight_scale = c.scale.to(torch.float16)
        m.weight_zero_point = c.zero.to(torch.uint8)
        if m.weight_g_idx is not None:
            m.weight_g_idx = c.g_idx.to(torch.int32)
        if m.weight_bitmask is not None:
            m.weight_bitmask = c.bitmask if c.bitmask is not None else pack.pack_bitmask(c.mask)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
        if prepare:
            m.prepare()
        return m

    def codes(self) -> Tensor:
        """Unpacked integer codes ``(out, in)`` uint8."""
        return pack.unpack(self.weight_packed, self.bits, self.in_features)

    def dequantize(self) -> Tensor:
        """The dense float32 weight this layer computes with (canonical layout)."""
        return ops.dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point,
                              self.weight_g_idx, self.bits, self.group_size, self.in_features)

    # -- kernel layouts ------------------------------------------------------------------

    def _cpu_int4_group(self) -> int | None:
        if self.bits > 4 or self.out_features % 16:
            return None
        return next((g for g in CPU_INT4_GROUPS if self.group_size % g == 0), None)

    def prepare(self) -> None:
        """(Re)build the kernel layout for the device the canonical buffers are on."""
        for name in _DERIVED:
            self.register_buffer(name, None, persistent=False)
        device = self.weight_packed.device
        self.kernel = "canonical"
        if device.type == "cuda":
            self._prepare_triton()
        if device.type != "cpu":
            return
        kg = self._cpu_int4_group() if self.precision == "fast" else None
        if kg is not None:
            self._prepare_int4(kg)
        elif self.bits == 8 and self.group_size == self.in_features and self.weight_g_idx is None:
            self._prepare_int8()

    def _sorted_groups(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Codes with columns ordered by group, the column permutation (None if natural),
        and the group of each reordered column."""
        codes = self.codes()
        natural = torch.arange(self.in_features, device=codes.device) // self.group_size
        if self.weight_g_idx is None:
            return codes, None, natural
        perm = torch.argsort(self.weight_g_idx, stable=True)
        return codes[:, perm], perm, self.weight_g_idx[perm].long()

    def _prepare_int4(self, kg: int) -> None:
        codes, perm, groups = self._sorted_groups()
        self._w_int4, self._scale_zeros = int4pack(codes, self.weight_scale,
                                                   self.weight_zero_point, groups, self.bits, kg)
        self._perm = perm
        self.kernel_group = kg
        self.kernel = "int4pack"

    def _prepare_int8(self) -> None:
        scale = self.weight_scale.float()[:, 0]
        self._w_int8 = (self.codes().to(torch.int16) - 128).to(torch.int8)
        self._scale8 = scale
        offset = (128 - self.weight_zero_point.float()[:, 0]) * scale
        self._offset8 = None if self.sym else offset
        self.kernel = "int8pack"

    def _prepare_triton(self) -> None:
        """The Triton kernels' layouts: 2:4 kept half + positions for 2:4-sparse layers,
        otherwise ``prepare_quant_weight`` (3-bit planes, act-order columns sorted by group).
        Runs on any device (on CPU the ops' reference branches read the same layouts)."""
        from ..kernels import triton_kernels as tk

        k, gs = self.in_features, self.group_size
        if gs % 16 and gs < k:
            return  # the kernels need groups of a multiple of 16 columns: canonical path
        if self.weight_bitmask is not None:
            mask = pack.unpack_bitmask(self.weight_bitmask, k)
            is_24 = k % 4 == 0 and bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
            if is_24 and self.bits != 3 and self.weight_g_idx is None:
                self._v24, self._meta24 = pack.pack_24(self.codes(), mask, self.bits)
                self.kernel = "sparse24"
                return
        try:
            p = tk.prepare_quant_weight(self.weight_packed, self.weight_scale,
                                        self.weight_zero_point, self.bits, k, gs,
                                        self.weight_g_idx)
        except ValueError:
            return
        self._tw, self._ts, self._tz, self._tperm = p.weight, p.scale, p.zero, p.perm
        self.kernel_group = p.group_size
        self.kernel = "triton"

    def __getstate__(self) -> dict:
        """Pickle the canonical buffers only: the kernel layouts are derived, and aten's CPU
        int4 layout depends on the machine that packed it."""
        state = self.__dict__.copy()
        state["_buffers"] = {k: v for k, v in self._buffers.items() if k not in _DERIVED}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.prepare()

    def _apply(self, fn, recurse: bool = True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:  # keep the stored grid exact under .to(dtype)
            self.weight_scale = scale.to(self.weight_scale.device)
        if self.weight_packed.device.type != "meta":
            self.prepare()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        if self.kernel == "int4pack" and x.device.type == "cpu":
            return torch.ops.fxcompress.int4pack_linear(
                x, self._w_int4, self._scale_zeros, self._perm, self.bias, self.kernel_group)
        if self.kernel == "int8pack" and x.device.type == "cpu":
            return torch.ops.fxcompress.int8pack_linear(
                x, self._w_int8, self._scale8, self._offset8, self.bias)
        if self.kernel == "triton":
            return torch.ops.fxcompress.prepared_quant_linear(
                x, self._tw, self._ts, self._tz, self._tperm, self.bias, self.bits,
                self.kernel_group)
        if self.kernel == "sparse24":
            return torch.ops.fxcompress.sparse24_quant_linear(
                x, self._v24, self._meta24, self.weight_scale, self.weight_zero_point, self.bias,
                self.bits, self.group_size)
        return torch.ops.fxcompress.quant_linear(
            x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_g_idx,
            self.bias, self.bits, self.group_size, self.in_features)

    def extra_repr(self) -> str:
        grid = f"g{self.group_size}" if self.group_size != self.in_features else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, {grid}, sym={self.sym}, kernel={self.kernel}"
                + (", sparse" if self.weight_bitmask is not None else "")
                + (f", precision={self.precision}" if self.precision != "fast" else ""))


class SparseLinear(nn.Module):
    """A pruned linear layer: dense ``weight`` (trainable) and a boolean keep-``mask``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype,
                                               device=device))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool,
                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) \
            if bias else None

    @classmethod
    def from_compressed(cls, c: Compressed, bias: Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> SparseLinear:
        if c.values is None:
            raise ValueError("SparseLinear needs a pruned, unquantized Compressed result")
        out_features, in_features = c.shape
        m = cls(in_features, out_features, bias is not None, device="meta", dtype=dtype)
        # values are zero where pruned: a result in the target dtype (an in-memory run's,
        # folded into the original weight) becomes the weight without a copy
        m.weight = nn.Parameter(c.values.to(dtype))
        m.mask = c.keep()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(c.values.device, dtype))
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        return torch.ops.fxcompress.masked_linear(x, self.weight, self.mask, self.bias)

    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity():.2f}")


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Choose how ``model``'s quantized layers compute on CPU, in place; returns ``model``.

    ``"fast"`` (the default): 2/3/4-bit layers whose groups suit aten's int4 kernel run it,
    with activations and scales rounded to bf16: logits up to about 1 % (relative) from the
    dequantized float32 model's (0.8 % on SmolLM2-135M). ``"exact"``: every layer computes in
    the activations' own dtype from its canonical layout (dequantized per call, then
    ``F.linear``), as the dequantized model does — slower, for evaluation and reference runs.
    GPUs' Triton kernels and 8-bit per-channel layers compute in the activations' dtype in
    both modes.

    The setting is an attribute of each ``QuantLinear``: it moves with the module (``.to``,
    pickling) and ``torch.compile``/``torch.export`` capture it; checkpoints do not store it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.precision != precision:
            m.precision = precision
            if m.weight_packed.device.type != "meta":
                m.prepare()
    return model
